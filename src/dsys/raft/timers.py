"""Cheap timeouts for many short-lived futures (one timer per 10 ms, not one per future).

A request path that arms ``loop.call_later`` for every request pays for a
``TimerHandle``, a heap push and a heap cleanup per request. :func:`expire_after`
instead drops the future into a bucket keyed by its deadline rounded *up* to
:data:`GRAIN` seconds; one timer per bucket fails every future still pending in it
with :class:`TimeoutError`. A timeout therefore fires between 0 and ``GRAIN`` seconds
late, never early.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, TypeVar

GRAIN = 0.01
"""Granularity of deadlines in seconds."""

T = TypeVar("T")


class Deadlines:
    """Deadline buckets of one event loop (use :func:`deadlines` to get the loop's)."""

    __slots__ = ("_buckets", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, set[asyncio.Future[Any]]] = {}

    def add(self, fut: asyncio.Future[Any], timeout: float) -> int:
        """Fail ``fut`` with TimeoutError once ``timeout`` seconds passed; returns its slot."""
        slot = int((self._loop.time() + timeout) / GRAIN) + 1
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = set()
            self._loop.call_at(slot * GRAIN, self._fire, slot)
        bucket.add(fut)
        return slot

    def discard(self, slot: int, fut: asyncio.Future[Any]) -> None:
        """Forget ``fut`` (it finished before its deadline)."""
        bucket = self._buckets.get(slot)
        if bucket is not None:
            bucket.discard(fut)

    def _fire(self, slot: int) -> None:
        for fut in self._buckets.pop(slot, ()):
            if not fut.done():
                fut.set_exception(TimeoutError())


_PER_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = (
    weakref.WeakKeyDictionary()
)


def deadlines(loop: asyncio.AbstractEventLoop | None = None) -> Deadlines:
    """The :class:`Deadlines` of ``loop`` (default: the running loop)."""
    loop = loop or asyncio.get_running_loop()
    d = _PER_LOOP.get(loop)
    if d is None:
        d = _PER_LOOP[loop] = Deadlines(loop)
    return d


def expire_after(fut: asyncio.Future[Any], timeout: float) -> None:
    """Fail ``fut`` with TimeoutError if it is not done after ``timeout`` seconds.

    The future is released from its bucket as soon as it completes.
    """
    d = deadlines(fut.get_loop())
    slot = d.add(fut, timeout)
    fut.add_done_callback(lambda f: d.discard(slot, f))


async def wait_future(fut: asyncio.Future[T], timeout: float) -> T:  # noqa: ASYNC109
    """Await ``fut`` for at most ``timeout`` seconds (TimeoutError after that).

    Cheaper than ``asyncio.wait_for``: no extra task and no timer handle of its own.
    """
    d = deadlines(fut.get_loop())
    slot = d.add(fut, timeout)
    try:
        return await fut
    finally:
        d.discard(slot, fut)


__all__ = ["GRAIN", "Deadlines", "deadlines", "expire_after", "wait_future"]
