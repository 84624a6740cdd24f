"""Circuit-breaker core: sliding windows and the state machine (pure, sans-I/O).

Theory of operation
-------------------
A breaker protects a caller from a failing dependency. Each call first asks the core
for a permit (:meth:`BreakerCore.acquire`); the core answers :class:`Permit` or
:class:`Rejected` (with ``retry_after``). After the call the adapter reports the
outcome with :meth:`BreakerCore.on_success`, :meth:`BreakerCore.on_failure` or, for a
call that neither succeeded nor failed (cancelled, ignored exception),
:meth:`BreakerCore.release`. Time is always an argument (``now``, seconds on any
monotonic scale); the core never reads a clock.

::

             failure rate >= threshold or slow-call rate >= threshold
             (and at least minimum_calls recorded in the window)
    CLOSED ───────────────────────────────────────────────────────────▶ OPEN
      ▲                                                                 │  ▲
      │ trial calls below both thresholds           open wait elapsed   │  │ trial calls
      │                                             (at the next call)  ▼  │ at/above a threshold
      └──────────────────────────────────────────────────────────── HALF_OPEN
                 (permitted_calls_in_half_open trial calls, then decide)

    FORCED_OPEN (rejects everything)  and  DISABLED (permits everything, records
    nothing) are entered and left only by hand (force_open / disable / reset).

Windows. In ``CLOSED`` every outcome goes into a sliding window:

* :class:`CountWindow` keeps the last ``size`` outcomes in a ring buffer;
* :class:`TimeWindow` keeps ``buckets`` buckets each ``seconds / buckets`` wide and
  counts the calls whose bucket lies within the last ``buckets`` buckets (so the window
  covers between ``seconds - width`` and ``seconds`` of history).

Both keep running totals, so recording a call and reading the rates is O(1)
(the time window touches at most ``buckets`` buckets when time jumps, amortised O(1)).

Generations. Each transition starts a new generation and a new :class:`Permit`
object. An outcome reported with a permit of an older generation is ignored: a call
that started while closed and ends after the breaker opened says nothing about the
half-open trial. In ``CLOSED`` and ``HALF_OPEN`` the same permit object is handed to
every call of a generation, so the fast path allocates nothing.

Outputs. Transitions are appended to :attr:`BreakerCore.events` as
:class:`StateTransition` values; the adapter drains them (log, metrics, listeners).
Per-outcome counters (``calls_successful`` ...) are plain ints the adapter exposes as
metrics at scrape time.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass

from dsys.errors import ConfigError


class BreakerState(enum.Enum):
    """The states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN
FORCED_OPEN = BreakerState.FORCED_OPEN
DISABLED = BreakerState.DISABLED


@dataclass(frozen=True, kw_only=True, slots=True)
class CountWindow:
    """A count-based sliding window: the last ``size`` recorded calls.

    Args:
        size: how many of the most recent calls the rates are computed over (>= 1).
    """

    size: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"CountWindow size must be an integer >= 1, got {self.size!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TimeWindow:
    """A time-based sliding window: the calls of the last ``seconds``, in buckets.

    Args:
        seconds: window length in seconds (> 0).
        buckets: number of buckets the window is split into (1..3600); more buckets
            expire old calls more smoothly.
    """

    seconds: float = 60.0
    buckets: int = 10

    def __post_init__(self) -> None:
        if not _finite_positive(self.seconds):
            raise ConfigError(
                f"TimeWindow seconds must be a finite number > 0, got {self.seconds!r}"
            )
        if (
            isinstance(self.buckets, bool)
            or not isinstance(self.buckets, int)
            or not 1 <= self.buckets <= 3600
        ):
            raise ConfigError(
                f"TimeWindow buckets must be an integer in 1..3600, got {self.buckets!r}"
            )


