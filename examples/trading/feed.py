"""The simulated exchange feed, and a market maker so that orders have someone to trade with.

``python -m examples.trading.feed --pubsub HOST:PORT --streams HOST:PORT``

- Ticks: a seeded random walk per instrument; every ``--interval`` seconds a ``--fraction``
  of the instruments move by a few ticks and their quote is published on pub/sub subject
  ``ticks.NSE.<symbol>`` (:func:`~.market.encode_tick`).
- Market maker: one bid and one ask (``--mm-qty`` shares, ``--mm-spread`` ticks from the
  price) per instrument, placed through the ORDERS stream like any member's orders, and
  re-quoted around the moving price a few instruments at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from aiohttp import web

from dsys.observability import configure_logging, get_logger
from dsys.pubsub import Client
from dsys.streams.client import StreamClient

from .market import EXCHANGE, TICK_SIZE, Instrument, Quote, encode_tick, instruments
from .matching import BUY, SELL, Cancel, Place, command_to_wire
from .service import ensure_streams, serve

log = get_logger("trading.feed")


class Feed:
    """Prices (seeded random walk) and the market maker's quotes."""

    def __init__(self, insts: list[Instrument], seed: int, spread: int, qty: int) -> None:
        self.rnd = random.Random(seed)
        self.insts = insts
        self.quotes = {
            i.symbol: Quote(
                token=i.token, ltp=i.open, open=i.open, high=i.open, low=i.open, close=i.open
            )
            for i in insts
        }
        self.spread = spread
        self.qty = qty
        self.mm_orders: dict[str, list[str]] = {}
        self.n = 0
        self.ticks = 0

    def step(self, fraction: float) -> list[tuple[str, Quote]]:
        """Move a random ``fraction`` of the instruments; returns what moved."""
        moved = []
        for inst in self.rnd.sample(self.insts, max(1, int(len(self.insts) * fraction))):
            q = self.quotes[inst.symbol]
            move = self.rnd.choice((-3, -2, -1, -1, 0, 1, 1, 2, 3)) * TICK_SIZE
            q.ltp = max(TICK_SIZE, q.ltp + move)
            q.last_qty = self.rnd.randint(1, 500)
            q.volume += q.last_qty
            q.avg_price = q.ltp
            q.high, q.low = max(q.high, q.ltp), min(q.low, q.ltp)
            q.buy_qty, q.sell_qty = self.rnd.randint(1000, 50_000), self.rnd.randint(1000, 50_000)
            q.ts = int(time.time())
            moved.append((inst.symbol, q))
        self.ticks += len(moved)
        return moved

    def quote_commands(self, symbol: str) -> list[tuple[str, bytes, str]]:
        """Cancel the market maker's old quotes on ``symbol`` and place new ones."""
        out: list[tuple[str, Cancel | Place, str]] = []
        for oid in self.mm_orders.pop(symbol, []):
            out.append((symbol, Cancel(oid), f"{oid}:cancel"))
        ltp = self.quotes[symbol].ltp
        ids = []
        for side, price in (
            (BUY, ltp - self.spread * TICK_SIZE),
            (SELL, ltp + self.spread * TICK_SIZE),
        ):
            self.n += 1
            oid = f"mm.{self.n}"
            ids.append(oid)
            out.append((symbol, Place(oid, side, self.qty, max(TICK_SIZE, price)), f"{oid}:place"))
        self.mm_orders[symbol] = ids
        return [
            (f"orders.{s}", json.dumps(command_to_wire(c)).encode(), msg_id) for s, c, msg_id in out
        ]


async def run(feed: Feed, args: argparse.Namespace, sc: StreamClient, ps: Client) -> None:
    await ensure_streams(sc)
    # seed every book: all publishes in flight together (the client pipelines them)
    t = time.monotonic()
    pubs = [
        sc.publish(subj, data, msg_id=f"{args.seed}:{mid}")
        for inst in feed.insts
        for subj, data, mid in feed.quote_commands(inst.symbol)
    ]
    for i in range(0, len(pubs), 200):
        await asyncio.gather(*pubs[i : i + 200])
    log.info("market maker quoting", instruments=len(feed.insts), s=round(time.monotonic() - t, 2))
    requote = 0
    while True:
        for symbol, q in feed.step(args.fraction):
            await ps.publish(f"ticks.{EXCHANGE}.{symbol}", encode_tick(q))
        requote += 1
        if args.requote and requote % args.requote == 0:
            symbol = feed.rnd.choice(feed.insts).symbol
            await asyncio.gather(
                *(
                    sc.publish(subj, data, msg_id=f"{args.seed}:{mid}")
                    for subj, data, mid in feed.quote_commands(symbol)
                )
            )
        await asyncio.sleep(args.interval)


async def main_async(args: argparse.Namespace) -> None:
    feed = Feed(instruments(args.instruments), args.seed, args.mm_spread, args.mm_qty)
    async with StreamClient(args.streams.split(",")) as sc, Client(args.pubsub.split(",")) as ps:
        app = web.Application()

        async def status(request: web.Request) -> web.Response:
            return web.json_response(
                {
                    "ticks": feed.ticks,
                    "ltp": {s: q.ltp for s, q in feed.quotes.items()},
                }
            )

        app.router.add_get("/status", status)
        await serve("feed", app, args.listen, lambda: run(feed, args, sc, ps))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m examples.trading.feed", description=__doc__)
    p.add_argument("--streams", required=True)
    p.add_argument("--pubsub", required=True)
    p.add_argument("--instruments", type=int, default=500)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--interval", type=float, default=0.25, help="seconds between ticks")
    p.add_argument("--fraction", type=float, default=0.1, help="instruments moving per tick")
    p.add_argument("--mm-spread", type=int, default=2, help="market maker: ticks from price")
    p.add_argument("--mm-qty", type=int, default=1000)
    p.add_argument("--requote", type=int, default=4, help="re-quote one instrument every N ticks")
    p.add_argument("--listen", default="127.0.0.1:0")
    args = p.parse_args(argv)
    configure_logging()
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
