"""Benchmark: the multi-Raft watch (``ShardedKVClient.watch``) over 1 and 4 ranges.

Three ``dsys kv multi-serve`` processes on loopback (``--fsync none``: the watch path is
measured, not the disk; automatic splits and merges off). For each range count R, a
fresh cluster: the prefix ``b/`` is split into R ranges, N keys of 100 bytes are written
(32 puts in flight), then

* **catch-up**: a watch from revision 1 delivers the N events: events/s;
* **live**: one client puts M keys one at a time while a watch of ``b/`` runs; the time
  from sending a put to its event reaching the watcher (p50, p99; it includes the
  put's commit).

Events are checked: each key's events once, in revision order.

    .venv/bin/python benchmarks/bench_multiwatch.py               # N = 20000, M = 1000
    .venv/bin/python benchmarks/bench_multiwatch.py --quick       # N = 3000, M = 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

from bench_multiraft import ready_client, start_cluster

IDS = ["n1", "n2", "n3"]


async def _run(ranges: int, n: int, m: int) -> dict[str, float]:
    base = Path(tempfile.mkdtemp(prefix="bench-multiwatch-"))
    procs, addrs = start_cluster(
        base, len(IDS), "shared", "none", False, "--split-qps", "0", "--merge-keys", "0"
    )
    try:
        async with await ready_client(addrs, "ready") as kv:
            rid = 1
            for j in range(1, ranges):  # b/ cut into `ranges` ranges
                _, right = await kv.split(rid, f"b/{j * n // ranges:07d}")
                rid = right.range_id
            value = b"v" * 100
            sem = asyncio.Semaphore(32)

            async def one(i: int) -> None:
                async with sem:
                    await kv.put(f"b/{i:07d}", value)

            await asyncio.gather(*(one(i) for i in range(n)))
            # catch-up from revision 1
            t0 = time.perf_counter()
            seen: dict[str, int] = {}
            async with kv.watch("b/", start_revision=1, max_buffered=10_000) as w:
                async for ev in w:
                    assert ev.key not in seen, f"duplicate {ev.key}"
                    seen[ev.key] = ev.revision
                    if len(seen) == n:
                        break
            catch_up = time.perf_counter() - t0
            # live lag
            acked: dict[str, float] = {}
            lags: list[float] = []
            got = asyncio.Event()
            async with kv.watch("b/", max_buffered=10_000) as w:

                async def consume() -> None:
                    async for ev in w:
                        t = acked.get(ev.key)
                        now = time.perf_counter()
                        if t is not None:
                            lags.append(now - t)
                        if len(lags) >= m:
                            got.set()
                            return

                task = asyncio.create_task(consume())
                for i in range(m):
                    key = f"b/{(i * 7919) % n:07d}"
                    acked[key] = time.perf_counter()  # the event may come before the ack
                    await kv.put(key, b"w" * 100)
                await asyncio.wait_for(got.wait(), 60)
                task.cancel()
            lags.sort()
            return {
                "events_per_s": n / catch_up,
                "catch_up_s": catch_up,
                "lag_p50_ms": 1000 * statistics.median(lags),
                "lag_p99_ms": 1000 * lags[int(0.99 * (len(lags) - 1))],
            }
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        shutil.rmtree(base, ignore_errors=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 3000, M = 300")
    args = ap.parse_args()
    n, m = (3000, 300) if args.quick else (20000, 1000)
    print(f"# {platform.python_version()} on {os.cpu_count()} cores, load {os.getloadavg()}")
    print(f"N = {n} keys caught up, M = {m} live puts (one at a time)")
    print("ranges  catch-up events/s  catch-up s  live lag p50 ms  p99 ms")
    for ranges in (1, 4):
        r = await _run(ranges, n, m)
        print(
            f"{ranges:6d}  {r['events_per_s']:17.0f}  {r['catch_up_s']:10.2f}  "
            f"{r['lag_p50_ms']:15.2f}  {r['lag_p99_ms']:6.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
