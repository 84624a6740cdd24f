"""The CircuitBreaker adapter: sync/async entry points, classification, metrics, listeners."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dsys.clock import ManualClock
from dsys.errors import BadInputError, CircuitOpenError, ConfigError
from dsys.observability import Metrics
from dsys.resilience import (
    BreakerState,
    CircuitBreaker,
    MemoryBreakerStore,
    StateTransition,
    TimeWindow,
)


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom("down")


async def aboom() -> None:
    raise Boom("down")


async def aok(x: int = 1) -> int:
    return x


def make(clock: ManualClock, **kw: object) -> CircuitBreaker:
    base: dict[str, object] = {
        "window": 10,
        "minimum_calls": 4,
        "open_wait": 10.0,
        "permitted_calls_in_half_open": 2,
        "clock": clock,
        "metrics": CollectorRegistry(),
    }
    base.update(kw)
    return CircuitBreaker("dep", **base)  # type: ignore[arg-type]


def trip_sync(b: CircuitBreaker, n: int = 4) -> None:
    for _ in range(n):
        with pytest.raises(Boom):
            b.call(boom)


def test_sync_call_opens_and_rejects_with_retry_after() -> None:
    clock = ManualClock()
    b = make(clock)
    assert b.call(lambda x: x * 2, 21) == 42
    trip_sync(b, 3)  # 3 of 4 failed
    assert b.state is BreakerState.OPEN
    clock.advance(4.0)
    ran = []
    with pytest.raises(CircuitOpenError) as err:
        b.call(ran.append, 1)
    assert ran == []
    assert err.value.retry_after == pytest.approx(6.0)
    assert "dep" in str(err.value)
    assert b.open_until == pytest.approx(10.0)
    b.reset()
    assert b.open_until is None


def test_full_cycle_with_manual_clock_and_listeners() -> None:
    clock = ManualClock(100.0)
    seen: list[StateTransition] = []
    b = make(clock, listeners=[lambda br, t: seen.append(t)])
    trip_sync(b)
    clock.advance(10.0)
    assert b.call(lambda: "trial") == "trial"
    assert b.state is BreakerState.HALF_OPEN
    assert b.call(lambda: "trial") == "trial"
    assert b.state is BreakerState.CLOSED
    assert [(t.from_state.value, t.to_state.value, t.at) for t in seen] == [
        ("closed", "open", 100.0),
        ("open", "half_open", 110.0),
        ("half_open", "closed", 110.0),
    ]
    assert seen[0].failure_rate == 100.0


def test_a_failing_listener_does_not_break_the_call() -> None:
    def bad(b: CircuitBreaker, t: StateTransition) -> None:
        raise RuntimeError("listener bug")

    clock = ManualClock()
    b = make(clock, listeners=[bad])
    trip_sync(b)
    assert b.state is BreakerState.OPEN


def test_ignored_and_non_failure_exceptions_do_not_count() -> None:
    clock = ManualClock()
    b = make(clock, ignore_exceptions=[BadInputError], failure_exceptions=[Boom, OSError])

    def bad_input() -> None:
        raise BadInputError("caller's fault")

    def key_error() -> None:
        raise KeyError("not a failure type")

    for fn in (bad_input, key_error) * 5:
        with pytest.raises((BadInputError, KeyError)):
            b.call(fn)
    assert b.state is BreakerState.CLOSED
    assert b.counts().calls == 0
    trip_sync(b)
    assert b.state is BreakerState.OPEN


def test_failure_predicate_filters_exceptions() -> None:
    clock = ManualClock()
    b = make(clock, failure_predicate=lambda e: "retryable" in str(e))

    def soft() -> None:
        raise Boom("permanent")

    for _ in range(6):
        with pytest.raises(Boom):
            b.call(soft)
    assert b.state is BreakerState.CLOSED


def test_result_predicate_counts_5xx_as_failure_but_returns_it() -> None:
    clock = ManualClock()
    b = make(clock, result_predicate=lambda status: status >= 500)
    assert b.call(lambda: 200) == 200
    assert b.call(lambda: 503) == 503
    assert b.counts().failures == 1
    for _ in range(2):
        assert b.call(lambda: 500) == 500  # 3 of 4 failed
    assert b.state is BreakerState.OPEN


def test_slow_calls_measured_with_the_injected_clock() -> None:
    clock = ManualClock()
    b = make(clock, slow_call_duration=1.0, slow_call_rate_threshold=50.0)

    def slow() -> str:
        clock.advance(2.0)
        return "late"

    for _ in range(2):
        b.call(lambda: "fast")
    for _ in range(2):
        assert b.call(slow) == "late"
    assert b.state is BreakerState.OPEN


def test_time_window_expiry_through_the_adapter() -> None:
    clock = ManualClock()
    b = make(clock, window=TimeWindow(seconds=10.0, buckets=10))
    for _ in range(3):
        with pytest.raises(Boom):
            b.call(boom)
    clock.advance(20.0)  # the failures expire
    for _ in range(3):
        b.call(lambda: None)
    with pytest.raises(Boom):
        b.call(boom)
    assert b.state is BreakerState.CLOSED  # 1 of 4
    assert b.counts().failures == 1


def test_sync_context_manager_and_decorator() -> None:
    clock = ManualClock()
    b = make(clock)

    @b
    def double(x: int) -> int:
        return 2 * x

    assert double(4) == 8
    assert double.__name__ == "double"
    for _ in range(3):  # 3 of 4 failed
        with pytest.raises(Boom), b:
            raise Boom()
    assert b.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError):
        double(1)
    with pytest.raises(CircuitOpenError), b:
        pass


async def test_async_call_decorator_and_context_manager() -> None:
    clock = ManualClock()
    b = make(clock, failure_rate_threshold=60.0)

    @b
    async def triple(x: int) -> int:
        return 3 * x

    assert await triple(2) == 6
    assert await b.call_async(aok, 5) == 5
    async with b:
        pass
    for _ in range(2):
        with pytest.raises(Boom):
            await b.call_async(aboom)
    for _ in range(3):
        with pytest.raises(Boom):
            async with b:
                raise Boom()
    assert b.state is BreakerState.OPEN  # 5 of 8 failed
    with pytest.raises(CircuitOpenError):
        await triple(1)
    with pytest.raises(CircuitOpenError):
        async with b:
            pass
    clock.advance(10.0)
    assert await triple(1) == 3
    async with b:
        pass
    assert b.state is BreakerState.CLOSED


async def test_half_open_lets_exactly_n_concurrent_trials_through() -> None:
    clock = ManualClock()
    b = make(clock, permitted_calls_in_half_open=3)
    trip_sync(b)
    clock.advance(10.0)
    gate = asyncio.Event()
    started = 0

    async def trial() -> str:
        nonlocal started
        started += 1
        await gate.wait()
        return "ok"

    tasks = [asyncio.create_task(b.call_async(trial)) for _ in range(10)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert started == 3
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(r == "ok" for r in results) == 3
    assert sum(isinstance(r, CircuitOpenError) for r in results) == 7
    assert b.state is BreakerState.CLOSED


async def test_cancelled_trial_calls_do_not_leak_half_open_permits() -> None:
    clock = ManualClock()
    b = make(clock, permitted_calls_in_half_open=2)
    trip_sync(b)
    clock.advance(10.0)
    never = asyncio.Event()

    async def hang() -> None:
        await never.wait()

    async def hang_in_block() -> None:
        async with b:
            await never.wait()

    t1 = asyncio.create_task(b.call_async(hang))
    t2 = asyncio.create_task(hang_in_block())
    await asyncio.sleep(0)
    assert b.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpenError):
        await b.call_async(aok)  # both slots taken
    t1.cancel()
    t2.cancel()
    for t in (t1, t2):
        with pytest.raises(asyncio.CancelledError):
            await t
    # both slots came back: two trials pass and close the breaker
    assert await b.call_async(aok, 1) == 1
    assert await b.call_async(aok, 2) == 2
    assert b.state is BreakerState.CLOSED


async def test_cancellation_in_closed_state_is_not_a_failure() -> None:
    clock = ManualClock()
    b = make(clock, minimum_calls=1, failure_rate_threshold=1.0)

    async def hang() -> None:
        await asyncio.Event().wait()

    for _ in range(5):
        t = asyncio.create_task(b.call_async(hang))
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
    assert b.state is BreakerState.CLOSED
    assert b.counts().calls == 0


def test_forced_open_disabled_reset_and_trip() -> None:
    clock = ManualClock()
    b = make(clock)
    b.force_open()
    with pytest.raises(CircuitOpenError) as err:
        b.call(lambda: 1)
    assert err.value.retry_after is None
    b.disable()
    trip_sync(b, 10)
    assert b.state is BreakerState.DISABLED
    b.reset()
    assert b.state is BreakerState.CLOSED
    b.trip()
    assert b.state is BreakerState.OPEN


def test_metrics_are_exposed_by_a_collector() -> None:
    clock = ManualClock()
    registry = CollectorRegistry()
    b = make(clock, metrics=registry, failure_rate_threshold=60.0)
    b.call(lambda: 1)
    b.call(lambda: 1)
    trip_sync(b, 3)  # 3 of 5 = 60%
    with pytest.raises(CircuitOpenError):
        b.call(lambda: 1)
    text = generate_latest(registry).decode()
    assert 'dsys_resilience_breaker_state{breaker="dep",state="open"} 1.0' in text
    assert 'dsys_resilience_breaker_state{breaker="dep",state="closed"} 0.0' in text
    assert 'dsys_resilience_breaker_calls_total{breaker="dep",outcome="successful"} 2.0' in text
    assert 'dsys_resilience_breaker_calls_total{breaker="dep",outcome="failed"} 3.0' in text
    assert 'dsys_resilience_breaker_calls_total{breaker="dep",outcome="rejected"} 1.0' in text
    assert (
        'dsys_resilience_breaker_transitions_total{breaker="dep",from_state="closed",'
        'to_state="open"} 1.0'
    ) in text


def test_metrics_object_and_several_breakers_share_a_registry() -> None:
    m = Metrics("resilience")
    a = CircuitBreaker("a", metrics=m)
    b = CircuitBreaker("b", metrics=m)
    a.call(lambda: 1)
    b.call(lambda: 1)
    text = m.render().decode()
    assert 'breaker="a"' in text and 'breaker="b"' in text


@pytest.mark.parametrize(
    "window", [100_000, TimeWindow(seconds=3600.0, buckets=10)], ids=["count", "time"]
)
def test_threads_share_one_breaker_without_losing_counts(window: object) -> None:
    b = CircuitBreaker(
        "threads",
        window=window,  # type: ignore[arg-type]
        failure_rate_threshold=100.0,  # 10% failures never open it...
        minimum_calls=20,  # ...and successes take the lock-free path once 20 are in
        metrics=CollectorRegistry(),
    )
    n_threads, per_thread = 4, 2000

    def work() -> None:
        for i in range(per_thread):
            if i % 10 == 5:
                with pytest.raises(Boom):
                    b.call(boom)
            else:
                b.call(lambda: None)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(old_interval)
    counts = b.counts()
    assert counts.calls == n_threads * per_thread
    assert counts.failures == n_threads * per_thread // 10
    assert b._core.calls_successful == n_threads * per_thread * 9 // 10


def test_shared_store_opens_every_breaker_of_the_name() -> None:
    clock = ManualClock()
    store = MemoryBreakerStore()
    a = make(clock, store=store, store_poll_interval=1.0)
    b = make(clock, store=store, store_poll_interval=1.0)
    b.call(lambda: 1)
    trip_sync(a)
    assert a.state is BreakerState.OPEN
    clock.advance(1.0)  # b reads the store at its next call
    with pytest.raises(CircuitOpenError) as err:
        b.call(lambda: 1)
    assert err.value.retry_after == pytest.approx(9.0)
    a.reset()
    clock.advance(1.0)
    assert b.call(lambda: 2) == 2
    assert b.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure_rate_threshold": 150}, "failure_rate_threshold"),
        ({"window": 0}, "window size"),
        ({"open_wait": -1.0}, "open_wait"),
        ({"failure_exceptions": ["Boom"]}, "failure_exceptions"),
        ({"store_poll_interval": 0}, "store_poll_interval"),
        ({"store_poll_interval": "1"}, "store_poll_interval"),
        ({"metrics": "prometheus"}, "metrics must be"),
    ],
    ids=["threshold", "window", "wait", "exceptions", "poll", "poll-type", "metrics"],
)
def test_bad_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CircuitBreaker("x", **kwargs)  # type: ignore[arg-type]


def test_name_is_required() -> None:
    with pytest.raises(ConfigError, match="name"):
        CircuitBreaker("")


def test_exit_without_enter_is_a_clear_error() -> None:
    b = CircuitBreaker("x", metrics=CollectorRegistry())
    with pytest.raises(RuntimeError, match="without"):
        b.__exit__(None, None, None)


MODES = {
    "count": {},
    "count+slow": {"slow_call_duration": 1.0},
    "time": {"window": TimeWindow(seconds=60.0, buckets=6)},
    "time+slow": {"window": TimeWindow(seconds=60.0, buckets=6), "slow_call_duration": 1.0},
    "predicate": {"result_predicate": lambda r: r == "bad"},
}


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
async def test_every_entry_point_counts_in_every_mode(mode: str) -> None:
    clock = ManualClock()
    kwargs: dict[str, object] = {"window": 1000, "minimum_calls": 1000, **MODES[mode]}
    b = make(clock, **kwargs)

    def ok() -> str:
        return "ok"

    async def aok_() -> str:
        return "ok"

    deco_sync = b(ok)
    deco_async = b(aok_)
    deco_boom = b(boom)
    deco_aboom = b(aboom)
    for step in range(3):
        assert b.call(ok) == "ok"
        assert deco_sync() == "ok"
        assert await b.call_async(aok_) == "ok"
        assert await deco_async() == "ok"
        with b:
            pass
        async with b:
            pass
        with pytest.raises(Boom):
            deco_boom()
        with pytest.raises(Boom):
            await deco_aboom()
        clock.advance(11.0 * step)  # crosses time buckets in the time modes
    counts = b.counts()
    assert counts.calls == 24
    assert counts.failures == 6
    assert b._core.calls_successful == 18
    assert b._core.calls_failed == 6


async def test_slow_calls_counted_on_every_entry_point() -> None:
    clock = ManualClock()
    b = make(clock, slow_call_duration=1.0, minimum_calls=100, window=TimeWindow(seconds=60))

    def slow() -> None:
        clock.advance(2.0)

    async def aslow() -> None:
        clock.advance(2.0)

    b.call(slow)
    b(slow)()
    await b.call_async(aslow)
    await b(aslow)()
    with b:
        clock.advance(2.0)
    async with b:
        clock.advance(2.0)
    assert b.counts().slow == 6


async def test_async_with_blocks_of_parent_and_child_tasks_stay_apart() -> None:
    clock = ManualClock()
    b = make(clock, slow_call_duration=5.0, minimum_calls=100)
    child_inside = asyncio.Event()
    parent_done = asyncio.Event()

    async def child() -> None:
        async with b:
            child_inside.set()
            await parent_done.wait()
            clock.advance(10.0)  # only the child's block is slow

    async with b:
        task = asyncio.create_task(child())
        await child_inside.wait()
    parent_done.set()
    await task
    counts = b.counts()
    assert counts.calls == 2
    assert counts.slow == 1


def test_predicates_may_use_the_breaker_without_deadlock() -> None:
    clock = ManualClock()
    seen: list[int] = []
    holder: list[CircuitBreaker] = []

    def predicate(exc: BaseException) -> bool:
        seen.append(holder[0].counts().calls)  # takes the breaker's lock
        return True

    b = make(clock, failure_predicate=predicate, result_predicate=lambda r: r == 500)
    holder.append(b)
    with pytest.raises(Boom):
        b.call(boom)
    assert seen == [0]
    with b:
        pass  # a with-block has no result: the result predicate is not consulted
    assert b.counts().failures == 1 and b.counts().calls == 2


@pytest.mark.parametrize("mode", list(MODES)[:4], ids=list(MODES)[:4])
@pytest.mark.parametrize("entry", ["call", "decorator", "with", "call_async", "async_with"])
async def test_a_success_that_reaches_minimum_calls_can_open(mode: str, entry: str) -> None:
    """9 failures then 1 success: the 10th call makes the window count, 90% >= 50%."""
    clock = ManualClock()
    kwargs: dict[str, object] = {"window": 100, "minimum_calls": 10, **MODES[mode]}
    b = make(clock, **kwargs)
    for _ in range(9):
        with pytest.raises(Boom):
            b.call(boom)
    assert b.state is BreakerState.CLOSED

    def ok() -> int:
        return 1

    if entry == "call":
        b.call(ok)
    elif entry == "decorator":
        b(ok)()
    elif entry == "with":
        with b:
            pass
    elif entry == "call_async":
        await b.call_async(aok)
    else:
        async with b:
            pass
    assert b.state is BreakerState.OPEN


class Reply:
    def __init__(self, status: int) -> None:
        self.status = status


def status_is_5xx(r: object) -> bool:
    return r.status >= 500  # type: ignore[attr-defined,no-any-return]  # raises on non-replies


def only_boom(exc: BaseException) -> bool:
    if "odd" in str(exc):
        raise RuntimeError("predicate bug")
    return True


@pytest.mark.parametrize("entry", ["call", "decorator", "call_async", "async_decorator"])
async def test_a_raising_predicate_hands_the_half_open_permit_back(entry: str) -> None:
    clock = ManualClock()
    b = make(
        clock,
        permitted_calls_in_half_open=1,
        result_predicate=status_is_5xx,
        failure_predicate=only_boom,
    )
    trip_sync(b)
    clock.advance(10.0)

    def sync_fn(value: object) -> object:
        if isinstance(value, Exception):
            raise value
        return value

    async def async_fn(value: object) -> object:
        return sync_fn(value)

    async def run(value: object) -> object:
        if entry == "call":
            return b.call(sync_fn, value)
        if entry == "decorator":
            return b(sync_fn)(value)
        if entry == "call_async":
            return await b.call_async(async_fn, value)
        return await b(async_fn)(value)

    with pytest.raises(AttributeError):
        await run("not a reply")  # the result predicate itself fails
    with pytest.raises(RuntimeError, match="predicate bug"):
        await run(Boom("odd"))  # so does the failure predicate
    assert b.state is BreakerState.HALF_OPEN
    # the trial slot came back both times: the trial runs and closes the breaker
    assert isinstance(await run(Reply(200)), Reply)
    assert b.state is BreakerState.CLOSED
