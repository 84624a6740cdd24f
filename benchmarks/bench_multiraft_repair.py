"""Benchmark: how long the placement loop takes to replace the replicas of a dead node.

Four ``dsys kv multi-serve`` processes on loopback (the first range on n1, n2, n3), with
``--placement-interval 0.5 --down-after D``. For each size N: a fresh cluster, range 1
split into R ranges, N keys of 100 bytes written (32 puts in flight); then one client
writes sequentially (a latency probe) while a node that drives or takes no move is
killed with SIGKILL. The table shows when the metadata leader declared it down, when
every range was back on three live replicas (the map, polled every 50 ms), how many
repairs ran, the probe's put latency before and during the repair, and that every key
written before the kill reads back.

    .venv/bin/python benchmarks/bench_multiraft_repair.py            # N = 1000, 10000
    .venv/bin/python benchmarks/bench_multiraft_repair.py --quick    # N = 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench_multiraft import start_cluster
from bench_multiraft_moves import _fill, _pct, _probe
from dsys.errors import DsysError
from dsys.kv.sharded import ShardedKVClient

IDS = ["n1", "n2", "n3", "n4"]


def _start(
    base: Path, down_after: float
) -> tuple[dict[str, subprocess.Popen[bytes]], dict[str, str]]:
    procs, addrs = start_cluster(
        base,
        len(IDS),
        "shared",
        "always",
        True,
        "--balance-interval",
        "2",
        "--initial-replicas",
        "n1,n2,n3",
        "--placement-interval",
        "0.5",
        "--down-after",
        str(down_after),
        "--move-timeout",
        "20",
        "--merge-keys",
        "0",
    )
    return dict(zip(IDS, procs, strict=True)), dict(zip(IDS, addrs, strict=True))


async def _status(http: aiohttp.ClientSession, addr: str) -> dict[str, Any] | None:
    try:
        async with http.get(f"http://{addr}/v1/status") as r:
            data = await r.json()
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def _one(n: int, ranges: int, down_after: float) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="bench-repair-"))
    procs, addrs = _start(base, down_after)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
    kv = ShardedKVClient(list(addrs.values()), timeout=30.0)
    try:
        for _ in range(300):
            try:
                await kv.refresh()
                await kv.put("warm", b"1")
                break
            except DsysError:
                await asyncio.sleep(0.1)
        for k in range(1, ranges):
            at = f"key{k * n // ranges:07d}"
            for _ in range(50):
                try:
                    await kv.split((await kv.locate(at)).range_id, at)
                    break
                except DsysError:
                    await asyncio.sleep(0.1)
        fill_s = await _fill(kv, n)
        # the victim: n1..n3 hold every range; one that drives, gives or takes no move
        victim = "n2"
        for _ in range(600):
            views = {i: await _status(http, a) for i, a in addrs.items()}
            busy = {i for i, v in views.items() if v and v["moves"]} | {
                x for v in views.values() if v for m in v["moves"] for x in (m["from"], m["to"])
            }
            free = [i for i in ("n1", "n2", "n3") if i not in busy]
            if free:
                victim = free[0]
                break
            await asyncio.sleep(0.05)
        lat: list[tuple[float, float]] = []
        stop = asyncio.Event()
        probe = asyncio.create_task(_probe(kv, stop, lat))
        await asyncio.sleep(2.0)
        os.killpg(procs[victim].pid, signal.SIGKILL)
        procs[victim].wait(10)
        t0 = time.perf_counter()
        down_s = repaired_s = float("nan")
        repairs = 0
        live = [a for i, a in addrs.items() if i != victim]
        while time.perf_counter() - t0 < 120:
            if down_s != down_s:  # nan: not yet
                for a in live:
                    v = await _status(http, a)
                    p = v.get("placement", {}) if v else {}
                    if p.get("metadata_leader") and victim in p.get("down", []):
                        down_s = time.perf_counter() - t0
            try:
                m = list(await kv.refresh())
            except DsysError:
                m = []
            if m and all(victim not in r.replicas and len(r.replicas) == 3 for r in m):
                repaired_s = time.perf_counter() - t0
                break
            await asyncio.sleep(0.05)
        t1 = time.perf_counter()
        stop.set()
        failed = await probe
        for a in live:
            v = await _status(http, a)
            if v and v["placement"]["metadata_leader"]:
                repairs = v["placement"]["repairs"]
        lost = 0
        for i in range(0, n, max(1, n // 500)):  # a sample of the keys written before
            got = await kv.get(f"key{i:07d}")
            lost += got is None
        before = [d for t, d in lat if t < t0]
        during = [d for t, d in lat if t0 <= t < t1]
        return {
            "n": n,
            "ranges": ranges,
            "fill_s": fill_s,
            "victim": victim,
            "down_s": down_s,
            "repaired_s": repaired_s,
            "repairs": repairs,
            "before": (statistics.median(before), _pct(before, 0.99)),
            "during": (
                statistics.median(during) if during else float("nan"),
                _pct(during, 0.99),
                max(during, default=float("nan")),
                len(during),
            ),
            "failed": failed,
            "lost": lost,
        }
    finally:
        await kv.close()
        await http.close()
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        shutil.rmtree(base, ignore_errors=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 1000 only")
    ap.add_argument("--ranges", type=int, default=8, help="ranges to split the keys into")
    ap.add_argument("--down-after", type=float, default=3.0, help="seconds (default 3)")
    args = ap.parse_args()
    sizes = [1000] if args.quick else [1000, 10000]
    print(f"# {platform.python_implementation()} {platform.python_version()}, fsync always")
    print(f"# load average {os.getloadavg()[0]:.2f} at start; --down-after {args.down_after}")
    print(
        "| keys | ranges | killed | down after s | all ranges on 3 live nodes after s "
        "| repairs | put p50/p99 ms before | put p50/p99/max ms during | puts failed "
        "| keys lost |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        r = await _one(n, args.ranges, args.down_after)
        b, d = r["before"], r["during"]
        print(
            f"| {n} | {r['ranges']} | {r['victim']} | {r['down_s']:.2f} | {r['repaired_s']:.2f} "
            f"| {r['repairs']} | {b[0] * 1e3:.1f} / {b[1] * 1e3:.1f} "
            f"| {d[0] * 1e3:.1f} / {d[1] * 1e3:.1f} / {d[2] * 1e3:.0f} ({d[3]} puts) "
            f"| {r['failed']} | {r['lost']} |"
        )
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    asyncio.run(main())
