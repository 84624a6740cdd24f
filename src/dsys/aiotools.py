"""Small asyncio helpers shared by the building blocks' hot paths."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from collections.abc import Callable, Coroutine
from typing import Any

LOOPS = ("auto", "asyncio", "uvloop")
"""Event loop choices of :func:`loop_factory` (the servers' ``--loop``)."""


def loop_factory(loop: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory ``loop`` names: ``uvloop`` (the optional ``dsys[fast]``
    extra), ``asyncio`` (None: the standard loop) or ``auto`` (uvloop when installed).

    ``None`` reads ``$DSYS_LOOP`` (default ``asyncio``).

    Raises:
        ValueError: an unknown name, or ``uvloop`` when it is not installed.
    """
    loop = loop or os.environ.get("DSYS_LOOP") or "asyncio"
    if loop not in LOOPS:
        raise ValueError(f"unknown event loop {loop!r}: choose one of {', '.join(LOOPS)}")
    if loop == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if loop == "uvloop":
            raise ValueError("--loop uvloop needs uvloop: pip install 'dsys[fast]'") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def hand_over(transport: asyncio.Transport, protocol: asyncio.Protocol, buffered: bytes) -> None:
    """Give a connection to another protocol, with the bytes read but not yet parsed.

    How a protocol-level fast path passes a request it does not serve (and the rest of
    the connection) to a full HTTP server's protocol, e.g. aiohttp's ``AppRunner.server()``.
    """
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    transport.resume_reading()
    if buffered:
        protocol.data_received(buffered)


def start_inline(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run the first step of ``coro`` now; a task finishes it only if it has to wait.

    For sends such as ``WebSocketResponse.send_bytes``: without compression their first
    step writes to the transport and returns, so the common case costs no task and no
    loop turn. Only a send that must wait (flow control: a full socket buffer) gets a
    task, which the caller may watch for errors.

    Raises:
        Exception: whatever the first step raised.
    """
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    if isinstance(waiting, asyncio.Future):
        waiting._asyncio_future_blocking = False  # taken, as a Task takes it
    return asyncio.ensure_future(_finish(coro, waiting))


async def _finish(coro: Coroutine[Any, Any, None], waiting: object) -> None:
    """Run the rest of ``coro``, whose last step stopped at ``waiting``."""
    try:
        while True:
            if isinstance(waiting, asyncio.Future):
                # the coroutine itself raises what the future raised when it resumes
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await waiting
            else:  # a bare yield: give the loop one turn
                await asyncio.sleep(0)
            try:
                waiting = coro.send(None)
            except StopIteration:
                return
    finally:
        coro.close()


__all__ = ["LOOPS", "hand_over", "loop_factory", "start_inline"]
