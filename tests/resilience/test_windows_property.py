"""Property tests: the O(1) windows count exactly what a brute-force model counts."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.resilience.breaker_core import FAILED, SLOW, CountRing, TimeBuckets

outcomes = st.sampled_from([0, FAILED, SLOW, FAILED | SLOW])


@settings(max_examples=200, deadline=None)
@given(
    seconds=st.sampled_from([1.0, 2.5, 10.0, 60.0]),
    buckets=st.integers(min_value=1, max_value=20),
    steps=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=30.0), outcomes, st.booleans()),
        max_size=120,
    ),
)
def test_time_window_matches_brute_force(
    seconds: float, buckets: int, steps: list[tuple[float, int, bool]]
) -> None:
    w = TimeBuckets(seconds, buckets)
    width = seconds / buckets
    now = 0.0
    log: list[tuple[int, int]] = []  # (bucket, outcome)
    for gap, outcome, clear in steps:
        now += gap
        if clear and outcome == 0:
            w.clear()
            log.clear()
            continue
        if outcome != 0:
            w.add(now, outcome)
        elif not w.try_add_success(now):  # the adapter's fast path for successes...
            w.add(now, outcome)  # ...declines when the bucket moved on
        log.append((int(now // width), outcome))
        head = int(now // width)
        live = [o for b, o in log if b > head - buckets]
        assert w.calls == len(live)
        assert w.failures == sum(1 for o in live if o & FAILED)
        assert w.slow == sum(1 for o in live if o & SLOW)
    # reading later expires exactly the old buckets too
    later = now + seconds / 2
    w.expire(later)
    head = int(later // width)
    live = [o for b, o in log if b > head - buckets]
    assert w.calls == len(live)
    assert w.failures == sum(1 for o in live if o & FAILED)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=12),
    steps=st.lists(st.one_of(outcomes, st.just(-1)), max_size=150),
)
def test_count_window_matches_brute_force(size: int, steps: list[int]) -> None:
    w = CountRing(size)
    log: list[int] = []
    for outcome in steps:
        if outcome == -1:
            w.clear()
            log.clear()
            continue
        if outcome == 0:
            w.add_success()
        else:
            w.add(0.0, outcome)
        log.append(outcome)
        w.expire(0.0)
        live = log[-size:]
        assert w.calls == len(live)
        assert w.failures == sum(1 for o in live if o & FAILED)
        assert w.slow == sum(1 for o in live if o & SLOW)


@settings(max_examples=300, deadline=None)
@given(
    seconds=st.floats(min_value=1e-3, max_value=1e4),
    buckets=st.integers(min_value=1, max_value=3600),
    now=st.floats(min_value=0.0, max_value=1e7),
    probe=st.floats(min_value=0.0, max_value=1e7),
)
def test_fast_path_edge_agrees_with_the_bucket_of_a_time(
    seconds: float, buckets: int, now: float, probe: float
) -> None:
    # The fast path tests `t < until`; it must mean exactly "t is not past the newest
    # bucket", whatever the float rounding at the bucket's edge.
    w = TimeBuckets(seconds, buckets)
    w.add(now, 0)
    head = w.bucket_of(now)
    for t in (probe, w.until, math.nextafter(w.until, -math.inf)):
        assert (t < w.until) == (w.bucket_of(t) <= head), (t, w.until, head)
