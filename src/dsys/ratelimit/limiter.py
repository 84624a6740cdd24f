"""The :class:`Limiter` and the in-process :class:`MemoryStore`.

A :class:`Limiter` is one named limit (a policy from :mod:`dsys.ratelimit.core`) applied
per key through a store:

* :class:`MemoryStore` keeps state in this process (default; bounded memory);
* :class:`~dsys.ratelimit.cluster.ClusterStore` routes keys to ``dsys ratelimit serve``
  nodes with :class:`dsys.sharding.HashRing`;
* :class:`~dsys.ratelimit.redis_store.RedisStore` runs one atomic Lua script per decision.

Example::

    limiter = Limiter(rate=100, per=1.0, burst=100, store=MemoryStore())
    decision = await limiter.hit("client-42")          # any store
    decision = limiter.hit_sync("client-42")           # MemoryStore only, no coroutine
    async with limiter.acquire("client-42"):           # waits (bounded) or raises
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Literal, ParamSpec, Protocol, TypeVar, runtime_checkable

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from dsys.clock import Clock, MonotonicClock
from dsys.errors import (
    BadInputError,
    ConfigError,
    RateLimitedError,
    TransportError,
    UnavailableError,
)
from dsys.observability import Metrics, get_logger
from dsys.ratelimit.core import (
    Decision,
    FixedWindow,
    Policy,
    SlidingWindow,
    Table,
    TokenBucket,
    check_cost,
)

P = ParamSpec("P")
R = TypeVar("R")

Algorithm = Literal["token_bucket", "sliding_window", "fixed_window"]
FailurePolicy = Literal["open", "closed"]


@runtime_checkable
class Store(Protocol):
    """Where a limiter keeps its per-key state. Stores raise ``TransportError`` or
    ``UnavailableError`` when they cannot decide; the :class:`Limiter` applies its
    failure policy then."""

    async def hit(self, policy: Policy, key: str, cost: int) -> Decision:
        """Decide one request of ``cost`` (already validated) for ``key`` under ``policy``."""
        ...

    async def close(self) -> None:
        """Release connections; the store cannot be used afterwards."""
        ...


class MemoryStore:
    """In-process state for any number of limiters; bounded memory.

    Each policy gets its own table of at most ``max_keys`` keys. Idle keys (a full bucket
    again, or windows that no longer count) are dropped when the table fills, at no cost
    in accuracy; see :mod:`dsys.ratelimit.core` for what happens beyond that.

    Args:
        max_keys: most keys kept per policy.
        clock: time source (a :class:`~dsys.clock.ManualClock` in tests).
    """

    def __init__(self, *, max_keys: int = 100_000, clock: Clock | None = None) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigError(f"max_keys must be a positive integer, got {max_keys!r}")
        self.max_keys = max_keys
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        # time.monotonic itself for the default clock: one Python frame less per decision.
        self._now: Callable[[], float] = (
            time.monotonic if type(self.clock) is MonotonicClock else self.clock.now
        )
        self._tables: dict[int, tuple[Policy, Table]] = {}

    def table(self, policy: Policy) -> Table:
        """The table holding ``policy``'s keys (created on first use)."""
        entry = self._tables.get(id(policy))
        if entry is None or entry[0] is not policy:
            entry = (policy, policy.new_table(self.max_keys, self._now))
            self._tables[id(policy)] = entry
        return entry[1]

    def hit_sync(self, policy: Policy, key: str, cost: int = 1) -> Decision:
        """Decide synchronously (cost already validated)."""
        return self.table(policy).hit(key, self._now(), cost)

    async def hit(self, policy: Policy, key: str, cost: int) -> Decision:
        """Decide one request (the async face of :meth:`hit_sync`)."""
        return self.table(policy).hit(key, self._now(), cost)

    def __len__(self) -> int:
        return sum(len(t) for _, t in self._tables.values())

    async def close(self) -> None:
        """Forget every key."""
        self._tables.clear()

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _LimiterCollector(Collector):
    """Exposes the plain-int counters of every limiter attached to one registry.

    The hot path only increments ints; Prometheus reads them at scrape time.
    """

    def __init__(self) -> None:
        self.limiters: weakref.WeakSet[Limiter] = weakref.WeakSet()

    def collect(self) -> Iterator[CounterMetricFamily]:
        allowed = CounterMetricFamily(
            "dsys_ratelimit_allowed", "Requests allowed, by limit", labels=["limit"]
        )
        denied = CounterMetricFamily(
            "dsys_ratelimit_denied", "Requests refused, by limit", labels=["limit"]
        )
        errors = CounterMetricFamily(
            "dsys_ratelimit_store_errors",
            "Decisions the store could not make (failure policy applied), by limit",
            labels=["limit"],
        )
        totals: dict[str, list[int]] = {}
        for lim in list(self.limiters):
            t = totals.setdefault(lim.name, [0, 0, 0])
            t[0] += lim.allowed_count
            t[1] += lim.denied_count
            t[2] += lim.store_errors
        for name, (a, d, e) in sorted(totals.items()):
            allowed.add_metric([name], a)
            denied.add_metric([name], d)
            errors.add_metric([name], e)
        yield allowed
        yield denied
        yield errors


