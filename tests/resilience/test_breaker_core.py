"""State-machine tests of the pure breaker core: every transition, with time as an argument."""

from __future__ import annotations

import pytest

from dsys.errors import ConfigError
from dsys.resilience.breaker_core import (
    CLOSED,
    DISABLED,
    FORCED_OPEN,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    BreakerCore,
    BreakerState,
    CountWindow,
    Permit,
    Rejected,
    TimeWindow,
)


def core(**kw: object) -> BreakerCore:
    base: dict[str, object] = {
        "failure_rate_threshold": 50.0,
        "window": 10,
        "minimum_calls": 4,
        "open_wait": 10.0,
        "permitted_calls_in_half_open": 2,
    }
    base.update(kw)
    return BreakerCore(BreakerConfig(**base), now=0.0)  # type: ignore[arg-type]


def ok(c: BreakerCore, now: float = 0.0, duration: float = 0.0) -> None:
    p = c.acquire(now)
    assert isinstance(p, Permit), p
    c.on_success(p, now, duration)


def fail(c: BreakerCore, now: float = 0.0, duration: float = 0.0) -> None:
    p = c.acquire(now)
    assert isinstance(p, Permit), p
    c.on_failure(p, now, duration)


def transitions(c: BreakerCore) -> list[tuple[str, str]]:
    out = [(e.from_state.value, e.to_state.value) for e in c.events]
    c.events.clear()
    return out


def open_core(c: BreakerCore, now: float = 0.0) -> None:
    for _ in range(4):
        fail(c, now)
    assert c.state is OPEN


def test_closed_to_open_when_failure_rate_reaches_threshold() -> None:
    c = core()
    ok(c)
    ok(c)
    fail(c)
    assert c.state is CLOSED  # 3 calls < minimum_calls
    fail(c)  # 2 of 4 failed = 50% >= 50%
    assert c.state is OPEN
    assert transitions(c) == [("closed", "open")]
    assert c.open_until == 10.0


def test_below_threshold_stays_closed() -> None:
    c = core(failure_rate_threshold=60.0)
    for _ in range(3):
        ok(c)
    for _ in range(4):
        fail(c)  # 4 of 7 = 57% < 60%
    assert c.state is CLOSED
    fail(c)  # 5 of 8 = 62.5%
    assert c.state is OPEN


def test_minimum_calls_prevents_tripping_on_few_calls() -> None:
    c = core(minimum_calls=5)
    for _ in range(4):
        fail(c)
    assert c.state is CLOSED
    fail(c)
    assert c.state is OPEN


def test_count_window_forgets_calls_older_than_size() -> None:
    c = core(window=CountWindow(size=4), minimum_calls=4, failure_rate_threshold=75.0)
    fail(c)
    fail(c)
    ok(c)
    ok(c)  # window: F F S S = 50%
    ok(c)  # F S S S
    ok(c)  # S S S S
    fail(c)  # S S S F = 25%
    fail(c)  # S S F F = 50%
    assert c.state is CLOSED
    assert c.counts(0.0).failures == 2
    fail(c)  # S F F F = 75%
    assert c.state is OPEN


def test_open_rejects_with_retry_after_then_half_open_after_wait() -> None:
    c = core()
    open_core(c, now=100.0)
    transitions(c)
    r = c.acquire(103.0)
    assert r == Rejected(7.0, OPEN)
    assert c.calls_rejected == 1
    assert c.state is OPEN
    p = c.acquire(110.0)
    assert isinstance(p, Permit)
    assert c.state is HALF_OPEN
    assert transitions(c) == [("open", "half_open")]


def test_half_open_permits_exactly_n_trial_calls() -> None:
    c = core(permitted_calls_in_half_open=3)
    open_core(c)
    permits = [c.acquire(10.0) for _ in range(5)]
    assert [isinstance(p, Permit) for p in permits] == [True, True, True, False, False]
    assert permits[3] == Rejected(None, HALF_OPEN)


def test_half_open_to_closed_when_trials_succeed() -> None:
    c = core()
    open_core(c)
    transitions(c)
    p1, p2 = c.acquire(10.0), c.acquire(10.0)
    assert isinstance(p1, Permit) and isinstance(p2, Permit)
    c.on_success(p1, 10.0)
    assert c.state is HALF_OPEN  # waits for both trials
    c.on_success(p2, 10.0)
    assert c.state is CLOSED
    assert transitions(c) == [("open", "half_open"), ("half_open", "closed")]
    assert c.counts(10.0).calls == 0  # a fresh window


