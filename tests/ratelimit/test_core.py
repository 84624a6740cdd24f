"""The pure algorithms: exactness properties with a fake clock, and parity with `limits`."""

from __future__ import annotations

import math
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsys.errors import BadInputError, ConfigError
from dsys.ratelimit.core import (
    Decision,
    FixedWindow,
    SlidingWindow,
    TokenBucket,
    check_cost,
)

# -- token bucket (GCRA) ---------------------------------------------------------------

rates = st.sampled_from([1.0, 2.5, 10.0, 100.0, 1000.0])
bursts = st.integers(min_value=1, max_value=50)
gaps = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=0.5), st.integers(min_value=1, max_value=5)),
    min_size=1,
    max_size=300,
)


def _replay(
    bucket: TokenBucket, events: list[tuple[float, int]], start: float = 1000.0
) -> list[tuple[float, int, Decision]]:
    table = bucket.new_table()
    now = start
    out = []
    for gap, cost in events:
        now += gap
        cost = min(cost, bucket.burst)
        out.append((now, cost, table.hit("k", now, cost)))
    return out


@settings(max_examples=200, deadline=None)
@given(rate=rates, burst=bursts, events=gaps)
def test_no_window_admits_more_than_burst_plus_rate_times_length(
    rate: float, burst: int, events: list[tuple[float, int]]
) -> None:
    bucket = TokenBucket(rate=rate, per=1.0, burst=burst)
    allowed = [(t, c) for t, c, d in _replay(bucket, events) if d.allowed]
    # Every window [t_i, t_j] between two allowed requests (the tightest windows).
    for i in range(len(allowed)):
        total = 0
        for j in range(i, len(allowed)):
            total += allowed[j][1]
            length = allowed[j][0] - allowed[i][0]
            assert total <= burst + rate * length + 1e-6, (i, j, total, length)


@settings(max_examples=100, deadline=None)
@given(
    rate=rates,
    per=st.sampled_from([0.5, 1.0, 60.0]),
    burst=bursts,
    n=st.integers(min_value=1, max_value=400),
    start=st.floats(min_value=0.0, max_value=1e4),
)
def test_a_steady_client_at_the_rate_is_never_refused(
    rate: float, per: float, burst: int, n: int, start: float
) -> None:
    bucket = TokenBucket(rate=rate, per=per, burst=burst)
    table = bucket.new_table()
    interval = per / rate
    for k in range(n):
        d = table.hit("k", start + k * interval, 1)
        assert d.allowed, (k, d)


@settings(max_examples=100, deadline=None)
@given(rate=rates, burst=bursts, events=gaps)
def test_retry_after_is_exact(rate: float, burst: int, events: list[tuple[float, int]]) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    table = bucket.new_table()
    now = 50.0
    for gap, cost in events:
        now += gap
        cost = min(cost, burst)
        d = table.hit("k", now, cost)
        if not d.allowed:
            assert d.retry_after > 0
            # A bit earlier it still fails; at retry_after it passes.
            probe = bucket.new_table()
            probe._states["k"] = table.tat("k")
            if d.retry_after > 1e-6:
                assert not probe.hit("k", now + d.retry_after - 1e-6, cost).allowed
            assert probe.hit("k", now + d.retry_after, cost).allowed


def test_decision_fields_for_a_simple_bucket() -> None:
    table = TokenBucket(rate=10, per=1.0, burst=5).new_table()
    first = table.hit("a", 100.0, 1)
    assert first == Decision(True, 4, 0.0, pytest.approx(0.1))  # type: ignore[arg-type]
    for _ in range(4):
        assert table.hit("a", 100.0, 1).allowed
    refused = table.hit("a", 100.0, 1)
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after == pytest.approx(0.1)
    assert refused.reset == pytest.approx(0.5)  # five tokens at 10/s until full
    later = table.hit("a", 100.25, 1)  # 2.5 tokens back: one spent, 1 whole left
    assert later.allowed and later.remaining == 1
    assert table.hit("b", 100.0, 5).remaining == 0  # keys are independent


