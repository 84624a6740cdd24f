"""A ticker gateway: market data over WebSocket in the shape of Kite's streaming API.

``python -m examples.trading.ticker --pubsub HOST:PORT`` (run several behind ``dsys lb``).

Connect to ``/ws``. Send JSON text messages::

    {"a": "subscribe", "v": [100000, 100007]}
    {"a": "unsubscribe", "v": [100007]}
    {"a": "mode", "v": ["full", [100000]]}          # "ltp", "quote" or "full"

and receive binary messages of ltp (8 bytes), quote (44) or full (184, with five levels
of depth) packets, prices in paise (:mod:`.market` has the layout and a parser). New
subscriptions start in ``quote`` mode and get the current quote at once; after that a
quote is sent when it changes, batched every ``--flush`` seconds. At most 3,000
instruments per connection. Anything malformed is answered with a text message
``{"type": "error", "data": "..."}``, and the connection stays open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

import aiohttp
from aiohttp import web

from dsys.observability import configure_logging, get_logger
from dsys.pubsub import Client, Msg

from .market import MODES, Quote, decode_tick, instruments, pack_message, pack_quote

log = get_logger("trading.ticker")
MAX_PER_CONNECTION = 3000
Depth = tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]


class Conn:
    """One client connection: its instruments, their modes, what changed since the last send."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.modes: dict[int, str] = {}
        self.dirty: set[int] = set()


class Ticker:
    """Quotes from pub/sub, fanned out to WebSocket clients."""

    def __init__(self, count: int) -> None:
        insts = instruments(count)
        self.by_symbol = {i.symbol: i.token for i in insts}
        self.quotes: dict[int, Quote] = {
            i.token: Quote(
                token=i.token, ltp=i.open, open=i.open, high=i.open, low=i.open, close=i.open
            )
            for i in insts
        }
        self.depth: dict[int, Depth] = {}
        self.conns: set[Conn] = set()
        self.watchers: dict[int, set[Conn]] = {}
        self.sent = 0

    async def on_tick(self, msg: Msg) -> None:
        try:
            q = decode_tick(msg.data)
        except ValueError:
            return
        if q.token in self.quotes:
            self.quotes[q.token] = q
            self._touch(q.token)

    async def on_depth(self, msg: Msg) -> None:
        try:
            d = json.loads(msg.data)
            token = self.by_symbol[d["symbol"]]
            self.depth[token] = ([tuple(x) for x in d["bids"]], [tuple(x) for x in d["asks"]])
        except (ValueError, KeyError, TypeError):
            return
        self._touch(token)

    def _touch(self, token: int) -> None:
        for c in self.watchers.get(token, ()):
            c.dirty.add(token)

    def handle(self, c: Conn, text: str) -> str | None:
        """Apply one client message; returns an error to send back, or None."""
        try:
            req = json.loads(text)
        except ValueError:
            return "not JSON"
        if not isinstance(req, dict) or req.get("a") not in ("subscribe", "unsubscribe", "mode"):
            return 'expected {"a": "subscribe" | "unsubscribe" | "mode", "v": ...}'
        a, v = req["a"], req.get("v")
        mode = "quote"
        if a == "mode":
            if not (isinstance(v, list) and len(v) == 2 and v[0] in MODES):
                return 'mode needs "v": ["ltp" | "quote" | "full", [tokens]]'
            mode, v = v
        if not isinstance(v, list) or not all(type(t) is int for t in v):
            return '"v" must be a list of integer instrument tokens'
        unknown = [t for t in v if t not in self.quotes]
        tokens = [t for t in v if t in self.quotes]
        if a == "unsubscribe":
            for t in tokens:
                c.modes.pop(t, None)
                c.dirty.discard(t)
                self.watchers.get(t, set()).discard(c)
        else:
            new = [t for t in tokens if t not in c.modes]
            if a == "subscribe" and len(c.modes) + len(new) > MAX_PER_CONNECTION:
                return f"at most {MAX_PER_CONNECTION} instruments per connection"
            for t in tokens:
                if a == "subscribe" and t in c.modes:
                    continue
                if a == "mode" and t not in c.modes:
                    continue
                c.modes[t] = mode
                c.dirty.add(t)
                self.watchers.setdefault(t, set()).add(c)
        if unknown:
            return f"unknown instrument tokens: {unknown[:20]}"
        return None

    def packets(self, c: Conn) -> bytes | None:
        if not c.dirty:
            return None
        out = [
            pack_quote(self.quotes[t], c.modes[t], self.depth.get(t, ([], [])))
            for t in c.dirty
            if t in c.modes
        ]
        c.dirty.clear()
        return pack_message(out) if out else None

    async def flush_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            for c in list(self.conns):
                data = self.packets(c)
                if data is not None and not c.ws.closed:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await c.ws.send_bytes(data)
                        self.sent += 1

    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=1 << 20)
        await ws.prepare(request)
        c = Conn(ws)
        self.conns.add(c)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    err = self.handle(c, msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    err = "binary frames are not accepted; send JSON text messages"
                else:
                    break
                if err is not None:
                    await ws.send_str(json.dumps({"type": "error", "data": err}))
        finally:
            self.conns.discard(c)
            for t in c.modes:
                self.watchers.get(t, set()).discard(c)
        return ws

    def status(self) -> dict[str, Any]:
        return {"connections": len(self.conns), "messages_sent": self.sent}


async def main_async(args: argparse.Namespace) -> None:
    from .service import serve

    t = Ticker(args.instruments)
    async with Client(args.pubsub.split(","), name="ticker") as ps:
        await ps.subscribe("ticks.>", cb=t.on_tick)
        await ps.subscribe("depth.>", cb=t.on_depth)
        app = web.Application()
        app.router.add_get("/ws", t.ws_handler)

        async def status(request: web.Request) -> web.Response:
            return web.json_response(t.status())

        app.router.add_get("/status", status)
        await serve("ticker", app, args.listen, lambda: t.flush_forever(args.flush))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m examples.trading.ticker", description=__doc__)
    p.add_argument("--pubsub", required=True)
    p.add_argument("--instruments", type=int, default=500)
    p.add_argument("--flush", type=float, default=0.1, help="seconds between sends")
    p.add_argument("--listen", default="127.0.0.1:0")
    args = p.parse_args(argv)
    configure_logging()
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
