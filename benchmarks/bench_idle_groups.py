"""Benchmark: what idle ranges cost with and without quiet ticks, and how long a merge takes.

Three in-process multi-Raft nodes (one Python process, real loopback sockets, no
fsync) with R data ranges (R - 1 splits of range 1) and nothing to do. For each mode
(quiet ticks off, then on with 10 ticks = 0.3 s) the run waits until every group has a
leader (and, with quiet ticks, until every group is quiet), then measures over T
seconds of idleness: peer messages and frames sent by the three nodes, and the CPU
seconds of the process (all three nodes; ``time.process_time``). Then it merges the
ranges back into one, right neighbour into left, and reports the wall time per merge
(prepare in the source's log, commit in the target's, the source's group stopped).

    .venv/bin/python benchmarks/bench_idle_groups.py                  # R=32, T=5 s
    .venv/bin/python benchmarks/bench_idle_groups.py --ranges 8 --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from dsys.kv.multi import MultiConfig, MultiRaftServer
from dsys.kv.sharded import ShardedKVClient
from dsys.observability.logging import configure_logging


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def _wait(cond: object, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise SystemExit("the cluster did not settle in time")


async def run(ranges: int, seconds: float, quiet: int | None, tmp: Path) -> dict[str, float]:
    ids = ["n1", "n2", "n3"]
    addrs = dict(zip(ids, (f"127.0.0.1:{p}" for p in _ports(3)), strict=True))
    servers = [
        MultiRaftServer(
            MultiConfig(
                id=i,
                port=int(addrs[i].split(":")[1]),
                peers={j: a for j, a in addrs.items() if j != i},
                data_dir=str(tmp / i),
                fsync=False,
                balance_interval=1.0,
                merge_keys=None,
                split_qps=None,
                merge_after_split=0.0,
                quiet_ticks=quiet,
            )
        )
        for i in ids
    ]
    out: dict[str, float] = {}
    try:
        for s in servers:
            await s.start()
        async with ShardedKVClient(list(addrs.values()), timeout=30.0) as kv:
            await _wait(lambda: any(s.groups[1].node.is_leader for s in servers), 20)
            for i in range(1, ranges):
                key = f"k{i:03d}"
                await kv.split((await kv.locate(key)).range_id, key)

            def settled() -> bool:
                rids = [g.range_id for g in servers[0].data_groups()]
                if len(rids) != ranges:
                    return False
                lead = [r for r in [0, *rids] for s in servers if s.groups[r].node.is_leader]
                if len(lead) != ranges + 1:
                    return False
                return quiet is None or all(
                    g.node.quiet for s in servers for g in s.groups.values()
                )

            await _wait(settled, 60)
            await asyncio.sleep(1.0)
            msgs0 = sum(s.transport.messages_sent for s in servers)
            frames0 = sum(s.transport.frames_sent for s in servers)
            cpu0 = time.process_time()
            await asyncio.sleep(seconds)
            out["msgs_per_s"] = (sum(s.transport.messages_sent for s in servers) - msgs0) / seconds
            out["frames_per_s"] = (
                sum(s.transport.frames_sent for s in servers) - frames0
            ) / seconds
            out["cpu_pct"] = 100 * (time.process_time() - cpu0) / seconds
            if quiet is None:
                times = []
                while len(servers[0].data_groups()) > 1:
                    descs = servers[0].local_descriptors()
                    left, right = descs[-2], descs[-1]
                    t0 = time.perf_counter()
                    await kv.merge(left.range_id, right.range_id)
                    times.append(time.perf_counter() - t0)
                out["merge_ms_p50"] = 1000 * statistics.median(times)
                out["merge_ms_max"] = 1000 * max(times)
                out["merges"] = len(times)
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                await s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranges", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    configure_logging(level="warning")
    print(
        f"{args.ranges} data ranges + the metadata range, 3 in-process nodes, "
        f"idle {args.seconds:g} s"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for label, quiet in (("quiet ticks off", None), ("quiet ticks on (10)", 10)):
        with tempfile.TemporaryDirectory() as d:
            r = asyncio.run(run(args.ranges, args.seconds, quiet, Path(d)))
        print(
            f"{label:<20} messages/s {r['msgs_per_s']:8.0f}   frames/s {r['frames_per_s']:6.0f}"
            f"   CPU {r['cpu_pct']:5.1f} %"
        )
        if "merges" in r:
            print(
                f"{'':<20} {int(r['merges'])} merges: p50 {r['merge_ms_p50']:.1f} ms, "
                f"max {r['merge_ms_max']:.1f} ms"
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
