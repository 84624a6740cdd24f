"""Background jobs: dsys.jobs (Redis and dsys backends) vs arq, RQ and saq, same redis-server.

Each system runs 4 worker processes with its default per-process concurrency (dsys 10,
arq ``max_jobs`` 10, saq ``concurrency`` 10, RQ's ``SimpleWorker`` one job at a time: RQ
has no in-process concurrency, and its default forking worker is slower still). Every job
is a no-op that pushes its enqueue-to-start delay (the producer stamps ``time.time()`` into
the job's argument; one machine, one clock) to a Redis list; the list's length tells the
producer when every job ran. Two measurements per system and round, rounds alternating
the order of systems:

* burst: enqueue N jobs (16 concurrent producers; RQ's synchronous client: one) with the
  workers running; jobs/s is N over the time from the first enqueue to the last start
  recorded, and its start-delay p50/p99 includes the queueing of the burst;
* paced: enqueue M jobs at a fixed rate the workers easily sustain; start delay p50/p99
  is then the dispatch latency (how soon an idle worker starts a new job).

Each system runs with its defaults: arq polls every 0.5 s, saq dequeues with a blocking
pop, RQ blocks on ``BLPOP``; dsys's Redis backend blocks in ``XREADGROUP``, its dsys
backend long-polls a stream consumer. The dsys backend runs on a one-node ``dsys streams
serve`` and ``dsys kv serve`` with ``--fsync none`` (the redis-server runs without
persistence too). Every run is bounded in time; a run that does not finish is reported.

Run: ``.venv/bin/python benchmarks/bench_jobs.py [--quick] [--rounds N] [--systems ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dsys.testing.procs import free_port, start_redis, stop_process, wait_healthy

SYSTEMS = ("dsys-redis", "dsys-streams", "arq", "rq", "saq")
WORKERS = 4
LAT_KEY = "bench:lat"
HERE = os.path.dirname(os.path.abspath(__file__))

# -- the tasks, one per system (run in the worker processes) -----------------------------

_redis: Any = None


def _aredis() -> Any:
    global _redis
    if _redis is None:
        import redis.asyncio as aioredis

        _redis = aioredis.Redis.from_url(os.environ["BENCH_REDIS"])
    return _redis


async def dsys_noop(t: float) -> None:
    """The dsys task (and arq's/saq's through the wrappers below)."""
    await _aredis().rpush(LAT_KEY, time.time() - t)


async def arq_noop(ctx: dict[str, Any], t: float) -> None:
    """arq calls tasks with a context first."""
    await _aredis().rpush(LAT_KEY, time.time() - t)


async def saq_noop(ctx: dict[str, Any], *, t: float) -> None:
    """saq passes keyword arguments only."""
    await _aredis().rpush(LAT_KEY, time.time() - t)


def rq_noop(t: float) -> None:
    """RQ's task is synchronous (imported by path: ``bench_jobs.rq_noop``)."""
    import redis

    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["BENCH_REDIS"])
    _redis.rpush(LAT_KEY, time.time() - t)


def run_worker(system: str, backend_url: str) -> None:
    """The worker process of one system (until SIGTERM)."""
    redis_url = os.environ["BENCH_REDIS"]
    print("ready", flush=True)
    if system == "rq":
        from redis import Redis
        from rq import Queue as RQQueue
        from rq.worker import SimpleWorker

        conn = Redis.from_url(redis_url)
        SimpleWorker([RQQueue("bench", connection=conn)], connection=conn).work(
            logging_level="WARNING", with_scheduler=False
        )
        return
    if system == "arq":
        from arq.connections import RedisSettings
        from arq.worker import Worker as ArqWorker

        ArqWorker(
            functions=[arq_noop],  # type: ignore[list-item]
            redis_settings=RedisSettings.from_dsn(redis_url),
            max_jobs=10,
            handle_signals=True,
        ).run()
        return
    asyncio.run(_async_worker(system, backend_url, redis_url))