_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, _LimiterCollector] = (
    weakref.WeakKeyDictionary()
)


def _attach(metrics: Metrics, limiter: Limiter) -> None:
    collector = _COLLECTORS.get(metrics.registry)
    if collector is None:
        collector = _LimiterCollector()
        metrics.registry.register(collector)
        _COLLECTORS[metrics.registry] = collector
    collector.limiters.add(limiter)


def make_policy(
    algorithm: str, rate: float, per: float, burst: int | None
) -> TokenBucket | SlidingWindow | FixedWindow:
    """Build the core policy for a :class:`Limiter`'s arguments.

    Raises:
        ConfigError: unknown algorithm or bad numbers.
    """
    if algorithm == "token_bucket":
        return TokenBucket(rate=rate, per=per, burst=burst)
    if algorithm in ("sliding_window", "fixed_window"):
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate != int(rate):
            raise ConfigError(
                f"{algorithm} needs an integer rate (requests per window), got {rate!r}"
            )
        if burst is not None and burst != rate:
            raise ConfigError(f"{algorithm} has no burst separate from its rate; omit burst")
        cls = SlidingWindow if algorithm == "sliding_window" else FixedWindow
        return cls(limit=int(rate), window=per)
    raise ConfigError(
        f"unknown algorithm {algorithm!r}; use token_bucket, sliding_window or fixed_window"
    )


