"""Durable streams: dsys streams (R1, R3) vs Redis Streams vs NATS JetStream.

Every system runs as real server processes on free loopback ports, started afresh for
each system and round; rounds alternate the systems so they share the machine's noise.
All clients run in this process. Messages carry a 128-byte payload. Three measurements
per system and round:

* publish: acknowledged publishes/s with ``INFLIGHT`` (128) publishes in flight from one
  client, for ``seconds`` after a short warm-up. dsys: ``StreamClient.publish`` (one
  WebSocket; requests of one loop iteration share a frame, so a frame's publishes are
  one Raft entry). Redis: ``XADD`` through redis-py asyncio pipelines, 8 pipelines of 16
  in flight on 8 connections (pipelining is how redis-py gets its best figure; 128
  concurrent single ``XADD`` calls on a pool are slower in this process). NATS:
  nats-py ``js.publish`` (a request that waits for the stream's PubAck), 128 in flight.
* latency: a publisher sends at a fixed ``RATE`` (1,000 msg/s) for ``seconds``, the payload
  carrying the send time; one consumer on another connection receives and acknowledges
  every message (each ack is sent without holding up the receive loop). p50/p99 are
  publish-to-receive, the median over rounds of each round's percentiles; ``pub-ack`` is
  the time each of these publishes took to be acknowledged (a commit for dsys, the
  XADD reply for Redis, the PubAck for NATS). dsys: ``StreamClient.subscribe``
  (push); Redis: ``XREADGROUP ... BLOCK`` + ``XACK``; NATS: a push consumer with explicit
  acks.
* consume: drain ``N`` stored messages (20,000; 3,000 with ``--quick``) through a new
  consumer, a batch of ``BATCH`` (500) at a time, acknowledging each batch before the
  next fetch. dsys: ``fetch(batch=500)`` + one ``ack`` call per batch; Redis:
  ``XREADGROUP COUNT 500`` + ``XACK`` of the batch's ids; NATS: a pull consumer,
  ``fetch(500)`` + ``ack()`` per message (nats-py has no batch ack for explicit acks).

The publish rows also show the CPU time per acknowledged publish, of the server
processes (all replicas; from ``/proc``) and of this process (the client), which varies
far less than throughput when other jobs share the machine.

Durability, per row:

* dsys ``fsync=always``: a publish is answered after its Raft entry is fsynced on a
  quorum (group commit). ``fsync=none``: written, never fsynced (UNSAFE; for comparison).
* Redis ``fsync=always``: ``appendonly yes``, ``appendfsync always`` (one fsync per event
  loop iteration, before the replies go out). ``fsync=none``: the default, no AOF (RDB
  snapshots are off here, ``save ""``, so no fork lands in a measurement). Redis has no
  synchronous replication, so it is R1 only.
* NATS JetStream: R1 file storage. The installed nats-server (2.9.x from Debian) writes
  each message to the OS and fsyncs the message blocks every 2 minutes; it has no
  per-message sync (``sync_interval: always`` came with 2.10 and 2.9 rejects the key), so
  its row compares with the ``fsync=none`` rows.

Run: ``.venv/bin/python benchmarks/bench_streams.py [--quick] [--rounds N]``
(``--quick``: one short round, about 35 s; the default, 3 rounds, about 5 minutes, 5 to 6
when other jobs load the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsys.testing.procs import LOOPBACK, free_port, stop_process, wait_healthy, wait_port

SIZE = 128
INFLIGHT = 128
RATE = 1000
BATCH = 500
REDIS_PIPELINES = 8
SUBJECT = "bench.pub"
LAT_SUBJECT = "lat.x"


@dataclass
class Result:
    """One system, one round."""

    pub: float = float("nan")
    lat: list[float] = field(default_factory=list)  # publish to receive, ms
    ack_lat: list[float] = field(default_factory=list)  # publish to its acknowledgement, ms
    lost: int = 0
    drain: float = float("nan")
    server_us: float = float("nan")  # server CPU per acknowledged publish (all replicas)
    client_us: float = float("nan")  # this process's CPU per acknowledged publish
    errors: list[str] = field(default_factory=list)
    p50: float = float("nan")
    p99: float = float("nan")
    ack_p50: float = float("nan")
    ack_p99: float = float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def stamp(pad: bytes) -> bytes:
    return struct.pack("!q", time.perf_counter_ns()) + pad


def since(data: bytes) -> float:
    """Milliseconds since the send time the payload carries."""
    (sent,) = struct.unpack_from("!q", data)
    return (time.perf_counter_ns() - sent) / 1e6


async def publish_load(
    op: Callable[[], Awaitable[int]], workers: int, seconds: float, errors: list[str]
) -> tuple[float, int]:
    """Run ``op`` (returns messages acknowledged) from ``workers`` loops for ``seconds``.

    Returns acknowledged messages/s and how many were acknowledged.
    """
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            try:
                acked = await op()  # not `done += await op()`: that reads `done` first
            except Exception as exc:  # counted and shown, the run goes on
                errors.append(f"publish: {exc!r}"[:200])
            else:
                done += acked

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return done / (time.perf_counter() - t0), done


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes used so far (Linux ``/proc``; nan elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def measured_publish(
    op: Callable[[], Awaitable[int]], workers: int, seconds: float, pids: list[int], res: Result
) -> int:
    """The measured publish run: rate and CPU per message into ``res``; returns the count."""
    server0, client0 = cpu_seconds(pids), time.process_time()
    res.pub, done = await publish_load(op, workers, seconds, res.errors)
    if done:
        res.server_us = (cpu_seconds(pids) - server0) / done * 1e6
        res.client_us = (time.process_time() - client0) / done * 1e6
    return done


async def top_up(
    op: Callable[[], Awaitable[int]], workers: int, stored: int, n: int, res: Result
) -> None:
    """Publish more until at least ``n`` messages are stored, for the consume phase."""
    for _ in range(50):
        if stored >= n:
            return
        _, more = await publish_load(op, workers, (n - stored) / max(res.pub, 500) + 0.1, [])
        stored += more
    res.errors.append(f"top-up: only {stored} of {n} messages stored")


async def paced(publish: Callable[[bytes], Awaitable[Any]], seconds: float, res: Result) -> int:
    """Start one publish every 1/RATE s (not waiting for the previous); returns the count.

    The time each publish took to be acknowledged goes to ``res.ack_lat`` (ms).
    """
    n = int(seconds * RATE)
    pad = b"p" * (SIZE - 8)
    tasks: set[asyncio.Task[Any]] = set()

    async def one(data: bytes) -> None:
        t0 = time.perf_counter()
        await publish(data)
        res.ack_lat.append((time.perf_counter() - t0) * 1000)

    start = time.perf_counter()
    for i in range(n):
        delay = start + i / RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(one(stamp(pad)))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    return n


async def wait_count(count: Callable[[], int], n: int, limit: float = 10.0) -> None:
    """Wait until ``count()`` reaches ``n``, ``limit`` seconds at most."""
    for _ in range(int(limit * 100)):
        if count() >= n:
            return
        await asyncio.sleep(0.01)


# -- dsys --------------------------------------------------------------------------------


class DsysCluster:
    """``dsys streams serve`` processes: 1 (R1) or 3 (R3) replicas."""

    def __init__(self, replicas: int, fsync: str, base: Path) -> None:
        self.ids = [f"n{i + 1}" for i in range(replicas)]
        self.addrs = {i: f"{LOOPBACK}:{free_port()}" for i in self.ids}
        self.fsync = fsync
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        env = {**os.environ, "DSYS_LOG_LEVEL": "warning"}
        for i in self.ids:
            cmd = [sys.executable, "-m", "dsys", "streams", "serve", "--id", i]
            cmd += ["--listen", self.addrs[i], "--fsync", self.fsync]
            cmd += ["--data-dir", str(self.base / i)]
            cmd += [f"--peer={j}={a}" for j, a in self.addrs.items() if j != i]
            self.procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            )
        for addr in self.addrs.values():
            wait_healthy(addr, timeout=20.0)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            for addr in self.addrs.values():
                url = f"http://{addr}/v1/status"
                with (
                    contextlib.suppress(OSError, ValueError),
                    urllib.request.urlopen(url, timeout=1) as r,
                ):
                    if json.load(r).get("role") == "leader":
                        return
            time.sleep(0.05)
        raise RuntimeError("no dsys streams leader")

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p)


async def bench_dsys(replicas: int, fsync: str, base: Path, seconds: float, n: int) -> Result:
    from dsys.streams.client import StreamClient
    from dsys.streams.fsm import ConsumerConfig, StreamConfig

    res = Result()
    cluster = DsysCluster(replicas, fsync, base)
    try:
        cluster.start()
        eps = list(cluster.addrs.values())
        async with StreamClient(eps, timeout=10.0) as c, StreamClient(eps, timeout=10.0) as c2:
            await c.add_stream(StreamConfig(name="BENCH", subjects=("bench.>",)))
            await c.add_stream(StreamConfig(name="LAT", subjects=("lat.>",)))
            payload = b"x" * SIZE

            async def pub() -> int:
                await c.publish(SUBJECT, payload)
                return 1

            _, stored = await publish_load(pub, INFLIGHT, min(0.5, seconds / 4), res.errors)
            stored += await measured_publish(
                pub, INFLIGHT, seconds, [p.pid for p in cluster.procs], res
            )
            await top_up(pub, INFLIGHT, stored, n, res)

            # consume: fetch + ack batches
            await c.add_consumer("BENCH", ConsumerConfig(name="drain"))
            got = 0
            t0 = time.perf_counter()
            while got < n:
                msgs = await c.fetch("BENCH", "drain", batch=min(BATCH, n - got), expires=1.0)
                if not msgs:
                    res.errors.append(f"consume: stopped after {got} of {n}")
                    break
                await c.ack("BENCH", "drain", [(m.seq, m.deliveries) for m in msgs])
                got += len(msgs)
            res.drain = got / (time.perf_counter() - t0)

            # latency: push subscriber on a second connection, paced publisher
            await c.add_consumer("LAT", ConsumerConfig(name="lat"))
            # connect first: a subscribe that opens the client's connection is sent twice
            # (once by the connect, which re-subscribes, once by the call) and refused
            await c2.streams()
            sub = await c2.subscribe("LAT", "lat", max_inflight=256)
            acks: set[asyncio.Task[Any]] = set()

            async def consume() -> None:
                async for msg in sub:
                    res.lat.append(since(msg.data))
                    t = asyncio.create_task(msg.ack())
                    acks.add(t)
                    t.add_done_callback(acks.discard)

            pump = asyncio.create_task(consume())
            sent = await paced(lambda d: c.publish(LAT_SUBJECT, d), seconds, res)
            await wait_count(lambda: len(res.lat), sent)
            res.lost = sent - len(res.lat)
            pump.cancel()
            await asyncio.gather(*acks, return_exceptions=True)
            await sub.close()
    finally:
        cluster.stop()
    return res


# -- Redis Streams -----------------------------------------------------------------------


def start_redis(fsync: str, base: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    base.mkdir(parents=True, exist_ok=True)
    cmd = ["redis-server", "--port", str(port), "--bind", LOOPBACK, "--save", ""]
    cmd += ["--dir", str(base)]
    if fsync == "always":
        cmd += ["--appendonly", "yes", "--appendfsync", "always"]
    else:
        cmd += ["--appendonly", "no"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, port


async def bench_redis(fsync: str, base: Path, seconds: float, n: int) -> Result:
    import redis.asyncio as redis

    res = Result()
    proc, port = start_redis(fsync, base)
    # Fixed pools, connected before measuring: redis-py opens a connection per concurrent
    # command when none is free, and a new one costs a handshake of several round trips.
    # 64 connections for the paced publisher: one command at a time per connection, so
    # with appendfsync always (an fsync per reply) fewer would throttle it below 1,000/s.
    r = redis.Redis(
        connection_pool=redis.BlockingConnectionPool(host=LOOPBACK, port=port, max_connections=64)
    )
    r2 = redis.Redis(
        connection_pool=redis.BlockingConnectionPool(host=LOOPBACK, port=port, max_connections=4)
    )
    try:
        await asyncio.gather(*(r.ping() for _ in range(64)), *(r2.ping() for _ in range(4)))
        payload = b"x" * SIZE
        per = INFLIGHT // REDIS_PIPELINES

        async def pub() -> int:
            pipe = r.pipeline(transaction=False)
            for _ in range(per):
                pipe.xadd("bench", {"d": payload})
            await pipe.execute()
            return per

        _, stored = await publish_load(pub, REDIS_PIPELINES, min(0.5, seconds / 4), res.errors)
        stored += await measured_publish(pub, REDIS_PIPELINES, seconds, [proc.pid], res)
        await top_up(pub, REDIS_PIPELINES, stored, n, res)

        await r.xgroup_create("bench", "drain", id="0")
        got = 0
        t0 = time.perf_counter()
        while got < n:
            resp = await r.xreadgroup("drain", "w1", {"bench": ">"}, count=min(BATCH, n - got))
            if not resp:
                res.errors.append(f"consume: stopped after {got} of {n}")
                break
            ids = [mid for mid, _ in resp[0][1]]
            await r.xack("bench", "drain", *ids)
            got += len(ids)
        res.drain = got / (time.perf_counter() - t0)

        await r.xgroup_create("lat", "lat", id="$", mkstream=True)
        acks: set[asyncio.Task[Any]] = set()

        stop = False

        async def consume() -> None:
            # stopped by a flag: cancelling a blocked XREADGROUP hangs redis-py (8.1)
            while not stop:
                resp = await r2.xreadgroup("lat", "w1", {"lat": ">"}, count=100, block=100)
                if not resp:
                    continue
                ids = []
                for mid, fields in resp[0][1]:
                    res.lat.append(since(fields[b"d"]))
                    ids.append(mid)
                t = asyncio.create_task(r2.xack("lat", "lat", *ids))
                acks.add(t)
                t.add_done_callback(acks.discard)

        pump = asyncio.create_task(consume())
        await asyncio.sleep(0.05)  # the first XREADGROUP is blocking on the server
        sent = await paced(lambda d: r.xadd("lat", {"d": d}), seconds, res)
        await wait_count(lambda: len(res.lat), sent)
        res.lost = sent - len(res.lat)
        stop = True
        await pump
        await asyncio.gather(*acks, return_exceptions=True)
    finally:
        for cl in (r, r2):
            with contextlib.suppress(Exception):
                await cl.aclose()
        stop_process(proc)
    return res


# -- NATS JetStream ----------------------------------------------------------------------


def start_nats(base: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = ["nats-server", "-js", "-sd", str(base), "-a", LOOPBACK, "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, port


async def bench_nats(base: Path, seconds: float, n: int) -> Result:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

    res = Result()
    proc, port = start_nats(base)
    url = f"nats://{LOOPBACK}:{port}"
    nc = nc2 = None
    try:
        nc = await nats.connect(url)
        nc2 = await nats.connect(url)
        js, js2 = nc.jetstream(), nc2.jetstream()
        for name, subj in (("BENCH", "bench.>"), ("LAT", "lat.>")):
            await js.add_stream(
                StreamConfig(name=name, subjects=[subj], storage=StorageType.FILE, num_replicas=1)
            )
        payload = b"x" * SIZE

        async def pub() -> int:
            await js.publish(SUBJECT, payload)
            return 1

        _, stored = await publish_load(pub, INFLIGHT, min(0.5, seconds / 4), res.errors)
        stored += await measured_publish(pub, INFLIGHT, seconds, [proc.pid], res)
        await top_up(pub, INFLIGHT, stored, n, res)

        psub = await js.pull_subscribe(
            SUBJECT,
            durable="drain",
            stream="BENCH",
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10_000),
        )
        got = 0
        t0 = time.perf_counter()
        while got < n:
            try:
                msgs = await psub.fetch(min(BATCH, n - got), timeout=2.0)
            except nats.errors.TimeoutError:
                res.errors.append(f"consume: stopped after {got} of {n}")
                break
            for m in msgs:
                await m.ack()
            got += len(msgs)
        await nc.flush()
        res.drain = got / (time.perf_counter() - t0)

        async def on_msg(msg: Any) -> None:
            res.lat.append(since(msg.data))
            await msg.ack()

        await js2.subscribe(
            LAT_SUBJECT,
            stream="LAT",
            durable="lat",
            cb=on_msg,
            manual_ack=True,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL),
        )
        sent = await paced(lambda d: js.publish(LAT_SUBJECT, d), seconds, res)
        await wait_count(lambda: len(res.lat), sent)
        res.lost = sent - len(res.lat)
    finally:
        for c in (nc, nc2):
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.close()
        stop_process(proc)
    return res


# -- main --------------------------------------------------------------------------------

SYSTEMS: dict[str, tuple[str, str, str]] = {
    # key: (label, replicas, fsync)
    "dsys-r1-always": ("dsys streams", "R1", "always"),
    "dsys-r3-always": ("dsys streams", "R3", "always"),
    "redis-always": ("Redis Streams", "R1", "always"),
    "dsys-r1-none": ("dsys streams", "R1", "none"),
    "dsys-r3-none": ("dsys streams", "R3", "none"),
    "redis-none": ("Redis Streams", "R1", "none"),
    "nats": ("NATS JetStream", "R1", "2-min sync"),
}


def run_one(key: str, base: Path, seconds: float, n: int) -> Result:
    if key.startswith("dsys"):
        _, r, fsync = key.split("-")
        return asyncio.run(bench_dsys(int(r[1:]), fsync, base, seconds, n))
    if key.startswith("redis"):
        return asyncio.run(bench_redis(key.split("-")[1], base, seconds, n))
    return asyncio.run(bench_nats(base, seconds, n))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round (< 1 minute)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", default="", help="comma-separated system keys (debugging)")
    args = parser.parse_args()
    # a SIGTERM unwinds like Ctrl-C, so every server started here is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = 1.0 if args.quick else 2.5
    n = 3_000 if args.quick else 20_000

    keys = [k for k in SYSTEMS if not args.only or k in args.only.split(",")]
    for binary, prefix in (("redis-server", "redis"), ("nats-server", "nats")):
        if shutil.which(binary) is None:
            print(f"skipping {prefix}: {binary} is not installed", file=sys.stderr)
            keys = [k for k in keys if not k.startswith(prefix)]
    results: dict[str, list[Result]] = {k: [] for k in keys}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        for rnd in range(rounds):
            order = keys[rnd % len(keys) :] + keys[: rnd % len(keys)]
            for k in order:
                t0 = time.perf_counter()
                res = run_one(k, Path(tmp) / f"{k}-{rnd}", seconds, n)
                res.p50, res.p99 = pct(res.lat, 0.5), pct(res.lat, 0.99)
                res.ack_p50, res.ack_p99 = pct(res.ack_lat, 0.5), pct(res.ack_lat, 0.99)
                results[k].append(res)
                print(
                    f"round {rnd + 1} {k:15s}: publish {res.pub:9,.0f}/s  "
                    f"p50 {res.p50:7.2f} ms  p99 {res.p99:7.2f} ms  "
                    f"consume {res.drain:9,.0f}/s  ({time.perf_counter() - t0:.1f} s)"
                    + (f"  ({len(res.errors)} errors: {res.errors[0]})" if res.errors else ""),
                    file=sys.stderr,
                )
    elapsed = time.perf_counter() - started
    print_table(results, rounds, seconds, n, elapsed, (load_before, os.getloadavg()[0]))
    return 0


def print_table(
    results: dict[str, list[Result]],
    rounds: int,
    seconds: float,
    n: int,
    elapsed: float,
    load: tuple[float, float],
) -> None:
    def med(k: str, attr: str) -> float:
        vals = [getattr(r, attr) for r in results[k]]
        return statistics.median(vals) if vals else float("nan")

    def ref(k: str) -> str:
        return "redis-always" if SYSTEMS[k][2] == "always" else "redis-none"

    def ratio(k: str, attr: str) -> str:
        if ref(k) not in results:
            return ""
        return f"{med(k, attr) / med(ref(k), attr):.2f}x"

    print()
    print(
        f"bench_streams: {SIZE}-byte messages; publish with {INFLIGHT} in flight for "
        f"{seconds:g} s; latency at {RATE:,} msg/s for {seconds:g} s (acks included); consume "
        f"{n:,} stored messages in batches of {BATCH} with acks; median of {rounds} round(s); "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.1f} before and {load[1]:.1f} after; "
        f"{elapsed:.0f} s"
    )
    print()
    print(
        "| system | replicas | fsync | publish msgs/s | vs Redis R1 | server CPU µs/msg "
        "| client CPU µs/msg | pub-ack p50 / p99 ms | p50 ms | p99 ms | consume msgs/s "
        "| vs Redis R1 |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    errors: list[str] = []
    for k in results:
        label, reps, fsync = SYSTEMS[k]
        lost = sum(r.lost for r in results[k])
        p99 = f"{med(k, 'p99'):.2f}" + (f" ({lost:,} lost)" if lost else "")
        print(
            f"| {label} | {reps} | {fsync} | {med(k, 'pub'):,.0f} | {ratio(k, 'pub')} | "
            f"{med(k, 'server_us'):.1f} | {med(k, 'client_us'):.1f} | "
            f"{med(k, 'ack_p50'):.2f} / {med(k, 'ack_p99'):.2f} | {med(k, 'p50'):.2f} | "
            f"{p99} | {med(k, 'drain'):,.0f} | {ratio(k, 'drain')} |"
        )
        for r in results[k]:
            errors += [f"{k}: {e}" for e in r.errors]
    print(
        "\n`vs Redis R1` compares with the Redis Streams row of the same durability (fsync "
        "always: appendfsync always; the others: Redis without AOF). p50/p99 are medians of "
        "each round's percentiles; `lost` counts messages not received within 10 s."
    )
    goals: list[str] = []
    for fsync in ("always", "none"):
        r1, r3, red = f"dsys-r1-{fsync}", f"dsys-r3-{fsync}", f"redis-{fsync}"
        if red not in results:
            continue
        base = med(red, "pub")
        if r3 in results:
            ok = med(r3, "pub") >= base
            goals.append(
                f"R3 >= Redis R1, fsync {fsync}: {med(r3, 'pub'):,.0f} vs {base:,.0f} "
                f"({med(r3, 'pub') / base:.2f}x): {'met' if ok else 'NOT met'}"
            )
        if r1 in results:
            ok = med(r1, "pub") >= 2 * base
            goals.append(
                f"R1 >= 2x Redis R1, fsync {fsync}: {med(r1, 'pub'):,.0f} vs {2 * base:,.0f} "
                f"({med(r1, 'pub') / base:.2f}x): {'met' if ok else 'NOT met'}"
            )
    for k in results:
        if k.startswith("dsys"):
            p99 = med(k, "p99")
            goals.append(
                f"p99 < 10 ms at {RATE:,} msg/s, {k}: {p99:.2f} ms: "
                f"{'met' if p99 < 10 else 'NOT met'}"
            )
    if goals:
        print("\nGoals (issue 12):")
        for line in goals:
            print(f"- {line}")
    if errors:
        print(f"\nERRORS ({len(errors)}):")
        for line in sorted(set(errors))[:20]:
            print(f"- {line}")


if __name__ == "__main__":
    sys.exit(main())
