"""Retry, Backoff and RetryBudget with injected sleep, clock and randomness."""

from __future__ import annotations

import asyncio
import random

import pytest

from dsys.clock import ManualClock
from dsys.errors import (
    BadInputError,
    CircuitOpenError,
    ConfigError,
    ConnectError,
    RateLimitedError,
)
from dsys.resilience import Backoff, Retry, RetryAttempt, RetryBudget, Timeout


class Flaky:
    """Fails ``failures`` times with ``exc``, then returns ``value``."""

    def __init__(self, failures: int, exc: BaseException | None = None, value: str = "ok"):
        self.failures = failures
        self.exc = exc or ConnectError("refused")
        self.value = value
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return self.value

    async def coro(self) -> str:
        return self()


def harness(**kw: object) -> tuple[Retry, list[float], ManualClock]:
    clock = ManualClock()
    slept: list[float] = []

    async def sleep(d: float) -> None:
        slept.append(d)
        clock.advance(d)

    def sync_sleep(d: float) -> None:
        slept.append(d)
        clock.advance(d)

    base: dict[str, object] = {
        "clock": clock,
        "sleep": sleep,
        "sync_sleep": sync_sleep,
        "rng": random.Random(7),
        "backoff": Backoff(initial=1.0, maximum=8.0, jitter="none"),
    }
    base.update(kw)
    return Retry(**base), slept, clock  # type: ignore[arg-type]


async def test_async_retries_until_success_with_exponential_backoff() -> None:
    retry, slept, _ = harness(max_attempts=5)
    flaky = Flaky(3)
    assert await retry.call_async(flaky.coro) == "ok"
    assert flaky.calls == 4
    assert slept == [1.0, 2.0, 4.0]
    assert retry.retries == 3


def test_sync_retries_and_gives_up_after_max_attempts() -> None:
    retry, slept, _ = harness(max_attempts=3)
    flaky = Flaky(10)
    with pytest.raises(ConnectError) as err:
        retry.call(flaky)
    assert flaky.calls == 3
    assert slept == [1.0, 2.0]
    assert any("gave up after 3 attempt" in n for n in err.value.__notes__)


def test_backoff_is_capped() -> None:
    retry, slept, _ = harness(max_attempts=7)
    with pytest.raises(ConnectError):
        retry.call(Flaky(10))
    assert slept == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_abort_on_and_retry_on() -> None:
    retry, slept, _ = harness(max_attempts=5)
    for exc in (BadInputError("bad"), CircuitOpenError("open"), KeyError("x")):
        flaky = Flaky(1, exc)
        if isinstance(exc, KeyError):
            retry2, _, _ = harness(max_attempts=5, retry_on=(ConnectError,))
            with pytest.raises(KeyError):
                retry2.call(flaky)
        else:
            with pytest.raises(type(exc)):
                retry.call(flaky)
        assert flaky.calls == 1
    assert slept == []


def test_retry_on_predicate() -> None:
    retry, _, _ = harness(max_attempts=4, retry_on=lambda e: "again" in str(e))
    assert retry.call(Flaky(2, ConnectError("again"))) == "ok"
    with pytest.raises(ConnectError):
        retry.call(Flaky(2, ConnectError("stop")))


def test_retry_on_result_and_on_retry_hook() -> None:
    seen: list[RetryAttempt] = []
    retry, _slept, _ = harness(
        max_attempts=3, retry_on_result=lambda r: r == 503, on_retry=seen.append
    )
    answers = iter([503, 503, 200])
    assert retry.call(lambda: next(answers)) == 200
    assert [a.result for a in seen] == [503, 503]
    answers = iter([503, 503, 503, 200])
    assert retry.call(lambda: next(answers)) == 503  # out of attempts: last result


def test_max_elapsed_stops_retrying() -> None:
    retry, slept, _ = harness(max_attempts=100, max_elapsed=10.0)
    with pytest.raises(ConnectError) as err:
        retry.call(Flaky(100))
    assert slept == [1.0, 2.0, 4.0]  # the next sleep (8) would end at 15 > 10
    assert any("max_elapsed" in n for n in err.value.__notes__)


def test_retry_after_of_the_error_raises_the_delay() -> None:
    retry, slept, _ = harness(max_attempts=2)
    assert retry.call(Flaky(1, RateLimitedError("slow down", retry_after=5.0))) == "ok"
    assert slept == [5.0]


