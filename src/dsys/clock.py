"""Clocks injected into cores and adapters, so time is an argument, never a global.

:class:`MonotonicClock` reads ``time.monotonic``; :class:`ManualClock` is advanced by
hand in tests and simulations.
"""

from __future__ import annotations

import time
from typing import Protocol

from dsys.errors import ConfigError


class Clock(Protocol):
    """Anything that tells monotonic time in seconds."""

    def now(self) -> float:
        """Current monotonic time in seconds."""
        ...


class MonotonicClock:
    """The process's monotonic clock (``time.monotonic``)."""

    __slots__ = ()

    def now(self) -> float:
        """Current monotonic time in seconds."""
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told; for tests and deterministic simulations."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        """Current (manual) time in seconds."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (>= 0) and return the new time."""
        if seconds < 0:
            raise ConfigError(f"a clock cannot go backwards (advance by {seconds})")
        self._now += seconds
        return self._now

    def set(self, now: float) -> None:
        """Jump to ``now``, which must not be earlier than the current time."""
        if now < self._now:
            raise ConfigError(f"a clock cannot go backwards ({now} < {self._now})")
        self._now = float(now)


__all__ = ["Clock", "ManualClock", "MonotonicClock"]
