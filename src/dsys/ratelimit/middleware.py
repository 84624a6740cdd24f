"""aiohttp middleware: rate-limit requests by client IP, header, route or your own function.

Headers (one convention, on allowed *and* refused responses) follow the IETF httpapi
draft's original three-field form, the one most clients and gateways read::

    RateLimit-Limit: 100        # the burst: most requests that may pass at once
    RateLimit-Remaining: 42     # requests that would pass right now
    RateLimit-Reset: 1          # seconds (rounded up) until the limit is fully restored

A refused request gets ``429 Too Many Requests`` with ``Retry-After`` (whole seconds,
rounded up, at least 1) and a JSON body ``{"error": "rate_limited", "message": ...,
"retry_after": <float seconds>}``.

Example::

    limiter = Limiter(rate=100, per=1.0, burst=100)
    app = web.Application(middlewares=[ratelimit_middleware(limiter, key=by_ip)])
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Middleware

from dsys.errors import BadInputError, ConfigError
from dsys.ratelimit.core import Decision, check_cost
from dsys.ratelimit.limiter import Limiter

KeyFunc = Callable[[web.Request], "str | Awaitable[str | None] | None"]
"""Maps a request to its rate-limit key; ``None`` lets the request through unlimited."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def by_ip(request: web.Request) -> str:
    """Key by the client's address (``request.remote``; behind a proxy see ``by_header``)."""
    return f"ip:{request.remote or 'unknown'}"


def by_header(name: str) -> KeyFunc:
    """Key by a request header (e.g. an API key); requests without it share one bucket."""

    def key(request: web.Request) -> str:
        return f"h:{name}:{request.headers.get(name, '')}"

    return key


def by_route(request: web.Request) -> str:
    """One bucket per route (its canonical path, e.g. ``/users/{id}``) for all clients."""
    info = request.match_info.route.resource
    canonical = info.canonical if info is not None else request.path
    return f"route:{request.method}:{canonical}"


def _resolve_key(key: str | KeyFunc) -> KeyFunc:
    if callable(key):
        return key
    if key == "ip":
        return by_ip
    if key == "route":
        return by_route
    if isinstance(key, str) and key.startswith("header:") and len(key) > len("header:"):
        return by_header(key[len("header:") :])
    raise ConfigError(f"unknown key {key!r}; use 'ip', 'route', 'header:NAME' or a function")


def rate_limit_headers(limiter: Limiter, d: Decision) -> dict[str, str]:
    """The ``RateLimit-*`` headers (and ``Retry-After`` when refused) for a decision."""
    headers = {
        "RateLimit-Limit": str(limiter.limit),
        "RateLimit-Remaining": str(max(0, d.remaining)),
        "RateLimit-Reset": str(math.ceil(max(0.0, d.reset))),
    }
    if not d.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(d.retry_after)))
    return headers


def ratelimit_middleware(
    limiter: Limiter,
    *,
    key: str | KeyFunc = "ip",
    cost: int = 1,
    exempt: Collection[str] = ("/healthz", "/metrics"),
) -> Middleware:
    """An aiohttp middleware applying ``limiter`` to every request.

    Args:
        limiter: the limit (any store).
        key: ``"ip"``, ``"route"``, ``"header:NAME"`` or a function of the request
            (sync or async) returning the key, or ``None`` to skip limiting.
        cost: tokens per request.
        exempt: paths never limited (health checks and metrics by default).

    Raises:
        ConfigError: an unknown ``key`` shortcut, or a ``cost`` that is not an integer
            in ``1..limiter.limit``.
    """
    key_func = _resolve_key(key)
    try:
        check_cost(cost, limiter.limit)
    except BadInputError as exc:
        raise ConfigError(f"ratelimit_middleware: {exc}") from None
    exempt_paths = frozenset(exempt)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in exempt_paths:
            return await handler(request)
        k = key_func(request)
        if inspect.isawaitable(k):
            k = await k
        if k is None:
            return await handler(request)
        d = await limiter.hit(k, cost)
        headers = rate_limit_headers(limiter, d)
        if not d.allowed:
            return web.json_response(
                {
                    "error": "rate_limited",
                    "message": f"rate limit {limiter.name!r} exceeded; retry in "
                    f"{d.retry_after:.3f}s",
                    "retry_after": d.retry_after,
                },
                status=429,
                headers=headers,
            )
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(headers)
            raise
        if not response.prepared:
            response.headers.update(headers)
        return response

    return middleware


__all__ = [
    "KeyFunc",
    "by_header",
    "by_ip",
    "by_route",
    "rate_limit_headers",
    "ratelimit_middleware",
]
