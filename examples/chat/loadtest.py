"""Load and chaos test of the chat example (a benchmark script, not a timed test).

``python -m examples.chat.loadtest`` starts the whole system (as ``python -m
examples.chat`` does), connects N simulated users through ``dsys lb`` spread over M rooms,
has each post at ``--rate`` messages per second for ``--seconds``, and reports Centrifugo's
four figures: messages delivered per second, publish-to-deliver latency (p50/p99),
connections held, memory per connection on the chat servers, plus how many reconnects the
clients went through.

``--chaos`` kills (SIGKILL) in turn a chat server, a pub/sub broker (two are started),
the KV leader and the stream cluster's leader (three stream nodes are started) during the
load, restarting each a little later. Either way the run ends by
checking every client's log: per room, offsets 1, 2, 3... with no gap and no duplicate,
every acknowledged message present in every member's log, each author's messages in the
order they were acknowledged.

Bounded: ``--seconds`` of load, ``--max-messages`` posts at most, and a hard timeout.
Defaults are the issue's goal (2,000 connections, 100 rooms, 2 servers); ``--quick`` is
200 connections over 20 rooms for 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from dsys.observability import configure_logging

from .client import ChatClient
from .cluster import ChatCluster
from .common import sign_token


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, in seconds (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Results:
    connections: int = 0
    posted: int = 0
    acked: int = 0
    unacked: int = 0
    delivered: int = 0
    window: float = 0.0
    latencies: list[float] = field(default_factory=list)
    reconnects: int = 0
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)
    chaos: list[str] = field(default_factory=list)
    lost: int = 0
    dups: int = 0
    holes: int = 0
    misordered: int = 0
    refetches: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU s per process kind, in the window
    load: str = ""  # the load average when the window ended

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(q * len(s)))] * 1000


async def _chaos(cluster: ChatCluster, seconds: float, res: Results) -> None:
    """Kill a chat server, a broker, the KV leader and the stream leader in turn, each at a
    fixed point of the load (10 %, 30 %, 50 %, 70 % of it), and restart each 12 % of the
    load later."""
    t0 = time.monotonic()

    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, t0 + fraction * seconds - time.monotonic()))

    async def kill_restart(when: float, name: str | None, what: str) -> None:
        await at(when)
        if name is None:  # a Raft leader: whoever it is now
            name = await asyncio.to_thread(cluster.leader, what.split()[1])
        await asyncio.to_thread(cluster.kill, name)
        res.chaos.append(f"kill -9 {what} ({name}) at {time.monotonic() - t0:.0f} s")
        print(f"  chaos: {time.monotonic() - t0:5.1f} s kill -9 {what} {name}", flush=True)
        await at(when + 0.12)
        await asyncio.to_thread(cluster.restart, name)
        print(f"  chaos: {time.monotonic() - t0:5.1f} s {name} is back", flush=True)

    await kill_restart(0.10, cluster.names("chat")[0], "a chat server")
    await kill_restart(0.30, cluster.names("broker")[0], "a pub/sub broker")
    await kill_restart(0.50, None, "the kv leader")
    await kill_restart(0.70, None, "the streams leader")


async def run_load(cluster: ChatCluster, args: argparse.Namespace) -> Results:
    res = Results()
    rooms = [f"room{i:03}" for i in range(args.rooms)]
    acked: dict[str, dict[int, str]] = defaultdict(dict)  # room -> offset -> text
    by_author: dict[str, list[int]] = defaultdict(list)  # user -> offsets acked, in order
    t0 = time.perf_counter()
    measuring = {"on": False}

    def on_msg(c: ChatClient, m: dict[str, Any]) -> None:
        if measuring["on"]:
            res.delivered += 1
            sent = m["text"].split(" ", 1)[0]
            with contextlib.suppress(ValueError):
                res.latencies.append(time.perf_counter() - t0 - float(sent))

    for name in cluster.names("chat"):
        proc = cluster.procs[name].proc
        assert proc is not None
        res.rss_before[name] = rss_kib(proc.pid)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    clients: list[ChatClient] = []
    try:
        # accounts are the cluster's business: tokens signed with its secret stand in
        # for 2,000 log-ins (argon2 is slow on purpose)
        secret = cluster.secret.encode()
        users = [f"u{i:05}" for i in range(args.connections)]
        for start in range(0, len(users), 100):
            batch = [
                ChatClient(cluster.url, u, token=sign_token(secret, u), http=http, on_msg=on_msg)
                for u in users[start : start + 100]
            ]
            for c in batch:
                c.ack_deliveries = not args.no_receipts
            await asyncio.gather(*(c.start(timeout=60) for c in batch))
            clients += batch
        res.connections = len(clients)
        print(f"  {len(clients)} WebSockets open through the load balancer", flush=True)
        for i, room in enumerate(rooms):
            await clients[i % len(clients)].request(
                {"type": "create", "room": room}, f"joined:{room}", timeout=30
            )
        for start in range(0, len(clients), 100):
            await asyncio.gather(
                *(
                    c.join(rooms[(start + j) % len(rooms)])
                    for j, c in enumerate(clients[start : start + 100])
                )
            )
        per_room = len(clients) / len(rooms)
        print(f"  {len(rooms)} rooms, {per_room:.0f} members each; load for {args.seconds} s",
              flush=True)  # fmt: skip
        await asyncio.sleep(1.0)
        for name in cluster.names("chat"):
            proc = cluster.procs[name].proc
            assert proc is not None
            res.rss_after[name] = rss_kib(proc.pid)
        reconnects0 = sum(c.connects for c in clients)
        budget = {"left": args.max_messages}
        stop_at = time.monotonic() + args.seconds

        async def user_loop(idx: int, c: ChatClient) -> None:
            room = rooms[idx % len(rooms)]
            rnd = random.Random(idx)
            await asyncio.sleep(rnd.random() / args.rate)
            i = 0
            while time.monotonic() < stop_at and budget["left"] > 0:
                budget["left"] -= 1
                i += 1
                text = f"{time.perf_counter() - t0:.6f} {c.user} {i}"
                res.posted += 1
                try:
                    ack = await c.send(room, text, timeout=30)
                except Exception:
                    res.unacked += 1
                else:
                    res.acked += 1
                    acked[room][ack["offset"]] = text
                    by_author[c.user].append(ack["offset"])
                await asyncio.sleep(min(rnd.expovariate(args.rate), stop_at - time.monotonic()))

        def cpu_by_kind() -> dict[str, float]:
            out: dict[str, float] = defaultdict(float)
            for p in cluster.procs.values():
                if p.alive and p.proc is not None:
                    with contextlib.suppress(OSError):
                        out[p.kind] += cpu_seconds(p.proc.pid)
            return out

        async def window() -> None:
            # deliveries (and the processes' CPU time) are counted over exactly --seconds
            cpu0, own0 = cpu_by_kind(), time.process_time()
            measuring["on"] = True
            await asyncio.sleep(args.seconds)
            measuring["on"] = False
            cpu1 = cpu_by_kind()
            res.cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
            res.cpu["load generator"] = time.process_time() - own0
            res.window = args.seconds
            res.load = " ".join(f"{x:.2f}" for x in os.getloadavg())

        chaos = asyncio.create_task(_chaos(cluster, args.seconds, res)) if args.chaos else None
        await asyncio.gather(window(), *(user_loop(i, c) for i, c in enumerate(clients)))
        if chaos is not None:
            await chaos
        # drain: everything acknowledged reaches every member
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            behind = [
                c
                for i, c in enumerate(clients)
                if len(c.offsets(room := rooms[i % len(rooms)])) < max(acked[room], default=0)
            ]
            if not behind:
                break
            await asyncio.sleep(0.5)
        res.reconnects = sum(c.connects for c in clients) - reconnects0
        for i, c in enumerate(clients):
            room = rooms[i % len(rooms)]
            log = c.rooms[room].log if room in c.rooms else []
            offs = [m["offset"] for m in log]
            res.dups += c.dups + len(offs) - len(set(offs))
            res.holes += c.holes
            res.refetches += c.rooms[room].refetches if room in c.rooms else 0
            if offs != list(range(1, len(offs) + 1)):
                res.misordered += 1
            got = {m["offset"]: m["text"] for m in log}
            res.lost += sum(1 for off, text in acked[room].items() if got.get(off) != text)
        for offs in by_author.values():
            if offs != sorted(offs):
                res.misordered += 1
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await http.close()
    return res


def table(args: argparse.Namespace, res: Results) -> str:
    mem = [
        (res.rss_after[n] - res.rss_before[n]) / max(1, res.connections / len(res.rss_after))
        for n in res.rss_after
    ]
    rows = [
        ("chat servers", str(args.chat_servers)),
        ("connections (WebSockets through dsys lb)", f"{res.connections}"),
        ("rooms x members", f"{args.rooms} x {res.connections // args.rooms}"),
        ("posts acknowledged / not (timed out)", f"{res.acked} / {res.unacked}"),
        ("delivered messages/s", f"{res.delivered / res.window:,.0f}" if res.window else "-"),
        ("publish-to-deliver p50 / p99 (ms)", f"{res.pct(0.5):.1f} / {res.pct(0.99):.1f}"),
        ("memory per connection, chat server (KiB)", f"{statistics.mean(mem):.1f}"),
        ("reconnects (per minute)", f"{res.reconnects} ({res.reconnects * 60 / res.window:.0f})"),
        ("acked messages lost / duplicated / out of order",
         f"{res.lost} / {res.dups} / {res.misordered}"),
        ("refetches", str(res.refetches)),
        ("CPU per 1,000 deliveries, chat servers (ms)",
         f"{res.cpu.get('chat', 0) * 1e6 / res.delivered:.1f}" if res.delivered else "-"),
        ("CPU in the window by process kind (s)",
         ", ".join(f"{k} {v:.1f}" for k, v in sorted(res.cpu.items()))),
        ("load average at the end of the window", res.load),
    ]  # fmt: skip
    if res.chaos:
        rows.append(("chaos", "; ".join(res.chaos)))
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'figure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> int:
    cluster = ChatCluster(
        chat_servers=args.chat_servers,
        brokers=2 if args.chaos else 1,
        stream_nodes=3 if args.chaos else args.stream_nodes,
        fsync=args.fsync,
        password_cost="fast",
        verbose=True,
    )
    print(f"dsys chat load test: {platform.node()}, {platform.processor() or platform.machine()}")
    await asyncio.to_thread(cluster.start)
    try:
        res = await asyncio.wait_for(run_load(cluster, args), args.seconds + 300)
    finally:
        await asyncio.to_thread(cluster.stop)
    print()
    print(table(args, res))
    ok = res.lost == res.dups == res.misordered == 0
    print(f"\nevery acknowledged message delivered once, in order, to every member: {ok}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m examples.chat.loadtest", description=__doc__.split("\n")[0]
    )
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--chat-servers", type=int, default=2)
    p.add_argument("--stream-nodes", type=int, default=1, choices=(1, 3))
    p.add_argument("--rate", type=float, default=0.5, help="posts per second per user")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the load")
    p.add_argument("--max-messages", type=int, default=200_000, help="posts at most")
    p.add_argument("--fsync", choices=("always", "none"), default="always")
    p.add_argument(
        "--chaos",
        action="store_true",
        help="kill -9 a chat server, a broker, the KV leader and the stream leader",
    )
    p.add_argument("--quick", action="store_true", help="200 connections, 20 rooms, 10 s")
    p.add_argument("--no-receipts", action="store_true", help="clients send no delivery receipts")
    args = p.parse_args(argv)
    if args.quick:
        args.connections, args.rooms, args.seconds = 200, 20, min(args.seconds, 10.0)
    configure_logging(level="error")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
