"""Rate limiting: a GCRA token bucket and window counters, in memory, across a cluster, or in Redis.

``from dsys.ratelimit import Limiter, MemoryStore, ClusterStore, RedisStore``::

    limiter = Limiter(rate=100, per=1.0, burst=100, store=MemoryStore())
    decision = await limiter.hit("client-42", cost=1)
    if not decision.allowed:
        ...  # decision.retry_after seconds until it would pass
"""

from __future__ import annotations

from dsys.ratelimit.core import Decision, FixedWindow, SlidingWindow, TokenBucket
from dsys.ratelimit.limiter import Limiter, MemoryStore, Store

__all__ = [
    "Decision",
    "FixedWindow",
    "Limiter",
    "MemoryStore",
    "SlidingWindow",
    "Store",
    "TokenBucket",
]
