from __future__ import annotations

import pytest

from dsys.balance.health import (
    ActiveHealth,
    BecameHealthy,
    BecameUnhealthy,
    Ejected,
    HealthCheckConfig,
    OutlierConfig,
    OutlierDetector,
    Returned,
)
from dsys.balance.pool import Pool, PoolConfig
from dsys.clock import ManualClock
from dsys.errors import ConfigError, NoHealthyBackendError


def test_active_health_thresholds() -> None:
    h = ActiveHealth("a", HealthCheckConfig(healthy_threshold=2, unhealthy_threshold=3))
    assert h.healthy
    assert h.record(False, "refused") is None
    assert h.record(False, "refused") is None
    assert h.record(True) is None  # a success resets the failure run
    assert h.record(False) is None
    assert h.record(False) is None
    assert h.record(False, "refused") == BecameUnhealthy("a", "refused")
    assert not h.healthy
    assert h.record(True) is None
    assert h.record(False) is None  # resets the success run
    assert h.record(True) is None
    assert h.record(True) == BecameHealthy("a")
    assert h.healthy


def test_health_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        HealthCheckConfig(path="healthz")
    with pytest.raises(ConfigError):
        HealthCheckConfig(interval=0)
    with pytest.raises(ConfigError):
        HealthCheckConfig(unhealthy_threshold=0)
    with pytest.raises(ConfigError):
        OutlierConfig(max_ejection_percent=150)
    with pytest.raises(ConfigError):
        OutlierConfig(base_ejection_time=10, max_ejection_time=5)


def test_consecutive_errors_eject_for_a_growing_time() -> None:
    d = OutlierDetector(
        OutlierConfig(consecutive_errors=3, base_ejection_time=10, max_ejection_time=25)
    )
    for ep in "abc":
        d.add(ep)
    assert d.record_failure("a", now=0) is None
    d.record_success("a", now=0)  # success resets the run
    assert d.record_failure("a", now=0) is None
    assert d.record_failure("a", now=0) is None
    assert d.record_failure("a", now=1) == Ejected("a", 11.0, 1)
    assert d.is_ejected("a") and d.ejected_count == 1
    assert d.tick(now=10.9) == []
    assert d.tick(now=11.0) == [Returned("a")]
    assert not d.is_ejected("a")
    for _ in range(2):
        d.record_failure("a", now=12)
    assert d.record_failure("a", now=12) == Ejected("a", 32.0, 2)  # twice as long
    d.tick(now=32)
    for _ in range(3):
        ev = d.record_failure("a", now=33)
    assert ev == Ejected("a", 58.0, 3)  # 30 s capped at 25
    assert d.ejections("a") == 3


def test_ejection_multiplier_shrinks_after_calm_periods() -> None:
    d = OutlierDetector(OutlierConfig(consecutive_errors=1, base_ejection_time=10))
    for ep in "abc":
        d.add(ep)
    assert d.record_failure("a", now=0) == Ejected("a", 10.0, 1)
    d.tick(now=10)
    # 20 s in the pool without trouble: back to a first-time ejection.
    assert d.record_failure("a", now=30) == Ejected("a", 40.0, 1)


def test_max_ejection_percent_never_empties_the_pool() -> None:
    d = OutlierDetector(OutlierConfig(consecutive_errors=1, max_ejection_percent=100))
    for ep in "abc":
        d.add(ep)
    assert d.record_failure("a", now=0) is not None
    assert d.record_failure("b", now=0) is not None
    assert d.record_failure("c", now=0) is None  # the last one stays in
    assert d.ejected_count == 2

    half = OutlierDetector(OutlierConfig(consecutive_errors=1, max_ejection_percent=50))
    for ep in "abcd":
        half.add(ep)
    assert [half.record_failure(ep, now=0) is not None for ep in "abcd"] == [
        True,
        True,
        False,
        False,
    ]
    half.remove("a")
    assert half.ejected_count == 1


def _pool(clock: ManualClock, **kw: object) -> Pool:
    cfg = PoolConfig(
        strategy="round-robin",
        outlier=OutlierConfig(consecutive_errors=2, base_ejection_time=5),
        circuit_breaker=False,
        **kw,  # type: ignore[arg-type]
    )
    return Pool(
        ["http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"],
        config=cfg,
        clock=clock,
    )


