"""Benchmark: multi-Raft KV writes/s over 1, 2, 4 and 8 loaded ranges, on 3 and on 5
processes, with the shared WAL and with per-range WALs, beside etcd, in one run.

Each cluster is N ``dsys kv multi-serve`` processes on loopback (N = 3 and 5, fsync
always, ``--wal shared`` or ``--wal per-range``); the key space is split into 8 ranges
(``["", "k1")``, ``["k1", "k2")`` ... ``["k7", +inf)``), every range has a replica on
every process, leaders are balanced, and each measurement loads *n* of the ranges in an
order that spreads their leaders over the processes (round-robin; n = 1, 2, 4, 8). The
idle ranges still tick and heartbeat, as they would in a cluster.

Rounds alternate: in every round each configuration (processes x WAL kind) gets a fresh
cluster (the order rotates per round) and etcd gets its turn, so all see the same machine
state; the table gives medians over the rounds.

Load: one `wrk <https://github.com/wg/wrk>`_ process per loaded range (``-t1``), aimed
at that range's leader, PUTting 16-byte values to 1,000 keys inside the range; the 64
connections are split evenly among them (64, 32, 16, 8 per range). wrk is C and cheap
next to our servers. ops/s counts 2xx answers; any other answer or socket error is
reported. etcd (Debian's 3.4, ``etcd`` on the PATH; 3 members, default settings, so its
WAL is fsynced) is one Raft group driven through its v3 JSON gateway by the same wrk with
64 connections, the same keys and value sizes (``bench_write_path.EtcdCluster``).

CPU per write: user + system CPU of the cluster's server processes (``/proc/<pid>/stat``)
over the measurement, divided by the writes acknowledged; it includes the followers'
work. "groups/write" is the mean number of ranges whose records shared one write (and
fsync) of a process's shared WAL during the measurement (from ``/v1/status``).

    .venv/bin/python benchmarks/bench_multiraft.py             # 3 rounds of 3 s per n
    .venv/bin/python benchmarks/bench_multiraft.py --quick     # 1 round of 2 s
    .venv/bin/python benchmarks/bench_multiraft.py --procs 3 --wal shared --no-etcd
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsys.errors import BadInputError
from dsys.kv.sharded import ShardedKVClient

ETCD = shutil.which("etcd")

SPLITS = [f"k{i}" for i in range(1, 8)]
PREFIXES = [f"k{i}" for i in range(8)]  # one per range, in key order
CONNS = 64

WRK_SCRIPT = """
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  prefix = args[1]
  n = 0
  non2xx = 0
end
function request()
  local path = "/v1/kv/" .. prefix .. "-" .. (n % 1000)
  n = n + 1
  local hdrs = {["Content-Type"] = "application/octet-stream"}
  return wrk.format("PUT", path, hdrs, "vvvvvvvvvvvvvvvv")
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
  io.write(string.format("DSYS requests=%d non2xx=%d sockerr=%d p50us=%d\\n",
    summary.requests, bad, e.connect + e.read + e.write + e.timeout, latency:percentile(50)))
end
"""


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_cluster(
    base: Path, procs: int, wal: str, fsync: str, balance: bool, *extra: str
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """``procs`` ``dsys kv multi-serve`` processes n1..nN on free loopback ports, data and
    logs under ``base``, ``extra`` flags last; returns them and their addresses."""
    ids = [f"n{k + 1}" for k in range(procs)]
    ports = dict(zip(ids, free_ports(procs), strict=True))
    out = []
    for i in ids:
        args = [
            sys.executable,
            "-m",
            "dsys",
            "kv",
            "multi-serve",
            "--id",
            i,
            "--listen",
            f"127.0.0.1:{ports[i]}",
            "--data-dir",
            str(base / i),
            "--fsync",
            fsync,
            "--wal",
            wal,
            "--balance-interval",
            "1" if balance else "0",
            *[f"--peer={j}=127.0.0.1:{ports[j]}" for j in ids if j != i],
            *extra,
        ]
        base.mkdir(parents=True, exist_ok=True)
        log = open(base / f"{i}.log", "ab")  # noqa: SIM115
        out.append(subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True))
        log.close()
    return out, [f"127.0.0.1:{ports[i]}" for i in ids]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def wal_counters(kv: ShardedKVClient) -> tuple[int, int]:
    """(writes, groups carried by those writes) of every node's shared WAL so far."""
    writes = groups = 0
    for addr in kv.nodes.values():
        async with kv._http().get(f"http://{addr}/v1/status") as r:
            w = (await r.json()).get("wal", {})
        n = int(w.get("writes", 0))
        writes += n
        groups += round(float(w.get("groups_per_write_mean", 0.0)) * n)
    return writes, groups


async def ready_client(addrs: list[str], warm_key: str) -> ShardedKVClient:
    """A client (30 s timeout) of a cluster just started, once it has served a put of
    ``warm_key`` (tried for up to 30 s)."""
    kv = ShardedKVClient(addrs, timeout=30.0)
    for _ in range(300):
        try:
            await kv.refresh()
            await kv.put(warm_key, b"x")
            break
        except Exception:
            await asyncio.sleep(0.1)
    return kv