def test_half_open_to_open_when_trials_fail_and_wait_grows_exponentially() -> None:
    c = core(open_wait=10.0, open_wait_multiplier=2.0, open_wait_max=35.0)
    open_core(c)
    now = 0.0
    expected_waits = [20.0, 35.0, 35.0]
    for wait in expected_waits:
        now = c.open_until
        fail(c, now)
        fail(c, now)  # 2 of 2 trials failed
        assert c.state is OPEN
        assert c.open_until == now + wait
    # success resets the wait to the initial one
    now = c.open_until
    ok(c, now)
    ok(c, now)
    assert c.state is CLOSED
    assert c.current_open_wait == 10.0


def test_fixed_open_wait_does_not_grow() -> None:
    c = core(open_wait=5.0)
    open_core(c)
    for _ in range(3):
        now = c.open_until
        fail(c, now)
        fail(c, now)
        assert c.open_until == now + 5.0


def test_half_open_mixed_trials_decide_by_threshold() -> None:
    c = core(permitted_calls_in_half_open=4, failure_rate_threshold=50.0)
    open_core(c)
    ok(c, 10.0)
    ok(c, 10.0)
    ok(c, 10.0)
    fail(c, 10.0)  # 25% < 50%
    assert c.state is CLOSED


def test_slow_calls_open_the_breaker() -> None:
    c = core(slow_call_duration=1.0, slow_call_rate_threshold=50.0)
    ok(c, duration=0.1)
    ok(c, duration=0.2)
    ok(c, duration=1.0)  # exactly the duration counts as slow
    assert c.state is CLOSED
    ok(c, duration=5.0)  # 2 of 4 slow
    assert c.state is OPEN
    assert c.calls_slow == 2
    assert c.calls_successful == 4
    assert c.calls_failed == 0


def test_slow_trials_reopen() -> None:
    c = core(slow_call_duration=1.0, slow_call_rate_threshold=50.0)
    for _ in range(4):
        ok(c, duration=2.0)
    assert c.state is OPEN
    ok(c, 10.0, duration=2.0)
    ok(c, 10.0, duration=2.0)
    assert c.state is OPEN
    assert c.events[-1].reason == "trial calls slow"


def test_slow_detection_off_by_default() -> None:
    c = core()
    for _ in range(10):
        ok(c, duration=1e9)
    assert c.state is CLOSED
    assert c.calls_slow == 0


def test_time_window_expires_old_failures() -> None:
    c = core(window=TimeWindow(seconds=10.0, buckets=10), minimum_calls=4)
    fail(c, 0.5)
    fail(c, 1.5)
    fail(c, 2.5)
    assert c.counts(2.6).failures == 3
    # at t=10.0 the bucket [0, 1) has left the window, at 11.0 the bucket [1, 2)
    assert c.counts(10.0).failures == 2
    assert c.counts(11.0).failures == 1
    assert c.counts(13.0).failures == 0
    ok(c, 13.0)
    ok(c, 13.1)
    fail(c, 13.2)
    assert c.state is CLOSED  # 3 calls in window: below minimum_calls
    fail(c, 13.3)  # 2 of 4
    assert c.state is OPEN


def test_time_window_opens_when_successes_expire() -> None:
    """The failure rate can rise because old successes leave the window."""
    c = core(window=TimeWindow(seconds=4.0, buckets=4), minimum_calls=2)
    for _ in range(8):
        ok(c, 0.0)
    fail(c, 3.0)
    fail(c, 3.5)
    assert c.state is CLOSED  # 2 of 10
    ok(c, 4.2)  # the 8 successes at t=0 expired: 2 failures of 3 calls
    assert c.state is OPEN


def test_stale_permit_outcomes_are_ignored() -> None:
    c = core()
    slow_call = c.acquire(0.0)
    assert isinstance(slow_call, Permit)
    open_core(c)
    p = c.acquire(10.0)  # half-open trial
    assert isinstance(p, Permit)
    c.on_failure(slow_call, 10.0)  # from the closed generation: ignored
    assert c.state is HALF_OPEN
    assert c.counts(10.0).calls == 0


