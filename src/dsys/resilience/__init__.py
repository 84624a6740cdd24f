"""Fault tolerance: circuit breakers, retries with budgets, timeouts, bulkheads, policies.

::

    from dsys.resilience import CircuitBreaker, Retry, Timeout, Bulkhead, Policy

    breaker = CircuitBreaker("inventory", failure_rate_threshold=50, window=TimeWindow(seconds=30))
    policy = Policy.timeout(2.0).retry(max_attempts=3).breaker(breaker)
    value = await policy.call_async(fetch, url)

The pure cores (:mod:`dsys.resilience.breaker_core`, :mod:`dsys.resilience.backoff`) hold
the logic; the adapters add the clock, locking, logging and metrics.
"""

from __future__ import annotations

from dsys.resilience.backoff import Backoff, RetryBudget
from dsys.resilience.breaker import (
    BreakerStore,
    CircuitBreaker,
    MemoryBreakerStore,
    SharedState,
)
from dsys.resilience.breaker_core import (
    BreakerConfig,
    BreakerState,
    CountWindow,
    StateTransition,
    TimeWindow,
    WindowCounts,
)
from dsys.resilience.bulkhead import Bulkhead
from dsys.resilience.policy import Fallback, Policy
from dsys.resilience.retry import Retry, RetryAttempt
from dsys.resilience.timeout import Timeout, deadline, remaining

__all__ = [
    "Backoff",
    "BreakerConfig",
    "BreakerState",
    "BreakerStore",
    "Bulkhead",
    "CircuitBreaker",
    "CountWindow",
    "Fallback",
    "MemoryBreakerStore",
    "Policy",
    "Retry",
    "RetryAttempt",
    "RetryBudget",
    "SharedState",
    "StateTransition",
    "TimeWindow",
    "Timeout",
    "WindowCounts",
    "deadline",
    "remaining",
]
