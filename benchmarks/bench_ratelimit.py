"""Rate-limit decisions per second: dsys vs the `limits` library, same run, alternating rounds.

Scenarios (every limit is large enough that requests are allowed, the common case):

1. In-process: ``Limiter.hit_sync`` on a MemoryStore vs ``limits`` memory storage with
   each of its strategies (fixed window, moving window, sliding window counter), for one
   hot key and for 10,000 keys round-robin.
2. Cluster: ``ClusterStore`` over 3 ``dsys ratelimit serve`` subprocesses, 16 concurrent
   tasks over 1,000 keys, without and with token leases (lease_size=100).
3. Redis: ``RedisStore`` vs ``limits.aio`` with redis storage (redis-py asyncio client for
   both) against the same redis-server started here, one client awaiting each decision.

Run: ``.venv/bin/python benchmarks/bench_ratelimit.py [--quick]``. Prints a markdown table
of medians and ratios (dsys / peer).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager

from dsys.testing.procs import start_dsys, start_redis

BIG = 10**9  # a limit that never refuses during the benchmark


def _rate(n: int, fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


# -- 1. in-process ---------------------------------------------------------------------


def bench_inprocess(rounds: int, n: int) -> list[tuple[str, float, str, float]]:
    from limits import RateLimitItemPerSecond, storage, strategies

    from dsys.ratelimit import Limiter, MemoryStore

    keys = [f"user:{i}" for i in range(10_000)]
    results: dict[str, list[float]] = {}
    item = RateLimitItemPerSecond(BIG, 1)
    peers = {
        "limits fixed window": strategies.FixedWindowRateLimiter,
        "limits moving window": strategies.MovingWindowRateLimiter,
        "limits sliding window counter": strategies.SlidingWindowCounterRateLimiter,
    }
    for _ in range(rounds):
        for nkeys in (1, 10_000):
            ks = keys[:nkeys]
            lim = Limiter(rate=BIG, per=1.0, burst=BIG, store=MemoryStore(max_keys=20_000))
            hit = lim.hit_sync

            def run_dsys(hit: Callable[[str], object] = hit, ks: list[str] = ks) -> None:
                m = len(ks)
                for i in range(n):
                    hit(ks[i % m])

            results.setdefault(f"dsys {nkeys}", []).append(_rate(n, run_dsys))
            for name, cls in peers.items():
                store = storage.MemoryStorage()
                peer = cls(store)
                # The moving window keeps one entry per hit: fewer ops keep it fair.
                m_ops = n // 5 if "moving" in name else n

                def run_peer(
                    peer: strategies.RateLimiter = peer, ks: list[str] = ks, m_ops: int = m_ops
                ) -> None:
                    m = len(ks)
                    for i in range(m_ops):
                        peer.hit(item, ks[i % m])

                results.setdefault(f"{name} {nkeys}", []).append(_rate(m_ops, run_peer))
                store.timer.cancel()
    rows = []
    for nkeys in (1, 10_000):
        ours = statistics.median(results[f"dsys {nkeys}"])
        best_name, best = max(
            ((name, statistics.median(results[f"{name} {nkeys}"])) for name in peers),
            key=lambda x: x[1],
        )
        label = "1 key" if nkeys == 1 else "10,000 keys"
        for name in peers:
            rows.append(
                (
                    f"in-process, {label}: dsys MemoryStore vs {name}",
                    ours,
                    name,
                    statistics.median(results[f"{name} {nkeys}"]),
                )
            )
        del best_name, best
    return rows


# -- helpers for servers -----------------------------------------------------------------


@contextmanager
def limiter_nodes(count: int) -> Iterator[list[str]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(start_dsys("ratelimit", "serve", "--listen", "127.0.0.1:0")).addr
            for _ in range(count)
        ]


@contextmanager
def redis_server() -> Iterator[str | None]:
    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    with start_redis(exe) as server:
        yield server.addr


# -- 2. cluster --------------------------------------------------------------------------


async def _cluster_round(nodes: list[str], lease: int, ops: int, tasks: int = 16) -> float:
    from dsys.ratelimit import ClusterStore, Limiter

    store = ClusterStore(nodes, lease_size=lease, lease_ttl=5.0, timeout=5.0)
    lim = Limiter(rate=BIG, per=1.0, burst=BIG, store=store)
    keys = [f"user:{i}" for i in range(1000)]
    per_task = ops // tasks

    async def worker(w: int) -> None:
        for i in range(per_task):
            await lim.hit(keys[(w * per_task + i) % len(keys)])

    # Warm connections to every node.
    await asyncio.gather(*(lim.hit(f"warm{i}") for i in range(32)))
    t = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(tasks)))
    rate = per_task * tasks / (time.perf_counter() - t)
    assert lim.store_errors == 0
    await lim.close()
    return rate


def bench_cluster(rounds: int, scale: float) -> list[tuple[str, float, str, float]]:
    plain: list[float] = []
    leased: list[float] = []
    with limiter_nodes(3) as nodes:
        for _ in range(rounds):
            plain.append(asyncio.run(_cluster_round(nodes, 0, int(3000 * scale))))
            leased.append(asyncio.run(_cluster_round(nodes, 100, int(100_000 * scale))))
    return [
        (
            "cluster (3 nodes, 16 tasks): ClusterStore with leases (100) vs without",
            statistics.median(leased),
            "dsys ClusterStore without leases",
            statistics.median(plain),
        )
    ]


# -- 3. redis ----------------------------------------------------------------------------


REDIS_STRATEGIES = ("fixed window", "moving window", "sliding window counter")


async def _redis_round(addr: str, ops: int, chunk: int = 250) -> dict[str, float]:
    """One round: dsys and each limits strategy take turns, ``chunk`` decisions at a time."""
    from limits import RateLimitItemPerSecond
    from limits.aio import storage, strategies

    from dsys.ratelimit import Limiter, RedisStore

    lim = Limiter(rate=BIG, per=1.0, burst=BIG, store=RedisStore(f"redis://{addr}/0"))
    peer_store = storage.RedisStorage(f"async+redis://{addr}", implementation="redispy")
    classes = {
        "fixed window": strategies.FixedWindowRateLimiter,
        "moving window": strategies.MovingWindowRateLimiter,
        "sliding window counter": strategies.SlidingWindowCounterRateLimiter,
    }
    peers = {name: cls(peer_store) for name, cls in classes.items()}
    item = RateLimitItemPerSecond(BIG, 1)

    async def run_dsys(start: int) -> None:
        for i in range(start, start + chunk):
            await lim.hit(f"user:{i % 1000}")

    def run_peer(name: str) -> Callable[[int], Awaitable[None]]:
        peer, tag = peers[name], name.replace(" ", "-")

        async def go(start: int) -> None:
            for i in range(start, start + chunk):
                await peer.hit(item, tag, f"user:{i % 1000}")

        return go

    runners: dict[str, Callable[[int], Awaitable[None]]] = {"dsys": run_dsys}
    runners.update({name: run_peer(name) for name in REDIS_STRATEGIES})
    spent = dict.fromkeys(runners, 0.0)
    for fn in runners.values():  # warm: connections, scripts
        await fn(0)
    done = 0
    for turn in range(max(1, ops // chunk)):
        order = list(runners) if turn % 2 == 0 else list(reversed(runners))
        for name in order:
            t = time.perf_counter()
            await runners[name](done)
            spent[name] += time.perf_counter() - t
        done += chunk
    assert lim.store_errors == 0
    await lim.close()
    return {name: done / spent[name] for name in runners}


def bench_redis(rounds: int, scale: float) -> list[tuple[str, float, str, float]]:
    results: dict[str, list[float]] = {}
    with redis_server() as addr:
        if addr is None:
            print("redis-server not found: skipping the Redis comparison", file=sys.stderr)
            return []
        for _ in range(rounds):
            for name, rate in asyncio.run(_redis_round(addr, int(2000 * scale))).items():
                results.setdefault(name, []).append(rate)
    ours = statistics.median(results["dsys"])
    return [
        (
            f"redis (1 client, sequential): dsys RedisStore vs limits.aio {s}",
            ours,
            f"limits {s} (redis)",
            statistics.median(results[s]),
        )
        for s in REDIS_STRATEGIES
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    args = parser.parse_args()
    rounds = 2 if args.quick else 5
    scale = 0.2 if args.quick else 1.0
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30)  # warnings and up
    )
    rows = bench_inprocess(rounds, 20_000 if args.quick else 200_000)
    rows += bench_cluster(max(2, rounds - 2), scale)
    rows += bench_redis(rounds, scale)
    print(
        f"\nrate-limit decisions/s, median of {rounds} alternating rounds; "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores\n"
    )
    print("| scenario | dsys decisions/s | peer | peer decisions/s | dsys / peer |")
    print("| --- | ---: | --- | ---: | ---: |")
    for scenario, ours, peer, theirs in rows:
        print(f"| {scenario} | {ours:,.0f} | {peer} | {theirs:,.0f} | {ours / theirs:.1f}x |")


if __name__ == "__main__":
    main()