def test_release_frees_a_half_open_slot() -> None:
    c = core(permitted_calls_in_half_open=1)
    open_core(c)
    p = c.acquire(10.0)
    assert isinstance(p, Permit)
    assert isinstance(c.acquire(10.0), Rejected)
    c.release(p)
    p2 = c.acquire(10.0)
    assert isinstance(p2, Permit)
    c.on_success(p2, 10.0)
    assert c.state is CLOSED
    assert c.calls_ignored == 1


def test_forced_open_rejects_without_retry_after_until_reset() -> None:
    c = core()
    c.force_open(1.0)
    assert c.state is FORCED_OPEN
    assert c.acquire(1e9) == Rejected(None, FORCED_OPEN)
    c.reset(2.0)
    assert c.state is CLOSED
    assert transitions(c) == [("closed", "forced_open"), ("forced_open", "closed")]


def test_disabled_permits_everything_and_records_nothing() -> None:
    c = core()
    c.disable(0.0)
    for _ in range(20):
        fail(c)
    assert c.state is DISABLED
    c.reset(1.0)
    assert c.state is CLOSED
    assert c.counts(1.0).calls == 0


def test_trip_and_adopt() -> None:
    c = core()
    c.trip(5.0)
    assert c.state is OPEN and c.open_until == 15.0
    c.adopt(OPEN, 6.0, 40.0)
    assert c.open_until == 40.0
    c.adopt(CLOSED, 7.0, 0.0)
    assert c.state is CLOSED
    c.adopt(HALF_OPEN, 8.0, 0.0)  # local only: ignored
    assert c.state is CLOSED


def test_transitions_are_counted_by_pair() -> None:
    c = core()
    open_core(c)
    ok(c, 10.0)
    ok(c, 10.0)
    assert c.transitions == {
        (CLOSED, OPEN): 1,
        (OPEN, HALF_OPEN): 1,
        (HALF_OPEN, CLOSED): 1,
    }
    assert c.generation == 3


def test_reset_in_closed_clears_the_window() -> None:
    c = core()
    fail(c)
    fail(c)
    c.reset(0.0)
    assert c.counts(0.0).calls == 0
    assert c.events == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure_rate_threshold": 0}, "failure_rate_threshold"),
        ({"failure_rate_threshold": 101}, "failure_rate_threshold"),
        ({"failure_rate_threshold": float("nan")}, "failure_rate_threshold"),
        ({"slow_call_rate_threshold": -5}, "slow_call_rate_threshold"),
        ({"slow_call_duration": 0}, "slow_call_duration"),
        ({"window": 0}, "window size"),
        ({"window": "10"}, "window must be"),
        ({"minimum_calls": 0}, "minimum_calls"),
        ({"open_wait": -1}, "open_wait"),
        ({"open_wait_multiplier": 0.5}, "open_wait_multiplier"),
        ({"open_wait": 10, "open_wait_max": 5}, "open_wait_max"),
        ({"permitted_calls_in_half_open": 0}, "permitted_calls_in_half_open"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_bad_configuration_raises_config_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BreakerConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: CountWindow(size=0), "CountWindow size"),
        (lambda: TimeWindow(seconds=0), "TimeWindow seconds"),
        (lambda: TimeWindow(seconds=-1), "TimeWindow seconds"),
        (lambda: TimeWindow(seconds=10, buckets=0), "TimeWindow buckets"),
    ],
    ids=["count-size-0", "time-0s", "time-negative", "buckets-0"],
)
def test_bad_windows_raise_config_error(factory: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        factory()  # type: ignore[operator]


def test_states_have_stable_names() -> None:
    assert [s.value for s in BreakerState] == [
        "closed",
        "open",
        "half_open",
        "forced_open",
        "disabled",
    ]


def test_fast_flag_tracks_whether_a_success_could_open() -> None:
    c = core(minimum_calls=4)
    assert c.fast
    fail(c)
    assert not c.fast  # a failure and fewer than minimum_calls: successes must be checked
    ok(c)
    ok(c)
    assert not c.fast
    ok(c)  # 4 calls, 25%: closed, and from now on a success cannot open it
    assert c.state is CLOSED and c.fast
    fail(c)
    fail(c)  # 3 of 6 failed
    assert c.state is OPEN and not c.fast


def test_success_reaching_minimum_calls_opens() -> None:
    c = core(minimum_calls=4)
    for _ in range(3):
        fail(c)
    ok(c)
    assert c.state is OPEN
