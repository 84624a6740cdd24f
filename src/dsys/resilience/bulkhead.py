"""``Bulkhead``: bounded concurrency with an optional bounded wait queue (asyncio).

A bulkhead keeps one slow dependency from tying up every task of a service: at most
``max_concurrent`` calls run at once, at most ``max_queue`` more wait (first come,
first served, each for at most ``queue_timeout`` seconds), and anything beyond is
refused at once with :class:`~dsys.errors.BulkheadFullError`::

    db = Bulkhead(max_concurrent=10, max_queue=20, queue_timeout=0.5, name="db")
    rows = await db.call_async(query, sql)
    async with db:
        await other_query()

Slots are handed directly from a finishing call to the oldest waiter, so a newcomer
cannot overtake the queue. A waiter cancelled (or timed out) after it was handed a slot
passes the slot on, so cancellation never leaks capacity.

Use one bulkhead from one event loop (no locks are taken).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry

from dsys.errors import BulkheadFullError, ConfigError
from dsys.observability import Metrics
from dsys.resilience.metrics import collector_for

P = ParamSpec("P")
R = TypeVar("R")


class Bulkhead:
    """At most ``max_concurrent`` calls at once, ``max_queue`` more waiting.

    Args:
        max_concurrent: calls allowed to run at the same time (>= 1).
        max_queue: calls allowed to wait for a slot (>= 0; 0 refuses at once when full).
        queue_timeout: seconds a call may wait in the queue before it is refused
            (``None``: wait as long as it takes).
        name: names the bulkhead in errors and metrics.
        metrics: where the gauges and counters are reported (see
            :mod:`dsys.resilience.metrics`).

    Raises:
        ConfigError: a setting is out of range.
    """

    __slots__ = (
        "__weakref__",
        "_active",
        "_max",
        "_max_queue",
        "_queue_timeout",
        "_waiters",
        "completed",
        "name",
        "rejected",
    )

    def __init__(
        self,
        max_concurrent: int,
        *,
        max_queue: int = 0,
        queue_timeout: float | None = None,
        name: str = "bulkhead",
        metrics: Metrics | CollectorRegistry | None = None,
    ) -> None:
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
            raise ConfigError(f"max_concurrent must be an integer >= 1, got {max_concurrent!r}")
        if max_concurrent < 1:
            raise ConfigError(f"max_concurrent must be an integer >= 1, got {max_concurrent!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ConfigError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if queue_timeout is not None and (
            isinstance(queue_timeout, bool)
            or not isinstance(queue_timeout, (int, float))
            or not math.isfinite(queue_timeout)
            or queue_timeout <= 0
        ):
            raise ConfigError(f"queue_timeout must be None or seconds > 0, got {queue_timeout!r}")
        self.name = name
        self._max = max_concurrent
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.rejected = 0
        """Calls refused so far (full, or waited too long)."""
        self.completed = 0
        """Calls that held a slot and finished (any outcome)."""
        collector_for(metrics).bulkheads.add(self)

    @property
    def active(self) -> int:
        """Calls holding a slot now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Calls waiting in the queue now."""
        return sum(1 for f in self._waiters if not f.done())

    @property
    def max_concurrent(self) -> int:
        """The concurrency limit."""
        return self._max

    def __repr__(self) -> str:
        return f"Bulkhead({self.name!r}, active={self._active}/{self._max}, waiting={self.waiting})"

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if allowed.

        Raises:
            BulkheadFullError: every slot is taken and the queue is full, or the wait
                exceeded ``queue_timeout``.
        """
        if self._active < self._max and not self._waiters:
            self._active += 1
            return
        await self._wait()

    async def _wait(self) -> None:
        waiters = self._waiters
        if len(waiters) >= self._max_queue:
            self.rejected += 1
            raise BulkheadFullError(
                f"bulkhead {self.name!r} is full: {self._active} running, "
                f"{len(waiters)} waiting (max_queue={self._max_queue})"
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            try:
                if self._queue_timeout is None:
                    await fut
                else:
                    async with asyncio.timeout(self._queue_timeout):
                        await fut
            except TimeoutError:
                self.rejected += 1
                raise BulkheadFullError(
                    f"bulkhead {self.name!r}: no slot within {self._queue_timeout:g} s"
                ) from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed a slot we will not use: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    waiters.remove(fut)
            raise

    def release(self) -> None:
        """Give a slot back: hand it to the oldest waiter, or free it."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter; _active unchanged
                return
        if self._active <= 0:
            raise RuntimeError(f"{self!r}: release() without acquire()")
        self._active -= 1

    async def call_async(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)`` holding a slot.

        Raises:
            BulkheadFullError: no slot could be had (``fn`` was not called).
        """
        if self._active < self._max and not self._waiters:
            self._active += 1
        else:
            await self._wait()
        try:
            return await fn(*args, **kwargs)
        finally:
            self.completed += 1
            self.release()

    async def __aenter__(self) -> Bulkhead:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.completed += 1
        self.release()

    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        """Decorate a coroutine function so each call holds a slot."""

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return await self.call_async(fn, *args, **kwargs)

        return wrapper


__all__ = ["Bulkhead"]
