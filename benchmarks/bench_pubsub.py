"""Pub/sub fan-out: dsys broker vs Redis pub/sub vs NATS, each through its Python client.

1 publisher, 10 subscribers (one connection each), 100-byte messages, all clients in this
process. Two measurements per system and round, rounds alternating between systems:

* throughput: publish N messages as fast as the client takes them; delivered msgs/s is
  the messages received by all subscribers over the time until the last one arrived;
* latency: publish at a fixed 1,000 msg/s; publish-to-receive p50/p99 over every
  delivery (the payload carries the send time; one process, one clock).

Servers: ``python -m dsys pubsub serve`` (subprocess), ``redis-server`` and
``nats-server`` from the system packages, each on a free loopback port. Clients:
``dsys.pubsub.Client``, redis-py asyncio, nats-py.

Run: ``.venv/bin/python benchmarks/bench_pubsub.py [--quick] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dsys.testing.procs import (
    ServerProcess,
    free_port,
    start_dsys,
    start_redis,
    stop_process,
    wait_port,
)

SUBJECT = "bench.data"
SUBSCRIBERS = 10
SIZE = 100
RATE = 1000


def start_broker() -> ServerProcess:
    return start_dsys("pubsub", "serve", "--listen", "127.0.0.1:0")


def start_nats() -> ServerProcess:
    port = free_port()
    proc = subprocess.Popen(
        ["nats-server", "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc=proc)
    except BaseException:
        stop_process(proc)
        raise
    return ServerProcess(proc, port)


@dataclass
class Harness:
    """Uniform face over the three clients: publish(bytes) and on_message callbacks."""

    publish: Callable[[bytes], Awaitable[None]]
    flush: Callable[[], Awaitable[None]]
    close: Callable[[], Awaitable[None]]
    handlers: list[Callable[[bytes], None]] = field(default_factory=list)


async def dsys_harness(port: int, deliver: list[Callable[[bytes], None]]) -> Harness:
    from dsys.pubsub import Client

    addr = [f"127.0.0.1:{port}"]
    pub = Client(addr)
    await pub.connect()
    subs = []
    tasks = []
    for handler in deliver:
        c = Client(addr)
        await c.connect()
        sub = await c.subscribe(SUBJECT)

        async def pump(sub: object = sub, handler: Callable[[bytes], None] = handler) -> None:
            async for msg in sub:  # type: ignore[attr-defined]
                handler(msg.data)

        tasks.append(asyncio.create_task(pump()))
        subs.append(c)

    async def publish(data: bytes) -> None:
        await pub.publish(SUBJECT, data)

    async def close() -> None:
        for t in tasks:
            t.cancel()
        for c in [pub, *subs]:
            await c.close(timeout=1)

    return Harness(publish, pub.flush, close)


async def redis_harness(port: int, deliver: list[Callable[[bytes], None]]) -> Harness:
    import redis.asyncio as redis

    pub = redis.Redis(host="127.0.0.1", port=port)
    conns = []
    tasks = []
    for handler in deliver:
        r = redis.Redis(host="127.0.0.1", port=port)
        ps = r.pubsub()
        await ps.subscribe(SUBJECT)
        await ps.get_message(timeout=1.0)  # the subscribe confirmation

        async def pump(ps: object = ps, handler: Callable[[bytes], None] = handler) -> None:
            async for msg in ps.listen():  # type: ignore[attr-defined]
                if msg["type"] == "message":
                    handler(msg["data"])

        tasks.append(asyncio.create_task(pump()))
        conns.append((r, ps))

    async def publish(data: bytes) -> None:
        await pub.publish(SUBJECT, data)

    async def flush() -> None:
        await pub.ping()

    async def close() -> None:
        for t in tasks:
            t.cancel()
        for r, ps in conns:
            with contextlib.suppress(Exception):
                await ps.aclose()
            await r.aclose()
        await pub.aclose()

    return Harness(publish, flush, close)


async def nats_harness(port: int, deliver: list[Callable[[bytes], None]]) -> Harness:
    import nats

    url = f"nats://127.0.0.1:{port}"
    pub = await nats.connect(url)
    subs = []
    for handler in deliver:
        nc = await nats.connect(url)

        async def cb(msg: object, handler: Callable[[bytes], None] = handler) -> None:
            handler(msg.data)  # type: ignore[attr-defined]

        await nc.subscribe(SUBJECT, cb=cb)
        await nc.flush()
        subs.append(nc)

    async def publish(data: bytes) -> None:
        await pub.publish(SUBJECT, data)

    async def close() -> None:
        for nc in [pub, *subs]:
            await nc.close()

    return Harness(publish, pub.flush, close)


HARNESSES = {"dsys": dsys_harness, "redis": redis_harness, "nats": nats_harness}


async def throughput(system: str, port: int, n: int) -> float:
    counts = [0] * SUBSCRIBERS
    done = asyncio.Event()
    target = n * SUBSCRIBERS
    total = [0]
    last = [0.0]

    def make(i: int) -> Callable[[bytes], None]:
        def handler(data: bytes) -> None:
            counts[i] += 1
            total[0] += 1
            if total[0] >= target:
                last[0] = time.perf_counter()
                done.set()

        return handler

    h = await HARNESSES[system](port, [make(i) for i in range(SUBSCRIBERS)])
    try:
        payload = b"x" * SIZE
        await h.flush()
        start = time.perf_counter()
        for _ in range(n):
            await h.publish(payload)
        await h.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60)
        end = last[0] if done.is_set() else time.perf_counter()
        return total[0] / (end - start)
    finally:
        await h.close()


async def latency(system: str, port: int, seconds: float) -> tuple[float, float]:
    lat: list[float] = []

    def handler(data: bytes) -> None:
        (sent,) = struct.unpack_from("!q", data)
        lat.append((time.perf_counter_ns() - sent) / 1e6)

    h = await HARNESSES[system](port, [handler] * SUBSCRIBERS)
    try:
        await h.flush()
        n = int(seconds * RATE)
        pad = b"p" * (SIZE - 8)
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await h.publish(struct.pack("!q", time.perf_counter_ns()) + pad)
        await h.flush()
        for _ in range(100):
            if len(lat) >= n * SUBSCRIBERS:
                break
            await asyncio.sleep(0.05)
    finally:
        await h.close()
    lat.sort()
    if not lat:
        return float("nan"), float("nan")
    return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    n = 5_000 if args.quick else 20_000
    seconds = 1.0 if args.quick else 3.0

    systems = ["dsys"]
    for name, binary in (("redis", "redis-server"), ("nats", "nats-server")):
        if shutil.which(binary) is None:
            print(f"skipping {name}: {binary} is not installed", file=sys.stderr)
        else:
            systems.append(name)
    starters = {"dsys": start_broker, "redis": start_redis, "nats": start_nats}
    servers = {s: starters[s]() for s in systems}
    results: dict[str, dict[str, list[float]]] = {
        s: {"tput": [], "p50": [], "p99": []} for s in systems
    }
    try:
        for r in range(rounds):
            order = systems[r % len(systems) :] + systems[: r % len(systems)]
            for s in order:
                tput = asyncio.run(throughput(s, servers[s].port, n))
                p50, p99 = asyncio.run(latency(s, servers[s].port, seconds))
                results[s]["tput"].append(tput)
                results[s]["p50"].append(p50)
                results[s]["p99"].append(p99)
                print(
                    f"round {r + 1} {s:5s}: {tput:10,.0f} delivered msgs/s, "
                    f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
                    file=sys.stderr,
                )
    finally:
        for server in servers.values():
            server.stop()

    med = {s: {k: statistics.median(v) for k, v in results[s].items()} for s in systems}
    print()
    print(
        f"1 publisher, {SUBSCRIBERS} subscribers, {SIZE}-byte messages; throughput over "
        f"{n:,} messages, latency at {RATE:,} msg/s for {seconds:g} s; median of {rounds} "
        f"round(s); {platform.python_implementation()} {platform.python_version()}"
    )
    print()
    print("| system (Python client) | delivered msgs/s | p50 ms | p99 ms | dsys/peer msgs/s |")
    print("|---|---:|---:|---:|---:|")
    base = med["dsys"]["tput"]
    for s in systems:
        label = {"dsys": "dsys broker (dsys.pubsub.Client)", "redis": "Redis pub/sub (redis-py)",
                 "nats": "NATS (nats-py)"}[s]  # fmt: skip
        ratio = "" if s == "dsys" else f"{base / med[s]['tput']:.2f}x"
        print(
            f"| {label} | {med[s]['tput']:,.0f} | {med[s]['p50']:.2f} | "
            f"{med[s]['p99']:.2f} | {ratio} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