def _finite_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _finite_nonneg(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerConfig:
    """Configuration of a circuit breaker (validated; bad values raise ``ConfigError``).

    Args:
        failure_rate_threshold: percent (0 < t <= 100) of failed calls in the window at
            or above which the breaker opens.
        slow_call_rate_threshold: percent (0 < t <= 100) of slow calls at or above which
            the breaker opens (only when ``slow_call_duration`` is set).
        slow_call_duration: a call taking at least this many seconds counts as slow;
            ``None`` disables slow-call detection (and the adapter's timing).
        window: a :class:`CountWindow`, a :class:`TimeWindow`, or an int (a count window
            of that size).
        minimum_calls: calls the window must hold before the rates can open the breaker.
        open_wait: seconds the breaker stays open before letting trial calls through.
        open_wait_multiplier: each time a half-open trial fails, the next open wait is
            multiplied by this (1.0 = fixed wait, 2.0 = exponential).
        open_wait_max: upper bound of the open wait (defaults to ``open_wait`` when the
            multiplier is 1, else 64 times ``open_wait``).
        permitted_calls_in_half_open: trial calls let through in ``HALF_OPEN``; their
            outcomes decide between ``CLOSED`` and ``OPEN``.
    """

    failure_rate_threshold: float = 50.0
    slow_call_rate_threshold: float = 100.0
    slow_call_duration: float | None = None
    window: CountWindow | TimeWindow | int = 100
    minimum_calls: int = 10
    open_wait: float = 30.0
    open_wait_multiplier: float = 1.0
    open_wait_max: float | None = None
    permitted_calls_in_half_open: int = 3

    def __post_init__(self) -> None:
        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            value = getattr(self, name)
            if not _finite_positive(value) or value > 100:
                raise ConfigError(f"{name} must be a percentage in (0, 100], got {value!r}")
        if self.slow_call_duration is not None and not _finite_positive(self.slow_call_duration):
            raise ConfigError(
                f"slow_call_duration must be None or seconds > 0, got {self.slow_call_duration!r}"
            )
        if isinstance(self.window, int) and not isinstance(self.window, bool):
            if self.window < 1:
                raise ConfigError(f"window size must be >= 1 calls, got {self.window!r}")
        elif not isinstance(self.window, (CountWindow, TimeWindow)):
            raise ConfigError(
                f"window must be a CountWindow, a TimeWindow or an int, got {self.window!r}"
            )
        if not _is_int(self.minimum_calls) or self.minimum_calls < 1:
            raise ConfigError(f"minimum_calls must be an integer >= 1, got {self.minimum_calls!r}")
        if not _finite_nonneg(self.open_wait):
            raise ConfigError(f"open_wait must be seconds >= 0, got {self.open_wait!r}")
        if not _finite_positive(self.open_wait_multiplier) or self.open_wait_multiplier < 1:
            raise ConfigError(
                "open_wait_multiplier must be >= 1 (1 = fixed wait), "
                f"got {self.open_wait_multiplier!r}"
            )
        if self.open_wait_max is not None and (
            not _finite_nonneg(self.open_wait_max) or self.open_wait_max < self.open_wait
        ):
            raise ConfigError(
                f"open_wait_max must be >= open_wait ({self.open_wait}), got {self.open_wait_max!r}"
            )
        if not _is_int(self.permitted_calls_in_half_open) or self.permitted_calls_in_half_open < 1:
            raise ConfigError(
                "permitted_calls_in_half_open must be an integer >= 1, "
                f"got {self.permitted_calls_in_half_open!r}"
            )

    @property
    def max_open_wait(self) -> float:
        """The effective upper bound of the open wait."""
        if self.open_wait_max is not None:
            return self.open_wait_max
        return self.open_wait if self.open_wait_multiplier == 1 else self.open_wait * 64


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True, slots=True)
class Permit:
    """Permission to make one call; hand it back with the outcome.

    One object per breaker generation (it is shared by the calls of that generation).
    """

    generation: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """The breaker refused the call.

    Attributes:
        retry_after: seconds until the breaker may let a call through; ``None`` when
            unknown (forced open).
        state: the state that refused the call.
    """

    retry_after: float | None
    state: BreakerState


