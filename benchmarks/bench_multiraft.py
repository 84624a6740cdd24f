"""Benchmark: multi-Raft KV writes/s over 1, 2, 4 and 8 loaded ranges on 3 processes.

Three ``dsys kv multi-serve`` processes on loopback; the key space is split into 8 ranges
(``["", "k1")``, ``["k1", "k2")`` ... ``["k7", +inf)``), and each round loads
*N* of them in an order that spreads their leaders over the nodes (round-robin over
the nodes; N = 1, 2, 4, 8; the rounds alternate, so every N sees the same machine
state). The idle ranges of a round still tick and heartbeat, as they would in a cluster.

Load: one `wrk <https://github.com/wg/wrk>`_ process per loaded range (``-t1``), aimed
at that range's leader, PUTting 16-byte values to 1,000 keys inside the range; the 64
connections are split evenly among them (64, 32, 16, 8 per range). wrk is C and cheap
next to our servers (an aiohttp client would cost ~85 us of CPU per request on the
same 2 cores). ops/s counts 2xx answers; any other answer or socket error is reported.

CPU per write: user + system CPU of the three server processes (``/proc/<pid>/stat``)
over the round, divided by the writes acknowledged; it includes the followers' work.

Leaders are balanced first (``--balance-interval 1``: no node leads two data ranges more
than another; ``--no-balance`` leaves them where elections put them); the table names
the node leading each loaded range, because a process (one Python thread) is the unit
that saturates, and the machine has 2 cores for 3 servers and the load generators.

    .venv/bin/python benchmarks/bench_multiraft.py             # 3 rounds of 3 s per N
    .venv/bin/python benchmarks/bench_multiraft.py --quick     # 1 round of 2 s
    .venv/bin/python benchmarks/bench_multiraft.py --fsync none
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

from dsys.kv.sharded import ShardedKVClient

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
    base: Path, fsync: str, balance: bool
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    ids = ["n1", "n2", "n3"]
    ports = dict(zip(ids, free_ports(3), strict=True))
    procs = []
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
            "--balance-interval",
            "1" if balance else "0",
            *[f"--peer={j}=127.0.0.1:{ports[j]}" for j in ids if j != i],
        ]
        log = open(base / f"{i}.log", "ab")  # noqa: SIM115
        procs.append(subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True))
        log.close()
    return procs, [f"127.0.0.1:{ports[i]}" for i in ids]


async def prepare(addrs: list[str]) -> ShardedKVClient:
    kv = ShardedKVClient(addrs, timeout=30.0)
    for _ in range(300):
        try:
            await kv.refresh()
            await kv.put("k0-warm", b"x")
            break
        except Exception:
            await asyncio.sleep(0.1)
    for key in SPLITS:
        await kv.split((await kv.locate(key)).range_id, key)
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
    nodes: dict[str, str],
    pids: list[int],
    script: Path,
    seconds: int,
) -> dict[str, float]:
    loaded = order[:n]
    conns = CONNS // n
    cpu0 = sum(cpu_seconds(p) for p in pids)
    t0 = time.perf_counter()
    runs = await asyncio.gather(
        *(wrk(script, f"http://{nodes[lead[p][1]]}", p, conns, seconds) for p in loaded)
    )
    wall = time.perf_counter() - t0
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    ok = sum(r["ok"] for r in runs)
    return {
        "ops": ok / seconds,
        "errors": sum(r["errors"] for r in runs),
        "cpu_us": cpu / ok * 1e6 if ok else math.nan,
        "cpu_util": cpu / wall,
        "p50ms": statistics.median(r["p50us"] for r in runs) / 1000,
    }


async def main_async(args: argparse.Namespace) -> None:
    seconds = 2 if args.quick else 3
    rounds = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-multiraft-") as tmp:
        base = Path(tmp)
        script = base / "put.lua"
        script.write_text(WRK_SCRIPT)
        procs, addrs = start_cluster(base, args.fsync, args.balance)
        try:
            kv = await prepare(addrs)  # closed below
            lead = await leaders(kv, args.balance)
            nodes = dict(kv.nodes)
            order = spread(lead)
            pids = [p.pid for p in procs]
            results: dict[int, list[dict[str, float]]] = {n: [] for n in (1, 2, 4, 8)}
            for r in range(rounds):
                for n in (1, 2, 4, 8):
                    print(f"round {r + 1}/{rounds}: {n} range(s)", file=sys.stderr)
                    results[n].append(await round_(n, order, lead, nodes, pids, script, seconds))
            lead_after = await leaders(kv, False)
            await kv.close()
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    load = os.getloadavg()
    print(
        f"\nbench_multiraft: 3 processes on loopback, fsync={args.fsync}, 16-byte values, "
        f"{CONNS} connections (wrk -t1 per loaded range), Python {platform.python_version()}, "
        f"{os.cpu_count()} cores, {rounds} round(s) of {seconds} s per N, alternating, "
        f"leaders {'balanced' if args.balance else 'as elected'}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )
    print(
        "| ranges loaded | leaders (range:node) | writes/s | vs 1 range | p50 ms | "
        "server CPU us/write | server CPU cores busy | errors |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    base_ops = statistics.median(x["ops"] for x in results[1])
    for n, runs in results.items():
        ops = statistics.median(x["ops"] for x in runs)
        who = " ".join(f"{lead[p][0]}:{lead[p][1]}" for p in order[:n])
        print(
            f"| {n} | {who} | {ops:,.0f} | {ops / base_ops:.2f}x | "
            f"{statistics.median(x['p50ms'] for x in runs):.2f} | "
            f"{statistics.median(x['cpu_us'] for x in runs):.0f} | "
            f"{statistics.median(x['cpu_util'] for x in runs):.2f} | "
            f"{sum(int(x['errors']) for x in runs)} |"
        )
    if lead_after != lead:
        print("\nnote: leadership moved during the run:", lead_after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s per N")
    parser.add_argument("--fsync", choices=("always", "none"), default="always")
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
