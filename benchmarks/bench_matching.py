"""Matching-engine core: orders/s and per-order latency, dsys's example vs `order-matching`.

The workload has exchange-core's benchmark shape, on one book: 9% GTC limit orders, 3%
IOC orders, 6% cancels and 82% moves (a resting order gets a new price, and trades when
the new price crosses), over about 1,000 resting orders on about 750 price levels. It is
generated once, up front, from a seeded random walk (the generator follows the book with
our engine to know which orders are still resting); both engines then replay the same
command list on a fresh book, preloaded the same way, in alternating rounds.

- Throughput: the command list as fast as it goes (no I/O, no logging), orders/s.
- Latency at a constant arrival rate (half of the engine's median throughput): each order
  has an intended start time ``t0 + i / rate``; its latency is measured from that time,
  not from when the loop got to it, so a stall is charged to every order queued behind
  it (no coordinated omission). p50 and p99 in microseconds.

The peer is `order-matching` (PyPI), a pure-Python price-time order book; it has no
modify and no IOC, so a move is cancel + place and an IOC is place + match + cancel of the
rest, which is how a user of it would write them. It is much slower, so it runs on the
first ``--peer-orders`` commands of the same list; both engines' traded quantity over that
prefix is compared as a sanity check.

Run: ``.venv/bin/python benchmarks/bench_matching.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.trading.matching import BUY, IOC, LIMIT, SELL, OrderBook, Trade

MID = 100_000  # paise (1,000.00 rupees)
SPREAD = 700  # offsets from MID: ~1,000 orders land on ~750 distinct levels
RESTING = 1_000

# a command: (kind, order_id, side, qty, price); kinds below
GTC, IOC_ORDER, CANCEL, MOVE = 0, 1, 2, 3
Op = tuple[int, int, int, int, int]


def preload(seed: int) -> list[Op]:
    """About RESTING orders over about LEVELS levels, bids below MID, asks above."""
    rnd = random.Random(seed)
    ops: list[Op] = []
    for i in range(RESTING):
        side = i % 2
        offset = rnd.randint(1, SPREAD)
        price = MID - offset if side == BUY else MID + offset
        ops.append((GTC, i + 1, side, rnd.randint(1, 100), price))
    return ops


def workload(n: int, seed: int) -> tuple[list[Op], list[Op]]:
    """The preload and ``n`` commands in exchange-core's mix."""
    rnd = random.Random(seed)
    pre = preload(seed)
    book = OrderBook()
    for _, oid, side, qty, price in pre:
        book.place(oid, BUY if side == BUY else SELL, qty, price)
    live = [op[1] for op in pre]
    where = {oid: i for i, oid in enumerate(live)}
    next_id = len(pre) + 1
    ops: list[Op] = []

    def forget(oid: int) -> None:
        i = where.pop(oid)
        last = live.pop()
        if last != oid:
            live[i] = last
            where[last] = i

    def follow(events: list[object]) -> None:
        for e in events:
            if isinstance(e, Trade) and e.maker_left == 0 and e.maker in where:
                forget(int(e.maker))

    for _ in range(n):
        r = rnd.random()
        mid = book.last_price or MID
        if r < 0.09 or not live:  # GTC limit near the touch, rests mostly
            side = rnd.randint(0, 1)
            off = rnd.randint(-5, SPREAD)
            price = mid - off if side == BUY else mid + off
            op: Op = (GTC, next_id, side, rnd.randint(1, 100), max(1, price))
            next_id += 1
            evs = book.place(op[1], BUY if side == BUY else SELL, op[3], op[4])
            follow(list(evs))
            if book.open_qty(op[1]):
                live.append(op[1])
                where[op[1]] = len(live) - 1
        elif r < 0.12:  # IOC: takes liquidity
            side = rnd.randint(0, 1)
            best = book.best_ask() if side == BUY else book.best_bid()
            best = best or mid
            price = best + 3 if side == BUY else max(1, best - 3)
            op = (IOC_ORDER, next_id, side, rnd.randint(1, 50), price)
            next_id += 1
            follow(list(book.place(op[1], BUY if side == BUY else SELL, op[3], op[4], LIMIT, IOC)))
        elif r < 0.18:  # cancel
            oid = live[rnd.randrange(len(live))]
            op = (CANCEL, oid, 0, 0, 0)
            book.cancel(oid)
            forget(oid)
        else:  # move: a new price a few ticks away, sometimes crossing
            oid = live[rnd.randrange(len(live))]
            side, price = _side_price(book, oid)
            price = max(1, price + rnd.randint(-8, 8))
            op = (MOVE, oid, side, 0, price)
            follow(list(book.modify(oid, price=price)))
            if oid in where and not book.open_qty(oid):
                forget(oid)
        ops.append(op)
    return pre, ops


