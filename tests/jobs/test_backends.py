"""Queue and Worker behaviour on each backend, against real servers (see conftest)."""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dsys.errors import BadInputError
from dsys.jobs import CronJob, Queue, Registry, Worker, WorkerConfig, current_job, dsys_backend
from dsys.jobs.backend import Backend, Lease
from dsys.jobs.core import JobInfo, JobSpec, encode_spec
from dsys.ratelimit import Limiter, MemoryStore
from dsys.resilience.backoff import Backoff

from .conftest import LEASE, backend_url, make_backend

FAST = Backoff(initial=0.01, maximum=0.05, jitter="full")


def config(**kw: Any) -> WorkerConfig:
    kw.setdefault("poll", 0.2)
    kw.setdefault("backoff", FAST)
    kw.setdefault("concurrency", 4)
    return WorkerConfig(**kw)


async def until(cond: Callable[[], Any], limit: float = 20.0, step: float = 0.02) -> Any:
    """Poll ``cond`` (sync or async) until truthy; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {limit} s")
        await asyncio.sleep(step)


async def test_enqueue_run_complete_with_result_and_progress(backend: Backend) -> None:
    tasks = Registry()
    seen: list[tuple[str, int, int]] = []

    @tasks.task
    async def add(a: int, b: int, *, scale: int = 1) -> int:
        job = current_job()
        seen.append((job.job_id, job.attempt, job.tries))
        assert await job.set_progress({"step": 1, "of": 2})
        return (a + b) * scale

    q = Queue(backend, registry=tasks)
    r = await q.enqueue("add", 2, 3, scale=10, job_id="add-1")
    assert r.created and r.state == "queued"
    async with Worker(backend, tasks, config()):
        info = await q.wait("add-1", timeout=20)
    assert info.state == "succeeded" and info.result == 50
    assert info.progress == {"step": 1, "of": 2}
    assert (info.attempt, info.tries) == (1, 1) and seen == [("add-1", 1, 1)]
    assert info.enqueued_ms <= info.started_ms <= info.finished_ms
    assert info.error is None and info.worker


async def test_job_id_dedups_enqueue(backend: Backend) -> None:
    tasks = Registry()
    runs = Counter[str]()

    @tasks.task
    async def once(x: int) -> int:
        runs[current_job().job_id] += 1
        return x

    q = Queue(backend)
    first = await q.enqueue("once", 1, job_id="dup")
    second = await q.enqueue("once", 2, job_id="dup")
    assert first.created and not second.created and second.state == "queued"
    async with Worker(backend, tasks, config()):
        info = await q.wait("dup", timeout=20)
        third = await q.enqueue("once", 3, job_id="dup")
    assert not third.created and third.state == "succeeded"
    assert info.result == 1 and runs == {"dup": 1}


async def test_retries_with_backoff_then_dead_letter_then_requeue(backend: Backend) -> None:
    tasks = Registry()
    calls: list[int] = []
    healthy = False

    @tasks.task(retries=2, backoff=FAST)
    async def flaky() -> str:
        calls.append(current_job().tries)
        if not healthy:
            raise ValueError("downstream is down")
        return "ok"

    q = Queue(backend)
    await q.enqueue("flaky", job_id="f1")
    async with Worker(backend, tasks, config()) as worker:
        dead = await q.wait("f1", timeout=20)
        assert dead.state == "dead" and calls == [1, 2, 3]
        assert dead.tries == 3 and dead.attempt == 3
        assert dead.error is not None and "ValueError: downstream is down" in dead.error
        assert "after 3 tries" in dead.error
        assert [i.id async for i in q.list("dead")] == ["f1"]
        assert (worker.stats.retried, worker.stats.dead) == (2, 1)

        healthy = True
        assert await q.retry("f1") == "ok"
        assert await q.retry("f1") in ("wrong_state", "ok")  # maybe already running again
        again = await q.wait("f1", timeout=20)
    assert again.state == "succeeded" and again.result == "ok"
    assert again.tries == 1 and again.attempt == 4  # a fresh run; the fence keeps counting
    assert calls == [1, 2, 3, 1]
    assert [i.id async for i in q.list("dead")] == []
    assert await q.retry("f1") == "wrong_state"
    assert await q.retry("nope") == "not_found"


async def test_per_job_retries_override_the_task_default(backend: Backend) -> None:
    tasks = Registry()

    @tasks.task(retries=5)
    async def boom() -> None:
        raise RuntimeError("x")

    q = Queue(backend)
    await q.enqueue("boom", job_id="b0", retries=0)
    async with Worker(backend, tasks, config()):
        info = await q.wait("b0", timeout=20)
    assert info.state == "dead" and info.tries == 1


async def test_delayed_and_scheduled_jobs_wait_for_their_time(backend: Backend) -> None:
    tasks = Registry()

    @tasks.task
    async def now_ms() -> int:
        return int(time.time() * 1000)

    q = Queue(backend)
    soon = await q.enqueue("now_ms", job_id="later", delay=0.6)
    at = datetime.now(UTC) + timedelta(seconds=0.6)
    sched = await q.enqueue("now_ms", job_id="at", at=at)
    quick = await q.enqueue("now_ms", job_id="quick")
    assert (soon.state, sched.state, quick.state) == ("scheduled", "scheduled", "queued")
    info = await q.status("later")
    assert info is not None and info.not_before_ms >= info.enqueued_ms + 600
    async with Worker(backend, tasks, config()):
        done = {j: await q.wait(j, timeout=20) for j in ("later", "at", "quick")}
    assert all(i.state == "succeeded" for i in done.values())
    assert done["later"].result >= done["later"].enqueued_ms + 600
    assert done["at"].result >= int(at.timestamp() * 1000)
    with pytest.raises(BadInputError, match="timezone-aware"):
        await q.enqueue("now_ms", at=datetime(2030, 1, 1))
    with pytest.raises(BadInputError, match="delay"):
        await q.enqueue("now_ms", delay=-1)


async def test_priority_hands_out_higher_first(backend: Backend) -> None:
    q = Queue(backend)
    for i, prio in enumerate([0, 5, 9, 0, 9]):
        await q.enqueue("t", job_id=f"p{i}-{prio}", priority=prio)
    order = []
    for _ in range(10):
        for lease in await backend.fetch("default", "w", 1, 0.2):
            order.append(lease.spec.priority)
        if len(order) == 5:
            break
    assert order == [9, 9, 5, 0, 0]


async def test_cancel_queued_scheduled_and_running_jobs(backend: Backend) -> None:
    tasks = Registry()
    ran: list[str] = []
    started = asyncio.Event()
    interrupted = asyncio.Event()

    @tasks.task
    async def quick() -> None:
        ran.append(current_job().job_id)

    @tasks.task
    async def slow() -> None:
        ran.append(current_job().job_id)
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            interrupted.set()
            raise

    q = Queue(backend)
    await q.enqueue("quick", job_id="c-queued")
    await q.enqueue("quick", job_id="c-sched", delay=0.3)
    assert await q.cancel("c-queued") == "ok"
    assert await q.cancel("c-sched") == "ok"
    assert await q.cancel("c-sched") == "wrong_state"
    assert await q.cancel("missing") == "not_found"
    await q.enqueue("slow", job_id="c-run")
    await q.enqueue("quick", job_id="c-after", delay=0.5)
    async with Worker(backend, tasks, config()) as worker:
        await asyncio.wait_for(started.wait(), 20)
        assert await q.cancel("c-run") == "ok"
        await asyncio.wait_for(interrupted.wait(), 20)  # at the next heartbeat
        await q.wait("c-after", timeout=20)
        await until(lambda: worker.stats.cancelled == 1)
    for j in ("c-queued", "c-sched", "c-run"):
        info = await q.status(j)
        assert info is not None and info.state == "cancelled", j
    assert sorted(ran) == ["c-after", "c-run"]
    assert worker.stats.succeeded == 1  # the cancelled attempt could not complete
    # a cancelled job can be requeued
    assert await q.retry("c-queued") == "ok"
    async with Worker(backend, tasks, config()):
        assert (await q.wait("c-queued", timeout=20)).state == "succeeded"


async def test_results_expire_after_their_ttl_dead_letters_do_not(backend: Backend) -> None:
    tasks = Registry()

    @tasks.task(retries=0)
    async def echo(x: str) -> str:
        if x == "bad":
            raise ValueError(x)
        return x

    q = Queue(backend)
    await q.enqueue("echo", "hi", job_id="ttl-ok")
    await q.enqueue("echo", "bad", job_id="ttl-dead")
    async with Worker(backend, tasks, config(result_ttl=0.5)):
        await until(lambda: q.status("ttl-ok"))
        await q.wait("ttl-dead", timeout=20)
        await until(lambda: _is_none(q.status("ttl-ok")))
    dead = await q.status("ttl-dead")
    assert dead is not None and dead.state == "dead"


async def _is_none(coro: Any) -> bool:
    return (await coro) is None


async def test_a_stale_attempt_cannot_complete_or_renew(url: str) -> None:
    """Worker A leases a job and goes silent; after the lease B gets it with attempt 2.
    A's completion, heartbeat and progress are refused; B's completion counts."""
    a, b = make_backend(url), make_backend(url)
    try:
        q = Queue(a)
        await q.enqueue("t", 7, job_id="stale-1")
        (lease_a,) = await until(lambda: a.fetch("default", "wa", 1, 0.2))
        assert lease_a.attempt == 1
        (lease_b,) = await until(lambda: b.fetch("default", "wb", 1, 0.2), limit=10 * LEASE)
        assert (lease_b.attempt, lease_b.tries) == (2, 2)
        assert await a.complete(lease_a, b"\x01", 60) == "stale"
        assert await a.heartbeat([lease_a]) == ["stale"]
        assert await a.progress(lease_a, b"\x02") == "stale"
        assert await a.fail(lease_a, "late", None) == "stale"
        assert await b.heartbeat([lease_b]) == ["ok"]
        assert await b.complete(lease_b, b"\x03", 60) == "ok"
        info = await q.status("stale-1")
        assert info is not None and info.state == "succeeded" and info.result == 3
        assert await b.complete(lease_b, b"\x04", 60) == "stale"  # once only
    finally:
        await a.close()
        await b.close()


async def test_heartbeats_keep_a_long_job_leased(backend: Backend) -> None:
    tasks = Registry()
    starts = Counter[str]()

    @tasks.task
    async def long() -> str:
        starts[current_job().job_id] += 1
        await asyncio.sleep(4 * LEASE)
        return "done"

    q = Queue(backend)
    await q.enqueue("long", job_id="long-1")
    async with (
        Worker(backend, tasks, config(worker_id="w1")) as w1,
        Worker(backend, tasks, config(worker_id="w2")) as w2,
    ):
        info = await q.wait("long-1", timeout=30)
    assert info.state == "succeeded" and info.attempt == 1
    assert starts == {"long-1": 1}
    assert w1.stats.stale == w2.stats.stale == 0


async def test_unknown_task_and_unencodable_result_are_dead_lettered(backend: Backend) -> None:
    tasks = Registry()

    @tasks.task
    async def weird() -> object:
        return object()

    q = Queue(backend)
    await q.enqueue("nobody_has_this", job_id="u1")
    await q.enqueue("weird", job_id="u2")
    async with Worker(backend, tasks, config()):
        u1 = await q.wait("u1", timeout=20)
        u2 = await q.wait("u2", timeout=20)
    assert u1.state == "dead" and "unknown task 'nobody_has_this'" in (u1.error or "")
    assert u2.state == "dead" and "cannot be encoded" in (u2.error or "")
    assert u2.tries == 1  # retrying cannot help


async def test_a_try_longer_than_its_timeout_fails(backend: Backend) -> None:
    tasks = Registry()

    @tasks.task(retries=1, timeout=0.1, backoff=FAST)
    async def sleepy() -> None:
        await asyncio.sleep(30)

    q = Queue(backend)
    await q.enqueue("sleepy", job_id="to")
    async with Worker(backend, tasks, config()):
        info = await q.wait("to", timeout=20)
    assert info.state == "dead" and info.tries == 2
    assert "took longer than 0.1 s" in (info.error or "")


async def test_sync_tasks_run_in_a_thread(backend: Backend) -> None:
    tasks = Registry()

    @tasks.task
    def blocking(n: int) -> int:
        time.sleep(0.05)
        return n * 2

    q = Queue(backend)
    await q.enqueue(blocking, 21, job_id="sync")
    async with Worker(backend, tasks, config()):
        assert (await q.wait("sync", timeout=20)).result == 42


async def test_rate_limited_task_is_released_not_failed(backend: Backend) -> None:
    limiter = Limiter(rate=5, per=1.0, burst=1, store=MemoryStore())
    tasks = Registry()

    @tasks.task(retries=0, limiter=limiter)
    async def limited(i: int) -> int:
        return i

    q = Queue(backend)
    for i in range(4):
        await q.enqueue("limited", i, job_id=f"rl{i}")
    async with Worker(backend, tasks, config()) as worker:
        infos = [await q.wait(f"rl{i}", timeout=30) for i in range(4)]
    assert [i.state for i in infos] == ["succeeded"] * 4
    assert all(i.tries == 1 for i in infos)  # a denied start is not a try
    assert worker.stats.released >= 1 and limiter.denied_count >= 1


async def test_bad_input_is_refused_with_typed_errors(backend: Backend) -> None:
    tasks = Registry()

    @tasks.task
    async def known(x: object) -> None: ...

    q = Queue(backend, registry=tasks)
    with pytest.raises(BadInputError, match="unknown task 'unknown'"):
        await q.enqueue("unknown")
    with pytest.raises(BadInputError, match=r"argument 0 .* cannot be encoded"):
        await q.enqueue("known", {1, 2})
    with pytest.raises(BadInputError, match="keyword argument 'x'"):
        await q.enqueue("known", x=object())
    with pytest.raises(BadInputError, match="retries"):
        await q.enqueue("known", 1, retries=-1)
    with pytest.raises(BadInputError, match="timeout"):
        await q.enqueue("known", 1, timeout=-5)
    with pytest.raises(BadInputError, match="priority"):
        await q.enqueue("known", 1, priority=11)
    with pytest.raises(BadInputError, match="job id"):
        await q.enqueue("known", 1, job_id="has space")
    with pytest.raises(BadInputError, match="only final jobs"):
        await q.purge(["queued"])
    assert await q.count() == 0  # nothing was stored


async def test_purge_removes_final_jobs_only(backend: Backend) -> None:
    tasks = Registry()

    @tasks.task(retries=0)
    async def maybe(ok: bool) -> None:
        if not ok:
            raise ValueError("no")

    q = Queue(backend)
    await q.enqueue("maybe", True, job_id="pg-ok")
    await q.enqueue("maybe", False, job_id="pg-dead")
    await q.enqueue("maybe", True, job_id="pg-later", delay=60)
    async with Worker(backend, tasks, config()):
        await q.wait("pg-ok", timeout=20)
        await q.wait("pg-dead", timeout=20)
    assert await q.purge(["dead"]) == 1
    assert await q.status("pg-dead") is None
    assert await q.purge(["succeeded", "cancelled"]) == 1
    ids = sorted([i.id async for i in q.list()])
    assert ids == ["pg-later"]


async def test_cron_runs_on_one_elected_scheduler(url: str) -> None:
    """Two workers offer the same schedule; one holds the lease and enqueues each fire
    once. When it stops, the other takes over and continues without duplicates."""
    fake_now = [datetime(2026, 12, 3, 12, 0, 30, tzinfo=UTC).timestamp()]
    tasks = Registry()
    fired: list[str] = []

    @tasks.task
    async def tick() -> None:
        fired.append(current_job().job_id)

    cron = (CronJob(name="every-minute", expr="* * * * *", task="tick"),)
    b1, b2 = make_backend(url), make_backend(url)
    try:
        cfg = {"cron": cron, "scheduler_lease": 1.0, "cron_catchup": 0.0}
        w1 = Worker(b1, tasks, config(worker_id="c1", **cfg), wallclock=lambda: fake_now[0])
        w2 = Worker(b2, tasks, config(worker_id="c2", **cfg), wallclock=lambda: fake_now[0])
        async with w2:
            async with w1:
                leader = await until(lambda: [w for w in (w1, w2) if w.is_scheduler], limit=10)
                assert len(leader) == 1
                fake_now[0] += 180  # 12:03:30: fires 12:01, 12:02, 12:03
                await until(lambda: len(fired) == 3)
                assert [w.is_scheduler for w in (w1, w2)].count(True) == 1
            # w1 stopped; if it was the scheduler, w2 takes over once the lease ends
            await until(lambda: w2.is_scheduler, limit=10)
            fake_now[0] += 120  # 12:05:30: fires 12:04, 12:05
            await until(lambda: len(fired) == 5)
            await asyncio.sleep(0.5)  # a duplicate would have been enqueued by now
        q = Queue(b1)
        infos = [await q.status(f"cron:every-minute:20261203T120{m}Z") for m in range(1, 6)]
    finally:
        await b1.close()
        await b2.close()
    assert sorted(fired) == [f"cron:every-minute:20261203T120{m}Z" for m in range(1, 6)]
    assert all(i is not None and i.state == "succeeded" for i in infos)
    assert w1.stats.cron_enqueued + w2.stats.cron_enqueued == 5


async def test_concurrent_workers_run_every_job_exactly_once_without_failures(
    backend: Backend, url: str
) -> None:
    tasks = Registry()
    runs = Counter[str]()

    @tasks.task
    async def noop(i: int) -> int:
        await asyncio.sleep(random.random() / 100)
        runs[current_job().job_id] += 1
        return i

    q = Queue(backend)
    for i in range(60):
        await q.enqueue("noop", i, job_id=f"n{i}")
    others = [make_backend(url) for _ in range(2)]
    try:
        async with (
            Worker(backend, tasks, config(concurrency=8)),
            Worker(others[0], tasks, config(concurrency=8)),
            Worker(others[1], tasks, config(concurrency=8)),
        ):
            infos: list[JobInfo] = [await q.wait(f"n{i}", timeout=30) for i in range(60)]
    finally:
        for o in others:
            await o.close()
    assert all(i.state == "succeeded" and i.attempt == 1 for i in infos)
    assert runs == {f"n{i}": 1 for i in range(60)}


async def test_fetch_skips_what_was_cancelled_after_it_was_published(backend: Backend) -> None:
    spec = JobSpec(id="raw", task="t")
    r = await backend.enqueue(spec, encode_spec(spec), delay=0, at_ms=0)
    assert r.created
    assert await backend.cancel("raw") == "ok"
    assert await backend.fetch("default", "w", 5, 0.1) == []
    lease = Lease(spec, 1, 1, "1-0:1", 0, "w")
    assert await backend.complete(lease, b"", 60) == "stale"


async def test_stop_lets_running_jobs_finish_and_takes_no_new_ones(backend: Backend) -> None:
    tasks = Registry()
    started = asyncio.Event()
    ran: list[str] = []

    @tasks.task
    async def job(seconds: float) -> None:
        ran.append(current_job().job_id)
        started.set()
        await asyncio.sleep(seconds)

    q = Queue(backend)
    await q.enqueue("job", 0.5, job_id="first")
    worker = Worker(backend, tasks, config(concurrency=1))
    run = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 20)
    await q.enqueue("job", 0.0, job_id="second")
    worker.stop()
    await asyncio.wait_for(run, 30)
    first, second = await q.status("first"), await q.status("second")
    assert first is not None and first.state == "succeeded"
    assert second is not None and second.state == "queued" and ran == ["first"]


async def test_dsys_listing_pages_through_kv_scans_without_a_cap(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing, counting and purging see every record, past any one scan page."""
    monkeypatch.setattr(dsys_backend, "_SCAN_PAGE", 2)  # many pages from a few jobs
    backend = make_backend(backend_url("dsys", request))
    try:
        q = Queue(backend)
        ids = [f"pager-{i}" for i in range(7)]
        for job_id in ids:
            await q.enqueue("known", 1, job_id=job_id, delay=600)
        assert await q.count() == 7
        assert sorted([i.id async for i in q.list(page=3)]) == ids
        assert [i.id for i in await backend.list_jobs(q.name, None, 2, 3)] == sorted(
            ids, key=lambda j: (zlib.crc32(j.encode()) % 16, j)
        )[2:5]
        for job_id in ids:
            assert await q.cancel(job_id) == "ok"
        assert await q.purge(["cancelled"]) == 7
        assert await q.count() == 0
    finally:
        await backend.close()
