"""Load test of the shop in the shape of Online Boutique's locustfile.

Each simulated user signs up, then repeats tasks picked with Online Boutique's weights:
home 1, set currency 2, browse a product 10, view cart 3, add to cart 2, checkout 1,
with 1-10 s of think time between them (``--think 0 0`` is a closed loop: as fast as the
shop answers, for throughput). At the end it waits for every order to reach a final state
and reports requests/s and p50/p99 latency per endpoint, errors, and the saga's end states.

    python -m examples.shop.loadtest --quick              # 15 s closed loop on a fresh shop
    python -m examples.shop.loadtest --users 50 --seconds 120 --think 1 10
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import aiohttp

from .run import Api, Shop

TASKS = [("home", 1), ("set_currency", 2), ("browse", 10), ("view_cart", 3),
         ("add_to_cart", 2), ("checkout", 1)]  # fmt: skip
PRODUCTS = ["sunglasses", "tank-top", "watch", "loafers", "hairdryer", "candle-holder",
            "salt-pepper", "bamboo-jar", "mug"]  # fmt: skip
FINAL = ("delivered", "cancelled", "refunded")
CURRENCIES = ["EUR", "USD", "JPY", "CAD", "GBP"]


class Stats:
    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.orders: list[str] = []

    def table(self, seconds: float) -> list[str]:
        rows = [
            "| endpoint | requests | req/s | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        total = 0
        for name in sorted(self.lat):
            xs = sorted(self.lat[name])
            total += len(xs)
            errors = sum(v for k, v in self.errors.items() if k.startswith(name + " "))
            rows.append(
                f"| {name} | {len(xs)} | {len(xs) / seconds:.1f} | {pct(xs, 0.5):.1f} | "
                f"{pct(xs, 0.99):.1f} | {errors} |"
            )
        rows.append(
            f"| **all** | {total} | {total / seconds:.1f} | | | {sum(self.errors.values())} |"
        )
        return rows


def pct(xs: Sequence[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else 0.0


async def user(api: Api, stats: Stats, until: float, think: tuple[float, float],
               rng: random.Random) -> None:  # fmt: skip
    currency = "USD"
    names, weights = zip(*TASKS, strict=True)
    if think[1] > 0:  # users arrive spread over one think time (Locust's spawn rate)
        await asyncio.sleep(rng.uniform(0, think[1]))

    async def timed(name: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        t = time.perf_counter()
        try:
            status, data = await api.call(method, path, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats.errors[f"{name} {type(exc).__name__}"] += 1
            return 0, None
        stats.lat[name].append(time.perf_counter() - t)
        if status >= 400:
            stats.errors[f"{name} {status}"] += 1
        return status, data

    while time.monotonic() < until:
        task = rng.choices(names, weights)[0]
        if task == "home":
            await timed("home", "GET", f"/api/products?currency={currency}")
        elif task == "set_currency":
            currency = rng.choice(CURRENCIES)
            await timed("set_currency", "GET", "/api/currencies")
        elif task == "browse":
            await timed("browse", "GET", f"/api/products/{rng.choice(PRODUCTS)}")
        elif task == "view_cart":
            await timed("view_cart", "GET", "/api/cart")
        elif task == "add_to_cart":
            body = {"product": rng.choice(PRODUCTS), "qty": rng.randint(1, 3)}
            await timed("add_to_cart", "POST", "/api/cart/items", body)
        else:  # Online Boutique's checkout adds an item first
            body = {"product": rng.choice(PRODUCTS), "qty": 1}
            await timed("add_to_cart", "POST", "/api/cart/items", body)
            status, data = await timed("checkout", "POST", "/api/checkout", {})
            if status == 202:
                stats.orders.append(data["id"])
        if think[1] > 0:
            await asyncio.sleep(rng.uniform(*think))


async def run(
    shop: Shop, users: int, seconds: float, think: tuple[float, float], seed: int
) -> tuple[Stats, Counter[str], float]:
    stats = Stats()
    rng = random.Random(seed)
    conn = aiohttp.TCPConnector(limit=0)
    url, orders_url = shop.url, shop.urls["orders"]
    async with aiohttp.ClientSession(connector=conn) as http:
        for pid in PRODUCTS:  # Online Boutique never runs out; neither does this run
            stock = {"on_hand": 1_000_000}
            async with http.put(f"{shop.urls['inventory']}/admin/stock/{pid}", json=stock) as r:
                assert r.status == 200, await r.text()
        apis = [Api(http, url) for _ in range(users)]
        for i in range(0, users, 10):  # sign up first (argon2 is meant to be slow): not timed
            await asyncio.gather(
                *(a.signup(f"load{secrets.token_hex(5)}") for a in apis[i : i + 10])
            )
        # warm up: each user opens its connection once (100 users connecting in the same
        # millisecond overflow the listen backlog and wait out a 1 s SYN retry otherwise)
        for i in range(0, users, 10):
            await asyncio.gather(*(a.call("GET", "/api/currencies") for a in apis[i : i + 10]))
        start = time.monotonic()
        until = start + seconds
        await asyncio.gather(*(
            user(api, stats, until, think, random.Random(rng.random())) for api in apis
        ))  # fmt: skip
        elapsed = time.monotonic() - start
        ends: Counter[str] = Counter()
        deadline = time.monotonic() + 60
        mine = set(stats.orders)
        while True:
            async with http.get(f"{orders_url}/admin/orders") as r:
                records = [o for o in await r.json() if o["id"] in mine]
            ends = Counter(
                o["status"] + (f" ({o['reason'].split(':')[-1].strip()})" if o["reason"] else "")
                for o in records
            )
            final = sum(n for s, n in ends.items() if s.startswith(FINAL))
            if final == len(mine) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    return stats, ends, elapsed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.shop.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="15 s, 8 users, closed loop, 1-node clusters"
    )
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--think", type=float, nargs=2, default=(1.0, 10.0), metavar=("MIN", "MAX"))
    p.add_argument("--nodes", type=int, default=3, help="KV and stream cluster size")
    p.add_argument("--error-rate", type=float, default=0.1, help="payment provider failures")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.seconds, args.think, args.nodes = 8, 15.0, (0.0, 0.0), 1
    think = (args.think[0], args.think[1])
    mode = "closed loop" if think[1] <= 0 else f"think {think[0]:g}-{think[1]:g} s"
    print(f"shop load test: {args.users} users, {args.seconds:g} s, {mode}, "
          f"{args.nodes}-node KV and streams, provider error rate {args.error_rate:g}")  # fmt: skip
    with Shop(kv_nodes=args.nodes, stream_nodes=args.nodes, rate=10_000, delivery_step=0.5,
              provider_error_rate=args.error_rate, quiet=True) as shop:  # fmt: skip
        stats, ends, elapsed = asyncio.run(run(shop, args.users, args.seconds, think, args.seed))
    print("\n".join(stats.table(elapsed)))
    print(f"\norders: {len(stats.orders)} placed; end states: {dict(ends)}")
    if stats.errors:
        print(f"errors: {dict(stats.errors)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
