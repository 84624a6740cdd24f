"""Benchmark: dsys KV (3 real processes) against PySyncObj's replicated dict (3 processes).

Measures write throughput (ops/s) and latency (p50/p99) with 1 and 64 requests in
flight, for dsys with ``--fsync always`` (group commit) and ``--fsync none`` through both
the HTTP API and the multiplexed ``KVClient``, and for PySyncObj (ReplDict; client as a
read-only node; batched and unbatched append-entries), all in the same run with
alternating rounds; then the leader failover time after ``kill -9`` for both.

Which load generator drives which row, and why:

* ``HTTP (wrk)``: `wrk <https://github.com/wg/wrk>`_ (``-t1 -c1`` and ``-t1 -c64``,
  ``--latency``) with a Lua script, written to a temporary file, that PUTs 16-byte values
  to ``/v1/kv/h<n % 1000>`` on the leader. The machine has 2 cores shared by the three
  servers and the load generator; an aiohttp client in this process costs about 85 us of
  CPU per request, so it measured our load generator more than the server (about 8,300
  req/s against about 12,000 with wrk, same leader); wrk is written in C and costs far
  less per request. wrk takes whole seconds (a 2.5 s run is 3 s, after a 1 s warm-up at
  64 connections). ops/s counts 2xx answers only; every other answer (a 307 to another leader,
  a 503) and every socket error is an error, and a row with errors says so in the table.
  p50/p99 are wrk's (over all answers), the median over rounds. Without ``wrk`` on the
  PATH the rows fall back to the aiohttp client and are labelled ``HTTP (aiohttp client)``.
* ``KVClient``: ``dsys.kv.KVClient`` in this process (one WebSocket to the leader, 1 or 64
  concurrent ``await kv.put(...)``): the client is part of what is measured, as a user
  of the library would run it.
* ``ReplDict``: a read-only PySyncObj node in this process as the client (callbacks,
  1 or 64 in flight), as in the issue's measurement.

    .venv/bin/python benchmarks/bench_kv.py            # full run (~2-3 minutes)
    .venv/bin/python benchmarks/bench_kv.py --quick    # short run
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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


@dataclass
class Run:
    """One measured run: successful ops/s, latencies (or wrk's percentiles), errors."""

    ops: float
    lat: list[float] = field(default_factory=list)
    p50: float = float("nan")
    p99: float = float("nan")
    errors: int = 0
    error_kinds: str = ""


async def run_load(op: Callable[[int], Awaitable[bool]], inflight: int, seconds: float) -> Run:
    """Run ``op`` from ``inflight`` workers for ``seconds`` (``op`` returns False on error)."""
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            n = next(counter)
            t0 = time.perf_counter()
            if await op(n):
                lat.append(time.perf_counter() - t0)
            else:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    run = Run(ops=len(lat) / (time.perf_counter() - t0), lat=lat, errors=errors)
    if errors:
        run.error_kinds = f"{errors} non-2xx"
    return run


WRK_SCRIPT = """
-- PUT 16-byte values to /v1/kv/h<n % 1000>; count answers that are not 2xx.
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  n = 0
  non2xx = 0
end
function request()
  local path = "/v1/kv/h" .. (n % 1000)
  n = n + 1
  return wrk.format("PUT", path, {["Content-Type"] = "application/octet-stream"}, "@VALUE@")
end
function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end
function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do
    bad = bad + t:get("non2xx")
  end
  local e = summary.errors
  io.write(string.format(
    "DSYS requests=%d duration_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d\\n",
    summary.requests, summary.duration, bad, e.connect, e.read, e.write, e.timeout))
end
"""

_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _wrk_time(text: str, label: str) -> float:
    m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no {label} latency in wrk output:\n{text}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_wrk(text: str) -> Run:
    """A :class:`Run` from the output of ``wrk --latency`` with :data:`WRK_SCRIPT`."""
    m = re.search(
        r"DSYS requests=(\d+) duration_us=(\d+) non2xx=(\d+) "
        r"connect=(\d+) read=(\d+) write=(\d+) timeout=(\d+)",
        text,
    )
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    if m is None or rps is None:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    requests, _duration_us, non2xx, *sock = (int(g) for g in m.groups())
    kinds = [f"{non2xx} non-2xx"] if non2xx else []
    kinds += [
        f"{n} socket {k}"
        for k, n in zip(("connect", "read", "write", "timeout"), sock, strict=True)
        if n
    ]
    return Run(
        # wrk's Requests/sec counts every answer; only 2xx answers are operations done
        ops=float(rps.group(1)) * (requests - non2xx) / requests if requests else 0.0,
        p50=_wrk_time(text, "50%"),
        p99=_wrk_time(text, "99%"),
        errors=non2xx + sum(sock),
        error_kinds=", ".join(kinds),
    )


async def run_wrk(script: Path, url: str, conns: int, seconds: float) -> Run:
    """Drive ``url`` with wrk (one thread, ``conns`` connections) for ``seconds``."""
    duration = max(1, math.ceil(seconds))  # wrk takes whole seconds
    proc = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(script),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), duration + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{text}")
    return parse_wrk(text)


WRK = shutil.which("wrk")
HTTP_API = "HTTP (wrk)" if WRK else "HTTP (aiohttp client)"