async def prepare(addrs: list[str]) -> ShardedKVClient:
    kv = await ready_client(addrs, "k0-warm")
    try:
        for key in SPLITS:
            for attempt in range(50):
                try:  # a node that has not applied the last split yet answers 400
                    await kv.split((await kv.locate(key)).range_id, key)
                    break
                except BadInputError:
                    if attempt == 49:
                        raise
                    await asyncio.sleep(0.1)
                    await kv.refresh()
    except BaseException:
        await kv.close()
        raise
    for p in PREFIXES:  # every range has a leader and has served a write
        await kv.put(f"{p}-warm", b"x")
    return kv


async def leaders(kv: ShardedKVClient, balanced: bool) -> dict[str, tuple[int, str]]:
    """Prefix -> (range id, leader node id) once every range reports a leader (and, if
    ``balanced``, once no node leads two ranges more than another)."""
    for _ in range(300):
        await kv.refresh()
        lead = await kv.range_leaders()
        out = {}
        for p in PREFIXES:
            rid = (await kv.locate(p)).range_id
            if rid in lead:
                out[p] = (rid, lead[rid])
        counts = [sum(1 for _, n in out.values() if n == node) for node in kv.nodes]
        if len(out) == len(PREFIXES) and (not balanced or max(counts) - min(counts) <= 1):
            return out
        await asyncio.sleep(0.1)
    raise RuntimeError("not every range has a leader (or leaders did not balance)")


async def wrk(script: Path, url: str, prefix: str, conns: int, seconds: int) -> dict[str, int]:
    proc = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(script),
        url,
        "--",
        prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    text = out.decode(errors="replace")
    m = re.search(r"DSYS requests=(\d+) non2xx=(\d+) sockerr=(\d+) p50us=(\d+)", text)
    if m is None:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    req, bad, sock, p50 = (int(g) for g in m.groups())
    return {"ok": req - bad, "errors": bad + sock, "p50us": p50}


def spread(lead: dict[str, tuple[int, str]]) -> list[str]:
    """The prefixes ordered so that the first N of them have leaders on as many nodes
    as possible (round-robin over the nodes, each node's ranges in key order)."""
    by_node: dict[str, list[str]] = {}
    for p in PREFIXES:
        by_node.setdefault(lead[p][1], []).append(p)
    queues = [by_node[n] for n in sorted(by_node)]
    out: list[str] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


async def round_(
    n: int,
    order: list[str],
    lead: dict[str, tuple[int, str]],
    kv: ShardedKVClient,
    pids: list[int],
    script: Path,
    seconds: int,
    shared: bool,
) -> dict[str, float]:
    loaded = order[:n]
    conns = CONNS // n
    nodes = kv.nodes
    w0 = await wal_counters(kv) if shared else (0, 0)
    cpu0 = sum(cpu_seconds(p) for p in pids)
    t0 = time.perf_counter()
    runs = await asyncio.gather(
        *(wrk(script, f"http://{nodes[lead[p][1]]}", p, conns, seconds) for p in loaded)
    )
    wall = time.perf_counter() - t0
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    w1 = await wal_counters(kv) if shared else (0, 0)
    ok = sum(r["ok"] for r in runs)
    writes = w1[0] - w0[0]
    return {
        "ops": ok / seconds,
        "errors": sum(r["errors"] for r in runs),
        "cpu_us": cpu / ok * 1e6 if ok else math.nan,
        "cpu_util": cpu / wall,
        "p50ms": statistics.median(r["p50us"] for r in runs) / 1000,
        "groups_per_write": (w1[1] - w0[1]) / writes if writes else math.nan,
    }


Config = tuple[int, str]  # (processes, WAL kind)


async def measure_cluster(
    cfg: Config, base: Path, args: argparse.Namespace, script: Path, seconds: int
) -> tuple[dict[int, dict[str, float]], dict[int, str]]:
    """One fresh cluster: every n in turn; returns the figures and who led what."""
    procs, addrs = start_cluster(base, cfg[0], cfg[1], args.fsync, args.balance)
    try:
        kv = await prepare(addrs)
        try:
            lead = await leaders(kv, args.balance)
            order = spread(lead)
            pids = [p.pid for p in procs]
            out: dict[int, dict[str, float]] = {}
            who: dict[int, str] = {}
            for n in (1, 2, 4, 8):
                out[n] = await round_(n, order, lead, kv, pids, script, seconds, cfg[1] == "shared")
                who[n] = " ".join(f"{lead[p][0]}:{lead[p][1]}" for p in order[:n])
            return out, who
        finally:
            await kv.close()
    finally:
        stop(procs)


