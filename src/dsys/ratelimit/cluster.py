"""ClusterStore: limits shared by many app instances through ``dsys ratelimit serve`` nodes.

Each key is routed with :class:`dsys.sharding.HashRing` to one limiter node (its
*owner*), which holds the key's bucket and decides with its own clock; so with every
node up, a cluster limit is exactly as accurate as a :class:`~dsys.ratelimit.MemoryStore`
in one process. If the owner is unreachable the store raises ``ConnectError`` /
``RequestTimeout`` and the :class:`~dsys.ratelimit.Limiter`'s failure policy (open or
closed) decides; the store never asks another node, which would hold a fresh bucket.

Token leases
------------

With ``lease_size=n`` (token bucket only), a client does not ask the owner for every
request: it takes up to ``n`` tokens at once and spends them locally, asking again when
they run out or after ``lease_ttl`` seconds, when unspent tokens are dropped. A client
holds at most ``n`` unspent tokens per key at any time (lease requests for one key are
serialized within a client).

**Over-admission bound.** With ``C`` clients (``ClusterStore`` instances) sharing a key
whose bucket allows ``b + r*t`` tokens in any window of length ``t``, the tokens *spent*
in any window of length ``t`` are at most::

    b + r*t + min(C * lease_size, r * lease_ttl)

because a token spent in the window was either granted by the owner inside the window,
or granted earlier and still unspent at its start (at most ``lease_size`` per client),
and no lease is spent more than ``lease_ttl`` after it was requested (so it was granted
within ``lease_ttl`` before the window). **Under-admission**: tokens leased but not
spent before their lease expires (or the client closes) are lost to the limit: at most
``lease_size`` per client per key and lease period; :attr:`ClusterStore.expired_tokens`
counts them.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp

from dsys.clock import Clock
from dsys.codec import decode, encode
from dsys.errors import (
    BadInputError,
    ClosedError,
    ConfigError,
    ConnectError,
    RequestTimeout,
    TransportError,
    UnavailableError,
)
from dsys.ratelimit.core import Decision, Policy, TokenBucket
from dsys.ratelimit.server import CONTENT_TYPE, MAX_KEY_LEN, policy_spec
from dsys.sharding import HashRing


class _Lease:
    __slots__ = ("blocked_need", "blocked_until", "expires", "reset_at", "tokens")

    def __init__(self, tokens: int, expires: float, reset_at: float) -> None:
        self.tokens = tokens  # invariant: 0 <= tokens <= lease_size
        self.expires = expires
        self.reset_at = reset_at
        # After a refusal: the owner cannot have `blocked_need` tokens before this time
        # (clients only ever take tokens), so refuse such requests locally until then.
        self.blocked_until = 0.0
        self.blocked_need = 0


class _KeyLock:
    """Serializes one key's lease requests; ``users`` counts the tasks holding or
    awaiting it, so it is dropped exactly when no task needs it and no lease exists."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


def _wire_key(key: str) -> str:
    """``key`` as nodes accept it: itself, or a digest if it is empty, longer than
    ``MAX_KEY_LEN`` or not encodable (lone surrogates from undecodable header bytes)."""
    if 0 < len(key) <= MAX_KEY_LEN:
        try:
            key.encode("utf-8")
            return key
        except UnicodeEncodeError:
            pass
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _node_url(node: str) -> str:
    if not isinstance(node, str) or not node:
        raise ConfigError(f"node must be 'host:port' or an http:// URL, got {node!r}")
    url = node if node.startswith(("http://", "https://")) else f"http://{node}"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"bad node address {node!r}: port is not valid") from None
    if not parts.hostname or port is None:
        raise ConfigError(f"bad node address {node!r}: use host:port")
    return url.rstrip("/")


