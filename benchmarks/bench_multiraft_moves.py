"""Benchmark: how long a multi-Raft replica move takes, and what it costs the writes.

Four ``dsys kv multi-serve`` processes on loopback, range 1 on n1, n2, n3
(``--initial-replicas``). For each size N, a fresh cluster: range 1 is filled with N keys
of 100 bytes (32 puts in flight), then one client writes sequentially (one put at a time,
as a latency probe) while the follower n3's replica moves to n4 (``ShardedKVClient.move``,
the same request ``dsys kv move`` sends). A side task polls the leader's ``/v1/status``
every 10 ms and notes when each step of the move (add_learner, catch_up, promote,
remove) was first seen, so the table shows where the time goes; the catch-up step is the
snapshot's transfer and install.

The probe's put latency is reported for the 2 s before the move and during the move
(p50 and p99, and the slowest put); a put that fails is counted, not timed.

    .venv/bin/python benchmarks/bench_multiraft_moves.py            # N = 1000, 10000, 30000
    .venv/bin/python benchmarks/bench_multiraft_moves.py --quick    # N = 1000, 5000
    .venv/bin/python benchmarks/bench_multiraft_moves.py --fsync none
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from dsys.errors import DsysError
from dsys.kv.sharded import ShardedKVClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_multiraft import ready_client, start_cluster

IDS = ["n1", "n2", "n3", "n4"]


async def _fill(kv: ShardedKVClient, n: int) -> float:
    started = time.perf_counter()
    value = b"v" * 100
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with sem:
            await kv.put(f"key{i:07d}", value)

    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - started


async def _probe(kv: ShardedKVClient, stop: asyncio.Event, out: list[tuple[float, float]]) -> int:
    failed = 0
    i = 0
    while not stop.is_set():
        i += 1
        t0 = time.perf_counter()
        try:
            await kv.put(f"probe{i % 100:03d}", b"p" * 100)
        except DsysError:
            failed += 1
            continue
        out.append((t0, time.perf_counter() - t0))
    return failed


async def _watch_steps(addrs: list[str], stop: asyncio.Event, seen: dict[str, float]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as s:
        while not stop.is_set():
            for addr in addrs:
                try:
                    async with s.get(f"http://{addr}/v1/status") as r:
                        data: dict[str, Any] = await r.json()
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                    continue
                for mv in data.get("moves", []):
                    seen.setdefault(str(mv.get("step")), time.perf_counter())
            await asyncio.sleep(0.01)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _one(n: int, fsync: str) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="bench-moves-"))
    # range 1 on n1, n2, n3 only; no leader balancing during the move
    procs, addrs = start_cluster(
        base, len(IDS), "shared", fsync, False, "--initial-replicas", "n1,n2,n3"
    )
    try:
        kv = await ready_client(addrs, "warm")
        fill_s = await _fill(kv, n)
        lat: list[tuple[float, float]] = []
        stop = asyncio.Event()
        probe = asyncio.create_task(_probe(kv, stop, lat))
        await asyncio.sleep(2.0)
        seen: dict[str, float] = {}
        wstop = asyncio.Event()
        watcher = asyncio.create_task(_watch_steps(addrs, wstop, seen))
        t0 = time.perf_counter()
        desc = await kv.move(1, "n3", "n4")
        t1 = time.perf_counter()
        wstop.set()
        stop.set()
        failed = await probe
        await watcher
        await kv.close()
        before = [d for t, d in lat if t < t0]
        during = [d for t, d in lat if t0 <= t < t1]
        data_dir = base / "n3" / "r1"
        for _ in range(500):  # the source drops its replica once it learns the removal
            if not data_dir.exists():
                break
            await asyncio.sleep(0.01)
        dropped_s = time.perf_counter() - t1
        return {
            "n": n,
            "fill_s": fill_s,
            "move_s": t1 - t0,
            "steps": {k: v - t0 for k, v in sorted(seen.items(), key=lambda kv: kv[1])},
            "before": (statistics.median(before), _pct(before, 0.99), len(before)),
            "during": (
                statistics.median(during) if during else float("nan"),
                _pct(during, 0.99),
                max(during, default=float("nan")),
                len(during),
            ),
            "failed": failed,
            "replicas": desc.replicas,
            "source_dir_gone": not data_dir.exists(),
            "dropped_s": dropped_s,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        shutil.rmtree(base, ignore_errors=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 1000, 5000")
    ap.add_argument("--fsync", choices=("always", "none"), default="always")
    args = ap.parse_args()
    sizes = [1000, 5000] if args.quick else [1000, 10000, 30000]
    print(f"# {platform.python_implementation()} {platform.python_version()}, fsync {args.fsync}")
    print(f"# load average {os.getloadavg()[0]:.2f} at start")
    print(
        "| keys | fill s | move s | steps seen at (s after the request) "
        "| put p50/p99 ms before | put p50/p99/max ms during | puts failed "
        "| source data gone after s |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for n in sizes:
        r = await _one(n, args.fsync)
        steps = ", ".join(f"{k} {v:.2f}" for k, v in r["steps"].items())
        b, d = r["before"], r["during"]
        print(
            f"| {n} | {r['fill_s']:.1f} | {r['move_s']:.2f} | {steps} "
            f"| {b[0] * 1e3:.1f} / {b[1] * 1e3:.1f} "
            f"| {d[0] * 1e3:.1f} / {d[1] * 1e3:.1f} / {d[2] * 1e3:.0f} ({d[3]} puts) "
            f"| {r['failed']} | {r['dropped_s']:.2f} |"
        )
        assert r["source_dir_gone"], "n3 kept r1 for 5 s after the move"
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    asyncio.run(main())
