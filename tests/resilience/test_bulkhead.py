"""Bulkhead: the bound holds, the queue is FIFO and bounded, cancellation leaks no slot."""

from __future__ import annotations

import asyncio

import pytest

from dsys.errors import BulkheadFullError, ConfigError
from dsys.resilience import Bulkhead


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrency_never_exceeds_the_limit() -> None:
    b = Bulkhead(3, max_queue=100)
    running = peak = 0

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        running -= 1

    await asyncio.gather(*(b.call_async(work) for _ in range(50)))
    assert peak == 3
    assert b.active == 0 and b.waiting == 0
    assert b.completed == 50


async def test_full_bulkhead_without_queue_refuses_at_once() -> None:
    b = Bulkhead(2, name="db")
    gate = asyncio.Event()
    tasks = [asyncio.create_task(b.call_async(gate.wait)) for _ in range(2)]
    await settle()
    called = False

    async def never() -> None:
        nonlocal called
        called = True

    with pytest.raises(BulkheadFullError, match="'db' is full: 2 running"):
        await b.call_async(never)
    assert not called
    assert b.rejected == 1
    gate.set()
    await asyncio.gather(*tasks)


async def test_queue_is_bounded_and_fifo() -> None:
    b = Bulkhead(1, max_queue=2)
    gate = asyncio.Event()
    order: list[int] = []

    async def job(i: int) -> None:
        async with b:
            order.append(i)
            await gate.wait()

    tasks = [asyncio.create_task(job(i)) for i in range(3)]
    await settle()
    assert b.active == 1 and b.waiting == 2
    with pytest.raises(BulkheadFullError):
        await b.acquire()
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]


async def test_queue_timeout_refuses_with_a_typed_error() -> None:
    b = Bulkhead(1, max_queue=5, queue_timeout=0.01)
    gate = asyncio.Event()
    holder = asyncio.create_task(b.call_async(gate.wait))
    await settle()
    with pytest.raises(BulkheadFullError, match="no slot within"):
        await b.acquire()
    assert b.waiting == 0
    gate.set()
    await holder
    assert b.active == 0


async def test_cancelled_waiters_and_holders_do_not_leak_slots() -> None:
    b = Bulkhead(2, max_queue=10)
    gate = asyncio.Event()
    holders = [asyncio.create_task(b.call_async(gate.wait)) for _ in range(2)]
    waiters = [asyncio.create_task(b.call_async(gate.wait)) for _ in range(5)]
    await settle()
    assert b.active == 2 and b.waiting == 5
    for t in waiters[:3] + holders[:1]:
        t.cancel()
    await settle()
    assert b.active == 2  # the cancelled holder's slot went to the first live waiter
    gate.set()
    results = await asyncio.gather(*holders, *waiters, return_exceptions=True)
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 4
    assert b.active == 0 and b.waiting == 0
    # full capacity is available again
    gate2 = asyncio.Event()
    again = [asyncio.create_task(b.call_async(gate2.wait)) for _ in range(2)]
    await settle()
    assert b.active == 2
    gate2.set()
    await asyncio.gather(*again)


async def test_waiter_cancelled_right_after_being_handed_a_slot_passes_it_on() -> None:
    b = Bulkhead(1, max_queue=5)
    await b.acquire()
    w1 = asyncio.create_task(b.acquire())
    w2 = asyncio.create_task(b.acquire())
    await settle()
    b.release()  # hands the slot to w1's future...
    w1.cancel()  # ...but w1 is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await w1
    await w2  # w2 got the slot w1 could not use
    assert b.active == 1
    b.release()
    assert b.active == 0


async def test_decorator_and_release_misuse() -> None:
    b = Bulkhead(1)

    @b
    async def one() -> int:
        return 1

    assert await one() == 1
    with pytest.raises(RuntimeError, match="without acquire"):
        b.release()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_concurrent": 2.5}, "max_concurrent"),
        ({"max_concurrent": 1, "max_queue": -1}, "max_queue"),
        ({"max_concurrent": 1, "queue_timeout": 0}, "queue_timeout"),
    ],
    ids=["zero", "float", "queue", "timeout"],
)
def test_bad_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Bulkhead(**kwargs)  # type: ignore[arg-type]
