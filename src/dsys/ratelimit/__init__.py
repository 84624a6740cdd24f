"""Rate limiting: a GCRA token bucket and window counters, in memory, across a cluster, or in Redis.

``from dsys.ratelimit import Limiter, MemoryStore, ClusterStore, RedisStore``::

    limiter = Limiter(rate=100, per=1.0, burst=100, store=MemoryStore())
    decision = await limiter.hit("client-42", cost=1)
    if not decision.allowed:
        ...  # decision.retry_after seconds until it would pass

See :mod:`dsys.ratelimit.core` for the exact semantics of each algorithm.
"""

from __future__ import annotations

from dsys.ratelimit.cluster import ClusterStore
from dsys.ratelimit.core import Decision, FixedWindow, SlidingWindow, TokenBucket
from dsys.ratelimit.limiter import Limiter, MemoryStore, Store, store_from_url
from dsys.ratelimit.middleware import by_header, by_ip, by_route, ratelimit_middleware
from dsys.ratelimit.redis_store import RedisStore
from dsys.ratelimit.server import LimiterServer, ServerConfig

__all__ = [
    "ClusterStore",
    "Decision",
    "FixedWindow",
    "Limiter",
    "LimiterServer",
    "MemoryStore",
    "RedisStore",
    "ServerConfig",
    "SlidingWindow",
    "Store",
    "TokenBucket",
    "by_header",
    "by_ip",
    "by_route",
    "ratelimit_middleware",
    "store_from_url",
]