async def bench_dsys(fsync: str, base: Path, seconds: float, script: Path | None) -> dict[str, Run]:
    """One dsys cluster: HTTP rows by wrk (``script``) or the aiohttp client, then KVClient."""
    cluster = DsysCluster(fsync, base)
    cluster.start()
    out: dict[str, Run] = {}
    try:
        leader = await cluster.leader()
        if script is not None:
            url = f"http://{cluster.addrs[leader]}"
            await run_wrk(script, url, 64, 1)  # warm-up
            for c in (1, 64):
                out[f"http/{c}"] = await run_wrk(script, url, c, seconds)
        else:
            url = f"http://{cluster.addrs[leader]}/v1/kv/"
            conn = aiohttp.TCPConnector(limit=128)
            async with aiohttp.ClientSession(connector=conn) as http:

                async def http_put(n: int) -> bool:
                    async with http.put(f"{url}h{n % 1000}", data=VALUE) as r:
                        await r.read()
                        return 200 <= r.status < 300

                for c in (1, 64):
                    await run_load(http_put, c, 0.3)  # warm-up
                    out[f"http/{c}"] = await run_load(http_put, c, seconds)
        async with KVClient(list(cluster.addrs.values())) as kv:

            async def client_put(n: int) -> bool:
                await kv.put(f"c{n % 1000}", VALUE)
                return True

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

    def load(self, inflight: int, seconds: float) -> Run:
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
        run = Run(ops=len(lat) / (time.perf_counter() - t0), lat=lat, errors=errors[0])
        if errors[0]:
            run.error_kinds = f"{errors[0]} failed writes"
        return run

    def destroy(self) -> None:
        self.obj.destroy()


def bench_pso(batch: bool, seconds: float) -> dict[str, Run]:
    cluster = PsoCluster(batch)
    cluster.start()
    client = None
    out: dict[str, Run] = {}
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
    results: dict[str, list[Run]] = {}

    def add(system: str, res: dict[str, Run]) -> None:
        for k, v in res.items():
            results.setdefault(f"{system} {k}", []).append(v)

    with tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp:
        base = Path(tmp)
        script = None
        if WRK:
            script = base / "put.lua"
            script.write_text(WRK_SCRIPT.replace("@VALUE@", VALUE.decode()))
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", file=sys.stderr)
            add(
                "dsys fsync=always",
                asyncio.run(bench_dsys("always", base / f"r{r}", seconds, script)),
            )
            add("PySyncObj batched", bench_pso(True, seconds))
            add("dsys fsync=none", asyncio.run(bench_dsys("none", base / f"r{r}", seconds, script)))
            add("PySyncObj unbatched", bench_pso(False, seconds))
        fo_dsys = [asyncio.run(failover_dsys(base / f"fo{i}")) for i in range(rounds)]
        fo_pso = [failover_pso() for _ in range(rounds)]

    def ops(name: str) -> float:
        return statistics.median(run.ops for run in results[name])

    best_pso = {
        c: max(ops(f"PySyncObj batched client/{c}"), ops(f"PySyncObj unbatched client/{c}"))
        for c in (1, 64)
    }
    http_how = f"wrk -t1 for {max(1, math.ceil(seconds))}s" if WRK else "aiohttp client in-process"
    print(
        f"\nbench_kv: 3 processes on loopback, 16-byte values, {platform.python_version()}, "
        f"{os.cpu_count()} cores, {rounds} round(s) of {seconds}s (HTTP rows: {http_how})\n"
    )
    print("| system | API | in flight | ops/s | p50 ms | p99 ms | ops/s vs best PySyncObj |")
    print("|---|---|---:|---:|---:|---:|---:|")
    errors: list[str] = []
    for name in results:
        runs = results[name]
        system, rest = name.rsplit(" ", 1)
        api, c = rest.split("/")
        lat = [x for run in runs for x in run.lat]
        if lat:
            p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
        else:  # wrk reports percentiles, not samples: the median over rounds
            p50 = statistics.median(run.p50 for run in runs)
            p99 = statistics.median(run.p99 for run in runs)
        o = ops(name)
        api_name = {
            "http": HTTP_API,
            "client": "KVClient" if system.startswith("dsys") else "ReplDict",
        }[api]
        n_err = sum(run.errors for run in runs)
        ops_cell = f"{o:,.0f}"
        if n_err:
            ops_cell += f" ({n_err:,} errors)"
            kinds = "; ".join(run.error_kinds for run in runs if run.errors)
            errors.append(f"{system} {api_name} {c} in flight: {kinds}")
        print(
            f"| {system} | {api_name} | {c} | {ops_cell} | {p50 * 1000:.2f} | "
            f"{p99 * 1000:.2f} | {o / best_pso[int(c)]:.2f}x |"
        )
    if errors:
        print("\nERRORS (ops/s counts successful operations only):")
        for line in errors:
            print(f"- {line}")
    print(
        f"\nfailover after kill -9 of the leader (time to the next acknowledged write): "
        f"dsys {statistics.median(fo_dsys):.2f} s, PySyncObj {statistics.median(fo_pso):.2f} s"
    )


if __name__ == "__main__":
    main()