def _side_price(book: OrderBook, oid: int) -> tuple[int, int]:
    o = book._orders[oid]
    return int(o.side), o.price


# -- the two engines --------------------------------------------------------------------


def run_ours(pre: list[Op], ops: list[Op]) -> Callable[[int, int], tuple[int, int]]:
    """A fresh preloaded book; the returned function applies ops[a:b], counts traded qty."""
    book = OrderBook()
    sides = (BUY, SELL)
    for _, oid, side, qty, price in pre:
        book.place(oid, sides[side], qty, price)
    place, cancel, modify = book.place, book.cancel, book.modify

    def apply(a: int, b: int) -> tuple[int, int]:
        traded = 0
        for kind, oid, side, qty, price in ops[a:b]:
            if kind == MOVE:
                evs = modify(oid, 0, price)
            elif kind == GTC:
                evs = place(oid, sides[side], qty, price)
            elif kind == CANCEL:
                evs = cancel(oid)
            else:
                evs = place(oid, sides[side], qty, price, LIMIT, IOC)
            for e in evs:
                if type(e) is Trade:
                    traded += e.qty
        return b - a, traded

    return apply


def run_peer(pre: list[Op], ops: list[Op]) -> Callable[[int, int], tuple[int, int]]:
    """The same on order-matching's MatchingEngine."""
    from loguru import logger
    from order_matching.enums import Side as PSide
    from order_matching.matching_engine import MatchingEngine
    from order_matching.order import LimitOrder
    from order_matching.orders import Orders

    logger.remove()  # it logs every call at DEBUG to stderr by default
    me = MatchingEngine(seed=1)
    psides = (PSide.BUY, PSide.SELL)
    t0 = datetime(2026, 1, 1)
    clock = [0]
    prices: dict[int, tuple[int, int]] = {}  # oid -> (side, qty) to re-place a moved order

    def now() -> datetime:
        clock[0] += 1
        return t0 + timedelta(microseconds=clock[0])

    def place(oid: int, side: int, qty: float, price: int) -> int:
        ts = now()
        order = LimitOrder(
            side=psides[side], price=price, size=qty, timestamp=ts, order_id=str(oid), trader_id="t"
        )
        me.place(Orders([order]))
        return int(sum(t.size for t in me.match(timestamp=ts).trades))

    def cancel(oid: int) -> float:
        found = me.unprocessed_orders.find_order_by_id(str(oid))
        if found is None:
            return 0.0
        me.cancel_order(str(oid))
        return float(found.size)

    for _, oid, side, qty, price in pre:
        place(oid, side, qty, price)
        prices[oid] = (side, qty)

    def apply(a: int, b: int) -> tuple[int, int]:
        traded = 0
        for kind, oid, side, qty, price in ops[a:b]:
            if kind == MOVE:
                left = cancel(oid)
                if left:
                    traded += place(oid, prices[oid][0], left, price)
            elif kind == GTC:
                prices[oid] = (side, qty)
                traded += place(oid, side, qty, price)
            elif kind == CANCEL:
                cancel(oid)
            else:
                traded += place(oid, side, qty, price)
                cancel(oid)
        return b - a, traded

    return apply


# -- measurement -------------------------------------------------------------------------


def throughput(apply: Callable[[int, int], tuple[int, int]], n: int) -> tuple[float, float, int]:
    """Orders per wall-clock second and per CPU second (the second does not count time
    the process waited for a core: the machine may be shared), and the traded quantity."""
    t, c = time.perf_counter(), time.process_time()
    done, traded = apply(0, n)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return done / wall, done / max(cpu, 1e-9), traded


