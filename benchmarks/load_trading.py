"""End-to-end load on the trading example (real processes on loopback).

1. Orders through the API: ``--users`` users place ``--orders`` MARKET orders (buy, then
   sell back) from ``--concurrency`` tasks; the API answers once the order is final, so
   the request time is order-to-fill. Per-user rate limits are raised for this run
   (``--orders-per-second``), everything else is as ``python -m examples.trading`` runs.
2. Ticks delivered: ``--clients`` WebSocket clients connect through ``dsys lb`` to the
   ticker gateways, each subscribes to ``--per-client`` instruments (quote mode), and the
   packets they receive in ``--seconds`` are counted.

Run: ``.venv/bin/python benchmarks/load_trading.py [--quick]``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.trading.market import instruments, unpack_message
from examples.trading.system import TradingSystem


async def orders(ts: TradingSystem, args: argparse.Namespace) -> dict[str, float]:
    insts = instruments(args.instruments)
    conn = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=conn) as http:
        tokens = []
        for u in range(args.users):
            async with http.post(
                f"{ts.api_url}/api/signup", json={"user": f"load_{u}", "password": "load-pass-1"}
            ) as r:
                tokens.append((await r.json())["token"])
        lat: list[float] = []
        statuses: dict[str, int] = {}
        rnd = random.Random(1)
        queue = list(range(args.orders))

        async def worker(w: int) -> None:
            token = tokens[w % len(tokens)]
            headers = {"Authorization": f"Bearer {token}"}
            while queue:
                i = queue.pop()
                sym = insts[rnd.randrange(len(insts))].symbol
                body = {"symbol": sym, "side": "BUY", "qty": 1, "type": "MARKET"}
                t = time.perf_counter()
                async with http.post(f"{ts.api_url}/api/orders", json=body, headers=headers) as r:
                    o = await r.json()
                lat.append(time.perf_counter() - t)
                key = o.get("status", f"HTTP {r.status}")
                statuses[key] = statuses.get(key, 0) + 1
                del i

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
    lat.sort()
    print(f"order statuses: {statuses}", flush=True)
    return {
        "orders_per_s": len(lat) / elapsed,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
        "complete": statuses.get("COMPLETE", 0) / max(1, len(lat)),
    }


async def ticks(ts: TradingSystem, args: argparse.Namespace) -> dict[str, float]:
    insts = instruments(args.instruments)
    counts = [0] * args.clients
    stop = asyncio.Event()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:

        async def client(i: int) -> None:
            rnd = random.Random(i)
            tokens = [x.token for x in rnd.sample(insts, args.per_client)]
            async with http.ws_connect(ts.ticker_url, max_msg_size=0) as ws:
                await ws.send_str(json.dumps({"a": "subscribe", "v": tokens}))
                ready.append(i)
                if len(ready) == args.clients:
                    all_ready.set()
                while not stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.BINARY and measuring:
                        counts[i] += len(unpack_message(msg.data))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return

        ready: list[int] = []
        all_ready = asyncio.Event()
        measuring = False
        tasks = []
        for i in range(args.clients):
            tasks.append(asyncio.create_task(client(i)))
            if i % 100 == 99:
                await asyncio.sleep(0.2)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_ready.wait(), 60)
        await asyncio.sleep(1.0)
        measuring = True
        t0 = time.perf_counter()
        await asyncio.sleep(args.seconds)
        measuring = False
        elapsed = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"connected": len(ready), "ticks_per_s": sum(counts) / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instruments", type=int, default=500)
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--orders", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-client", type=int, default=20)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.orders, args.clients, args.seconds = 300, 100, 3.0
    t = time.monotonic()
    with TradingSystem(
        instruments=args.instruments,
        api_args=["--orders-per-second", "100000", "--orders-per-minute", "10000000"],
    ) as ts:
        print(f"started in {time.monotonic() - t:.1f} s", flush=True)
        o = asyncio.run(orders(ts, args))
        k = asyncio.run(ticks(ts, args))
    print(
        f"\n{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.instruments} instruments, every process on this machine\n"
    )
    print("| measure | value |")
    print("|---|---:|")
    rate, p50, p99 = o["orders_per_s"], o["p50_ms"], o["p99_ms"]
    print(f"| MARKET orders through the API ({args.concurrency} concurrent) | {rate:,.0f}/s |")
    print(f"| order-to-fill p50 / p99 (request to COMPLETE) | {p50:.1f} / {p99:.1f} ms |")
    print(f"| orders complete | {o['complete']:.1%} |")
    print(
        f"| ticks delivered to {k['connected']:.0f} WebSocket clients via dsys lb "
        f"({args.per_client} instruments each) | {k['ticks_per_s']:,.0f}/s |"
    )


if __name__ == "__main__":
    main()
