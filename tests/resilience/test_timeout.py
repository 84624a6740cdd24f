"""Timeout: expiry raises RequestTimeout, outside cancellation propagates, deadlines nest."""

from __future__ import annotations

import asyncio

import pytest

from dsys.errors import ConfigError, RequestTimeout
from dsys.resilience import Timeout, deadline, remaining


async def test_expiry_cancels_the_block_and_raises_request_timeout() -> None:
    cleaned = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.set()

    with pytest.raises(RequestTimeout, match=r"timed out after 0\.05 s"):
        await Timeout(0.05).call(slow)
    assert cleaned.is_set()
    assert deadline() is None


async def test_result_is_returned_in_time() -> None:
    async def quick(x: int) -> int:
        return x + 1

    assert await Timeout(5).call(quick, 1) == 2


async def test_request_timeout_is_a_timeout_error() -> None:
    with pytest.raises(TimeoutError):
        async with Timeout(0.01):
            await asyncio.sleep(30)


async def test_outside_cancellation_propagates_as_cancelled() -> None:
    started = asyncio.Event()

    async def guarded() -> None:
        async with Timeout(30):
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(guarded())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_nested_deadline_keeps_the_earliest() -> None:
    async with Timeout(10):
        outer = deadline()
        assert outer is not None
        async with Timeout(100):  # longer inner timeout cannot extend the outer one
            assert deadline() == outer
            left = remaining()
            assert left is not None and 0 < left <= 10
        async with Timeout(1):
            inner = deadline()
            assert inner is not None and inner < outer
        assert deadline() == outer
    assert deadline() is None and remaining() is None


async def test_outer_deadline_fires_through_a_longer_inner_timeout() -> None:
    with pytest.raises(RequestTimeout, match=r"0\.05"):
        async with Timeout(0.05), Timeout(60):
            await asyncio.sleep(30)


async def test_deadline_propagates_into_child_tasks() -> None:
    async def child() -> float | None:
        return deadline()

    async with Timeout(10):
        d = deadline()
        assert await asyncio.create_task(child()) == d


async def test_shared_timeout_object_across_concurrent_tasks() -> None:
    t = Timeout(0.05)

    async def fast() -> str:
        async with t:
            await asyncio.sleep(0)
            return "fast"

    async def slow() -> str:
        async with t:
            await asyncio.sleep(30)
            return "slow"

    results = await asyncio.gather(fast(), slow(), fast(), return_exceptions=True)
    assert results[0] == "fast" and results[2] == "fast"
    assert isinstance(results[1], RequestTimeout)


async def test_decorator() -> None:
    @Timeout(0.02)
    async def hang() -> None:
        await asyncio.sleep(30)

    with pytest.raises(RequestTimeout):
        await hang()


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), True, "1"])
def test_bad_timeout(bad: object) -> None:
    with pytest.raises(ConfigError, match="timeout must be"):
        Timeout(bad)  # type: ignore[arg-type]