def test_take_grants_between_need_and_most() -> None:
    table = TokenBucket(rate=10, burst=20).new_table()
    granted, d = table.take("k", 0.0, 1, 8)
    assert granted == 8 and d.allowed and d.remaining == 12
    granted, d = table.take("k", 0.0, 1, 100)
    assert granted == 12 and d.remaining == 0
    granted, d = table.take("k", 0.0, 2, 5)
    assert granted == 0 and not d.allowed
    assert d.retry_after == pytest.approx(0.2)
    granted, d = table.take("k", 0.2, 2, 5)
    assert granted == 2


def test_hit_now_counts_and_reports_refusals() -> None:
    now = [0.0]
    table = TokenBucket(rate=1, burst=2).new_table(clock=lambda: now[0])
    seen: list[tuple[str, int, Decision]] = []
    table.on_refuse = lambda k, c, d: seen.append((k, c, d))
    assert table.hit_now("k").allowed
    assert table.hit_now("k").allowed
    assert not table.hit_now("k").allowed
    with pytest.raises(BadInputError, match="exceeds the limit of 2"):
        table.hit_now("k", 3)
    assert (table.allowed, table.denied) == (2, 1)
    assert seen[0][0] == "k" and seen[0][2].retry_after == pytest.approx(1.0)


@settings(max_examples=50, deadline=None)
@given(rate=rates, burst=bursts, events=gaps)
def test_hit_now_equals_hit(rate: float, burst: int, events: list[tuple[float, int]]) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    clock = [10.0]
    fast = bucket.new_table(clock=lambda: clock[0])
    slow = bucket.new_table()
    for gap, cost in events:
        clock[0] += gap
        cost = min(cost, burst)
        assert fast.hit_now("k", cost) == slow.hit("k", clock[0], cost)


def test_bounded_memory_drops_idle_keys_first() -> None:
    table = TokenBucket(rate=1, burst=1).new_table(max_keys=10)
    for i in range(10):
        table.hit(f"old{i}", 0.0, 1)
    # At t=5 every old bucket is full again: dropping them costs nothing.
    for i in range(5):
        table.hit(f"new{i}", 5.0, 1)
    assert len(table) == 5 and table.evicted_active == 0
    assert all(k.startswith("new") for k in table)