async def _async_worker(system: str, backend_url: str, redis_url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if system == "saq":
        from saq import Queue as SaqQueue
        from saq import Worker as SaqWorker

        queue = SaqQueue.from_url(redis_url, name="bench")
        worker = SaqWorker(queue, functions=[("noop", saq_noop)], concurrency=10)
        task = asyncio.create_task(worker.start())
        await stop.wait()
        await worker.stop()
        task.cancel()
        return
    from dsys.jobs import Registry, Worker, WorkerConfig
    from dsys.jobs.backend import open_backend

    tasks = Registry()
    tasks.task(name="noop")(dsys_noop)
    backend = open_backend(backend_url)
    w = Worker(backend, tasks, WorkerConfig(concurrency=10, queue="bench"))
    run = asyncio.create_task(w.run())
    await stop.wait()
    w.stop()
    await run
    await backend.close()


# -- the producer side -------------------------------------------------------------------


@dataclass
class Result:
    """One system's figures of one round."""

    jobs_per_s: float | None = None
    burst_p50: float | None = None
    burst_p99: float | None = None
    p50: float | None = None
    p99: float | None = None


@dataclass
class Producer:
    """Enqueues ``noop`` jobs on one system."""

    system: str
    backend_url: str
    redis_url: str
    _client: Any = None
    _closers: list[Any] = field(default_factory=list)

    async def open(self) -> None:
        if self.system == "arq":
            from arq.connections import RedisSettings, create_pool

            self._client = await create_pool(RedisSettings.from_dsn(self.redis_url))
            self._closers.append(self._client.aclose)
        elif self.system == "saq":
            from saq import Queue as SaqQueue

            self._client = SaqQueue.from_url(self.redis_url, name="bench")
            await self._client.connect()
            self._closers.append(self._client.disconnect)
        elif self.system == "rq":
            from redis import Redis
            from rq import Queue as RQQueue

            self._client = RQQueue("bench", connection=Redis.from_url(self.redis_url))
        else:
            from dsys.jobs import Queue
            from dsys.jobs.backend import open_backend

            backend = open_backend(self.backend_url)
            self._client = Queue(backend, "bench")
            self._closers.append(backend.close)

    async def close(self) -> None:
        for c in self._closers:
            with contextlib.suppress(Exception):
                await c()

    async def enqueue(self) -> None:
        t = time.time()
        if self.system == "arq":
            await self._client.enqueue_job("arq_noop", t)
        elif self.system == "saq":
            await self._client.enqueue("noop", t=t)
        else:
            await self._client.enqueue("noop", t)

    def enqueue_sync(self) -> None:
        self._client.enqueue("bench_jobs.rq_noop", time.time())


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _wait_done(r: Any, n: int, deadline: float) -> bool:
    while await r.llen(LAT_KEY) < n:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True


async def measure(
    system: str, backend_url: str, redis_url: str, burst: int, paced: int, rate: float, limit: float
) -> Result:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    p = Producer(system, backend_url, redis_url)
    await p.open()
    res = Result()
    try:
        # warm-up: connections, scripts, consumer groups
        for _ in range(20):
            await (asyncio.to_thread(p.enqueue_sync) if system == "rq" else p.enqueue())
        if not await _wait_done(r, 20, time.monotonic() + limit):
            return res
        await r.delete(LAT_KEY)
        # burst
        t0 = time.perf_counter()
        deadline = time.monotonic() + limit
        if system == "rq":

            def produce() -> None:
                for _ in range(burst):
                    p.enqueue_sync()

            await asyncio.to_thread(produce)
        else:
            per = burst // 16

            async def producer(k: int) -> None:
                for _ in range(per + (1 if k < burst % 16 else 0)):
                    await p.enqueue()

            await asyncio.gather(*(producer(k) for k in range(16)))
        if not await _wait_done(r, burst, deadline):
            print(f"  {system}: burst did not finish in {limit:g} s", file=sys.stderr)
            return res
        elapsed = time.perf_counter() - t0
        lat = [float(x) for x in await r.lrange(LAT_KEY, 0, -1)]
        res.jobs_per_s = burst / elapsed
        res.burst_p50, res.burst_p99 = _pct(lat, 0.5) * 1000, _pct(lat, 0.99) * 1000
        await r.delete(LAT_KEY)
        # paced
        deadline = time.monotonic() + limit
        start = time.perf_counter()
        for i in range(paced):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await (asyncio.to_thread(p.enqueue_sync) if system == "rq" else p.enqueue())
        if not await _wait_done(r, paced, deadline):
            print(f"  {system}: paced run did not finish in {limit:g} s", file=sys.stderr)
            return res
        lat = [float(x) for x in await r.lrange(LAT_KEY, 0, -1)]
        res.p50, res.p99 = _pct(lat, 0.5) * 1000, _pct(lat, 0.99) * 1000
        return res
    finally:
        await p.close()
        await r.aclose()


@contextlib.contextmanager
def workers(system: str, backend_url: str, redis_url: str) -> Iterator[None]:
    env = {**os.environ, "BENCH_REDIS": redis_url, "DSYS_LOG_LEVEL": "warning"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH", "")) if p)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "bench_jobs.py"),
                "--role",
                "worker",
                "--system",
                system,
                "--backend",
                backend_url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=HERE,
        )
        for _ in range(WORKERS)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            proc.stdout.readline()
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            stop_process(proc, timeout=10)


@contextlib.contextmanager
def dsys_servers(tmp: str) -> Iterator[str]:
    procs = []
    addrs = []
    try:
        for block in ("streams", "kv"):
            addr = f"127.0.0.1:{free_port()}"
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "dsys",
                        block,
                        "serve",
                        "--id",
                        "n1",
                        "--listen",
                        addr,
                        "--data-dir",
                        os.path.join(tmp, block),
                        "--fsync",
                        "none",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "DSYS_LOG_LEVEL": "warning"},
                )
            )
            wait_healthy(addr, timeout=30)
            addrs.append(addr)
        yield f"dsys://{addrs[0]}?kv={addrs[1]}&stream=BENCH"
    finally:
        for proc in procs:
            stop_process(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per system")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--role", default="producer", help=argparse.SUPPRESS)
    parser.add_argument("--system", default="", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "worker":
        run_worker(args.system, args.backend)
        return
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    rounds = args.rounds or (1 if args.quick else 3)
    burst = 1_000 if args.quick else 10_000
    paced, rate = (200, 200.0) if args.quick else (1_000, 200.0)
    limit = 60.0 if args.quick else 180.0
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    results: dict[str, list[Result]] = {s: [] for s in args.systems}
    with start_redis(exe) as server, tempfile.TemporaryDirectory() as tmp:
        redis_url = f"redis://{server.addr}/0"
        with contextlib.ExitStack() as stack:
            dsys_url = (
                stack.enter_context(dsys_servers(tmp)) if "dsys-streams" in args.systems else ""
            )
            import redis as sync_redis

            flush = sync_redis.Redis.from_url(redis_url)
            for rnd in range(rounds):
                order = args.systems if rnd % 2 == 0 else list(reversed(args.systems))
                for system in order:
                    flush.flushall()
                    url = {"dsys-redis": f"{redis_url}?prefix=bench{rnd}:"}.get(system, "")
                    if system == "dsys-streams":
                        url = f"{dsys_url}&prefix=bench{rnd}/"
                        url = url.replace("stream=BENCH", f"stream=BENCH{rnd}")
                    with workers(system, url, redis_url):
                        r = asyncio.run(measure(system, url, redis_url, burst, paced, rate, limit))
                    results[system].append(r)
                    print(f"  round {rnd + 1} {system}: {r}", file=sys.stderr)
            flush.close()
    _table(results, rounds, burst, paced, rate)


def _med(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def _table(
    results: dict[str, list[Result]], rounds: int, burst: int, paced: int, rate: float
) -> None:
    print(
        f"\nbackground jobs: {burst:,} no-op jobs (burst) and {paced:,} at {rate:g}/s (paced), "
        f"{WORKERS} worker processes each; median of {rounds} alternating rounds; "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores\n"
    )

    def f(v: float | None, spec: str) -> str:
        return "timeout" if v is None else format(v, spec)

    ours = _med([r.jobs_per_s for r in results.get("dsys-redis", [])])
    print(
        "| system | jobs/s (burst) | burst start delay p50 / p99 ms "
        "| paced start delay p50 / p99 ms | dsys-redis jobs/s / this |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for system, rs in results.items():
        jps = _med([r.jobs_per_s for r in rs])
        ratio = f"{ours / jps:.2f}x" if ours and jps else "-"
        print(
            f"| {system} | {f(jps, ',.0f')} "
            f"| {f(_med([r.burst_p50 for r in rs]), '.1f')} / "
            f"{f(_med([r.burst_p99 for r in rs]), '.1f')} "
            f"| {f(_med([r.p50 for r in rs]), '.1f')} / {f(_med([r.p99 for r in rs]), '.1f')} "
            f"| {ratio} |"
        )


if __name__ == "__main__":
    main()
