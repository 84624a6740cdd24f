"""Bucketed timeouts: never early, released when done, shared timer per bucket."""

from __future__ import annotations

import asyncio

import pytest

from dsys.raft.timers import GRAIN, deadlines, expire_after, wait_future


async def test_wait_future_returns_the_result_and_forgets_the_future() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    loop.call_soon(fut.set_result, 7)
    assert await wait_future(fut, 5.0) == 7
    assert all(not b for b in deadlines()._buckets.values())


async def test_timeouts_fire_never_early_and_only_for_pending_futures() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    slow: asyncio.Future[int] = loop.create_future()
    quick: asyncio.Future[int] = loop.create_future()
    expire_after(slow, 0.05)
    expire_after(quick, 0.05)
    quick.set_result(1)
    with pytest.raises(TimeoutError):
        await slow
    assert loop.time() - started >= 0.05  # a deadline is rounded up, never down
    assert quick.result() == 1


async def test_many_futures_share_one_timer_per_bucket() -> None:
    loop = asyncio.get_running_loop()
    futs: list[asyncio.Future[None]] = [loop.create_future() for _ in range(100)]
    d = deadlines()
    slots = {d.add(f, 10.0) for f in futs}
    assert len(slots) <= 1 + int(0.5 / GRAIN)  # all armed within a few ms of each other
    for s in slots:
        for f in futs:
            d.discard(s, f)
        assert not d._buckets[s]
    for f in futs:
        f.cancel()


async def test_wait_future_times_out() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await wait_future(fut, 0.02)
    assert fut.done()
