"""Paired comparison of one-connection put latency: trees and etcd up at once, alternating.

On a shared, loaded machine two runs minutes apart differ by 2x, which drowns what a
change to the write path does. This script starts every system first (3 replicas each,
``--fsync always``; etcd with its defaults, through its v3 JSON gateway), then sends
rounds of ``--batch`` sequential puts over one keep-alive connection to each leader in
turn (the order rotates per round), so all systems see the same load within seconds.
Per system it prints latency percentiles over all puts, how many rounds' medians beat
the first system's, and per put and per process (leader, then the two followers): CPU
time, context switches and run-queue wait (``/proc/<pid>/task/*/schedstat``, summed
over threads: the time the process was runnable but waiting for a core).

    .venv/bin/python benchmarks/pair_put.py --tree before=/tmp/raft-before --tree after=.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_write_path import ETCD, EtcdCluster, start_systems
from trace_put import add_env_arg, cpu_seconds, env_by_label, pct, sequential_puts

VALUE = b"v" * 16


def task_stats(pid: int) -> tuple[int, int]:
    """(context switches, run-queue wait in ns) of process ``pid``, summed over threads."""
    switches = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if "ctxt_switches" in line:
                switches += int(line.split()[1])
        wait += int((task / "schedstat").read_text().split()[1])
    return switches, wait


def etcd_puts(addr: str, n: int, first: int) -> list[tuple[int, int]]:
    """``n`` sequential etcd v3 JSON puts over one connection: (sent, answered) ns."""
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out: list[tuple[int, int]] = []
    buf = b""
    value = base64.b64encode(VALUE).decode()
    for k in range(first, first + n):
        key = base64.b64encode(f"t{k % 1000}".encode()).decode()
        body = json.dumps({"key": key, "value": value}).encode()
        head = (
            f"POST /v3/kv/put HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        t0 = time.perf_counter_ns()
        sock.sendall(head.encode() + body)
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                lower = buf[:end].lower()
                i = lower.find(b"content-length:")
                if i < 0:
                    raise RuntimeError(f"no content-length in {buf[:200]!r}")
                total = end + 4 + int(lower[i + 15 :].split(b"\r\n", 1)[0])
                if len(buf) >= total:
                    status, buf = buf[9:12], buf[total:]
                    break
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("etcd closed the connection")
            buf += chunk
        out.append((t0, time.perf_counter_ns()))
        if status != b"200":
            raise RuntimeError(f"etcd answered {status!r}")
    sock.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100, help="sequential puts per turn")
    parser.add_argument("--no-etcd", action="store_true")
    add_env_arg(parser)
    args = parser.parse_args()
    extra = env_by_label(args.env)
    trees = [t.split("=", 1) for t in args.tree] or [["this tree", str(Path.cwd())]]
    with tempfile.TemporaryDirectory(prefix="pair-put-") as tmp:
        base = Path(tmp)
        clusters = start_systems(base, trees, extra, bool(ETCD) and not args.no_etcd)
        addr: dict[str, str] = {}
        pids: dict[str, list[int]] = {}
        try:
            for label, c in clusters.items():
                if isinstance(c, EtcdCluster):
                    addr[label] = c.leader()
                    etcd_puts(addr[label], 200, 0)  # warm-up
                    by_addr = {c.client[i]: p.pid for i, p in zip(c.ids, c.procs, strict=True)}
                else:
                    lead = c.leader()
                    addr[label] = c.addrs[lead]
                    sequential_puts(addr[label], 200)
                    by_addr = {c.addrs[i]: c.procs[i].pid for i in c.ids}
                pids[label] = [by_addr[addr[label]]] + [
                    p for a, p in by_addr.items() if a != addr[label]
                ]
            lat: dict[str, list[float]] = {k: [] for k in clusters}
            medians: dict[str, list[float]] = {k: [] for k in clusters}
            cost = {k: [[0.0, 0, 0] for _ in range(3)] for k in clusters}
            names = list(clusters)
            for r in range(args.rounds):
                for label in names[r % len(names) :] + names[: r % len(names)]:
                    before = [(cpu_seconds(p), *task_stats(p)) for p in pids[label]]
                    if isinstance(clusters[label], EtcdCluster):
                        puts = etcd_puts(addr[label], args.batch, r * args.batch)
                    else:
                        puts = sequential_puts(addr[label], args.batch)
                    for j, p in enumerate(pids[label]):
                        sw, wait = task_stats(p)
                        cost[label][j][0] += cpu_seconds(p) - before[j][0]
                        cost[label][j][1] += sw - before[j][1]
                        cost[label][j][2] += wait - before[j][2]
                    ms = [(b - a) / 1e6 for a, b in puts]
                    lat[label] += ms
                    medians[label].append(statistics.median(ms))
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        finally:
            for c in clusters.values():
                c.stop()
    n = args.rounds * args.batch
    load = os.getloadavg()
    print(
        f"pair_put: {args.rounds} rounds x {args.batch} sequential puts per system, one "
        f"keep-alive connection, 16-byte values, fsync every commit; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end\n"
    )
    print(
        f"| system | p50 ms | p90 ms | p99 ms | puts/s | rounds faster than {names[0]} "
        "| CPU ms/put L, F, F | switches/put | run-queue wait ms/put |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|---|")
    for k in names:
        xs = lat[k]
        wins = sum(1 for a, b in zip(medians[k], medians[names[0]], strict=True) if a < b)
        cpu = ", ".join(f"{c[0] / n * 1e3:.2f}" for c in cost[k])
        sw = ", ".join(f"{c[1] / n:.1f}" for c in cost[k])
        wait = ", ".join(f"{c[2] / n / 1e6:.2f}" for c in cost[k])
        print(
            f"| {k} | {pct(xs, 0.5):.2f} | {pct(xs, 0.9):.2f} | {pct(xs, 0.99):.2f} | "
            f"{1000 / statistics.mean(xs):,.0f} | {wins}/{args.rounds} | {cpu} | {sw} | {wait} |"
        )


if __name__ == "__main__":
    main()