def latency(
    apply: Callable[[int, int], tuple[int, int]], n: int, rate: float
) -> tuple[float, float]:
    """p50, p99 in microseconds at a constant arrival rate, from each intended start."""
    lat: list[float] = []
    clock = time.perf_counter
    t0 = clock() + 0.001
    gap = 1.0 / rate
    for i in range(n):
        due = t0 + i * gap
        while clock() < due:
            pass
        apply(i, i + 1)
        lat.append(clock() - due)
    lat.sort()
    return lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=200_000)
    parser.add_argument("--peer-orders", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="small counts, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.orders, args.peer_orders, args.rounds = 20_000, 500, 2
    pre, ops = workload(args.orders, args.seed)
    mix = [sum(op[0] == k for op in ops) / len(ops) for k in (GTC, IOC_ORDER, CANCEL, MOVE)]
    probe = OrderBook()
    for _, oid, side, qty, price in pre:
        probe.place(oid, BUY if side == BUY else SELL, qty, price)
    print(
        f"workload: {len(ops):,} commands after a {len(pre):,}-order preload "
        f"({len(probe._bid_prices) + len(probe._ask_prices)} levels); mix GTC {mix[0]:.1%}, "
        f"IOC {mix[1]:.1%}, cancel {mix[2]:.1%}, move {mix[3]:.1%}",
        flush=True,
    )
    ours_tp: list[float] = []
    peer_tp: list[float] = []
    ours_cpu: list[float] = []
    peer_cpu: list[float] = []
    check: list[tuple[int, int]] = []
    for r in range(args.rounds):
        tp, cpu, _ = throughput(run_ours(pre, ops), len(ops))
        ours_tp.append(tp)
        ours_cpu.append(cpu)
        tp_peer, cpu_peer, peer_traded = throughput(run_peer(pre, ops), args.peer_orders)
        peer_tp.append(tp_peer)
        peer_cpu.append(cpu_peer)
        _, ours_traded = run_ours(pre, ops)(0, args.peer_orders)
        check.append((ours_traded, peer_traded))
        print(
            f"round {r + 1}: ours {tp:,.0f}/s ({cpu:,.0f} per CPU s), "
            f"order-matching {tp_peer:,.0f}/s ({cpu_peer:,.0f} per CPU s)",
            flush=True,
        )
    ours = statistics.median(ours_tp)
    peer = statistics.median(peer_tp)
    ours_c = statistics.median(ours_cpu)
    peer_c = statistics.median(peer_cpu)
    lat_n = min(len(ops), 50_000)
    ours_lat = latency(run_ours(pre, ops), lat_n, ours / 2)
    peer_lat = latency(run_peer(pre, ops), min(args.peer_orders, 1_000), peer / 2)
    same = all(a == b for a, b in check)
    print(
        f"\norders/s, median of {args.rounds} alternating rounds; latency at half the median "
        f"throughput, from each order's intended start. {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; traded quantity over the "
        f"first {args.peer_orders:,} commands: ours {check[0][0]:,}, order-matching "
        f"{check[0][1]:,} ({'same' if same else 'DIFFERENT'})\n"
    )
    print(
        "| engine | commands | orders/s | best round | orders per CPU s | vs peer (CPU) "
        "| latency p50 (us) | p99 (us) | arrival rate |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| dsys example (`examples/trading/matching.py`) | {len(ops):,} | {ours:,.0f} | "
        f"{max(ours_tp):,.0f} | {ours_c:,.0f} | {ours_c / peer_c:,.0f}x | "
        f"{ours_lat[0]:.1f} | {ours_lat[1]:.1f} | {ours / 2:,.0f}/s |"
    )
    print(
        f"| order-matching {_version()} | {args.peer_orders:,} | {peer:,.0f} | "
        f"{max(peer_tp):,.0f} | {peer_c:,.0f} | peer | "
        f"{peer_lat[0]:.1f} | {peer_lat[1]:.1f} | {peer / 2:,.0f}/s |"
    )


def _version() -> str:
    from importlib.metadata import version

    return version("order-matching")


if __name__ == "__main__":
    main()
