"""Pure rate-limiting algorithms: a GCRA token bucket, a sliding-window counter, a fixed window.

Theory of operation
===================

Nothing here reads a clock, sleeps or does I/O: every decision takes ``now`` (seconds on
any monotonic scale) as an argument and returns a :class:`Decision`. Adapters
(:mod:`dsys.ratelimit.limiter`, the cluster server, the Redis Lua script) read the clock,
call these functions and count, log or send the result.

A *policy* (:class:`TokenBucket`, :class:`SlidingWindow`, :class:`FixedWindow`) is the
validated configuration. ``policy.new_table(max_keys)`` returns a *table* holding the
state of many keys; ``table.hit(key, now, cost)`` decides one request and updates the
state in O(1).

Token bucket (GCRA)
-------------------

``TokenBucket(rate=r, per=p, burst=b)`` admits ``r`` tokens per ``p`` seconds with a
bucket of ``b`` tokens. It is implemented as the Generic Cell Rate Algorithm: the only
state per key is one float, the *theoretical arrival time* ``tat``. With the emission
interval ``T = p / r`` (seconds per token) and the tolerance ``tau = b * T``:

* a key never seen, or with ``tat <= now``, has a full bucket (``b`` tokens);
* a request of ``cost`` tokens is allowed iff ``max(tat, now) + cost*T - tau <= now``;
  then ``tat := max(tat, now) + cost*T``; a refused request changes nothing;
* the number of whole tokens in the bucket at ``now`` is ``floor((now + tau - tat) / T)``.

Guarantees (``rate_per_second = r / p``), exactly as for a token bucket of capacity ``b``
that refills continuously at ``r / p`` tokens per second and starts full:

* **upper bound**: in any time window of length ``t`` the allowed requests cost at most
  ``b + (r / p) * t`` tokens in total;
* **no starvation**: a client sending one request of cost 1 every ``p / r`` seconds is
  never refused (and, with ``b > 1``, may also burst up to ``b`` at once).

A tolerance of :data:`EPSILON` (1e-9) seconds absorbs float rounding, so a request
arriving at exactly its theoretical time is not refused because of the last bit of a
float; the upper bound is therefore ``b + (r / p) * (t + 1e-9)``, which for integer costs
is the same number of requests except at rates near a billion per second.

Decisions
---------

Every table returns a :class:`Decision`:

* ``allowed``: whether the request passes (its cost was charged only if so);
* ``remaining``: whole tokens (requests of cost 1) that would pass right now, after this
  decision;
* ``retry_after``: seconds until a request of the same cost would pass if nothing else
  arrives; ``0.0`` when allowed;
* ``reset``: seconds until the limit is fully restored (bucket full again, or window
  counts back to zero) if nothing else arrives.

Sliding window and fixed window
-------------------------------

These match the ``limits`` library's memory storage decision for decision (the test
suite replays random traffic through both with a fake clock; the sliding window with
costs 1 to 3, the fixed window with cost 1, see below):

* :class:`SlidingWindow` (``limits``' *sliding window counter*): windows of ``w`` seconds
  aligned to multiples of ``w``; the weighted count is
  ``previous * (time left in the current window) / w + current`` and a request is allowed
  iff ``floor(weighted) + cost <= limit``. It approximates a true sliding window; it can
  admit up to ``2 * limit`` in a window of length ``w`` that straddles two windows in the
  worst case (the same as ``limits``).
* :class:`FixedWindow` (``limits``' *fixed window*): a window of ``w`` seconds starts at the
  first request after the previous window ended; at most ``limit`` tokens pass per window
  (up to ``2 * limit`` in a span of length ``w`` across a window boundary).

One documented difference: ``limits``' fixed window also adds the cost of a *refused*
request to the window's count; dsys charges only allowed requests. For cost 1 the
decisions are identical (once a window is full both refuse until it ends); with larger
costs dsys admits a later, smaller request that ``limits`` would refuse.

Bounded memory
--------------

A table keeps at most ``max_keys`` keys. When an insertion goes over, it first drops
*idle* keys, whose state is equivalent to no state at all (a full bucket; windows that no
longer count), which costs no accuracy. Only if more than ``max_keys`` keys are active does
it evict the oldest-inserted active keys (down to 90% of ``max_keys``), counted in
``evicted_active``: an evicted key starts again with a full limit, so size ``max_keys``
above the number of keys active at once.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator

from dsys.errors import BadInputError, ConfigError

EPSILON = 1e-9
"""Seconds of float tolerance in admission checks (see the module docstring)."""

_TOKEN_EPS = 1e-9  # token-count tolerance when flooring float token counts
_NO_WINDOW = -(2**62)  # a window index no real time maps to


class Decision:
    """The outcome of one rate-limit check.

    Attributes:
        allowed: whether the request passes; its cost was charged only if so.
        remaining: whole cost-1 requests that would pass right now, after this decision.
        retry_after: seconds until a request of the same cost would pass if nothing else
            arrives (``0.0`` when allowed).
        reset: seconds until the limit is fully restored if nothing else arrives.
    """

    __slots__ = ("allowed", "remaining", "reset", "retry_after")

    allowed: bool
    remaining: int
    retry_after: float
    reset: float

    def __init__(self, allowed: bool, remaining: int, retry_after: float, reset: float) -> None:
        self.allowed = allowed
        self.remaining = remaining
        self.retry_after = retry_after
        self.reset = reset

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed}, remaining={self.remaining}, "
            f"retry_after={self.retry_after!r}, reset={self.reset!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return (self.allowed, self.remaining, self.retry_after, self.reset) == (
            other.allowed,
            other.remaining,
            other.retry_after,
            other.reset,
        )

    __hash__ = None  # type: ignore[assignment]


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_limit(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return value


def check_cost(cost: object, limit: int) -> int:
    """Validate the cost of one request against a policy's largest admissible cost.

    Raises:
        BadInputError: the cost is not an integer in ``1..limit`` (a cost above the burst
            or window limit could never pass, so it is an error, not a refusal).
    """
    if isinstance(cost, bool) or not isinstance(cost, int):
        raise BadInputError(f"cost must be an integer, got {type(cost).__name__}")
    if cost < 1:
        raise BadInputError(f"cost must be at least 1, got {cost}")
    if cost > limit:
        raise BadInputError(
            f"cost {cost} exceeds the limit of {limit} per request (the burst or window "
            "limit); it can never pass"
        )
    return cost


class _Table(abc.ABC):
    """State of many keys under one policy, bounded to ``max_keys`` keys.

    ``hit(key, now, cost)`` decides with time passed in; ``hit_now(key, cost)`` reads the
    injected ``clock`` callable, validates the cost, counts the outcome in
    :attr:`allowed` / :attr:`denied` and calls ``on_refuse(key, cost, decision)`` on a
    refusal when set.
    """

    __slots__ = (
        "_states",
        "allowed",
        "clock",
        "denied",
        "evicted_active",
        "max_keys",
        "on_refuse",
    )

    limit: int

    def __init__(self, max_keys: int, clock: Callable[[], float] | None = None) -> None:
        self.max_keys = _check_limit("max_keys", max_keys)
        self._states: dict[str, object] = {}
        self.evicted_active = 0
        self.clock = clock
        self.allowed = 0
        self.denied = 0
        self.on_refuse: Callable[[str, int, Decision], None] | None = None

    @abc.abstractmethod
    def hit(self, key: str, now: float, cost: int = 1) -> Decision:
        """Decide one request of ``cost`` tokens (already validated) for ``key`` at ``now``."""

    def hit_now(self, key: str, cost: int = 1) -> Decision:
        """Decide at ``clock()``, validating ``cost`` and counting the outcome.

        Raises:
            BadInputError: ``cost`` is not an integer in ``1..limit``.
        """
        if cost != 1:
            check_cost(cost, self.limit)
        d = self.hit(key, self.clock(), cost)  # type: ignore[misc]
        if d.allowed:
            self.allowed += 1
        else:
            self.denied += 1
            if self.on_refuse is not None:
                self.on_refuse(key, cost, d)
        return d

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: object) -> bool:
        return key in self._states

    def __iter__(self) -> Iterator[str]:
        """The keys currently holding state (insertion order; a snapshot)."""
        return iter(list(self._states))

    @abc.abstractmethod
    def _idle(self, state: object, now: float) -> bool:
        """Whether ``state`` is equivalent to no state at ``now`` (safe to drop)."""

    def sweep(self, now: float) -> int:
        """Drop idle keys (equivalent to no state); returns how many were dropped."""
        idle = self._idle
        dead = [k for k, s in self._states.items() if idle(s, now)]
        for k in dead:
            del self._states[k]
        return len(dead)

    def _shrink(self, now: float, most: int) -> None:
        # Called when an insertion took (or is about to take) us over max_keys: first the
        # free sweep of idle keys, then (only if most keys are active) evict the
        # oldest-inserted active keys, down to 90% of max_keys so this stays amortized O(1).
        self.sweep(now)
        states = self._states
        if len(states) > most:
            target = max(0, min(most, (self.max_keys * 9) // 10))
            excess = len(states) - target
            for k in list(states)[:excess]:
                del states[k]
            self.evicted_active += excess

    def clear(self) -> None:
        """Forget every key."""
        self._states.clear()


class TokenBucket:
    """A token bucket (GCRA): ``rate`` tokens per ``per`` seconds, bucket of ``burst`` tokens.

    Args:
        rate: tokens added per ``per`` seconds (> 0).
        per: the period of ``rate`` in seconds (> 0).
        burst: bucket capacity in tokens (integer >= 1); defaults to ``ceil(rate)``.

    Raises:
        ConfigError: a non-positive or non-finite rate or period, or a burst below 1.
    """

    __slots__ = ("burst", "interval", "per", "rate", "tolerance")

    kind = "token_bucket"

    def __init__(self, *, rate: float, per: float = 1.0, burst: int | None = None) -> None:
        self.rate = _check_number("rate", rate)
        self.per = _check_number("per", per)
        if burst is None:
            burst = max(1, math.ceil(self.rate))
        self.burst = _check_limit("burst", burst)
        # T: seconds per token; tau: how far tat may run ahead of now.
        self.interval = self.per / self.rate
        self.tolerance = self.burst * self.interval

    @property
    def limit(self) -> int:
        """The largest cost a single request may have (the burst)."""
        return self.burst

    @property
    def rate_per_second(self) -> float:
        """Refill rate in tokens per second."""
        return self.rate / self.per

    def new_table(
        self, max_keys: int = 100_000, clock: Callable[[], float] | None = None
    ) -> TokenBucketTable:
        """A table holding the buckets of up to ``max_keys`` keys (``clock`` for ``hit_now``)."""
        return TokenBucketTable(self, max_keys, clock)

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate!r}, per={self.per!r}, burst={self.burst})"


class TokenBucketTable(_Table):
    """GCRA state (one theoretical arrival time per key) for one :class:`TokenBucket`.

    Besides :meth:`hit` (time passed in), :meth:`hit_now` reads the injected ``clock``
    callable, validates the cost and counts decisions in :attr:`allowed` and
    :attr:`denied`: it is the in-process hot path, one Python frame per decision.
    """

    __slots__ = (
        "_burst_eps",
        "_interval",
        "_inv_interval",
        "_tol_eps",
        "_tolerance",
        "limit",
        "policy",
    )

    def __init__(
        self, policy: TokenBucket, max_keys: int, clock: Callable[[], float] | None = None
    ) -> None:
        super().__init__(max_keys, clock)
        self.policy = policy
        self.limit = policy.burst
        self._interval = policy.interval
        self._inv_interval = 1.0 / policy.interval
        self._tolerance = policy.tolerance
        self._tol_eps = policy.tolerance + EPSILON
        self._burst_eps = policy.burst + _TOKEN_EPS

    def _idle(self, state: object, now: float) -> bool:
        return state <= now  # type: ignore[operator]

    def hit(self, key: str, now: float, cost: int = 1) -> Decision:
        """Decide one request of ``cost`` tokens (already validated) for ``key`` at ``now``."""
        states = self._states
        tat = states.get(key)
        new_key = tat is None
        if tat is None or tat < now:  # type: ignore[operator]
            tat = now
        new_tat = tat + cost * self._interval  # type: ignore[operator]
        if new_tat - now <= self._tol_eps:
            states[key] = new_tat
            if new_key and len(states) > self.max_keys:
                self._shrink(now, self.max_keys)
            return Decision(
                True,
                int((now - new_tat) * self._inv_interval + self._burst_eps),
                0.0,
                new_tat - now,
            )
        return Decision(
            False,
            int((now - tat) * self._inv_interval + self._burst_eps),  # type: ignore[operator]
            new_tat - self._tolerance - now,
            tat - now,  # type: ignore[operator]
        )

    def hit_now(self, key: str, cost: int = 1) -> Decision:
        """Decide at ``clock()``, validating ``cost`` and counting the outcome.

        The same arithmetic as :meth:`hit`, inlined: the in-process hot path.

        Raises:
            BadInputError: ``cost`` is not an integer in ``1..burst``.
        """
        if cost != 1:
            check_cost(cost, self.policy.burst)
        now = self.clock()  # type: ignore[misc]
        states = self._states
        tat = states.get(key)
        if tat is None:
            tat = now
            if len(states) >= self.max_keys:
                self._shrink(now, self.max_keys - 1)
        elif tat < now:  # type: ignore[operator]
            tat = now
        new_tat = tat + cost * self._interval  # type: ignore[operator]
        if new_tat - now <= self._tol_eps:
            states[key] = new_tat
            self.allowed += 1
            return Decision(
                True,
                int((now - new_tat) * self._inv_interval + self._burst_eps),
                0.0,
                new_tat - now,
            )
        self.denied += 1
        d = Decision(
            False,
            int((now - tat) * self._inv_interval + self._burst_eps),  # type: ignore[operator]
            new_tat - self._tolerance - now,
            tat - now,  # type: ignore[operator]
        )
        if self.on_refuse is not None:
            self.on_refuse(key, cost, d)
        return d

    def take(self, key: str, now: float, need: int, most: int) -> tuple[int, Decision]:
        """Take between ``need`` and ``most`` tokens at once (a lease), as many as available.

        Returns:
            ``(granted, decision)``: ``granted`` is 0 when fewer than ``need`` tokens are
            available (then ``decision.allowed`` is false and ``retry_after`` says when
            ``need`` tokens will be); otherwise ``need <= granted <= most`` tokens were
            charged to the bucket.
        """
        states = self._states
        tat = states.get(key)
        new_key = tat is None
        if tat is None or tat < now:  # type: ignore[operator]
            tat = now
        interval = self._interval
        tolerance = self._tolerance
        available = int((now + tolerance - tat) / interval + _TOKEN_EPS)  # type: ignore[operator]
        if available >= need:
            granted = min(available, most)
            new_tat = tat + granted * interval  # type: ignore[operator]
            states[key] = new_tat
            if new_key and len(states) > self.max_keys:
                self._shrink(now, self.max_keys)
            return granted, Decision(True, available - granted, 0.0, new_tat - now)
        retry = tat + need * interval - tolerance - now  # type: ignore[operator]
        return 0, Decision(False, available, max(retry, 0.0), tat - now)  # type: ignore[operator]

    def tat(self, key: str) -> float | None:
        """The stored theoretical arrival time of ``key`` (``None`` when it has none)."""
        value = self._states.get(key)
        return None if value is None else float(value)  # type: ignore[arg-type]


class SlidingWindow:
    """A sliding-window counter: at most about ``limit`` tokens per ``window`` seconds.

    Same semantics as the ``limits`` library's sliding window counter (see the module
    docstring).

    Args:
        limit: tokens per window (integer >= 1).
        window: window length in seconds (> 0).
    """

    __slots__ = ("limit", "window")

    kind = "sliding_window"

    def __init__(self, *, limit: int, window: float = 1.0) -> None:
        self.limit = _check_limit("limit", limit)
        self.window = _check_number("window", window)

    def new_table(
        self, max_keys: int = 100_000, clock: Callable[[], float] | None = None
    ) -> SlidingWindowTable:
        """A table holding the counters of up to ``max_keys`` keys (``clock`` for ``hit_now``)."""
        return SlidingWindowTable(self, max_keys, clock)

    def __repr__(self) -> str:
        return f"SlidingWindow(limit={self.limit}, window={self.window!r})"


class SlidingWindowTable(_Table):
    """Per key: ``[current_index, current_count, previous_index, previous_count]``."""

    __slots__ = ("limit", "policy")

    def __init__(
        self, policy: SlidingWindow, max_keys: int, clock: Callable[[], float] | None = None
    ) -> None:
        super().__init__(max_keys, clock)
        self.policy = policy
        self.limit = policy.limit

    def _idle(self, state: object, now: float) -> bool:
        # Window indexes below int((now - w) / w) no longer count.
        w = self.policy.window
        return state[0] < int((now - w) / w)  # type: ignore[index,no-any-return]

    @staticmethod
    def _count(state: list[int], index: int) -> int:
        if state[0] == index:
            return state[1]
        if state[2] == index:
            return state[3]
        return 0

    def hit(self, key: str, now: float, cost: int = 1) -> Decision:
        """Decide one request of ``cost`` tokens (already validated) for ``key`` at ``now``."""
        w = self.policy.window
        limit = self.policy.limit
        # The same index and weight arithmetic as limits' memory storage, bit for bit.
        prev_index = int((now - w) / w)
        cur_index = int(now / w)
        state: list[int] | None = self._states.get(key)  # type: ignore[assignment]
        if state is None:
            prev_count = cur_count = 0
        else:
            prev_count = self._count(state, prev_index)
            cur_count = self._count(state, cur_index)
        prev_ttl = 0.0 if prev_count == 0 else (1 - (((now - w) / w) % 1)) * w
        cur_ttl = (1 - ((now / w) % 1)) * w  # time left in the current window
        weighted = prev_count * prev_ttl / w + cur_count
        if math.floor(weighted) + cost <= limit:
            if state is None:
                state = [cur_index, cost, _NO_WINDOW, 0]
                self._states[key] = state
                if len(self._states) > self.max_keys:
                    self._shrink(now, self.max_keys)
            elif state[0] == cur_index:
                state[1] += cost
            else:
                state[2], state[3] = state[0], state[1]
                state[0], state[1] = cur_index, cost
            cur_count += cost
            weighted = prev_count * prev_ttl / w + cur_count
            remaining = max(0, limit - math.floor(weighted))
            return Decision(
                True, remaining, 0.0, _sliding_reset(prev_count, cur_count, prev_ttl, cur_ttl, w)
            )
        remaining = max(0, limit - math.floor(weighted))
        return Decision(
            False,
            remaining,
            _sliding_retry(prev_count, cur_count, prev_ttl, cur_ttl, w, limit, cost),
            _sliding_reset(prev_count, cur_count, prev_ttl, cur_ttl, w),
        )


def _sliding_reset(prev: int, cur: int, prev_ttl: float, cur_ttl: float, w: float) -> float:
    # Both counts weigh nothing once the current window has become the previous one and
    # then ended too; with an empty current window, once the previous one stops counting.
    if cur:
        return cur_ttl + w
    if prev:
        return prev_ttl
    return 0.0


def _sliding_retry(
    prev: int, cur: int, prev_ttl: float, cur_ttl: float, w: float, limit: int, cost: int
) -> float:
    # Passing needs weighted < limit - cost + 1.
    room = limit - cost + 1
    need = room - cur
    if need > 0 and prev:
        # prev * ttl / w must drop below need: ttl < need * w / prev.
        return max(prev_ttl - need * w / prev, 0.0) + EPSILON
    # The current window must become the previous one: at cur_ttl + s into the next
    # window the weight is cur * (w - s) / w, which is below room once s > w - room*w/cur.
    if cur == 0:
        return cur_ttl
    return cur_ttl + max(0.0, w - room * w / cur) + EPSILON


class FixedWindow:
    """A fixed window: at most ``limit`` tokens per window of ``window`` seconds.

    A window starts at the first request after the previous window ended (as in the
    ``limits`` library's memory storage; see the module docstring).

    Args:
        limit: tokens per window (integer >= 1).
        window: window length in seconds (> 0).
    """

    __slots__ = ("limit", "window")

    kind = "fixed_window"

    def __init__(self, *, limit: int, window: float = 1.0) -> None:
        self.limit = _check_limit("limit", limit)
        self.window = _check_number("window", window)

    def new_table(
        self, max_keys: int = 100_000, clock: Callable[[], float] | None = None
    ) -> FixedWindowTable:
        """A table holding the counters of up to ``max_keys`` keys (``clock`` for ``hit_now``)."""
        return FixedWindowTable(self, max_keys, clock)

    def __repr__(self) -> str:
        return f"FixedWindow(limit={self.limit}, window={self.window!r})"


class FixedWindowTable(_Table):
    """Per key: ``[window_end, count]``."""

    __slots__ = ("limit", "policy")

    def __init__(
        self, policy: FixedWindow, max_keys: int, clock: Callable[[], float] | None = None
    ) -> None:
        super().__init__(max_keys, clock)
        self.policy = policy
        self.limit = policy.limit

    def _idle(self, state: object, now: float) -> bool:
        return state[0] <= now  # type: ignore[index,no-any-return]

    def hit(self, key: str, now: float, cost: int = 1) -> Decision:
        """Decide one request of ``cost`` tokens (already validated) for ``key`` at ``now``."""
        limit = self.policy.limit
        state: list[float] | None = self._states.get(key)  # type: ignore[assignment]
        if state is None:
            state = [now + self.policy.window, 0]
            self._states[key] = state
            if len(self._states) > self.max_keys:
                self._shrink(now, self.max_keys)
        elif state[0] <= now:
            state[0] = now + self.policy.window
            state[1] = 0
        count = int(state[1])
        end = state[0]
        if count + cost <= limit:
            state[1] = count + cost
            return Decision(True, limit - count - cost, 0.0, end - now)
        return Decision(False, limit - count, end - now, end - now)


Policy = TokenBucket | SlidingWindow | FixedWindow
"""Any of the three rate-limit policies."""

Table = TokenBucketTable | SlidingWindowTable | FixedWindowTable
"""Any of the three per-key state tables."""


__all__ = [
    "EPSILON",
    "Decision",
    "FixedWindow",
    "FixedWindowTable",
    "Policy",
    "SlidingWindow",
    "SlidingWindowTable",
    "Table",
    "TokenBucket",
    "TokenBucketTable",
    "check_cost",
]