async def measure_etcd(base: Path, script: Path, seconds: int) -> dict[str, float]:
    """etcd 3.4, three members, one group: 64 connections of wrk (after a warm-up)."""
    from bench_kv import run_wrk
    from bench_write_path import EtcdCluster

    cluster = EtcdCluster(base)
    cluster.start()
    try:
        url = f"http://{cluster.leader()}"
        await run_wrk(script, url, CONNS, 1)  # warm-up
        pids = [p.pid for p in cluster.procs]
        cpu0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        run = await run_wrk(script, url, CONNS, seconds)
        wall = time.perf_counter() - t0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        ok = run.ops * seconds
        return {
            "ops": run.ops,
            "errors": run.errors,
            "cpu_us": cpu / ok * 1e6 if ok else math.nan,
            "cpu_util": cpu / wall,
            "p50ms": run.p50 * 1000,
        }
    finally:
        cluster.stop()


async def main_async(args: argparse.Namespace) -> None:
    seconds = 2 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    configs: list[Config] = [(p, w) for p in args.procs for w in args.wal]
    etcd = ETCD is not None and not args.no_etcd
    systems: list[Config | str] = [*configs, *(["etcd"] if etcd else [])]
    results: dict[Config, list[dict[int, dict[str, float]]]] = {c: [] for c in configs}
    who: dict[Config, dict[int, str]] = {}
    etcd_runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-multiraft-") as tmp:
        base = Path(tmp)
        script = base / "put.lua"
        script.write_text(WRK_SCRIPT)
        etcd_lua = base / "etcd.lua"
        if etcd:
            from bench_write_path import etcd_script

            etcd_lua.write_text(etcd_script())
        for r in range(rounds):
            order = systems[r % len(systems) :] + systems[: r % len(systems)]
            for sys_ in order:
                d = base / f"r{r}-{sys_ if isinstance(sys_, str) else '-'.join(map(str, sys_))}"
                print(f"round {r + 1}/{rounds}: {sys_}", file=sys.stderr)
                if isinstance(sys_, str):
                    etcd_runs.append(await measure_etcd(d, etcd_lua, seconds))
                else:
                    figures, who[sys_] = await measure_cluster(sys_, d, args, script, seconds)
                    results[sys_].append(figures)
    load = os.getloadavg()
    print(
        f"\nbench_multiraft: {' and '.join(map(str, args.procs))} processes on loopback, "
        f"fsync={args.fsync}, 16-byte values, {CONNS} connections (wrk -t1 per loaded "
        f"range), Python {platform.python_version()}, {os.cpu_count()} cores, {rounds} "
        f"round(s) of {seconds} s per n, alternating (a fresh cluster per round), leaders "
        f"{'balanced' if args.balance else 'as elected'}; load average {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f} at the end\n"
    )
    print(
        "| processes | WAL | ranges loaded | writes/s | vs 1 range | p50 ms | "
        "server CPU us/write | server CPU cores busy | groups/write | errors | "
        "leaders (range:node, last round) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")

    def med(runs: list[dict[str, float]], k: str) -> float:
        return statistics.median(x[k] for x in runs)

    for cfg in configs:
        base_ops = med([x[1] for x in results[cfg]], "ops")
        for n in (1, 2, 4, 8):
            runs = [x[n] for x in results[cfg]]
            ops = med(runs, "ops")
            gpw = med(runs, "groups_per_write")
            print(
                f"| {cfg[0]} | {cfg[1]} | {n} | {ops:,.0f} | {ops / base_ops:.2f}x | "
                f"{med(runs, 'p50ms'):.2f} | {med(runs, 'cpu_us'):.0f} | "
                f"{med(runs, 'cpu_util'):.2f} | "
                f"{'-' if math.isnan(gpw) else f'{gpw:.2f}'} | "
                f"{sum(int(x['errors']) for x in runs)} | {who[cfg][n]} |"
            )
    if etcd_runs:
        ops = med(etcd_runs, "ops")
        print(
            f"\n| one group, {CONNS} connections | writes/s | vs etcd | p50 ms | "
            "server CPU us/write | errors |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        print(
            f"| etcd 3.4 (3 members) | {ops:,.0f} | 1.00x | {med(etcd_runs, 'p50ms'):.2f} | "
            f"{med(etcd_runs, 'cpu_us'):.0f} | {sum(int(x['errors']) for x in etcd_runs)} |"
        )
        for cfg in configs:
            runs = [x[1] for x in results[cfg]]
            ours = med(runs, "ops")
            print(
                f"| dsys, {cfg[0]} processes, {cfg[1]} WAL, 1 range loaded | {ours:,.0f} | "
                f"{ours / ops:.2f}x | {med(runs, 'p50ms'):.2f} | {med(runs, 'cpu_us'):.0f} | "
                f"{sum(int(x['errors']) for x in runs)} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s per n")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3, help="seconds per measurement")
    parser.add_argument("--fsync", choices=("always", "none"), default="always")
    parser.add_argument(
        "--procs", type=int, nargs="+", default=[3, 5], help="cluster sizes (default 3 5)"
    )
    parser.add_argument(
        "--wal",
        nargs="+",
        choices=("shared", "per-range"),
        default=["shared", "per-range"],
        help="WAL kinds to compare (default both)",
    )
    parser.add_argument("--no-etcd", action="store_true", help="leave etcd out")
    parser.add_argument(
        "--no-balance",
        dest="balance",
        action="store_false",
        help="leave leaders where elections put them (default: balance, then measure)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench_multiraft needs wrk on the PATH")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
