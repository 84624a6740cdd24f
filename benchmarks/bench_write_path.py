"""Benchmark: single-group KV write path, before/after trees and etcd, in one run.

Three replicas each (real processes on loopback, fsync on every commit), 16-byte values,
driven over HTTP by wrk (``-t1``, 1 and 64 connections) exactly as ``bench_kv.py`` does:

* ``dsys <label>``: ``dsys kv serve --fsync always`` run from a checkout's ``src``
  (``--tree LABEL=DIR``, repeatable; default: this checkout as ``this tree``), PUT
  ``/v1/kv/h<n % 1000>``;
* ``etcd``: Debian's ``etcd`` (3.4, when ``etcd`` is on the PATH) through its v3 JSON
  gateway, POST ``/v3/kv/put`` with the same keys and values base64-encoded.

Systems alternate inside each round (the order rotates per round); the table gives the
median over rounds of ops/s and of wrk's p50/p99, plus the load average when the run
ended. Every row counts 2xx answers only.

    .venv/bin/python benchmarks/bench_write_path.py --tree before=/tmp/raft-before \\
        --tree after=. --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_kv import VALUE, WRK_SCRIPT, Run, free_ports, run_wrk
from trace_put import Cluster, add_env_arg, env_by_label

ETCD = shutil.which("etcd")
KEYS = 1000


def etcd_script() -> str:
    """WRK_SCRIPT with etcd's v3 JSON put instead of our PUT (same keys and values)."""
    bodies = ",\n".join(
        "'"
        + json.dumps(
            {
                "key": base64.b64encode(f"h{n}".encode()).decode(),
                "value": base64.b64encode(VALUE).decode(),
            }
        )
        + "'"
        for n in range(KEYS)
    )
    request = (
        "local bodies = {\n" + bodies + "\n}\n"
        "function request()\n"
        f"  local body = bodies[(n % {KEYS}) + 1]\n"
        "  n = n + 1\n"
        '  return wrk.format("POST", "/v3/kv/put", '
        '{["Content-Type"] = "application/json"}, body)\n'
        "end\n"
    )
    start = WRK_SCRIPT.index("function request()")
    end = WRK_SCRIPT.index("function response(")
    return WRK_SCRIPT[:start] + request + WRK_SCRIPT[end:]