class Limiter:
    """One named rate limit applied per key: ``rate`` tokens per ``per`` seconds.

    Args:
        rate: tokens per ``per`` seconds (for the window algorithms: requests per window).
        per: the period in seconds.
        burst: token-bucket capacity (default ``ceil(rate)``); not used by the windows.
        store: where state lives; a new :class:`MemoryStore` by default.
        algorithm: ``"token_bucket"`` (GCRA, default), ``"sliding_window"`` or
            ``"fixed_window"``.
        name: the limit's name in metrics and logs.
        on_store_error: ``"open"`` allows and ``"closed"`` refuses a request when the
            store fails (raises ``TransportError``/``UnavailableError``); each such
            decision increments ``dsys_ratelimit_store_errors_total``.
        failure_retry_after: ``retry_after`` of a fail-closed refusal, in seconds.
        max_wait: default longest wait of :meth:`acquire`, :meth:`wait` and
            :meth:`limit_calls`, in seconds.
        metrics: a :class:`~dsys.observability.Metrics` to report into (shared by many
            limiters); a new one by default (see :attr:`metrics`).

    Raises:
        ConfigError: bad numbers, unknown algorithm or failure policy.
    """

    def __init__(
        self,
        rate: float,
        per: float = 1.0,
        burst: int | None = None,
        *,
        store: Store | MemoryStore | None = None,
        algorithm: Algorithm = "token_bucket",
        name: str = "default",
        on_store_error: FailurePolicy = "open",
        failure_retry_after: float = 1.0,
        max_wait: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.policy: Policy = make_policy(algorithm, rate, per, burst)
        if on_store_error not in ("open", "closed"):
            raise ConfigError(f"on_store_error must be 'open' or 'closed', got {on_store_error!r}")
        for label, value in (("failure_retry_after", failure_retry_after), ("max_wait", max_wait)):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{label} must be a finite number >= 0, got {value!r}")
        if on_store_error == "closed" and failure_retry_after == 0:
            # wait()/acquire() would retry a dead store in a tight loop.
            raise ConfigError("failure_retry_after must be > 0 when on_store_error='closed'")
        if not isinstance(name, str) or not name:
            raise ConfigError("name must be a non-empty string")
        self.store: Store | MemoryStore = store if store is not None else MemoryStore()
        if not isinstance(self.store, MemoryStore | Store):
            raise ConfigError(f"store must be a dsys rate-limit store, got {type(store).__name__}")
        supported = getattr(self.store, "algorithms", None)
        if supported is not None and self.policy.kind not in supported:
            raise ConfigError(
                f"{type(self.store).__name__} supports {', '.join(supported)}, "
                f"not {self.policy.kind}"
            )
        self.name = name
        self.on_store_error: FailurePolicy = on_store_error
        self.failure_retry_after = float(failure_retry_after)
        self.max_wait = float(max_wait)
        self._allowed = 0
        self._denied = 0
        self.store_errors = 0
        self._log = get_logger("ratelimit", limit=name)
        self._table: Table | None = None
        if isinstance(self.store, MemoryStore):
            self._table = self.store.table(self.policy)
            self._table.on_refuse = self._log_refusal
            # The hot path: the table's own method, one Python frame per decision.
            self.hit_sync = self._table.hit_now  # type: ignore[method-assign]
        self.metrics = metrics if metrics is not None else Metrics("ratelimit")
        _attach(self.metrics, self)

    @property
    def allowed_count(self) -> int:
        """Requests this limiter allowed so far."""
        return self._allowed + (self._table.allowed if self._table is not None else 0)

    @property
    def denied_count(self) -> int:
        """Requests this limiter refused so far."""
        return self._denied + (self._table.denied if self._table is not None else 0)

    def _log_refusal(self, key: str, cost: int, d: Decision) -> None:
        self._log.debug("rate_limited", key=key, cost=cost, retry_after=round(d.retry_after, 6))

    @property
    def limit(self) -> int:
        """The burst (token bucket) or the per-window limit: the largest admissible cost."""
        return self.policy.limit

    def hit_sync(self, key: str, cost: int = 1) -> Decision:
        """Decide one request synchronously; only with a :class:`MemoryStore`.

        The hot path: no coroutine, one table lookup, one :class:`Decision`.

        Raises:
            BadInputError: ``cost`` is not an integer in ``1..limit``.
            ConfigError: the store is not a :class:`MemoryStore`.
        """
        # With a MemoryStore, __init__ replaced this method by the table's hit_now.
        raise ConfigError(
            f"hit_sync needs a MemoryStore; this limiter uses {type(self.store).__name__} "
            "(use `await limiter.hit(...)`)"
        )

    async def hit(self, key: str, cost: int = 1) -> Decision:
        """Decide one request of ``cost`` tokens for ``key``.

        Store failures are not raised: the failure policy decides (see the class docs).

        Raises:
            BadInputError: ``cost`` is not an integer in ``1..limit``, or the key is not
                a string.
        """
        if self._table is not None:
            return self._table.hit_now(key, cost)
        if cost != 1:
            check_cost(cost, self.policy.limit)
        if not isinstance(key, str):
            raise BadInputError(f"key must be a string, got {type(key).__name__}")
        try:
            d = await self.store.hit(self.policy, key, cost)
        except (TransportError, UnavailableError) as exc:
            self.store_errors += 1
            self._log.warning(
                "store_failed",
                key=key,
                policy=self.on_store_error,
                error=f"{type(exc).__name__}: {exc}",
            )
            if self.on_store_error == "open":
                d = Decision(True, 0, 0.0, 0.0)
            else:
                r = self.failure_retry_after
                d = Decision(False, 0, r, r)
        if d.allowed:
            self._allowed += 1
        else:
            self._denied += 1
            self._log_refusal(key, cost, d)
        return d

    async def wait(self, key: str, cost: int = 1, *, max_wait: float | None = None) -> Decision:
        """Wait until ``key`` may spend ``cost`` tokens, at most ``max_wait`` seconds.

        Returns:
            The allowing decision.

        Raises:
            RateLimitedError: the request would not pass within ``max_wait`` (raised at
                once, without sleeping, when the first ``retry_after`` is already too long).
        """
        budget = self.max_wait if max_wait is None else max_wait
        if not math.isfinite(budget) or budget < 0:
            raise BadInputError(f"max_wait must be a finite number >= 0, got {budget!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        for _ in range(10_000):  # bounded: each round either passes, raises or sleeps
            d = await self.hit(key, cost)
            if d.allowed:
                return d
            left = deadline - loop.time()
            if d.retry_after > left:
                raise RateLimitedError(
                    f"rate limit {self.name!r} for {key!r}: retry in {d.retry_after:.3f}s",
                    retry_after=d.retry_after,
                )
            await asyncio.sleep(d.retry_after)
        raise RateLimitedError(f"rate limit {self.name!r} for {key!r}: too many retries")

    @contextlib.asynccontextmanager
    async def acquire(
        self, key: str, cost: int = 1, *, max_wait: float | None = None
    ) -> AsyncIterator[Decision]:
        """``async with limiter.acquire(key):`` waits (bounded) for ``cost`` tokens or raises.

        Raises:
            RateLimitedError: not within ``max_wait`` (default: the limiter's ``max_wait``).
        """
        yield await self.wait(key, cost, max_wait=max_wait)

    def limit_calls(
        self,
        key: str | Callable[..., str],
        *,
        cost: int = 1,
        max_wait: float | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
        """Decorator: each call of the async function first waits for ``cost`` tokens.

        Args:
            key: a fixed key, or a function of the call's arguments returning the key.
            cost: tokens per call.
            max_wait: longest wait before raising ``RateLimitedError``.
        """

        def deco(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                k = key if isinstance(key, str) else key(*args, **kwargs)
                await self.wait(k, cost, max_wait=max_wait)
                return await fn(*args, **kwargs)

            return wrapper

        return deco

    async def close(self) -> None:
        """Close the store."""
        await self.store.close()

    async def __aenter__(self) -> Limiter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        store = type(self.store).__name__
        return f"Limiter(name={self.name!r}, policy={self.policy!r}, store={store})"


def store_from_url(url: str) -> Store | MemoryStore:
    """Build a store from a URL.

    * ``memory://`` -> :class:`MemoryStore`;
    * ``redis://host:port/db`` (also ``rediss://``, ``unix://``) ->
      :class:`~dsys.ratelimit.redis_store.RedisStore`;
    * ``dsys://host:port,host:port[?lease=N&ttl=S&token=T]`` ->
      :class:`~dsys.ratelimit.cluster.ClusterStore` over ``dsys ratelimit serve`` nodes.

    Raises:
        ConfigError: an unknown scheme or a malformed URL.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"not a store URL: {url!r} (use memory://, redis://... or dsys://...)")
    scheme = url.partition("://")[0]
    if scheme == "memory":
        return MemoryStore()
    if scheme in ("redis", "rediss", "unix"):
        from dsys.ratelimit.redis_store import RedisStore

        return RedisStore(url)
    if scheme == "dsys":
        from dsys.ratelimit.cluster import ClusterStore

        return ClusterStore.from_url(url)
    raise ConfigError(
        f"unknown store URL scheme {scheme!r} in {url!r}; use memory://, redis:// or dsys://"
    )


__all__ = [
    "Algorithm",
    "FailurePolicy",
    "Limiter",
    "MemoryStore",
    "Store",
    "make_policy",
    "store_from_url",
]