def test_bounded_memory_evicts_active_keys_when_all_are_busy() -> None:
    table = TokenBucket(rate=1, burst=1).new_table(max_keys=10)
    for i in range(25):
        table.hit(f"k{i}", 0.0, 1)
        assert len(table) <= 10
    assert table.evicted_active > 0
    assert "k24" in table  # the newest key survives


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": -1}, "rate must be a positive"),
        ({"rate": 0}, "rate must be a positive"),
        ({"rate": math.inf}, "rate must be a positive finite"),
        ({"rate": 10, "per": 0}, "per must be a positive"),
        ({"rate": 10, "burst": 0}, "burst must be at least 1"),
        ({"rate": 10, "burst": 1.5}, "burst must be a positive integer"),
        ({"rate": "10"}, "rate must be a number"),
    ],
    ids=["negative-rate", "zero-rate", "inf-rate", "zero-per", "zero-burst", "float-burst", "str"],
)
def test_bad_token_bucket_config(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TokenBucket(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cost", "match"),
    [(0, "at least 1"), (-3, "at least 1"), (11, "exceeds"), (1.5, "integer"), (True, "integer")],
)
def test_bad_cost(cost: object, match: str) -> None:
    with pytest.raises(BadInputError, match=match):
        check_cost(cost, 10)


# -- parity with the `limits` library ---------------------------------------------------

limits = pytest.importorskip("limits")


class _FakeTime(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("time")
        self.now = 0.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def fake_limits(monkeypatch: pytest.MonkeyPatch) -> _FakeTime:
    """`limits`' memory storage reads `time.time()`; give it our fake clock."""
    import limits.storage.memory as memory_module

    fake = _FakeTime()
    monkeypatch.setattr(memory_module, "time", fake)
    return fake


traffic = st.lists(
    st.floats(min_value=0.0, max_value=0.7, allow_nan=False), min_size=1, max_size=150
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    limit=st.integers(1, 20),
    window=st.sampled_from([1, 2, 10]),
    steps=traffic,
    costs=st.lists(st.integers(1, 3), min_size=150, max_size=150),
)
def test_sliding_window_matches_limits(
    fake_limits: _FakeTime, limit: int, window: int, steps: list[float], costs: list[int]
) -> None:
    """Same decisions and remaining counts as limits, for costs 1..3 too."""
    from limits import RateLimitItemPerSecond, storage, strategies

    store = storage.MemoryStorage()
    try:
        theirs = strategies.SlidingWindowCounterRateLimiter(store)
        item = RateLimitItemPerSecond(limit, window)
        ours = SlidingWindow(limit=limit, window=float(window)).new_table()
        now = 1000.0 + window * 0.37
        for gap, cost in zip(steps, costs, strict=False):
            cost = min(cost, limit)
            now += gap * window
            fake_limits.now = now
            expected = theirs.hit(item, "k", cost=cost)
            got = ours.hit("k", now, cost)
            assert got.allowed == expected, (now, cost, got)
            stats = theirs.get_window_stats(item, "k")
            assert got.remaining == stats.remaining
    finally:
        store.timer.cancel()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(limit=st.integers(1, 20), window=st.sampled_from([1, 2, 10]), steps=traffic)
def test_fixed_window_matches_limits(
    fake_limits: _FakeTime, limit: int, window: int, steps: list[float]
) -> None:
    from limits import RateLimitItemPerSecond, storage, strategies

    store = storage.MemoryStorage()
    try:
        theirs = strategies.FixedWindowRateLimiter(store)
        item = RateLimitItemPerSecond(limit, window)
        ours = FixedWindow(limit=limit, window=float(window)).new_table()
        now = 500.0
        for gap in steps:
            now += gap * window
            fake_limits.now = now
            expected = theirs.hit(item, "k")
            got = ours.hit("k", now, 1)
            assert got.allowed == expected, (now, got)
            assert got.remaining == theirs.get_window_stats(item, "k").remaining
    finally:
        store.timer.cancel()


def test_fixed_window_charges_only_allowed_requests() -> None:
    # The documented difference from `limits`: a refused cost-5 request is not charged.
    table = FixedWindow(limit=10, window=1.0).new_table()
    assert table.hit("k", 0.0, 8).allowed
    assert not table.hit("k", 0.1, 5).allowed
    assert table.hit("k", 0.2, 2).allowed
    d = table.hit("k", 0.3, 1)
    assert not d.allowed and d.retry_after == pytest.approx(0.7)
    assert table.hit("k", 1.0, 10).allowed  # a new window at t=1.0


@settings(max_examples=100, deadline=None)
@given(limit=st.integers(1, 20), steps=traffic, cost=st.integers(1, 3))
def test_sliding_window_retry_after_passes(limit: int, steps: list[float], cost: int) -> None:
    cost = min(cost, limit)
    policy = SlidingWindow(limit=limit, window=1.0)
    table = policy.new_table()
    now = 100.0
    for gap in steps:
        now += gap
        d = table.hit("k", now, cost)
        if not d.allowed:
            probe = policy.new_table()
            probe._states["k"] = list(table._states["k"])  # type: ignore[call-overload]
            assert probe.hit("k", now + d.retry_after, cost).allowed, d


def test_window_configs_are_checked() -> None:
    with pytest.raises(ConfigError):
        SlidingWindow(limit=0)
    with pytest.raises(ConfigError):
        FixedWindow(limit=5, window=-1)
