"""Paired wrk comparison of write throughput: every system up at once, alternating rows.

``bench_write_path.py`` starts each system afresh per row, so on a shared machine its
rows minutes apart differ by more than the change under test. This script starts every
tree (3 replicas each, ``--fsync always``) and etcd first, then, per round and per
connection count, runs ``wrk -t1 -c C -d S`` against each leader in turn (the order
rotates per round). It prints median ops/s and p50 per system and connection count, and
in how many rounds each beat the first system.

    .venv/bin/python benchmarks/pair_wrk.py --tree start=/tmp/start --tree now=. --rounds 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench_kv import VALUE, WRK_SCRIPT, Run, run_wrk
from bench_write_path import ETCD, EtcdCluster, etcd_script, start_systems
from trace_put import add_env_arg, env_by_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--conns", default="1,64", help="comma-separated connection counts")
    parser.add_argument("--no-etcd", action="store_true")
    add_env_arg(parser)
    args = parser.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    extra = env_by_label(args.env)
    trees = [t.split("=", 1) for t in args.tree] or [["this tree", str(Path.cwd())]]
    with tempfile.TemporaryDirectory(prefix="pair-wrk-") as tmp:
        base = Path(tmp)
        ours = base / "put.lua"
        ours.write_text(WRK_SCRIPT.replace("@VALUE@", VALUE.decode()))
        theirs = base / "etcd.lua"
        theirs.write_text(etcd_script())
        clusters = start_systems(base, trees, extra, bool(ETCD) and not args.no_etcd)
        try:
            url = {}
            for label, c in clusters.items():
                addr = c.leader() if isinstance(c, EtcdCluster) else c.addrs[c.leader()]
                url[label] = f"http://{addr}"
            systems = list(clusters)
            results: dict[tuple[str, int], list[Run]] = {(s, c): [] for s in systems for c in conns}

            async def go() -> None:
                for s in systems:  # warm-up
                    await run_wrk(theirs if s == "etcd" else ours, url[s], 64, 1)
                for r in range(args.rounds):
                    print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
                    order = systems[r % len(systems) :] + systems[: r % len(systems)]
                    for c in conns:
                        for s in order:
                            script = theirs if s == "etcd" else ours
                            results[(s, c)].append(await run_wrk(script, url[s], c, args.seconds))

            asyncio.run(go())
        finally:
            for c in clusters.values():
                c.stop()
    load = os.getloadavg()
    print(
        f"\npair_wrk: {args.rounds} rounds, wrk -t1 -d{args.seconds}s per row, systems "
        f"alternating; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end\n"
    )
    first = systems[0]
    print(f"| system | connections | ops/s | p50 ms | rounds faster than {first} |")
    print("|---|---:|---:|---:|---:|")
    for c in conns:
        for s in systems:
            runs = results[(s, c)]
            ops = statistics.median(x.ops for x in runs)
            p50 = statistics.median(x.p50 for x in runs) * 1000
            wins = sum(x.ops > y.ops for x, y in zip(runs, results[(first, c)], strict=True))
            vs = "-" if s == first else f"{wins}/{len(runs)}"
            print(f"| {s} | {c} | {ops:,.0f} | {p50:.2f} | {vs} |")


if __name__ == "__main__":
    main()