def test_pool_ejects_on_failures_and_returns_after_the_ejection_time() -> None:
    clock = ManualClock()
    events: list[object] = []
    pool = _pool(clock)
    pool._on_event = events.append
    bad = "http://127.0.0.1:9002"
    for _ in range(2):
        lease = pool.acquire(exclude=[u for u in pool.urls if u != bad])
        pool.release(lease, ok=False, error="status 500")
    assert bad not in pool.eligible()
    assert {pool.acquire().endpoint for _ in range(6)} == set(pool.urls) - {bad}
    snap = {e["url"]: e for e in pool.snapshot()}
    assert snap[bad]["state"] == "ejected" and snap[bad]["ejections"] == 1
    clock.advance(5)
    assert bad in {pool.acquire().endpoint for _ in range(3)}
    assert [type(e).__name__ for e in events] == ["Ejected", "Returned"]


def test_pool_drain_add_remove_and_empty_error() -> None:
    clock = ManualClock()
    pool = _pool(clock)
    pool.drain("http://127.0.0.1:9001")
    pool.drain("http://127.0.0.1:9002")
    assert pool.eligible() == ["http://127.0.0.1:9003"]
    lease = pool.acquire()
    with pytest.raises(NoHealthyBackendError, match="2 draining, 1 tried"):
        pool.acquire(exclude=[lease.endpoint])
    pool.release(lease, ok=True)
    pool.remove("http://127.0.0.1:9003")
    with pytest.raises(NoHealthyBackendError, match="2 draining"):
        pool.acquire()
    added = pool.add("http://localhost:9004/")
    assert added == "http://localhost:9004"
    assert pool.acquire().endpoint == added
    pool.drain("http://127.0.0.1:9001", False)
    assert "http://127.0.0.1:9001" in pool.eligible()
    with pytest.raises(ConfigError, match="no endpoint"):
        pool.drain("http://127.0.0.1:9999")
    with pytest.raises(ConfigError, match="bad endpoint"):
        pool.add("ftp://x")
    with pytest.raises(ConfigError, match="weight"):
        pool.add("http://127.0.0.1:9005", 0)


def test_pool_active_health_marks_unhealthy_and_back() -> None:
    clock = ManualClock()
    pool = _pool(clock, health_check=HealthCheckConfig(healthy_threshold=2, unhealthy_threshold=2))
    ep = "http://127.0.0.1:9001"
    pool.record_probe(ep, False, "refused")
    assert ep in pool.eligible()
    pool.record_probe(ep, False, "refused")
    assert ep not in pool.eligible()
    assert {e["url"]: e["state"] for e in pool.snapshot()}[ep] == "unhealthy"
    pool.record_probe(ep, True)
    pool.record_probe(ep, True)
    assert ep in pool.eligible()
    pool.record_probe("http://127.0.0.1:1", False)  # unknown endpoint: ignored


def test_pool_circuit_breaker_opens_on_failures_and_half_opens_later() -> None:
    clock = ManualClock()
    pool = Pool(
        ["http://127.0.0.1:9001"],
        config=PoolConfig(strategy="round-robin", outlier=None),
        clock=clock,
    )
    for _ in range(10):
        lease = pool.acquire()
        pool.release(lease, ok=False, error="status 500", feed_breaker=True)
    with pytest.raises(NoHealthyBackendError, match="1 circuit open"):
        pool.acquire()
    assert pool.snapshot()[0]["state"] == "circuit_open"
    clock.advance(5.0)  # the default breaker's first open wait
    lease = pool.acquire()  # a half-open trial call
    pool.release(lease, ok=True, feed_breaker=True)
    assert pool.snapshot()[0]["circuit"] in ("half_open", "closed")


def test_breaker_sees_the_same_window_when_clean_successes_are_skipped() -> None:
    clock = ManualClock()
    pool = Pool(
        ["http://127.0.0.1:9001", "http://127.0.0.1:9002"],
        config=PoolConfig(strategy="round-robin", outlier=None),
        clock=clock,
    )
    ep = "http://127.0.0.1:9001"
    other = ["http://127.0.0.1:9002"]
    for _ in range(25):  # the last 5 are not reported: the window is all successes
        pool.release(pool.acquire(exclude=other), ok=True, feed_breaker=True)
    for i in range(10):
        assert ep in [e["url"] for e in pool.snapshot() if e["state"] == "up"], i
        pool.release(pool.acquire(exclude=other), ok=False, feed_breaker=True)
    # 10 failures among the last 20 calls: 50 %, the default threshold.
    assert {e["url"]: e["state"] for e in pool.snapshot()}[ep] == "circuit_open"