class ClusterStore:
    """Route keys with a :class:`~dsys.sharding.HashRing` to ``dsys ratelimit serve`` nodes.

    Args:
        nodes: node addresses (``"127.0.0.1:7401"`` or ``"http://..."``), or a mapping
            of address to ring weight.
        lease_size: tokens taken per lease (0 = no leases; one round trip per decision).
        lease_ttl: seconds a lease may be spent for, counted from its request.
        timeout: seconds per request to a node.
        token: bearer token the nodes require, if any.
        max_leases: most keys with a local lease; the oldest are dropped beyond it.
        clock: times lease expiry (a :class:`~dsys.clock.ManualClock` in tests).

    Any string is a key: one that nodes would refuse (empty, longer than
    :data:`~dsys.ratelimit.server.MAX_KEY_LEN` characters, or holding lone surrogates,
    as undecodable header bytes arrive) is sent as ``"sha256:" + its hex digest``.

    Raises:
        ConfigError: no nodes, bad addresses or numbers.
    """

    algorithms = ("token_bucket", "sliding_window", "fixed_window")

    def __init__(
        self,
        nodes: Sequence[str] | Mapping[str, int],
        *,
        lease_size: int = 0,
        lease_ttl: float = 1.0,
        timeout: float = 1.0,
        token: str | None = None,
        max_leases: int = 10_000,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(nodes, str) or not nodes:
            raise ConfigError("ClusterStore needs a non-empty list of node addresses")
        self._urls = {n: _node_url(n) for n in nodes}
        self.ring = HashRing(dict(nodes) if isinstance(nodes, Mapping) else list(nodes))
        if isinstance(lease_size, bool) or not isinstance(lease_size, int) or lease_size < 0:
            raise ConfigError(f"lease_size must be an integer >= 0, got {lease_size!r}")
        for name, value in (("lease_ttl", lease_ttl), ("timeout", timeout)):
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if isinstance(max_leases, bool) or not isinstance(max_leases, int) or max_leases < 1:
            raise ConfigError(f"max_leases must be a positive integer, got {max_leases!r}")
        self.lease_size = lease_size
        self._now = time.monotonic if clock is None else clock.now
        self.lease_ttl = float(lease_ttl)
        self.timeout = float(timeout)
        self.max_leases = max_leases
        self._headers = {"Content-Type": CONTENT_TYPE}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._leases: dict[tuple[Any, ...], _Lease] = {}
        # invariant: a key is here only while it has a lease or a task uses its lock
        self._locks: dict[tuple[Any, ...], _KeyLock] = {}
        self._specs: dict[int, tuple[Policy, list[object]]] = {}
        self.round_trips = 0
        """Requests sent to nodes so far."""
        self.expired_tokens = 0
        """Leased tokens dropped unspent (expired or evicted)."""

    @classmethod
    def from_url(cls, url: str) -> ClusterStore:
        """``dsys://host:port,host:port?lease=N&ttl=S&timeout=S&token=T`` -> a store.

        Raises:
            ConfigError: a malformed URL.
        """
        if not url.startswith("dsys://"):
            raise ConfigError(f"not a dsys:// URL: {url!r}")
        rest = url[len("dsys://") :]
        hosts, _, query = rest.partition("?")
        nodes = [h for h in hosts.rstrip("/").split(",") if h]
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        unknown = set(params) - {"lease", "ttl", "timeout", "token"}
        if unknown:
            raise ConfigError(f"unknown parameter(s) {sorted(unknown)} in {url!r}")
        try:
            return cls(
                nodes,
                lease_size=int(params.get("lease", "0")),
                lease_ttl=float(params.get("ttl", "1.0")),
                timeout=float(params.get("timeout", "1.0")),
                token=params.get("token"),
            )
        except ValueError as exc:
            raise ConfigError(f"bad parameter in {url!r}: {exc}") from exc

    def owner(self, key: str) -> str:
        """The node address owning ``key``."""
        return str(self.ring.get(key))

    def _spec(self, policy: Policy) -> list[object]:
        entry = self._specs.get(id(policy))
        if entry is None or entry[0] is not policy:
            entry = (policy, policy_spec(policy))
            self._specs[id(policy)] = entry
        return entry[1]

    async def hit(self, policy: Policy, key: str, cost: int) -> Decision:
        """Decide one request (cost already validated), through a lease when enabled.

        Raises:
            ConnectError, RequestTimeout, UnavailableError: the owner node failed.
            BadInputError: the node refused the request as malformed.
        """
        if not (0 < len(key) <= MAX_KEY_LEN and key.isascii()):
            key = _wire_key(key)
        if self.lease_size and isinstance(policy, TokenBucket):
            return await self._hit_leased(policy, key, cost)
        decision, _ = await self._call(policy, key, cost, None)
        return decision

    def leased_tokens(self) -> int:
        """Unspent tokens currently held in unexpired leases."""
        now = self._now()
        return sum(x.tokens for x in self._leases.values() if x.expires > now)

    async def _hit_leased(self, policy: TokenBucket, key: str, cost: int) -> Decision:
        lk = (id(policy), key)
        lease = self._leases.get(lk)
        now = self._now()
        if lease is not None:
            if lease.tokens >= cost and lease.expires > now:
                lease.tokens -= cost
                return Decision(True, lease.tokens, 0.0, max(0.0, lease.reset_at - now))
            if now < lease.blocked_until and cost - lease.tokens >= lease.blocked_need:
                wait = lease.blocked_until - now
                return Decision(False, lease.tokens, wait, max(wait, lease.reset_at - now))
        key_lock = self._locks.get(lk)
        if key_lock is None:
            key_lock = self._locks[lk] = _KeyLock()
        key_lock.users += 1
        try:
            return await self._lease_locked(policy, key, cost, lk, key_lock.lock)
        finally:
            key_lock.users -= 1
            if not key_lock.users and lk not in self._leases and self._locks.get(lk) is key_lock:
                del self._locks[lk]  # e.g. the request failed: keep no state for the key

    async def _lease_locked(
        self,
        policy: TokenBucket,
        key: str,
        cost: int,
        lk: tuple[Any, ...],
        lock: asyncio.Lock,
    ) -> Decision:
        async with lock:
            now = self._now()
            lease = self._leases.get(lk)
            leftover = 0
            if lease is not None:
                if lease.expires > now:
                    leftover = lease.tokens
                    if leftover >= cost:  # another task refilled it meanwhile
                        lease.tokens -= cost
                        return Decision(True, lease.tokens, 0.0, max(0.0, lease.reset_at - now))
                else:
                    self.expired_tokens += lease.tokens
                    lease.tokens = 0
            need = cost - leftover
            most = min(max(need, self.lease_size - leftover), policy.burst)
            sent = self._now()
            decision, granted = await self._call(policy, key, cost, (need, most))
            done = self._now()
            if lease is None:
                if len(self._leases) >= self.max_leases:
                    self._drop_leases(done)
                lease = self._leases[lk] = _Lease(leftover, sent + self.lease_ttl, 0.0)
            lease.reset_at = done + decision.reset
            if not decision.allowed:
                # The decision was made after `sent`: sent + retry_after is never late.
                lease.blocked_until = sent + decision.retry_after
                lease.blocked_need = need
                return Decision(False, leftover, decision.retry_after, decision.reset)
            lease.tokens = leftover + granted - cost
            lease.expires = sent + self.lease_ttl
            lease.blocked_until = 0.0
            return Decision(True, lease.tokens, 0.0, decision.reset)

    def _drop_leases(self, now: float) -> None:
        # Expired leases first; then the oldest half (their tokens are lost, counted).
        # A key whose lock is in use keeps its lease (and lock): the user ends it.
        locks = self._locks
        for lk, lease in list(self._leases.items()):
            if lease.expires <= now and not locks[lk].users:
                self.expired_tokens += lease.tokens
                del self._leases[lk]
                del locks[lk]
        if len(self._leases) >= self.max_leases:
            for lk in list(self._leases)[: len(self._leases) // 2]:
                if not locks[lk].users:
                    self.expired_tokens += self._leases.pop(lk).tokens
                    del locks[lk]

    async def _call(
        self, policy: Policy, key: str, cost: int, lease: tuple[int, int] | None
    ) -> tuple[Decision, int]:
        if self._closed:
            raise ClosedError("ClusterStore is closed")
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        node = self.owner(key)
        url = self._urls[node] + "/v1/hit"
        body: dict[str, object] = {"key": key, "cost": cost, "policy": self._spec(policy)}
        if lease is not None:
            body["lease"] = list(lease)
        self.round_trips += 1
        try:
            async with session.post(url, data=encode(body), headers=self._headers) as resp:
                status = resp.status
                raw = await resp.read()
        except TimeoutError as exc:
            raise RequestTimeout(f"limiter node {node} did not answer in {self.timeout}s") from exc
        except aiohttp.ClientConnectionError as exc:
            raise ConnectError(f"limiter node {node}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"limiter node {node}: {exc}") from exc
        if status != 200:
            message = raw.decode("utf-8", "replace")[:500]
            if status == 401:
                raise ConfigError(f"limiter node {node} refused our token: {message}")
            if 400 <= status < 500:
                raise BadInputError(f"limiter node {node} refused the request: {message}")
            raise UnavailableError(f"limiter node {node} answered {status}: {message}")
        try:
            data = decode(raw, max_size=64 * 1024)
            d = Decision(
                bool(data["allowed"]),
                int(data["remaining"]),
                float(data["retry_after"]),
                float(data["reset"]),
            )
            granted = int(data["granted"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TransportError(f"limiter node {node} sent a malformed answer: {exc}") from exc
        return d, granted

    async def close(self) -> None:
        """Close the HTTP session; unspent leased tokens are lost (counted)."""
        self._closed = True
        self.expired_tokens += sum(x.tokens for x in self._leases.values())
        self._leases.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ClusterStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


__all__ = ["ClusterStore"]
