"""Benchmark: dsys KV (3 real processes) against PySyncObj's replicated dict (3 processes).

Measures write throughput (ops/s) and latency (p50/p99) with 1 and 64 requests in
flight, for dsys with ``--fsync always`` (group commit) and ``--fsync none`` through both
the HTTP API and the multiplexed ``KVClient``, and for PySyncObj (ReplDict; client as a
read-only node; batched and unbatched append-entries), all in the same run with
alternating rounds; then the leader failover time after ``kill -9`` for both.

    .venv/bin/python benchmarks/bench_kv.py            # full run (~2-3 minutes)
    .venv/bin/python benchmarks/bench_kv.py --quick    # short run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from dsys.kv.client import KVClient

VALUE = b"v" * 16


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- dsys cluster ----------------------------------------------------------------------


class DsysCluster:
    def __init__(self, fsync: str, base: Path) -> None:
        self.fsync = fsync
        ports = free_ports(3)
        self.ids = ["n1", "n2", "n3"]
        self.addrs = {i: f"127.0.0.1:{p}" for i, p in zip(self.ids, ports, strict=True)}
        self.base = base
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start_node(self, i: str) -> None:
        cmd = [sys.executable, "-m", "dsys", "--log-level", "warning", "kv", "serve"]
        cmd += ["--id", i, "--listen", self.addrs[i], "--fsync", self.fsync]
        cmd += ["--data-dir", str(self.base / f"{self.fsync}-{i}")]
        cmd += [f"--peer={j}={a}" for j, a in self.addrs.items() if j != i]
        self.procs[i] = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def start(self) -> None:
        for i in self.ids:
            self.start_node(i)

    def kill9(self, i: str) -> None:
        p = self.procs[i]
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def stop(self) -> None:
        for i in self.ids:
            self.kill9(i)

    async def leader(self, timeout: float = 20.0) -> str:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while time.monotonic() < deadline:
                for i, addr in self.addrs.items():
                    if self.procs[i].poll() is not None:
                        continue
                    try:
                        async with http.get(f"http://{addr}/v1/status") as r:
                            st = await r.json()
                        if st["role"] == "leader" and st["applied_index"] >= 1:
                            return i
                    except (aiohttp.ClientError, OSError, TimeoutError):
                        pass
                await asyncio.sleep(0.05)
        raise RuntimeError("no dsys leader")


async def run_load(
    op: Callable[[int], Awaitable[None]], inflight: int, seconds: float
) -> tuple[float, list[float]]:
    """Run ``op`` from ``inflight`` workers for ``seconds``; returns (ops/s, latencies)."""
    lat: list[float] = []
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            n = next(counter)
            t0 = time.perf_counter()
            await op(n)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return len(lat) / (time.perf_counter() - t0), lat


async def bench_dsys(
    fsync: str, base: Path, seconds: float
) -> dict[str, tuple[float, list[float]]]:
    cluster = DsysCluster(fsync, base)
    cluster.start()
    out: dict[str, tuple[float, list[float]]] = {}
    try:
        leader = await cluster.leader()
        url = f"http://{cluster.addrs[leader]}/v1/kv/"
        conn = aiohttp.TCPConnector(limit=128)
        async with aiohttp.ClientSession(connector=conn) as http:

            async def http_put(n: int) -> None:
                async with http.put(f"{url}h{n % 1000}", data=VALUE) as r:
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
                    await r.read()

            for c in (1, 64):
                await run_load(http_put, c, 0.3)  # warm-up
                out[f"http/{c}"] = await run_load(http_put, c, seconds)
        async with KVClient(list(cluster.addrs.values())) as kv:

            async def client_put(n: int) -> None:
                await kv.put(f"c{n % 1000}", VALUE)

            for c in (1, 64):
                await run_load(client_put, c, 0.3)
                out[f"client/{c}"] = await run_load(client_put, c, seconds)
    finally:
        cluster.stop()
    return out


async def failover_dsys(base: Path) -> float:
    cluster = DsysCluster("always", base)
    cluster.start()
    try:
        leader = await cluster.leader()
        async with KVClient(list(cluster.addrs.values()), timeout=30.0) as kv:
            await kv.put("warm", VALUE)
            cluster.kill9(leader)
            t0 = time.perf_counter()
            await kv.put("after", VALUE)
            return time.perf_counter() - t0
    finally:
        cluster.stop()


# -- PySyncObj ---------------------------------------------------------------------------


def pso_node_main(self_addr: str, partners: list[str], batch: bool) -> None:
    """Entry of one PySyncObj server process."""
    from pysyncobj import SyncObj, SyncObjConf
    from pysyncobj.batteries import ReplDict

    d = ReplDict()
    conf = SyncObjConf(appendEntriesUseBatch=batch, dynamicMembershipChange=False)
    SyncObj(self_addr, partners, consumers=[d], conf=conf)
    while True:
        time.sleep(3600)


class PsoCluster:
    def __init__(self, batch: bool) -> None:
        self.batch = batch
        ports = free_ports(3)
        self.addrs = [f"127.0.0.1:{p}" for p in ports]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for a in self.addrs:
            others = [b for b in self.addrs if b != a]
            cmd = [sys.executable, __file__, "--pso-node", a, *others]
            if self.batch:
                cmd.append("--pso-batch")
            self.procs[a] = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )

    def kill9(self, a: str) -> None:
        p = self.procs[a]
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def stop(self) -> None:
        for a in self.addrs:
            self.kill9(a)


class PsoClient:
    """A read-only PySyncObj node used as the client (as in the issue's measurement)."""

    def __init__(self, cluster: PsoCluster) -> None:
        from pysyncobj import SyncObj, SyncObjConf
        from pysyncobj.batteries import ReplDict

        self.d = ReplDict()
        conf = SyncObjConf(appendEntriesUseBatch=cluster.batch, dynamicMembershipChange=False)
        self.obj = SyncObj(None, cluster.addrs, consumers=[self.d], conf=conf)

    def leader(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.obj.getStatus()
            if st.get("leader") is not None and self.obj.isReady():
                return str(st["leader"])
            time.sleep(0.05)
        raise RuntimeError("no PySyncObj leader")

    def load(self, inflight: int, seconds: float) -> tuple[float, list[float]]:
        lat: list[float] = []
        sem = threading.Semaphore(inflight)
        lock = threading.Lock()
        errors = [0]
        stop_at = time.perf_counter() + seconds
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() < stop_at:
            if not sem.acquire(timeout=1.0):
                continue
            started = time.perf_counter()

            def cb(res: Any, err: Any, started: float = started) -> None:
                with lock:
                    if err is None or err == 0:
                        lat.append(time.perf_counter() - started)
                    else:
                        errors[0] += 1
                sem.release()

            self.d.set(f"p{n % 1000}", VALUE.decode(), callback=cb)
            n += 1
        for _ in range(inflight):  # drain
            sem.acquire(timeout=5.0)
        return len(lat) / (time.perf_counter() - t0), lat

    def destroy(self) -> None:
        self.obj.destroy()


def bench_pso(batch: bool, seconds: float) -> dict[str, tuple[float, list[float]]]:
    cluster = PsoCluster(batch)
    cluster.start()
    client = None
    out: dict[str, tuple[float, list[float]]] = {}
    try:
        client = PsoClient(cluster)
        client.leader()
        for c in (1, 64):
            client.load(c, 0.3)
            out[f"client/{c}"] = client.load(c, seconds)
    finally:
        if client is not None:
            client.destroy()
        cluster.stop()
    return out


def failover_pso() -> float:
    cluster = PsoCluster(True)
    cluster.start()
    client = None
    try:
        client = PsoClient(cluster)
        leader = client.leader()
        client.d.set("warm", "x", sync=True, timeout=10)
        cluster.kill9(leader.replace("TCPNode('", "").replace("')", ""))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 30:
            try:
                client.d.set("after", "x", sync=True, timeout=0.5)
                return time.perf_counter() - t0
            except Exception:
                continue
        return float("nan")
    finally:
        if client is not None:
            client.destroy()
        cluster.stop()


# -- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument("--pso-node", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--pso-batch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pso_node:
        pso_node_main(args.pso_node[0], args.pso_node[1:], args.pso_batch)
        return
    seconds = 1.0 if args.quick else 2.5
    rounds = 1 if args.quick else 2
    results: dict[str, list[tuple[float, list[float]]]] = {}

    def add(system: str, res: dict[str, tuple[float, list[float]]]) -> None:
        for k, v in res.items():
            results.setdefault(f"{system} {k}", []).append(v)

    with tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp:
        base = Path(tmp)
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", file=sys.stderr)
            add("dsys fsync=always", asyncio.run(bench_dsys("always", base / f"r{r}", seconds)))
            add("PySyncObj batched", bench_pso(True, seconds))
            add("dsys fsync=none", asyncio.run(bench_dsys("none", base / f"r{r}", seconds)))
            add("PySyncObj unbatched", bench_pso(False, seconds))
        fo_dsys = [asyncio.run(failover_dsys(base / f"fo{i}")) for i in range(rounds)]
        fo_pso = [failover_pso() for _ in range(rounds)]

    def ops(name: str) -> float:
        return statistics.median(v[0] for v in results[name])

    best_pso = {
        c: max(ops(f"PySyncObj batched client/{c}"), ops(f"PySyncObj unbatched client/{c}"))
        for c in (1, 64)
    }
    print(
        f"\nbench_kv: 3 processes on loopback, 16-byte values, {platform.python_version()}, "
        f"{os.cpu_count()} cores, {rounds} round(s) of {seconds}s\n"
    )
    print("| system | API | in flight | ops/s | p50 ms | p99 ms | ops/s vs best PySyncObj |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in results:
        system, rest = name.rsplit(" ", 1)
        api, c = rest.split("/")
        lat = [x for _, ls in results[name] for x in ls]
        o = ops(name)
        api_name = {
            "http": "HTTP",
            "client": "KVClient" if system.startswith("dsys") else "ReplDict",
        }[api]
        print(
            f"| {system} | {api_name} | {c} | {o:,.0f} | {pct(lat, 0.5) * 1000:.2f} | "
            f"{pct(lat, 0.99) * 1000:.2f} | {o / best_pso[int(c)]:.2f}x |"
        )
    print(
        f"\nfailover after kill -9 of the leader (time to the next acknowledged write): "
        f"dsys {statistics.median(fo_dsys):.2f} s, PySyncObj {statistics.median(fo_pso):.2f} s"
    )


if __name__ == "__main__":
    main()