@dataclass(frozen=True, slots=True)
class StateTransition:
    """The breaker moved from one state to another at time ``at`` because of ``reason``."""

    from_state: BreakerState
    to_state: BreakerState
    at: float
    reason: str
    failure_rate: float = -1.0
    slow_call_rate: float = -1.0


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """A snapshot of a window: calls, failed calls and slow calls it holds."""

    calls: int
    failures: int
    slow: int

    @property
    def failure_rate(self) -> float:
        """Percent of failed calls (0 when empty)."""
        return 100.0 * self.failures / self.calls if self.calls else 0.0

    @property
    def slow_call_rate(self) -> float:
        """Percent of slow calls (0 when empty)."""
        return 100.0 * self.slow / self.calls if self.calls else 0.0


FAILED = 1
"""Outcome bit: the call failed."""
SLOW = 2
"""Outcome bit: the call was slow."""


class CountRing:
    """The last ``size`` recorded calls, O(1) amortised per call.

    Calls are numbered in order (``seq``); the window holds the calls numbered above
    ``seq - size`` (and above ``base``, the number at the last :meth:`clear`). Only the
    numbers of failed and slow calls are stored, in deques, so recording a success is
    a single integer increment (:meth:`add_success`) and old failures are dropped when
    the counts are read (:meth:`expire`).
    """

    __slots__ = ("_failed", "_size", "_slow", "base", "seq")

    def __init__(self, size: int) -> None:
        self._size = size
        self._failed: deque[int] = deque()
        self._slow: deque[int] = deque()
        self.seq = 0
        """Number of calls recorded since creation."""
        self.base = 0
        """``seq`` at the last clear."""

    def add_success(self) -> None:
        """Record a fast, successful call."""
        self.seq += 1

    def add(self, now: float, outcome: int) -> None:
        """Record one call with outcome bits (``FAILED | SLOW``); ``now`` is unused."""
        self.seq += 1
        if outcome & FAILED:
            self._failed.append(self.seq)
        if outcome & SLOW:
            self._slow.append(self.seq)

    def expire(self, now: float) -> None:
        """Drop failed/slow calls that fell out of the window (``now`` is unused)."""
        low = self.seq - self._size
        q = self._failed
        while q and q[0] <= low:
            q.popleft()
        q = self._slow
        while q and q[0] <= low:
            q.popleft()

    @property
    def calls(self) -> int:
        """Calls in the window."""
        n = self.seq - self.base
        return n if n < self._size else self._size

    @property
    def failures(self) -> int:
        """Failed calls in the window (call :meth:`expire` first)."""
        return len(self._failed)

    @property
    def slow(self) -> int:
        """Slow calls in the window (call :meth:`expire` first)."""
        return len(self._slow)

    def clear(self) -> None:
        """Forget every call."""
        self.base = self.seq
        self._failed.clear()
        self._slow.clear()


