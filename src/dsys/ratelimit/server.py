"""The limiter node behind ``dsys ratelimit serve``: buckets for the keys it owns.

Clients (:class:`~dsys.ratelimit.cluster.ClusterStore`) route each key with
:class:`dsys.sharding.HashRing` to one node, so a key's state lives in exactly one place
and every decision about it is made there, with that node's clock.

Wire protocol: msgpack over HTTP.

``POST /v1/hit`` with a msgpack map::

    {"key": str, "cost": int, "policy": [kind, *params], "lease": [need, most]?}

where ``policy`` is ``["token_bucket", rate, per, burst]``, ``["sliding_window", limit,
window]`` or ``["fixed_window", limit, window]``. Without ``lease`` the node decides one
request of ``cost``. With ``lease`` (token bucket only) it grants between ``need`` and
``most`` tokens at once, as many as the bucket holds (see
:meth:`~dsys.ratelimit.core.TokenBucketTable.take`). The answer is a msgpack map::

    {"allowed": bool, "remaining": int, "retry_after": float, "reset": float, "granted": int}

Bad input gets a 400 JSON body saying what was wrong; a missing or wrong token (when the
node has one) a 401. Bodies are bounded (``max_body``), keys to ``MAX_KEY_LEN``
characters and the number of distinct policies to ``max_policies``. ``GET /healthz``
and ``GET /metrics`` come from :mod:`dsys.observability`.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dsys.clock import Clock, MonotonicClock
from dsys.codec import decode, encode
from dsys.errors import BadInputError, ConfigError
from dsys.observability import (
    Metrics,
    add_observability_routes,
    error_middleware,
    get_logger,
    json_error,
)
from dsys.ratelimit.core import (
    FixedWindow,
    Policy,
    SlidingWindow,
    Table,
    TokenBucket,
    TokenBucketTable,
    check_cost,
)

MAX_KEY_LEN = 1024
"""Longest key a node accepts, in characters."""

CONTENT_TYPE = "application/msgpack"

PolicySpec = tuple[Any, ...]


def policy_spec(policy: Policy) -> list[object]:
    """The wire form of a policy (see the module docstring)."""
    if isinstance(policy, TokenBucket):
        return ["token_bucket", policy.rate, policy.per, policy.burst]
    return [policy.kind, policy.limit, policy.window]


def parse_policy(spec: object) -> Policy:
    """Build a policy from its wire form.

    Raises:
        BadInputError: an unknown kind or bad numbers.
    """
    if not isinstance(spec, list) or not spec or not isinstance(spec[0], str):
        raise BadInputError("policy must be a list [kind, *params]")
    kind, params = spec[0], spec[1:]
    try:
        if kind == "token_bucket" and len(params) == 3:
            return TokenBucket(rate=params[0], per=params[1], burst=params[2])
        if kind == "sliding_window" and len(params) == 2:
            return SlidingWindow(limit=params[0], window=params[1])
        if kind == "fixed_window" and len(params) == 2:
            return FixedWindow(limit=params[0], window=params[1])
    except ConfigError as exc:
        raise BadInputError(f"bad policy {spec!r}: {exc}") from exc
    raise BadInputError(f"unknown policy {spec!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """Configuration of one limiter node.

    Attributes:
        max_keys: most keys kept per policy (idle keys are dropped first).
        max_policies: most distinct policies a node holds tables for.
        max_body: largest request body in bytes.
        token: when set, requests must carry ``Authorization: Bearer <token>``.
    """

    max_keys: int = 1_000_000
    max_policies: int = 1024
    max_body: int = 64 * 1024
    token: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_keys", "max_policies", "max_body"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.token is not None and not self.token:
            raise ConfigError("token must be non-empty when given")


class LimiterServer:
    """One limiter node: tables per policy, an aiohttp app, metrics.

    Args:
        config: limits and the optional token.
        clock: the node's clock (decisions use it; clients never send time).
    """

    def __init__(self, config: ServerConfig | None = None, *, clock: Clock | None = None) -> None:
        self.config = config or ServerConfig()
        self._clock = clock or MonotonicClock()
        self._tables: dict[PolicySpec, Table] = {}
        self.metrics = Metrics("ratelimit_server")
        self._decisions = self.metrics.counter(
            "decisions_total", "Decisions made by this node", ["result"]
        )
        self._granted = self.metrics.counter(
            "lease_tokens_granted_total", "Tokens handed out in leases"
        )
        self._bad = self.metrics.counter("bad_requests_total", "Requests refused as bad input")
        self._keys = self.metrics.gauge("keys", "Keys holding state on this node")
        self._keys.set_function(lambda: sum(len(t) for t in self._tables.values()))
        self._log = get_logger("ratelimit.server")

    def _table(self, spec: object) -> Table:
        if not isinstance(spec, list):
            raise BadInputError("policy must be a list [kind, *params]")
        key = tuple(spec)
        try:
            table = self._tables.get(key)
        except TypeError:  # unhashable parameters (lists, maps): not numbers anyway
            raise BadInputError(f"bad policy {spec!r}: parameters must be numbers") from None
        if table is None:
            policy = parse_policy(spec)
            if len(self._tables) >= self.config.max_policies:
                raise BadInputError(
                    f"this node already holds {self.config.max_policies} distinct policies"
                )
            table = policy.new_table(self.config.max_keys)
            self._tables[key] = table
        return table

    def decide(self, body: object) -> dict[str, object]:
        """Decide one decoded request (see the module docstring).

        Raises:
            BadInputError: the request is malformed.
        """
        if not isinstance(body, dict):
            raise BadInputError("request must be a msgpack map")
        unknown = set(body) - {"key", "cost", "policy", "lease"}
        if unknown:
            raise BadInputError(f"unknown field(s) {sorted(map(str, unknown))}")
        key = body.get("key")
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN:
            raise BadInputError(f"key must be a string of 1..{MAX_KEY_LEN} characters")
        table = self._table(body.get("policy"))
        cost = check_cost(body.get("cost", 1), table.limit)
        now = self._clock.now()
        lease = body.get("lease")
        if lease is None:
            d = table.hit(key, now, cost)
            granted = cost if d.allowed else 0
        else:
            if not isinstance(table, TokenBucketTable):
                raise BadInputError("leases need a token_bucket policy")
            if (
                not isinstance(lease, list)
                or len(lease) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lease)
                or not 1 <= lease[0] <= lease[1] <= table.limit
            ):
                raise BadInputError("lease must be [need, most] with 1 <= need <= most <= burst")
            granted, d = table.take(key, now, lease[0], lease[1])
            if granted:
                self._granted.inc(granted)
        self._decisions.labels("allowed" if d.allowed else "denied").inc()
        return {
            "allowed": d.allowed,
            "remaining": d.remaining,
            "retry_after": d.retry_after,
            "reset": d.reset,
            "granted": granted,
        }

    async def _handle_hit(self, request: web.Request) -> web.StreamResponse:
        if self.config.token is not None:
            auth = request.headers.get("Authorization", "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.config.token}".encode()):
                return json_error(401, "unauthorized", "missing or wrong bearer token")
        raw = await request.read()
        try:
            result = self.decide(decode(raw, max_size=self.config.max_body))
        except BadInputError:
            self._bad.inc()
            raise
        return web.Response(body=encode(result), content_type=CONTENT_TYPE)

    async def _health(self) -> dict[str, object]:
        return {"policies": len(self._tables)}

    def app(self) -> web.Application:
        """The aiohttp application serving ``/v1/hit``, ``/healthz`` and ``/metrics``."""
        app = web.Application(
            client_max_size=self.config.max_body,
            middlewares=[_body_limit(self.config.max_body), error_middleware],
        )
        app.router.add_post("/v1/hit", self._handle_hit)
        add_observability_routes(app, self.metrics, self._health)
        return app


def _body_limit(max_body: int) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware answering an oversized body with a 413 JSON error that says so."""

    @web.middleware
    async def body_limit(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return json_error(
                413, "too_large", f"request body exceeds the limit of {max_body} bytes"
            )

    return body_limit


__all__ = [
    "MAX_KEY_LEN",
    "LimiterServer",
    "ServerConfig",
    "parse_policy",
    "policy_spec",
]
