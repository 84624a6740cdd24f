"""``Timeout``: a deadline for coroutines that propagates into nested calls.

A :class:`Timeout` sets a deadline (on the event loop's clock) in a context variable, so
every nested call, including tasks created inside, sees the *earliest* enclosing
deadline: ``remaining()`` tells how much time is left (to pass on to a server, or to skip
a retry that could not finish), and an inner ``Timeout`` longer than the outer one does
not extend it.

Cancellation is done by :func:`asyncio.timeout_at`, which cancels only the guarded
block and correctly tells its own expiry apart from an outside cancellation (which
propagates unchanged). On expiry the block raises :class:`~dsys.errors.RequestTimeout`
(a ``TimeoutError``)::

    async with Timeout(2.0):
        await client.get(key)            # and anything it awaits: same deadline

    await Timeout(0.5).call(fetch, url)
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from dsys.errors import ConfigError, RequestTimeout

P = ParamSpec("P")
R = TypeVar("R")

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "dsys_deadline", default=None
)


def deadline() -> float | None:
    """The earliest enclosing deadline (event-loop time), or ``None`` when there is none."""
    return _deadline.get()


def remaining() -> float | None:
    """Seconds left before the enclosing deadline (may be <= 0), or ``None`` when unbounded.

    Must be called inside a running event loop when a deadline is set.
    """
    d = _deadline.get()
    if d is None:
        return None
    return d - asyncio.get_running_loop().time()


_Entry = tuple[contextvars.Token[float | None], "asyncio.Timeout | None", Any]


class Timeout:
    """Bound the time a coroutine (and everything it awaits) may take.

    Args:
        seconds: the time limit (> 0); nested timeouts keep the earliest deadline.

    Raises:
        ConfigError: ``seconds`` is not a finite number > 0.
    """

    __slots__ = ("_stack", "seconds")

    def __init__(self, seconds: float) -> None:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds <= 0
        ):
            raise ConfigError(f"timeout must be a finite number of seconds > 0, got {seconds!r}")
        self.seconds = float(seconds)
        self._stack: contextvars.ContextVar[_Entry | None] = contextvars.ContextVar(
            "dsys_timeout", default=None
        )

    def __repr__(self) -> str:
        return f"Timeout({self.seconds})"

    async def __aenter__(self) -> Timeout:
        loop = asyncio.get_running_loop()
        mine = loop.time() + self.seconds
        outer = _deadline.get()
        cm: asyncio.Timeout | None = None
        if outer is None or mine < outer:
            token = _deadline.set(mine)
            cm = asyncio.timeout_at(mine)
            await cm.__aenter__()
        else:  # the enclosing deadline is earlier and already enforced outside
            token = _deadline.set(outer)
        self._stack.set((token, cm, self._stack.get()))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry = self._stack.get()
        if entry is None:
            raise RuntimeError(f"{self!r}: __aexit__ without __aenter__")
        token, cm, prev = entry
        self._stack.set(prev)
        _deadline.reset(token)
        if cm is None:
            return
        try:
            await cm.__aexit__(exc_type, exc, tb)
        except TimeoutError as err:
            if cm.expired():
                raise RequestTimeout(f"timed out after {self.seconds:g} s") from err
            raise

    async def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await ``fn(*args, **kwargs)`` within the time limit.

        Raises:
            RequestTimeout: the time limit passed first (the call was cancelled).
        """
        async with self:
            return await fn(*args, **kwargs)

    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        """Decorate a coroutine function so each call has this time limit."""

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            async with self:
                return await fn(*args, **kwargs)

        return wrapper


__all__ = ["Timeout", "deadline", "remaining"]
