"""Retry budget and backoff schedules (pure: time and randomness are arguments).

Retry budget
------------
Retries multiply load exactly when a dependency is struggling. A :class:`RetryBudget`
(after Finagle's ``RetryBudget`` and Envoy's retry budgets) allows retries only while

    retries_in_window + 1 <= ratio * requests_in_window + min_retries_per_second * window

counted over a sliding time window (bucketed, O(1) per call). With ``ratio=0.2`` a
fleet of clients adds at most 20% extra load during an outage, plus a small floor so
that low-traffic clients can still retry. One budget is shared by every :class:`Retry`
(and load balancer) talking to the same dependency.

Backoff
-------
:class:`Backoff` computes the sleep before retry number ``n`` (1-based): exponential
``initial * multiplier ** (n - 1)`` capped at ``maximum``, with jitter:

* ``"full"``: uniform in ``[0, capped]`` (AWS "full jitter");
* ``"decorrelated"``: uniform in ``[initial, previous * 3]``, capped (AWS "decorrelated");
* ``"equal"``: half fixed, half random;
* ``"none"``: exactly the capped exponential.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

from dsys.errors import ConfigError

Jitter = Literal["full", "decorrelated", "equal", "none"]


class Random(Protocol):
    """The part of ``random.Random`` the backoff uses (inject a seeded one in tests)."""

    def uniform(self, a: float, b: float) -> float:
        """A float in ``[a, b]``."""
        ...


def _check_nonneg(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Backoff:
    """Exponential backoff with jitter.

    Args:
        initial: the base delay in seconds (>= 0).
        maximum: no delay exceeds this (>= initial).
        multiplier: growth per retry (>= 1).
        jitter: ``"full"``, ``"decorrelated"``, ``"equal"`` or ``"none"``.
    """

    initial: float = 0.1
    maximum: float = 10.0
    multiplier: float = 2.0
    jitter: Jitter = "full"

    def __post_init__(self) -> None:
        _check_nonneg("initial backoff", self.initial)
        _check_nonneg("maximum backoff", self.maximum)
        if self.maximum < self.initial:
            raise ConfigError(
                f"maximum backoff ({self.maximum}) must be >= initial backoff ({self.initial})"
            )
        _check_nonneg("backoff multiplier", self.multiplier)
        if self.multiplier < 1:
            raise ConfigError(f"backoff multiplier must be >= 1, got {self.multiplier!r}")
        if self.jitter not in ("full", "decorrelated", "equal", "none"):
            raise ConfigError(
                f"jitter must be 'full', 'decorrelated', 'equal' or 'none', got {self.jitter!r}"
            )

    def delay(self, retry: int, previous: float, rng: Random) -> float:
        """Seconds to sleep before retry number ``retry`` (1-based).

        Args:
            retry: 1 for the first retry, 2 for the second...
            previous: the delay used before the previous retry (0 for the first).
            rng: randomness source.
        """
        if self.jitter == "decorrelated":
            low = self.initial
            high = max(low, previous * 3 if previous > 0 else low)
            return min(self.maximum, rng.uniform(low, high))
        # cap the exponent so huge retry numbers cannot overflow
        exp = min(retry - 1, 1024)
        try:
            base = min(self.maximum, self.initial * self.multiplier**exp)
        except OverflowError:
            base = self.maximum
        if self.jitter == "full":
            return rng.uniform(0.0, base)
        if self.jitter == "equal":
            return base / 2 + rng.uniform(0.0, base / 2)
        return base


class RetryBudget:
    """Allows retries only up to a ratio of recent requests (see module doc).

    Not thread-safe: share one budget inside one event loop (or guard it).

    Args:
        ratio: retries allowed per request over the window (0.2 = 20%).
        min_retries_per_second: a floor of retries always allowed, per second.
        window: seconds of history counted (> 0).
        buckets: buckets the window is split into.
    """

    __slots__ = (
        "_head",
        "_min_reserve",
        "_n",
        "_ratio",
        "_req",
        "_ret",
        "_width",
        "denied",
        "requests",
        "retries",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_retries_per_second: float = 10.0,
        window: float = 10.0,
        buckets: int = 10,
    ) -> None:
        _check_nonneg("retry budget ratio", ratio)
        _check_nonneg("min_retries_per_second", min_retries_per_second)
        _check_nonneg("retry budget window", window)
        if window == 0:
            raise ConfigError("retry budget window must be > 0 seconds")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets <= 3600:
            raise ConfigError(
                f"retry budget buckets must be an integer in 1..3600, got {buckets!r}"
            )
        self._ratio = float(ratio)
        self._min_reserve = float(min_retries_per_second) * window
        self._n = buckets
        self._width = window / buckets
        self._req = [0] * buckets
        self._ret = [0] * buckets
        self._head: int | None = None
        self.requests = 0
        """Requests counted in the window."""
        self.retries = 0
        """Retries counted in the window."""
        self.denied = 0
        """Retries refused so far (cumulative)."""

    @property
    def ratio(self) -> float:
        """Retries allowed per request."""
        return self._ratio

    def _expire(self, now: float) -> int:
        e = math.floor(now / self._width)
        head = self._head
        if head is None or e > head:
            n = self._n
            if head is None or e - head >= n:
                self._req = [0] * n
                self._ret = [0] * n
                self.requests = self.retries = 0
            else:
                for k in range(head + 1, e + 1):
                    j = k % n
                    self.requests -= self._req[j]
                    self.retries -= self._ret[j]
                    self._req[j] = self._ret[j] = 0
            self._head = e
            return e % n
        return head % self._n

    def record_request(self, now: float) -> None:
        """Count one original request (not a retry) at time ``now``."""
        j = self._expire(now)
        self._req[j] += 1
        self.requests += 1

    def available(self, now: float) -> float:
        """How many retries the budget allows at ``now`` (may be fractional or < 1)."""
        self._expire(now)
        return self._ratio * self.requests + self._min_reserve - self.retries

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget at ``now``; False (and counted) when exhausted."""
        j = self._expire(now)
        if self.retries + 1 > self._ratio * self.requests + self._min_reserve:
            self.denied += 1
            return False
        self._ret[j] += 1
        self.retries += 1
        return True


__all__ = ["Backoff", "Jitter", "Random", "RetryBudget"]
