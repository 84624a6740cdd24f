"""`make demo`: the dsys showcase, run end to end on 127.0.0.1.

A small market-data system assembled only from dsys pieces, each running as its own
real process where a user would run one:

1. shard routing: plan what moves when a node joins;
2. pub/sub: a broker process, wildcard subscribers, a queue group of order workers;
3. rate limiting: three limiter nodes sharing one limit across app instances;
4. Raft KV store: a 3-node cluster of processes with write-ahead logs; the leader is
   killed with SIGKILL mid-run, a new one takes over, no acknowledged write is lost;
4b. durable streams: a 3-process stream cluster; a consumer works through an order
   stream, the leader is killed mid-way, the consumer carries on from its acked floor;
5. load balancing: a reverse-proxy process (p2c-ewma) over three quote services, one
   of them slow, then one killed mid-run;
6. circuit breaker: calls to a quote service that goes down and comes back;
7. the example apps, briefly: chat, stock trading and a shop, each a multi-process
   system built only from these blocks (``make chat``, ``make trading``, ``make shop``
   run them until Ctrl-C).
 Every server started here is stopped at the end, whatever
happens; the demo stops by itself within a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web

from dsys.errors import CircuitOpenError, ConflictError
from dsys.kv import KVClient
from dsys.observability import configure_logging, start_site
from dsys.pubsub import Client, Msg
from dsys.ratelimit import ClusterStore, Limiter
from dsys.resilience import CircuitBreaker, CountWindow
from dsys.streams import ConsumerConfig, StreamConfig
from dsys.streams.client import StreamClient

PY = sys.executable
PROCS: list[subprocess.Popen[bytes]] = []


def say(text: str) -> None:
    """Print a demo headline."""
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def port_near(preferred: int) -> int:
    """The preferred default port when it is free, else any free loopback port.

    ``DSYS_DEMO_ANY_PORT=1`` skips the defaults (for tests running in parallel).
    """
    candidates = (0,) if os.environ.get("DSYS_DEMO_ANY_PORT") == "1" else (preferred, 0)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


def spawn(*args: str) -> subprocess.Popen[bytes]:
    """Start `python -m dsys ARGS` quietly; it is killed when the demo ends."""
    env = {**os.environ, "DSYS_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [PY, "-m", "dsys", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    PROCS.append(proc)
    return proc


async def wait_healthy(url: str, limit: float = 15.0) -> None:
    """Poll GET url/healthz until it answers 200 (for at most ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not become healthy in {limit} s")
            await asyncio.sleep(0.1)


@contextlib.contextmanager
def processes() -> Iterator[None]:
    """Kill every spawned process on the way out."""
    try:
        yield
    finally:
        for proc in PROCS:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# -- 1. sharding -------------------------------------------------------------------------


def demo_sharding() -> None:
    say("1. Shard routing: 1024 shards x 2 replicas on n1..n3, then n4 joins")
    subprocess.run(
        [PY, "-m", "dsys", "shard", "rebalance", "--nodes", "n1,n2,n3", "--add", "n4",
         "--shards", "1024", "--replicas", "2", "--keys", "200000", "--show", "3"],
        check=True,
    )  # fmt: skip


# -- 2. pub/sub --------------------------------------------------------------------------


async def demo_pubsub() -> None:
    port = port_near(7201)
    say(f"2. Pub/sub: a broker process on 127.0.0.1:{port}")
    spawn("pubsub", "serve", "--listen", f"127.0.0.1:{port}")
    await wait_healthy(f"http://127.0.0.1:{port}")
    servers = [f"127.0.0.1:{port}"]
    async with Client(servers, name="exchange") as feed, Client(servers, name="desk") as desk:
        everything = await desk.subscribe("prices.>")
        infy_anywhere = await desk.subscribe("prices.*.INFY")
        handled: Counter[str] = Counter()
        workers = [Client(servers, name=f"worker-{i}") for i in range(3)]
        for i, worker in enumerate(workers):

            async def handle(msg: Msg, name: str = f"worker-{i}") -> None:
                handled[name] += 1

            await worker.connect()
            await worker.subscribe("orders.new", queue="order-workers", cb=handle)
        ticks = [("NSE", "INFY", "1523.50"), ("NSE", "TCS", "3410.00"), ("BSE", "INFY", "1523.55")]
        for exchange, symbol, price in ticks:
            await feed.publish(f"prices.{exchange}.{symbol}", price.encode())
        for i in range(30):
            await feed.publish("orders.new", f"order-{i}".encode())
        await feed.flush()
        for _ in ticks:
            msg = await everything.next_msg(timeout=5)
            print(f"  prices.>        got {msg.subject:18} {msg.data.decode()}")
        for _ in range(2):
            msg = await infy_anywhere.next_msg(timeout=5)
            print(f"  prices.*.INFY   got {msg.subject:18} {msg.data.decode()}")
        for worker in workers:
            await worker.drain()
        print(f"  30 orders shared by the queue group: {dict(sorted(handled.items()))}")


# -- 3. rate limiting --------------------------------------------------------------------


async def demo_ratelimit() -> None:
    ports = [port_near(7401 + i) for i in range(3)]
    nodes = [f"127.0.0.1:{p}" for p in ports]
    say(f"3. Rate limiting: 3 limiter nodes ({', '.join(nodes)}), 3 app instances")
    for node in nodes:
        spawn("ratelimit", "serve", "--listen", node)
    for node in nodes:
        await wait_healthy(f"http://{node}")
    # Three app instances, each with its own ClusterStore, share one limit of
    # 10 requests/s with a burst of 20 for the key "api-key-7".
    instances: Sequence[Limiter] = [
        Limiter(rate=10, per=1.0, burst=20, store=ClusterStore(nodes), name="orders")
        for _ in range(3)
    ]
    try:
        allowed = Counter[int]()
        for i in range(45):
            decision = await instances[i % 3].hit("api-key-7")
            allowed[i % 3] += decision.allowed
        owner = ClusterStore(nodes).owner("api-key-7")
        print(f"  key api-key-7 lives on {owner}; 45 requests spread over 3 instances")
        print(
            f"  allowed {sum(allowed.values())} (burst 20 + refill), refused "
            f"{45 - sum(allowed.values())}; per instance: {dict(allowed)}"
        )
        decision = await instances[0].hit("api-key-7")
        print(f"  next request: allowed={decision.allowed} retry_after={decision.retry_after:.2f}s")
    finally:
        for limiter in instances:
            await limiter.close()


# -- 4. Raft KV store ---------------------------------------------------------------------


async def start_cluster(
    block: str, addrs: dict[str, str]
) -> tuple[Path, dict[str, subprocess.Popen[bytes]]]:
    """Start ``dsys BLOCK serve`` for each node id -> address; wait until all are healthy."""
    data = Path(tempfile.mkdtemp(prefix=f"dsys-demo-{block}-"))
    procs = {}
    for node, addr in addrs.items():
        peers = [f"--peer={other}={peer}" for other, peer in addrs.items() if other != node]
        procs[node] = spawn(
            block, "serve", "--id", node, "--listen", addr, "--data-dir", str(data / node), *peers
        )
    for addr in addrs.values():
        await wait_healthy(f"http://{addr}")
    return data, procs


async def demo_kv() -> None:
    addrs = {f"n{i + 1}": f"127.0.0.1:{port_near(7101 + i)}" for i in range(3)}
    say(f"4. Raft KV store: 3 processes ({', '.join(addrs.values())}), fsync on every commit")
    data, procs = await start_cluster("kv", addrs)
    try:
        async with KVClient(list(addrs.values())) as kv:
            for symbol, price in [("INFY", b"1523.50"), ("TCS", b"3410.00")]:
                rev = await kv.put(f"prices/{symbol}", price)
                print(f"  put prices/{symbol} = {price.decode()}  -> revision {rev}")
            rev = await kv.cas("orders/1", b"open", revision=0)
            print(f"  cas orders/1 (must not exist) -> revision {rev}")
            try:
                await kv.cas("orders/1", b"open", revision=0)
            except ConflictError as exc:
                print(f"  cas orders/1 again -> ConflictError: {exc}")
            status = await kv.status(kv.leader)
            leader = status["leader"]
            print(f"  leader is {leader} (term {status['term']}); killing it with SIGKILL")
            os.killpg(procs[leader].pid, signal.SIGKILL)
            start = time.monotonic()
            acked = []
            for i in range(20):
                await kv.put(f"ticks/{i:02}", b"%d" % i)
                acked.append(i)
            status = await kv.status(kv.leader)
            print(
                f"  20 more writes acknowledged {time.monotonic() - start:.2f} s after the kill; "
                f"new leader {status['leader']} (term {status['term']})"
            )
            keys = [item.key for item in await kv.scan("ticks/")]
            got = await kv.get("prices/INFY")
            assert got is not None
            print(
                f"  scan ticks/ -> {len(keys)} keys, all acknowledged writes present: "
                f"{len(keys) == len(acked)}; prices/INFY = {got.value.decode()}"
            )
    finally:
        shutil.rmtree(data, ignore_errors=True)


async def demo_streams() -> None:
    addrs = {f"n{i + 1}": f"127.0.0.1:{port_near(7501 + i)}" for i in range(3)}
    say(f"4b. durable streams: 3 processes ({', '.join(addrs.values())}), Raft + fsync")
    data, procs = await start_cluster("streams", addrs)
    try:
        async with StreamClient(list(addrs.values()), timeout=15.0) as c:
            await c.add_stream(StreamConfig(name="ORDERS", subjects=("orders.>",)))
            acks = await asyncio.gather(
                *[c.publish(f"orders.NSE.{i}", b"order %d" % i) for i in range(100)]
            )
            print(f"  published 100 orders -> sequences {acks[0].seq}..{acks[-1].seq}")
            await c.add_consumer("ORDERS", ConsumerConfig(name="billing", ack_wait_ms=1000))
            processed: Counter[int] = Counter()
            for m in await c.fetch("ORDERS", "billing", batch=40, expires=2.0):
                processed[m.seq] += 1
                await m.ack()
            status = await c.status()
            leader = status["leader"]
            print(
                f"  billing processed and acked {len(processed)}; leader {leader} killed (SIGKILL)"
            )
            os.killpg(procs[leader].pid, signal.SIGKILL)
            start = time.monotonic()
            first_after = None
            while len(processed) < 100:
                for m in await c.fetch("ORDERS", "billing", batch=20, expires=2.0):
                    first_after = first_after or m.seq
                    processed[m.seq] += 1
                    await m.ack()
            info = await c.consumer_info("ORDERS", "billing")
            assert info is not None
            print(
                f"  consumer resumed at seq {first_after} on the new leader "
                f"({time.monotonic() - start:.2f} s); acked floor {info['ack_floor']}; "
                f"processed twice: {sum(1 for n in processed.values() if n > 1)}"
            )
    finally:
        shutil.rmtree(data, ignore_errors=True)


# -- 5. load balancing --------------------------------------------------------------------


async def start_quote_service(name: str, delay: float) -> tuple[web.AppRunner, int]:
    """A tiny quote service (an aiohttp app on a free port) answering after ``delay`` s."""
    state = {"down": False}

    async def quote(request: web.Request) -> web.Response:
        if state["down"]:
            return web.json_response({"error": "maintenance"}, status=503)
        await asyncio.sleep(delay)
        return web.json_response({"symbol": "INFY", "price": 1523.5, "served_by": name})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def toggle(request: web.Request) -> web.Response:
        state["down"] = request.query.get("down") == "1"
        return web.json_response(state)

    app = web.Application()
    app.router.add_get("/quote", quote)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/toggle", toggle)
    return await start_site(app, "127.0.0.1", 0)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def demo_balance() -> None:
    services = [
        await start_quote_service("quotes-a", 0.002),
        await start_quote_service("quotes-b", 0.002),
        await start_quote_service("quotes-c (slow, +50 ms)", 0.050),
    ]
    port = port_near(7301)
    say(f"5. Load balancing: a proxy process on 127.0.0.1:{port}, strategy p2c-ewma")
    backends = [arg for _, p in services for arg in ("--backend", f"http://127.0.0.1:{p}")]
    spawn("lb", "serve", "--listen", f"127.0.0.1:{port}", "--strategy", "p2c-ewma", *backends)
    await wait_healthy(f"http://127.0.0.1:{port}/_dsys")
    url = f"http://127.0.0.1:{port}/quote"
    async with aiohttp.ClientSession() as http:

        async def one() -> tuple[str, float, int]:
            start = time.perf_counter()
            async with http.get(url) as resp:
                body = await resp.json()
                return body.get("served_by", "-"), time.perf_counter() - start, resp.status

        async def burst(n: int, concurrency: int = 10) -> list[tuple[str, float, int]]:
            results: list[tuple[str, float, int]] = []
            for _ in range(n // concurrency):
                results += await asyncio.gather(*(one() for _ in range(concurrency)))
            return results

        results = await burst(300)
        served = Counter(r[0] for r in results)
        latencies = [r[1] * 1000 for r in results]
        print(f"  300 requests: {dict(sorted(served.items()))}")
        print(
            f"  latency p50 {percentile(latencies, 0.5):.1f} ms, "
            f"p99 {percentile(latencies, 0.99):.1f} ms: the slow instance gets little traffic"
        )
        runner, killed = services[0]
        await runner.cleanup()
        results = await burst(200)
        statuses = Counter(r[2] for r in results)
        print(f"  quotes-a (:{killed}) stopped; next 200 requests -> statuses {dict(statuses)}")
    for runner, _ in services[1:]:
        await runner.cleanup()


# -- 5. circuit breaker ------------------------------------------------------------------


class QuoteServiceDown(Exception):
    """The quote service answered 5xx."""


async def demo_breaker() -> None:
    runner, port = await start_quote_service("quotes", 0.0)
    say("6. Circuit breaker: the quote service fails, the breaker opens, then recovers")
    breaker = CircuitBreaker(
        "quotes", failure_rate_threshold=50, window=CountWindow(size=10), minimum_calls=5,
        open_wait=0.5, permitted_calls_in_half_open=2,
    )  # fmt: skip
    breaker.add_listener(
        lambda _, t: print(f"  breaker: {t.from_state.value} -> {t.to_state.value} ({t.reason})")
    )
    base = f"http://127.0.0.1:{port}"
    outcomes: Counter[str] = Counter()
    async with aiohttp.ClientSession() as http:

        async def get_quote() -> None:
            async with http.get(f"{base}/quote") as resp:
                if resp.status >= 500:
                    raise QuoteServiceDown(f"quote service answered {resp.status}")

        async def call() -> None:
            try:
                await breaker.call_async(get_quote)
                outcomes["ok"] += 1
            except QuoteServiceDown:
                outcomes["failed (reached the service)"] += 1
            except CircuitOpenError:
                outcomes["refused at once (breaker open)"] += 1

        await http.post(f"{base}/toggle?down=1")
        for _ in range(20):
            await call()
        print(f"  during the outage: {dict(outcomes)}")
        await http.post(f"{base}/toggle?down=0")
        await asyncio.sleep(0.6)  # the breaker's open wait
        outcomes.clear()
        for _ in range(10):
            await call()
        print(f"  after recovery: {dict(outcomes)}")
    await runner.cleanup()


async def amain() -> None:
    await demo_pubsub()
    await demo_ratelimit()
    await demo_kv()
    await demo_streams()
    await demo_balance()
    await demo_breaker()


EXAMPLES = [
    ("chat", "7a. Chat: 2 chat servers behind dsys lb, KV, streams, pub/sub", ["--seconds", "0"]),
    (
        "trading",
        "7b. Stock ticker and trading: feed, matchers, tickers, broker API",
        ["--seconds", "0"],
    ),
    (
        "shop",
        "7c. Shop: gateways, cart, orders saga, inventory, payment, delivery",
        ["--seconds", "0", "--kv-nodes", "1", "--stream-nodes", "1"],
    ),
]


def demo_examples() -> None:
    """Run each example app briefly (its own processes; it stops them itself)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "DSYS_LOG_LEVEL": "warning"}
    for module, title, args in EXAMPLES:
        say(title)
        try:
            out = subprocess.run(
                [PY, "-m", f"examples.{module}", *args],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            print(f"  examples.{module} did not finish in 120 s")
            continue
        lines = [
            ln
            for ln in out.stdout.splitlines()
            if ln.strip() and "==" not in ln and "in a browser" not in ln
        ]
        for line in lines:
            print("  " + line.strip())
        if out.returncode != 0:
            print(f"  examples.{module} exited with {out.returncode}: {out.stderr[-500:]}")


def main() -> int:
    """Run the showcase; returns the exit code."""
    configure_logging(level="error")
    print("dsys demo: a small market-data system on 127.0.0.1, built from dsys blocks")
    with processes():
        demo_sharding()
        asyncio.run(asyncio.wait_for(amain(), timeout=120))
    demo_examples()
    say("done: every process stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
