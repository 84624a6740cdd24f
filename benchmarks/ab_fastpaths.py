"""A/B: the KV and proxy fast paths of two source trees, in one run, alternating rounds.

For changes to the HTTP fast paths, comparing two separate benchmark runs on a shared
machine mostly measures the neighbours. This runs both trees side by side: tree A
(``--before``, e.g. an export of the previous commit) and tree B (this checkout), same
backends, same wrk, rounds interleaved A, B, A, B... and prints medians per tree.

Rows (the fast-path rows of ``bench_balance.py`` and ``bench_kv.py``):

* proxy: ``dsys lb serve`` (p2c-ewma) over three aiohttp backends, ``wrk -t1 -c50``;
* kv: a 3-node ``dsys kv serve --fsync none`` cluster per tree, wrk PUTs on the leader
  with 1 and 64 connections (the ``HTTP (wrk)`` rows).

Run::

    git archive <old-commit> src | tar -x -C /tmp/before
    .venv/bin/python benchmarks/ab_fastpaths.py --before /tmp/before/src [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_balance import BACKEND, start, wrk
from bench_kv import VALUE, WRK_SCRIPT, DsysCluster, Run, run_wrk


@contextmanager
def python_path(path: str | None) -> Iterator[None]:
    """Child processes started inside import dsys from ``path`` (None: this checkout)."""
    old = os.environ.get("PYTHONPATH")
    if path is not None:
        os.environ["PYTHONPATH"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def med(values: list[float]) -> float:
    return statistics.median(values)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, run: Callable[[], dict[str, float]], seconds: float) -> dict[str, float]:
    """``run()`` plus the CPU the server ``pid`` spent per request meanwhile (us)."""
    before = cpu_seconds(pid)
    res = run()
    spent = cpu_seconds(pid) - before
    res["cpu_us"] = spent / max(1.0, res["rps"] * seconds) * 1e6
    return res


def interleave(
    rounds: int, trees: dict[str, Callable[[], dict[str, float]]]
) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(rounds):
        for name, run in trees.items():
            out[name].append(run())
    return out


def bench_proxy(before: str, rounds: int, duration: float) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    py = sys.executable
    try:
        backends = []
        for i in range(3):
            p, port = start([py, str(BACKEND), "--name", f"b{i}"])
            procs.append(p)
            backends.append(port)
        ports = {}
        pids = {}
        for name, path in (("A (before)", before), ("B (after)", None)):
            cmd = [py, "-m", "dsys", "lb", "serve", "--listen", "127.0.0.1:0", "--seed", "1"]
            for port in backends:
                cmd += ["--backend", f"http://127.0.0.1:{port}"]
            with python_path(path):
                p, ports[name] = start(cmd, env=dict(os.environ, DSYS_LOG_LEVEL="warning"))
            procs.append(p)
            pids[name] = p.pid
            wrk(ports[name], 1.0)  # warm-up
        res = interleave(
            rounds,
            {
                n: (lambda n=n, p=p: measured(pids[n], lambda: wrk(p, duration), duration))
                for n, p in ports.items()
            },
        )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=15)
    print(f"\nproxy: wrk -t1 -c50 -d{duration:g}s, {rounds} interleaved rounds, medians")
    print("| tree | req/s | p50 ms | p90 ms | p99 ms | errors | proxy CPU per request |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in res.items():
        m = {k: med([r[k] for r in runs]) for k in ("rps", "p50", "p90", "p99", "cpu_us")}
        print(
            f"| {name} | {m['rps']:,.0f} | {m['p50']:.2f} | {m['p90']:.2f} | {m['p99']:.2f} "
            f"| {sum(r['errors'] for r in runs):.0f} | {m['cpu_us']:.1f} us |"
        )
        print(f"<!-- {name} per round: {[round(r['rps']) for r in runs]} -->")


async def bench_kv(before: str, rounds: int, seconds: float, base: Path) -> None:
    script = base / "put.lua"
    script.write_text(WRK_SCRIPT.replace("@VALUE@", VALUE.decode()))
    clusters: dict[str, DsysCluster] = {}
    try:
        for name, path in (("A (before)", before), ("B (after)", None)):
            c = DsysCluster("none", base / name[0])
            with python_path(path):
                c.start()
            clusters[name] = c
        leaders = {n: await c.leader() for n, c in clusters.items()}
        urls = {n: f"http://{c.addrs[leaders[n]]}" for n, c in clusters.items()}
        pids = {n: c.procs[leaders[n]].pid for n, c in clusters.items()}
        for url in urls.values():
            await run_wrk(script, url, 64, 1)  # warm-up
        res: dict[tuple[str, int], list[Run]] = {}
        cpu: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for conns in (64, 1):
                for name, url in urls.items():
                    spent = cpu_seconds(pids[name])
                    run = await run_wrk(script, url, conns, seconds)
                    spent = cpu_seconds(pids[name]) - spent
                    res.setdefault((name, conns), []).append(run)
                    n = max(1.0, run.ops * math.ceil(seconds))
                    cpu.setdefault((name, conns), []).append(spent / n * 1e6)
    finally:
        for c in clusters.values():
            c.stop()
    print(f"\nkv: fsync=none, wrk PUTs of 16 bytes for {seconds:g}s, {rounds} rounds, medians")
    print("| tree | in flight | ops/s | p50 ms | p99 ms | errors | leader CPU per put |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, conns), runs in sorted(res.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        print(
            f"| {name} | {conns} | {med([r.ops for r in runs]):,.0f} "
            f"| {med([r.p50 for r in runs]) * 1000:.2f} | {med([r.p99 for r in runs]) * 1000:.2f} "
            f"| {sum(r.errors for r in runs)} | {med(cpu[name, conns]):.1f} us |"
        )
        print(f"<!-- {name} {conns} per round: {[round(r.ops) for r in runs]} -->")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="src/ directory of the older tree")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk round")
    parser.add_argument("--only", choices=["proxy", "kv"], default=None)
    args = parser.parse_args()
    before = str(Path(args.before).resolve())
    if args.only in (None, "proxy"):
        bench_proxy(before, args.rounds, args.duration)
    if args.only in (None, "kv"):
        with tempfile.TemporaryDirectory(prefix="ab-kv-") as tmp:
            asyncio.run(bench_kv(before, args.rounds, args.duration, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