class EtcdCluster:
    """Three ``etcd`` members on loopback (default settings: the WAL is fsynced)."""

    def __init__(self, base: Path) -> None:
        self.ids = ["e1", "e2", "e3"]
        ports = free_ports(6)
        self.client = {i: f"127.0.0.1:{ports[k]}" for k, i in enumerate(self.ids)}
        self.peer = {i: f"127.0.0.1:{ports[3 + k]}" for k, i in enumerate(self.ids)}
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        assert ETCD is not None
        initial = ",".join(f"{i}=http://{self.peer[i]}" for i in self.ids)
        for i in self.ids:
            cmd = [ETCD, "--name", i, "--data-dir", str(self.base / i)]
            cmd += ["--listen-client-urls", f"http://{self.client[i]}"]
            cmd += ["--advertise-client-urls", f"http://{self.client[i]}"]
            cmd += ["--listen-peer-urls", f"http://{self.peer[i]}"]
            cmd += ["--initial-advertise-peer-urls", f"http://{self.peer[i]}"]
            cmd += ["--initial-cluster", initial, "--initial-cluster-state", "new"]
            cmd += ["--initial-cluster-token", "bench", "--log-level", "error"]
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    def leader(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in self.ids:
                try:
                    req = urllib.request.Request(
                        f"http://{self.client[i]}/v3/maintenance/status", data=b"{}"
                    )
                    with urllib.request.urlopen(req, timeout=1) as r:
                        st = json.load(r)
                    if st.get("leader") and st["leader"] == st["header"]["member_id"]:
                        return self.client[i]
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("no etcd leader")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


async def measure(url: str, script: Path, seconds: float) -> dict[int, Run]:
    await run_wrk(script, url, 64, 1)  # warm-up
    return {c: await run_wrk(script, url, c, seconds) for c in (1, 64)}


def start_systems(
    base: Path, trees: list[list[str]], extra: dict[str, dict[str, str]], etcd: bool
) -> dict[str, Cluster | EtcdCluster]:
    """A 3-replica cluster of every ``[label, checkout]`` (with its ``--env`` variables)
    and, if ``etcd``, an etcd cluster as ``"etcd"``; all started, under ``base``. On an
    error the ones already started are stopped."""
    clusters: dict[str, Cluster | EtcdCluster] = {}
    try:
        for label, tree in trees:
            c = Cluster(base / label, tree=Path(tree).resolve(), trace_dir=None)
            c.env.update(extra.get(label, {}))
            c.start()
            clusters[label] = c
        if etcd:
            e = EtcdCluster(base / "etcd")
            e.start()
            clusters["etcd"] = e
    except BaseException:
        for c in clusters.values():
            c.stop()
        raise
    return clusters


def run_dsys(
    tree: Path, base: Path, script: Path, seconds: float, env: dict[str, str] | None = None
) -> dict[int, Run]:
    cluster = Cluster(base, tree=tree.resolve(), trace_dir=None)
    cluster.env.update(env or {})
    cluster.start()
    try:
        addr = cluster.addrs[cluster.leader()]
        return asyncio.run(measure(f"http://{addr}", script, seconds))
    finally:
        cluster.stop(signal.SIGKILL)


def run_etcd(base: Path, script: Path, seconds: float) -> dict[int, Run]:
    cluster = EtcdCluster(base)
    cluster.start()
    try:
        addr = cluster.leader()
        return asyncio.run(measure(f"http://{addr}", script, seconds))
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="a dsys checkout to run (repeatable; default: this one)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-etcd", action="store_true", help="leave etcd out")
    add_env_arg(parser)
    args = parser.parse_args()
    extra = env_by_label(args.env)
    if not shutil.which("wrk"):
        sys.exit("wrk is not on the PATH")
    trees = [tuple(t.split("=", 1)) for t in args.tree] or [
        ("this tree", str(Path(__file__).resolve().parent.parent))
    ]
    systems: list[str] = [f"dsys {label}" for label, _ in trees]
    if ETCD and not args.no_etcd:
        systems.append("etcd")
    results: dict[str, list[dict[int, Run]]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="bench-wp-") as tmp:
        base = Path(tmp)
        ours = base / "put.lua"
        ours.write_text(WRK_SCRIPT.replace("@VALUE@", VALUE.decode()))
        theirs = base / "etcd.lua"
        theirs.write_text(etcd_script())
        for r in range(args.rounds):
            order = systems[r % len(systems) :] + systems[: r % len(systems)]
            for s in order:
                print(f"round {r + 1}/{args.rounds}: {s}", file=sys.stderr)
                d = base / f"r{r}-{len(results[s])}-{s.replace(' ', '_')}"
                if s == "etcd":
                    results[s].append(run_etcd(d, theirs, args.seconds))
                else:
                    label = s.removeprefix("dsys ")
                    tree = dict(trees)[label]
                    results[s].append(run_dsys(Path(tree), d, ours, args.seconds, extra.get(label)))
    load = os.getloadavg()
    secs = max(1, math.ceil(args.seconds))
    print(
        f"\nbench_write_path: 3 replicas each on loopback, fsync every commit, 16-byte "
        f"values, wrk -t1 for {secs}s per row, {args.rounds} round(s), medians; "
        f"Python {platform.python_version()}, {os.cpu_count()} cores; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end\n"
    )
    if not ETCD and not args.no_etcd:
        print("(etcd is not on the PATH: no etcd rows)\n")
    base_ops = {c: statistics.median(x[c].ops for x in results[systems[0]]) for c in (1, 64)}
    print(f"| system | connections | ops/s | p50 ms | p99 ms | errors | vs {systems[0]} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in systems:
        for c in (1, 64):
            runs = [x[c] for x in results[s]]
            ops = statistics.median(r.ops for r in runs)
            p50 = statistics.median(r.p50 for r in runs) * 1000
            p99 = statistics.median(r.p99 for r in runs) * 1000
            errs = sum(r.errors for r in runs)
            print(
                f"| {s} | {c} | {ops:,.0f} | {p50:.2f} | {p99:.2f} | {errs} | "
                f"{ops / base_ops[c]:.2f}x |"
            )


if __name__ == "__main__":
    main()