class TimeBuckets:
    """Calls of the last ``buckets`` time buckets, with running totals.

    A call at time ``t`` falls in bucket ``t // width`` (``width = seconds / buckets``);
    at time ``now`` the window holds the calls whose bucket is greater than
    ``now // width - buckets``. A call reported with a time older than the newest bucket
    seen is counted in that newest bucket (time never runs backwards inside the window).

    Fast path. ``until`` is the first time past the newest bucket; a success at a time
    ``now < until`` may be recorded by ``buckets.fast += 1`` (that is all
    :meth:`try_add_success` does). Such successes are moved into their bucket when the
    window next moves on; :attr:`calls` and :attr:`successes` include them.
    """

    __slots__ = (
        "_calls",
        "_fails",
        "_head",
        "_n",
        "_slot",
        "_slow",
        "_successes",
        "_total",
        "_width",
        "failures",
        "fast",
        "slow",
        "until",
    )

    def __init__(self, seconds: float, buckets: int) -> None:
        self._n = buckets
        self._width = seconds / buckets
        self._calls = [0] * buckets
        self._fails = [0] * buckets
        self._slow = [0] * buckets
        self._head: int | None = None
        self._slot = 0
        self._total = 0  # calls in the buckets, not counting ``fast``
        self._successes = 0
        self.failures = 0
        self.slow = 0
        self.fast = 0
        """Successes in the newest bucket not yet moved into it (see the fast path)."""
        self.until = -math.inf
        """The first time past the newest bucket (``-inf`` before any call)."""

    @property
    def calls(self) -> int:
        """Calls in the window."""
        return self._total + self.fast

    @property
    def successes(self) -> int:
        """Successes recorded on the fast path (lifetime, for metrics)."""
        return self._successes + self.fast

    def bucket_of(self, now: float) -> int:
        """The bucket number of time ``now``."""
        return int(now // self._width)

    def _bucket_end(self, e: int) -> float:
        # The least float t with t // width > e, so `now < until` agrees exactly with
        # `now // width <= e` (floor division is monotonic; rounding moves the edge by ulps).
        width = self._width
        end = (e + 1) * width
        for _ in range(64):
            if end // width > e:
                break
            end = math.nextafter(end, math.inf)
        for _ in range(64):
            below = math.nextafter(end, -math.inf)
            if below // width <= e:
                break
            end = below
        return end

    def expire(self, now: float) -> None:
        """Drop the buckets that fell out of the window at time ``now``."""
        e = int(now // self._width)
        head = self._head
        if head is not None and e <= head:
            return
        fast = self.fast
        if fast:
            # Straight-line code: no thread switch under the GIL between read and reset.
            self.fast = 0
            self._calls[self._slot] += fast
            self._total += fast
            self._successes += fast
        n = self._n
        if head is None or e - head >= n:
            if self._total:
                self._calls = [0] * n
                self._fails = [0] * n
                self._slow = [0] * n
                self._total = self.failures = self.slow = 0
        else:
            calls, fails, slow = self._calls, self._fails, self._slow
            for k in range(head + 1, e + 1):
                j = k % n
                c = calls[j]
                if c:
                    self._total -= c
                    self.failures -= fails[j]
                    self.slow -= slow[j]
                    calls[j] = fails[j] = slow[j] = 0
        self._head = e
        self._slot = e % n
        self.until = self._bucket_end(e)

    def add(self, now: float, outcome: int) -> None:
        """Record one call at time ``now`` with outcome bits (``FAILED | SLOW``)."""
        self.expire(now)
        j = self._slot
        self._calls[j] += 1
        self._total += 1
        if outcome:
            if outcome & FAILED:
                self._fails[j] += 1
                self.failures += 1
            if outcome & SLOW:
                self._slow[j] += 1
                self.slow += 1

    def try_add_success(self, now: float) -> bool:
        """Record a fast success at ``now`` if it falls in the newest bucket.

        Nothing expires then, so the failure rate can only fall: no check is needed.
        Returns False (recording nothing) when the bucket moved on.
        """
        if now < self.until:
            self.fast += 1
            return True
        return False

    def clear(self) -> None:
        """Forget every call."""
        n = self._n
        self._successes += self.fast
        self.fast = 0
        self._calls = [0] * n
        self._fails = [0] * n
        self._slow = [0] * n
        self._head = None
        self._slot = 0
        self.until = -math.inf
        self._total = self.failures = self.slow = 0


@dataclass(slots=True)
class _Trial:
    """Bookkeeping of the half-open trial calls."""

    issued: int = 0
    calls: int = 0
    failures: int = 0
    slow: int = 0


class BreakerCore:
    """The circuit-breaker state machine over a sliding window (pure; see module doc).

    Not thread-safe by itself: the adapter serialises calls (one event loop, or a lock).

    Fast path. ``state``, ``permit`` and ``fast`` are plain attributes (read them, never
    assign them). ``fast`` is true when the state is ``CLOSED`` and a success cannot open
    the breaker. Then a successful call that is not slow (and not judged by a result
    predicate) whose permit is still ``core.permit`` may be recorded directly, if
    ``fast`` is still true when it ends: with a count window (``ring`` is not ``None``)
    by ``core.ring.seq += 1``, with a time window by
    ``core.buckets.try_add_success(now)`` (inlined: ``if now < buckets.until:
    buckets.fast += 1``; otherwise call :meth:`on_success`). That is all
    :meth:`on_success` would do, minus the calls.

    Args:
        config: the validated configuration.
        now: the current time, used as the time of the initial state.
    """

    __slots__ = (
        "_closed_failures",
        "_config",
        "_failure_threshold",
        "_generation",
        "_open_until",
        "_open_wait",
        "_slow_at",
        "_slow_threshold",
        "_successes",
        "_trial",
        "_window",
        "_window_min",
        "buckets",
        "calls_failed",
        "calls_ignored",
        "calls_rejected",
        "calls_slow",
        "events",
        "fast",
        "permit",
        "ring",
        "state",
        "state_since",
        "transitions",
    )

    def __init__(self, config: BreakerConfig, now: float = 0.0) -> None:
        self._config = config
        window = config.window
        self.ring: CountRing | None = None
        """The count window, or ``None`` for a time window (see the fast path above)."""
        self.buckets: TimeBuckets | None = None
        """The time window, or ``None`` for a count window (see the fast path above)."""
        if isinstance(window, TimeWindow):
            self.buckets = TimeBuckets(window.seconds, window.buckets)
            self._window: CountRing | TimeBuckets = self.buckets
        else:
            size = window.size if isinstance(window, CountWindow) else window
            self.ring = self._window = CountRing(size)
        self._window_min = config.minimum_calls
        self._failure_threshold = config.failure_rate_threshold
        self._slow_threshold = config.slow_call_rate_threshold
        self._slow_at = (
            config.slow_call_duration if config.slow_call_duration is not None else math.inf
        )
        self.state = CLOSED
        """The current state (``OPEN`` stays ``OPEN`` until a call arrives after the wait)."""
        self._generation = 0
        self.permit = Permit(0)
        """The permit of the current generation."""
        self.fast = True
        """Whether a success may be recorded on the fast path now (see above)."""
        self._open_until = 0.0
        self._open_wait = config.open_wait
        self._trial = _Trial()
        self.state_since = now
        """When the current state began."""
        self.events: list[StateTransition] = []
        """Transitions not yet drained by the adapter (it replaces the list)."""
        self.transitions: dict[tuple[BreakerState, BreakerState], int] = {}
        """Count of every transition so far, by (from, to)."""
        self._successes = 0
        self._closed_failures = 0
        self.calls_failed = 0
        """Failed calls recorded so far."""
        self.calls_slow = 0
        """Slow calls recorded so far (also counted as successful or failed)."""
        self.calls_rejected = 0
        """Calls refused so far."""
        self.calls_ignored = 0
        """Permits handed back without an outcome (cancelled, ignored exceptions)."""

    # -- reading ---------------------------------------------------------------------

    @property
    def config(self) -> BreakerConfig:
        """The configuration."""
        return self._config

    @property
    def calls_successful(self) -> int:
        """Successful calls recorded so far."""
        ring = self.ring
        if ring is None:
            return self._successes + self.buckets.successes  # type: ignore[union-attr]
        return self._successes + ring.seq - self._closed_failures

    @property
    def generation(self) -> int:
        """Number of transitions so far; outcomes of older permits are ignored."""
        return self._generation

    @property
    def open_until(self) -> float:
        """When ``OPEN``, the time from which the next call becomes a trial call."""
        return self._open_until

    @property
    def current_open_wait(self) -> float:
        """The wait the next opening will use (grows with the multiplier)."""
        return self._open_wait

    def counts(self, now: float) -> WindowCounts:
        """The window's counts at time ``now`` (in ``HALF_OPEN``: the trial's counts)."""
        if self.state is HALF_OPEN:
            t = self._trial
            return WindowCounts(t.calls, t.failures, t.slow)
        w = self._window
        w.expire(now)
        return WindowCounts(w.calls, w.failures, w.slow)

    # -- calls -----------------------------------------------------------------------

    def acquire(self, now: float) -> Permit | Rejected:
        """Ask to make a call at time ``now``.

        Returns:
            The generation's :class:`Permit`, or :class:`Rejected` with the time until
            a call may pass (``OPEN``) or ``None`` (``FORCED_OPEN``, or ``HALF_OPEN`` with
            every trial slot taken, where the answer depends on the trials).
        """
        state = self.state
        if state is CLOSED or state is DISABLED:
            return self.permit
        if state is OPEN:
            if now < self._open_until:
                self.calls_rejected += 1
                return Rejected(self._open_until - now, OPEN)
            self._transition(HALF_OPEN, now, "open wait elapsed")
            state = HALF_OPEN
        if state is HALF_OPEN:
            trial = self._trial
            if trial.issued < self._config.permitted_calls_in_half_open:
                trial.issued += 1
                return self.permit
            self.calls_rejected += 1
            return Rejected(None, HALF_OPEN)
        self.calls_rejected += 1
        return Rejected(None, state)

    def on_success(self, permit: Permit, now: float, duration: float = 0.0) -> None:
        """Report that a permitted call succeeded after ``duration`` seconds.

        Outcomes of a permit from an older generation are ignored (not counted).
        """
        if permit is not self.permit:
            return
        outcome = 0
        if duration >= self._slow_at:
            self.calls_slow += 1
            outcome = SLOW
        state = self.state
        if state is CLOSED:
            w = self._window
            w.add(now, outcome)
            if self.ring is None:
                self._successes += 1
            if w.calls >= self._window_min:
                self._check_window(now)
            self._refresh_fast()
            return
        self._successes += 1
        if state is HALF_OPEN:
            self._record_trial(now, outcome)

    def on_failure(self, permit: Permit, now: float, duration: float = 0.0) -> None:
        """Report that a permitted call failed after ``duration`` seconds.

        Outcomes of a permit from an older generation are ignored (not counted).
        """
        if permit is not self.permit:
            return
        outcome = FAILED
        if duration >= self._slow_at:
            self.calls_slow += 1
            outcome = FAILED | SLOW
        self.calls_failed += 1
        state = self.state
        if state is CLOSED:
            w = self._window
            w.add(now, outcome)
            if self.ring is not None:
                self._closed_failures += 1
            if w.calls >= self._window_min:
                self._check_window(now)
            self._refresh_fast()
        elif state is HALF_OPEN:
            self._record_trial(now, outcome)

    def release(self, permit: Permit) -> None:
        """Hand back a permit whose call neither succeeded nor failed (cancelled, ignored).

        In ``HALF_OPEN`` this frees the trial slot for another call.
        """
        self.calls_ignored += 1
        if permit is self.permit and self.state is HALF_OPEN:
            trial = self._trial
            if trial.issued > trial.calls:
                trial.issued -= 1

    # -- manual control --------------------------------------------------------------

    def force_open(self, now: float) -> None:
        """Reject every call until :meth:`reset` or :meth:`disable`."""
        if self.state is not FORCED_OPEN:
            self._transition(FORCED_OPEN, now, "forced open")

    def disable(self, now: float) -> None:
        """Permit every call and record nothing until :meth:`reset` or :meth:`force_open`."""
        if self.state is not DISABLED:
            self._transition(DISABLED, now, "disabled")

    def reset(self, now: float) -> None:
        """Go to ``CLOSED`` with an empty window and the initial open wait."""
        self._open_wait = self._config.open_wait
        if self.state is not CLOSED:
            self._transition(CLOSED, now, "reset")
        else:
            self._window.clear()
            self._refresh_fast()

    def trip(self, now: float, reason: str = "tripped by hand") -> None:
        """Open the breaker now, as if the thresholds had been reached."""
        if self.state is not OPEN:
            self._open(now, reason, -1.0, -1.0)

    def adopt(self, state: BreakerState, now: float, open_until: float) -> None:
        """Follow a state decided elsewhere (a shared store): open, forced open or closed.

        ``OPEN`` keeps this breaker open until at least ``open_until``; ``CLOSED``,
        ``FORCED_OPEN`` and ``DISABLED`` move there directly; ``HALF_OPEN`` is local
        and ignored.
        """
        if state is OPEN:
            if self.state is not OPEN:
                self._transition(OPEN, now, "shared state")
            self._open_until = max(self._open_until, open_until)
        elif state is not HALF_OPEN and state is not self.state:
            self._transition(state, now, "shared state")

    # -- internals -------------------------------------------------------------------

    def _refresh_fast(self) -> None:
        # A success can be recorded without checking the rates when it cannot open the
        # breaker: the window already holds minimum_calls (a success never raises the
        # failure rate then; a time window's expiry goes through on_success), or it
        # holds no failed or slow call (nothing to reach a threshold with).
        w = self._window
        self.fast = self.state is CLOSED and (
            w.calls >= self._window_min or not (w.failures or w.slow)
        )

    def _check_window(self, now: float) -> None:
        w = self._window
        w.expire(now)
        calls = w.calls
        if calls < self._window_min:
            return
        fr = 100.0 * w.failures / calls
        sr = 100.0 * w.slow / calls
        if fr >= self._failure_threshold:
            self._open(now, "failure rate reached the threshold", fr, sr)
        elif sr >= self._slow_threshold:
            self._open(now, "slow-call rate reached the threshold", fr, sr)

    def _record_trial(self, now: float, outcome: int) -> None:
        trial = self._trial
        trial.calls += 1
        if outcome & FAILED:
            trial.failures += 1
        if outcome & SLOW:
            trial.slow += 1
        if trial.calls < self._config.permitted_calls_in_half_open:
            return
        fr = 100.0 * trial.failures / trial.calls
        sr = 100.0 * trial.slow / trial.calls
        cfg = self._config
        if fr >= self._failure_threshold or sr >= self._slow_threshold:
            self._open_wait = min(self._open_wait * cfg.open_wait_multiplier, cfg.max_open_wait)
            reason = "trial calls failed" if fr >= self._failure_threshold else "trial calls slow"
            self._open(now, reason, fr, sr)
        else:
            self._open_wait = cfg.open_wait
            self._transition(CLOSED, now, "trial calls succeeded", fr, sr)

    def _open(self, now: float, reason: str, fr: float, sr: float) -> None:
        self._transition(OPEN, now, reason, fr, sr)
        self._open_until = now + self._open_wait

    def _transition(
        self, to: BreakerState, now: float, reason: str, fr: float = -1.0, sr: float = -1.0
    ) -> None:
        frm = self.state
        self.state = to
        self._generation += 1
        self.permit = Permit(self._generation)
        self.state_since = now
        if to is CLOSED:
            self._window.clear()
        elif to is HALF_OPEN:
            self._trial = _Trial()
        self._refresh_fast()
        key = (frm, to)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        self.events.append(StateTransition(frm, to, now, reason, fr, sr))


__all__ = [
    "CLOSED",
    "DISABLED",
    "FAILED",
    "FORCED_OPEN",
    "HALF_OPEN",
    "OPEN",
    "SLOW",
    "BreakerConfig",
    "BreakerCore",
    "BreakerState",
    "CountRing",
    "CountWindow",
    "Permit",
    "Rejected",
    "StateTransition",
    "TimeBuckets",
    "TimeWindow",
    "WindowCounts",
]
