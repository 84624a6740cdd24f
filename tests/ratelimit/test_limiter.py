"""Limiter + MemoryStore: sync hot path, async API, waiting, decorator, metrics, bad input."""

from __future__ import annotations

import asyncio
import math

import pytest

from dsys.clock import ManualClock
from dsys.errors import BadInputError, ConfigError, RateLimitedError
from dsys.observability import Metrics
from dsys.ratelimit import Decision, Limiter, MemoryStore


def _limiter(**kw: object) -> tuple[Limiter, ManualClock]:
    clock = ManualClock(100.0)
    kw.setdefault("store", MemoryStore(clock=clock))
    return Limiter(**kw), clock  # type: ignore[arg-type]


def test_hit_sync_follows_the_bucket() -> None:
    lim, clock = _limiter(rate=100, per=1.0, burst=100)
    decisions = [lim.hit_sync("k") for _ in range(101)]
    assert all(d.allowed for d in decisions[:100])
    assert decisions[99].remaining == 0
    last = decisions[100]
    assert isinstance(last, Decision) and not last.allowed
    assert last.retry_after == pytest.approx(0.01)
    assert last.reset == pytest.approx(1.0)
    clock.advance(0.5)
    assert lim.hit_sync("k", cost=50).allowed
    assert not lim.hit_sync("k").allowed
    assert (lim.allowed_count, lim.denied_count) == (101, 2)


async def test_hit_async_equals_hit_sync() -> None:
    a, _ = _limiter(rate=5, per=1.0, burst=3)
    b, _ = _limiter(rate=5, per=1.0, burst=3)
    for cost in (1, 2, 1, 1, 3):
        assert await a.hit("k", cost) == b.hit_sync("k", cost)


@pytest.mark.parametrize("algorithm", ["sliding_window", "fixed_window"])
def test_window_algorithms(algorithm: str) -> None:
    lim, clock = _limiter(rate=3, per=10.0, algorithm=algorithm)
    assert [lim.hit_sync("k").allowed for _ in range(4)] == [True, True, True, False]
    clock.advance(25.0)
    assert lim.hit_sync("k").allowed


def test_metrics_count_by_limit_name() -> None:
    metrics = Metrics("ratelimit")
    a, _ = _limiter(rate=1, burst=1, name="login", metrics=metrics)
    b, _ = _limiter(rate=1, burst=1, name="api", metrics=metrics)
    a.hit_sync("x")
    a.hit_sync("x")
    b.hit_sync("y")
    text = metrics.render().decode()
    assert 'dsys_ratelimit_allowed_total{limit="login"} 1.0' in text
    assert 'dsys_ratelimit_denied_total{limit="login"} 1.0' in text
    assert 'dsys_ratelimit_allowed_total{limit="api"} 1.0' in text
    assert 'dsys_ratelimit_store_errors_total{limit="api"} 0.0' in text


async def test_acquire_waits_then_passes() -> None:
    lim = Limiter(rate=50, per=1.0, burst=1)  # real clock: one token every 20 ms
    async with lim.acquire("k") as first:
        assert first.allowed
    async with lim.acquire("k", max_wait=1.0) as second:  # waits about 20 ms
        assert second.allowed
    assert lim.allowed_count == 2


async def test_acquire_raises_when_the_wait_is_too_long() -> None:
    lim, _ = _limiter(rate=1, per=60.0, burst=1)
    await lim.wait("k")
    with pytest.raises(RateLimitedError) as info:
        async with lim.acquire("k", max_wait=0.5):
            pytest.fail("must not enter")
    assert info.value.retry_after == pytest.approx(60.0)


async def test_decorator_limits_calls() -> None:
    lim, _ = _limiter(rate=2, per=60.0, burst=2, max_wait=0.0)
    calls: list[str] = []

    @lim.limit_calls(key=lambda user: f"user:{user}")
    async def work(user: str) -> str:
        calls.append(user)
        return user.upper()

    assert await work("a") == "A"
    assert await work("a") == "A"
    assert await work("b") == "B"
    with pytest.raises(RateLimitedError):
        await work("a")
    assert calls == ["a", "a", "b"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": -5}, "rate must be a positive"),
        ({"rate": 10, "burst": 0}, "burst must be at least 1"),
        ({"rate": 10, "per": -1.0}, "per must be a positive"),
        ({"rate": 10, "algorithm": "leaky"}, "unknown algorithm"),
        ({"rate": 10, "on_store_error": "maybe"}, "on_store_error"),
        ({"rate": 10, "max_wait": math.nan}, "max_wait"),
        ({"rate": 2.5, "algorithm": "fixed_window"}, "integer rate"),
        ({"rate": 5, "burst": 7, "algorithm": "sliding_window"}, "no burst"),
        ({"rate": 5, "store": object()}, "store must be"),
        ({"rate": 5, "name": ""}, "name"),
        ({"rate": 5, "on_store_error": "closed", "failure_retry_after": 0}, "must be > 0"),
    ],
)
def test_bad_limiter_config(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Limiter(**kwargs)  # type: ignore[arg-type]


async def test_bad_costs_are_refused_clearly() -> None:
    lim, _ = _limiter(rate=10, burst=10)
    with pytest.raises(BadInputError, match="exceeds the limit of 10"):
        lim.hit_sync("k", cost=11)
    with pytest.raises(BadInputError, match="exceeds"):
        await lim.hit("k", cost=10**9)
    with pytest.raises(BadInputError, match="at least 1"):
        lim.hit_sync("k", cost=0)
    with pytest.raises(BadInputError):
        await lim.wait("k", max_wait=-1)


def test_memory_store_is_bounded() -> None:
    store = MemoryStore(max_keys=100, clock=ManualClock())
    lim = Limiter(rate=1, burst=1, store=store)
    for i in range(1000):
        lim.hit_sync(f"k{i}")
    assert len(store) <= 100
    with pytest.raises(ConfigError):
        MemoryStore(max_keys=0)


async def test_many_limiters_share_one_store() -> None:
    store = MemoryStore()
    a = Limiter(rate=1, burst=1, store=store)
    b = Limiter(rate=1, burst=1, store=store)
    assert a.hit_sync("k").allowed
    assert b.hit_sync("k").allowed  # separate policies, separate tables
    await asyncio.sleep(0)
    assert "MemoryStore" in repr(a)


async def test_limiter_and_stores_are_async_context_managers() -> None:
    async with MemoryStore() as store, Limiter(rate=1, burst=1, store=store) as lim:
        assert lim.hit_sync("k").allowed
        assert len(store) == 1
    assert len(store) == 0  # closing a MemoryStore forgets its keys