def test_full_and_decorrelated_jitter_stay_in_bounds() -> None:
    rng = random.Random(1)
    full = Backoff(initial=0.5, maximum=4.0, jitter="full")
    deco = Backoff(initial=0.5, maximum=4.0, jitter="decorrelated")
    equal = Backoff(initial=0.5, maximum=4.0, jitter="equal")
    prev = 0.0
    for n in range(1, 200):
        d = full.delay(n, 0.0, rng)
        assert 0.0 <= d <= min(4.0, 0.5 * 2 ** (n - 1))
        e = equal.delay(n, 0.0, rng)
        cap = min(4.0, 0.5 * 2 ** (n - 1))
        assert cap / 2 <= e <= cap
        prev = deco.delay(n, prev, rng)
        assert 0.5 <= prev <= 4.0
    assert full.delay(10_000, 0.0, random.Random(3)) <= 4.0  # no overflow


def test_seeded_jitter_is_reproducible() -> None:
    a, _, _ = harness(backoff=Backoff(jitter="full"), max_attempts=4, rng=random.Random(5))
    b, _, _ = harness(backoff=Backoff(jitter="full"), max_attempts=4, rng=random.Random(5))
    da: list[float] = []
    db: list[float] = []
    for r, out in ((a, da), (b, db)):
        r._on_retry = lambda at, out=out: out.append(at.delay)  # type: ignore[misc]
        with pytest.raises(ConnectError):
            r.call(Flaky(10))
    assert da == db and len(da) == 3


def test_retry_budget_limits_retries_to_a_ratio_of_requests() -> None:
    clock = ManualClock()
    budget = RetryBudget(ratio=0.1, min_retries_per_second=0.0, window=10.0)
    for _ in range(100):
        budget.record_request(clock.now())
    allowed = sum(budget.try_spend(clock.now()) for _ in range(50))
    assert allowed == 10
    assert budget.denied == 40
    clock.advance(10.0)  # everything expired
    assert not budget.try_spend(clock.now())
    assert budget.available(clock.now()) == 0.0


def test_retry_budget_minimum_per_second_floor() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.5, window=10.0)
    assert sum(budget.try_spend(0.0) for _ in range(20)) == 5


async def test_budget_shared_by_retries_stops_amplification_in_an_outage() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0.0, window=10.0)
    retry, _slept, _ = harness(max_attempts=4, budget=budget)
    attempts = 0
    for _ in range(50):
        flaky = Flaky(1000)
        with pytest.raises(ConnectError):
            await retry.call_async(flaky.coro)
        attempts += flaky.calls
    # without a budget: 200 attempts; with it: 50 requests + at most 20% retries
    assert attempts <= 50 + 10 + 1
    assert budget.denied > 0


async def test_retry_respects_the_enclosing_deadline() -> None:
    retry, _slept, _ = harness(max_attempts=10, backoff=Backoff(initial=100.0, maximum=100.0))
    flaky = Flaky(5)
    with pytest.raises(ConnectError) as err:
        async with Timeout(5.0):
            await retry.call_async(flaky.coro)
    assert flaky.calls == 1
    assert any("deadline" in n for n in err.value.__notes__)


async def test_decorator_for_sync_and_async() -> None:
    retry, _, _ = harness(max_attempts=3)
    flaky = Flaky(2)

    @retry
    async def fetch() -> str:
        return flaky()

    assert await fetch() == "ok"
    flaky2 = Flaky(1)

    @retry
    def get() -> str:
        return flaky2()

    assert get() == "ok"


async def test_cancellation_is_not_retried() -> None:
    retry, _, _ = harness(max_attempts=5)
    calls = 0

    async def hang() -> None:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()

    t = asyncio.create_task(retry.call_async(hang))
    await asyncio.sleep(0)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert calls == 1


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: Retry(max_attempts=0), "max_attempts"),
        (lambda: Retry(max_elapsed=-1), "max_elapsed"),
        (lambda: Retry(retry_on=["x"]), "retry_on"),  # type: ignore[list-item]
        (lambda: Backoff(initial=-1), "initial backoff"),
        (lambda: Backoff(initial=5, maximum=1), "maximum backoff"),
        (lambda: Backoff(multiplier=0.5), "multiplier"),
        (lambda: Backoff(jitter="wild"), "jitter"),  # type: ignore[arg-type]
        (lambda: RetryBudget(ratio=-0.1), "ratio"),
        (lambda: RetryBudget(window=0), "window"),
        (lambda: RetryBudget(buckets=0), "buckets"),
    ],
    ids=[
        "attempts",
        "elapsed",
        "retry_on",
        "initial",
        "maximum",
        "multiplier",
        "jitter",
        "ratio",
        "window",
        "buckets",
    ],
)
def test_bad_configuration(factory: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        factory()  # type: ignore[operator]
