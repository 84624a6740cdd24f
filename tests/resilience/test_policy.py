"""Policy composition: order as written, every piece doing its job, fallback last."""

from __future__ import annotations

import asyncio
import random

import pytest
from prometheus_client import CollectorRegistry

from dsys.clock import ManualClock
from dsys.errors import CircuitOpenError, ConfigError, ConnectError, RequestTimeout
from dsys.resilience import (
    Backoff,
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    Fallback,
    Policy,
    Retry,
)


def no_sleep_retry(attempts: int) -> Retry:
    async def sleep(_: float) -> None:
        await asyncio.sleep(0)

    return Retry(
        max_attempts=attempts,
        backoff=Backoff(initial=0.0, maximum=0.0),
        sleep=sleep,
        rng=random.Random(1),
    )


def test_chain_starts_on_the_class_and_is_immutable() -> None:
    base = Policy.timeout(2.0)
    longer = base.retry(max_attempts=4)
    assert base.steps == ("timeout(2)",)
    assert longer.steps == ("timeout(2)", "retry(4)")
    assert "retry(4)" in repr(longer)


async def test_retry_outside_breaker_counts_every_attempt() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(
        "dep", window=10, minimum_calls=3, clock=clock, metrics=CollectorRegistry()
    )
    policy = Policy.retry(no_sleep_retry(5)).breaker(breaker)
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectError("refused")

    with pytest.raises(CircuitOpenError):
        await policy.call_async(down)
    # 3 attempts reached the dependency, the breaker opened, the retry stopped on
    # CircuitOpenError (it is never retried by default)
    assert calls == 3
    assert breaker.state is BreakerState.OPEN


async def test_per_attempt_timeout_inside_retry() -> None:
    attempts = 0

    async def first_hangs() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await asyncio.sleep(30)
        return "second try"

    policy = Policy.retry(no_sleep_retry(3)).timeout(0.02)
    assert await policy.call_async(first_hangs) == "second try"
    assert attempts == 2


async def test_overall_timeout_outside_retry() -> None:
    async def hang() -> None:
        await asyncio.sleep(30)

    policy = Policy.timeout(0.03).retry(no_sleep_retry(100)).timeout(0.01)
    with pytest.raises(RequestTimeout):
        await policy.call_async(hang)


async def test_fallback_answers_when_everything_else_failed() -> None:
    async def down() -> str:
        raise ConnectError("refused")

    seen: list[BaseException] = []

    async def cached(exc: BaseException) -> str:
        seen.append(exc)
        return "cached"

    policy = Policy.fallback(cached).retry(no_sleep_retry(2))

    @policy
    async def fetch() -> str:
        return await down()

    assert await fetch() == "cached"
    assert isinstance(seen[0], ConnectError)
    sync_fallback = Policy.fallback(lambda exc: "plain", on=[ConnectError])
    assert await sync_fallback.call_async(down) == "plain"


async def test_fallback_does_not_catch_unlisted_errors() -> None:
    async def broken() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await Fallback(lambda e: None, on=[ConnectError]).call_async(broken)


async def test_bulkhead_step_limits_concurrency() -> None:
    bulkhead = Bulkhead(2, max_queue=100)
    policy = Policy.bulkhead(bulkhead).timeout(5)
    running = peak = 0

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        running -= 1

    await asyncio.gather(*(policy.call_async(work) for _ in range(20)))
    assert peak == 2
    assert Policy.bulkhead(3).steps == ("bulkhead(3)",)


def test_bad_steps_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        Policy.breaker("not a breaker")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Policy.timeout(-1)
    with pytest.raises(ConfigError):
        Policy.fallback("not callable")  # type: ignore[arg-type]
