"""A matcher process: the order books of the instruments the ring gives it.

``python -m examples.trading.matcher --id m1 --matchers m1,m2 --streams HOST:PORT
--pubsub HOST:PORT``

It reads the durable ``ORDERS`` stream in sequence order (every matcher reads it all and
keeps the commands for its own instruments: the consistent-hash ring over ``--matchers``
decides), applies each command to the instrument's :class:`~.matching.OrderBook`, and
publishes one ``RESULTS`` message per command (``results.<symbol>``, message id
``r<orders seq>``: the events it caused) and the book's depth on pub/sub
(``depth.NSE.<symbol>``).

The books live only in memory. On start the matcher rebuilds them by replaying the
stream from the beginning; for every command whose result is already in ``RESULTS`` it
checks that the replay produced exactly the recorded events (``GET /status`` counts the
identical and the mismatched ones), and it publishes the results that are missing (the
message id makes a duplicate publish harmless). So a matcher killed with SIGKILL at any
point comes back with the same books and the same fills.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from aiohttp import web

from dsys.errors import UnavailableError
from dsys.observability import configure_logging, get_logger
from dsys.pubsub import Client
from dsys.streams.client import StreamClient

from .market import (
    EXCHANGE,
    ORDERS_STREAM,
    RESULTS_STREAM,
    TICK_SIZE,
    instruments,
    owner,
    owner_ring,
)
from .matching import OrderBook, command_from_wire, event_to_wire
from .service import ensure_streams, serve

log = get_logger("trading.matcher")
PAGE = 500


class Matcher:
    """The books of the instruments this matcher owns, fed from the ORDERS stream."""

    def __init__(self, node_id: str, matchers: list[str], symbols: list[str]) -> None:
        ring = owner_ring(matchers)
        self.node_id = node_id
        self.books = {s: OrderBook(tick=TICK_SIZE) for s in symbols if owner(ring, s) == node_id}
        self.next_seq = 1  # the next ORDERS sequence to apply
        self.recorded: dict[int, list[dict[str, Any]]] = {}  # results found in RESULTS
        self.identical = 0
        self.mismatched = 0
        self.published = 0
        self.bad_commands = 0
        self.rebuilt = False

    def apply(self, seq: int, subject: str, data: bytes) -> tuple[str, dict[str, Any]] | None:
        """Apply ORDERS message ``seq``; returns (symbol, result) when it is ours."""
        symbol = subject.rpartition(".")[2]
        book = self.books.get(symbol)
        if book is None:
            return None
        try:
            wire = json.loads(data)
            cmd = command_from_wire(wire)
        except (ValueError, TypeError, AttributeError) as exc:
            self.bad_commands += 1
            return symbol, {
                "seq": seq,
                "symbol": symbol,
                "cmd": None,
                "error": str(exc),
                "events": [],
            }
        events = [event_to_wire(e) for e in book.apply(cmd)]
        return symbol, {"seq": seq, "symbol": symbol, "cmd": wire, "events": events}

    def status(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "instruments": len(self.books),
            "next_seq": self.next_seq,
            "rebuilt": self.rebuilt,
            "replayed_identical": self.identical,
            "replayed_mismatched": self.mismatched,
            "published": self.published,
            "bad_commands": self.bad_commands,
            "trades": sum(b.trades for b in self.books.values()),
        }


async def load_recorded(sc: StreamClient, m: Matcher) -> None:
    """Every result already in RESULTS for our instruments, by ORDERS sequence."""
    start = 1
    while True:
        page = await sc.read(RESULTS_STREAM, start_seq=start, limit=PAGE)
        if not page:
            return
        for msg in page:
            res = json.loads(msg.data)
            if res.get("symbol") in m.books:
                m.recorded[int(res["seq"])] = res["events"]
        start = page[-1].seq + 1


async def run(m: Matcher, sc: StreamClient, ps: Client) -> None:
    """Replay, then follow the ORDERS stream forever."""
    await ensure_streams(sc)
    await load_recorded(sc, m)
    info = await sc.stream_info(ORDERS_STREAM)
    last_at_start = int((info or {}).get("last_seq", 0))
    log.info("rebuilding", recorded=len(m.recorded), orders=last_at_start)
    idle = 0.0
    while True:
        try:
            page = await sc.read(ORDERS_STREAM, start_seq=m.next_seq, limit=PAGE)
        except (UnavailableError, OSError, TimeoutError) as exc:
            log.warning("orders stream unavailable", error=str(exc))
            await asyncio.sleep(0.5)
            continue
        if not page:
            if not m.rebuilt and m.next_seq > last_at_start:
                m.rebuilt = True
                log.info("rebuilt", **m.status())
            idle = min(0.05, idle + 0.005)
            await asyncio.sleep(idle)
            continue
        idle = 0.0
        touched: set[str] = set()
        pubs = []
        for msg in page:
            out = m.apply(msg.seq, msg.subject, msg.data)
            m.next_seq = msg.seq + 1
            if out is None:
                continue
            symbol, result = out
            touched.add(symbol)
            seen = m.recorded.pop(msg.seq, None)
            if seen is not None:
                if seen == result["events"]:
                    m.identical += 1
                else:
                    m.mismatched += 1
                    log.error("replay differs", seq=msg.seq, recorded=seen, now=result["events"])
                continue
            body = json.dumps(result, separators=(",", ":")).encode()
            pubs.append((f"results.{symbol}", body, f"r{msg.seq}"))
        while pubs:  # until every result is stored (the message id makes retries harmless)
            try:
                await asyncio.gather(*(sc.publish(s, b, msg_id=i) for s, b, i in pubs))
            except (UnavailableError, OSError, TimeoutError) as exc:
                log.warning("results stream unavailable", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            m.published += len(pubs)
            break
        if m.rebuilt or m.next_seq > last_at_start:
            for symbol in touched:
                bids, asks = m.books[symbol].depth(5)
                depth = {"symbol": symbol, "bids": bids, "asks": asks}
                await ps.publish(f"depth.{EXCHANGE}.{symbol}", json.dumps(depth).encode())


async def main_async(args: argparse.Namespace) -> None:
    symbols = [i.symbol for i in instruments(args.instruments)]
    m = Matcher(args.id, args.matchers.split(","), symbols)
    async with StreamClient(args.streams.split(",")) as sc, Client(args.pubsub.split(",")) as ps:
        app = web.Application()

        async def status(request: web.Request) -> web.Response:
            return web.json_response(m.status())

        async def book(request: web.Request) -> web.Response:
            b = m.books.get(request.match_info["symbol"])
            if b is None:
                raise web.HTTPNotFound(text="not an instrument of this matcher")
            return web.json_response({"resting": [list(r) for r in b.resting()]})

        app.router.add_get("/status", status)
        app.router.add_get("/book/{symbol}", book)
        await serve(f"matcher {args.id}", app, args.listen, lambda: run(m, sc, ps))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m examples.trading.matcher", description=__doc__)
    p.add_argument("--id", required=True)
    p.add_argument("--matchers", required=True, help="every matcher id, comma-separated")
    p.add_argument("--streams", required=True, help="stream servers HOST:PORT,...")
    p.add_argument("--pubsub", required=True, help="pub/sub brokers HOST:PORT,...")
    p.add_argument("--instruments", type=int, default=500)
    p.add_argument("--listen", default="127.0.0.1:0")
    args = p.parse_args(argv)
    configure_logging()
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
