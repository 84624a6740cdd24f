"""Plumbing shared by the trading services: serve an aiohttp app until a signal, streams."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from dsys.observability import start_site
from dsys.streams import StreamConfig
from dsys.streams.client import StreamClient

from .market import ORDERS_STREAM, RESULTS_STREAM

DAY_MS = 24 * 3600 * 1000


async def ensure_streams(sc: StreamClient) -> None:
    """Create ORDERS and RESULTS (the same configuration again is fine)."""
    await sc.add_stream(
        StreamConfig(name=ORDERS_STREAM, subjects=("orders.>",), duplicate_window_ms=DAY_MS)
    )
    await sc.add_stream(
        StreamConfig(name=RESULTS_STREAM, subjects=("results.>",), duplicate_window_ms=DAY_MS)
    )


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0: any free port)."""
    host, _, port = listen.rpartition(":")
    return host or "127.0.0.1", int(port)


async def serve(
    name: str,
    app: web.Application,
    listen: str,
    run: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve ``app``; print ``NAME listening on http://HOST:PORT``; stop on SIGINT/SIGTERM.

    ``run`` is the service's own loop, run beside the HTTP server; if it ends with an
    error, the service exits with it.
    """
    host, port = parse_listen(listen)
    app.router.add_get("/healthz", _healthz)
    runner, port = await start_site(app, host, port)
    print(f"{name} listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits: list[asyncio.Future[object]] = [asyncio.ensure_future(stop.wait())]
    if run is not None:
        waits.append(asyncio.ensure_future(run()))
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()
    finally:
        for t in waits:
            t.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await runner.cleanup()


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
