"""The consumer side: a :class:`Worker` leases jobs, runs their tasks and reports back.

::

    async with RedisBackend(url) as backend:
        worker = Worker(backend, tasks, WorkerConfig(concurrency=8))
        await worker.run()            # until worker.stop() or cancellation

Up to ``concurrency`` jobs run at once, each as its own asyncio task (a plain function
runs in a thread). While jobs run, one heartbeat every ``lease / 3`` seconds renews all
their leases at once; a job cancelled meanwhile is cancelled in its task, and a job whose
lease was lost (the worker was paused past the lease) is abandoned: another worker runs
it and this one's completion would be refused anyway. Each outcome is decided by
:mod:`dsys.jobs.core` and reported with the job's attempt, so the backend refuses the
reports of an attempt that is no longer current (counted in :attr:`WorkerStats.stale`).

With ``cron`` entries, the worker also competes for the queue's scheduler lease; the one
holding it enqueues each due fire of each entry under a deterministic job id
(``cron:<name>:<UTC minute>``), so even two schedulers overlapping at a lease hand-over
enqueue every fire once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from dsys.errors import ConfigError, DsysError
from dsys.jobs.backend import Backend, Lease
from dsys.jobs.core import (
    DEFAULT_BACKOFF,
    DeadLetter,
    RetryAt,
    check_queue_name,
    decide_failure,
    decide_start,
    encode_spec,
    encode_value,
    format_error,
)
from dsys.jobs.cron import CronJob
from dsys.jobs.tasks import JobContext, Registry, TaskDef, _current
from dsys.observability import Metrics, get_logger
from dsys.resilience.backoff import Backoff


def _positive(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or v == float("inf"):
        raise ConfigError(f"{name} must be a positive finite number, got {v!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerConfig:
    """How a :class:`Worker` runs.

    Args:
        queue: the queue to take jobs from.
        concurrency: jobs running at once (1..10,000).
        worker_id: this worker's name in the backend (default: host-pid-random).
        poll: longest wait for a job in one fetch, seconds (also bounds how late a
            delayed job may start).
        result_ttl: seconds a succeeded job's record (and result) is kept.
        backoff: delays between tries of tasks that name none.
        cron: schedules this worker may run when it holds the scheduler lease.
        scheduler_lease: seconds the scheduler lease lasts without renewal.
        cron_catchup: a new scheduler enqueues fires missed up to this many seconds back.
        shutdown_grace: seconds :meth:`Worker.stop` lets running jobs finish before it
            cancels them and gives them back.
    """

    queue: str = "default"
    concurrency: int = 10
    worker_id: str | None = None
    poll: float = 1.0
    result_ttl: float = 86_400.0
    backoff: Backoff = DEFAULT_BACKOFF
    cron: tuple[CronJob, ...] = ()
    scheduler_lease: float = 10.0
    cron_catchup: float = 60.0
    shutdown_grace: float = 30.0

    def __post_init__(self) -> None:
        check_queue_name(self.queue)
        if (
            isinstance(self.concurrency, bool)
            or not isinstance(self.concurrency, int)
            or not 1 <= self.concurrency <= 10_000
        ):
            raise ConfigError(
                f"concurrency must be an integer in 1..10000, got {self.concurrency!r}"
            )
        if self.worker_id is not None and (
            not isinstance(self.worker_id, str) or not 0 < len(self.worker_id) <= 200
        ):
            raise ConfigError(f"worker_id must be a non-empty string, got {self.worker_id!r}")
        for name in ("poll", "result_ttl", "scheduler_lease", "shutdown_grace"):
            _positive(name, getattr(self, name))
        if (
            isinstance(self.cron_catchup, bool)
            or not isinstance(self.cron_catchup, int | float)
            or not 0 <= self.cron_catchup <= 86_400
        ):
            raise ConfigError(f"cron_catchup must be in [0, 86400] s, got {self.cron_catchup!r}")
        if not isinstance(self.backoff, Backoff):
            raise ConfigError(f"backoff must be a Backoff, got {self.backoff!r}")
        names = [c.name for c in self.cron]
        if len(set(names)) != len(names):
            raise ConfigError(f"cron entries need distinct names, got {names}")


@dataclass(slots=True)
class WorkerStats:
    """Counters of one worker (plain ints, read them any time).

    Attributes:
        started: tries started.
        succeeded: completions accepted.
        retried: failures that will be retried.
        dead: jobs this worker moved to the dead letters.
        cancelled: running jobs cancelled by request.
        stale: reports refused because the attempt was no longer current.
        released: jobs given back without a try (rate limited, stopping).
        lost: running jobs abandoned because their lease was lost.
        cron_enqueued: cron fires this worker enqueued as scheduler.
        latencies_ms: enqueue-to-start latency of the last 10,000 starts.
    """

    started: int = 0
    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    cancelled: int = 0
    stale: int = 0
    released: int = 0
    lost: int = 0
    cron_enqueued: int = 0
    latencies_ms: list[int] = field(default_factory=list)


class Worker:
    """Runs jobs of one queue (see the module docstring).

    Args:
        backend: where jobs are leased from.
        registry: the tasks this worker can run; a job naming another task is
            dead-lettered ("unknown task").
        config: see :class:`WorkerConfig`.
        rng: randomness for backoff jitter (seed it in tests).
        wallclock: seconds since the epoch (``time.time``); cron schedules use it.
        metrics: where to count ``dsys_jobs_*`` metrics (optional).
    """

    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        config: WorkerConfig | None = None,
        *,
        rng: random.Random | None = None,
        wallclock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.backend = backend
        self.registry = registry
        self.config = config if config is not None else WorkerConfig()
        self.id = self.config.worker_id or (
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.stats = WorkerStats()
        self.is_scheduler = False
        self._rng = rng if rng is not None else random.Random()
        self._wallclock = wallclock
        self._running: dict[asyncio.Task[None], Lease] = {}
        self._abandoned: set[asyncio.Task[None]] = set()
        self._cancelled: set[asyncio.Task[None]] = set()
        self._free = asyncio.Semaphore(self.config.concurrency)
        self._stopping = asyncio.Event()
        self._log = get_logger("jobs", worker=self.id, queue=self.config.queue)
        self._cron_last: dict[str, datetime] = {}
        self.crons: tuple[CronJob, ...] = (*self.config.cron, *registry.crons)
        names = [c.name for c in self.crons]
        if len(set(names)) != len(names):
            raise ConfigError(f"cron schedules need distinct names, got {names}")
        self._task: asyncio.Task[None] | None = None
        self._finished = None
        if metrics is not None:
            self._finished = metrics.counter(
                "finished_total", "Tries finished, by outcome", labels=["outcome"]
            )

    # -- lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        """Take and run jobs until :meth:`stop` (or cancellation); then drain."""
        loops = [asyncio.create_task(self._heartbeat_loop(), name="dsys-jobs-heartbeat")]
        if self.crons:
            loops.append(asyncio.create_task(self._scheduler_loop(), name="dsys-jobs-cron"))
        try:
            await self._fetch_loop()
        finally:
            await self._drain()
            for t in loops:
                t.cancel()
            for t in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    def stop(self) -> None:
        """Ask :meth:`run` to stop taking jobs and return once running ones are done."""
        self._stopping.set()

    async def __aenter__(self) -> Worker:
        self._task = asyncio.create_task(self.run(), name=f"dsys-jobs-worker-{self.id}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()
        if self._task is not None:
            await self._task

    # -- fetching -------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        cfg = self.config
        errors = 0
        while not self._stopping.is_set():
            if not await self._slot_or_stop():
                break
            free = 1  # then take every free slot
            await asyncio.sleep(0)  # let jobs finishing in this iteration free theirs too
            while not self._free.locked():
                await self._free.acquire()
                free += 1
            leases: list[Lease] = []
            try:
                # not raced against stop(): a fetch returns within `poll` seconds, and a
                # cancelled one could strand jobs it already leased until their lease ends
                leases = await self.backend.fetch(cfg.queue, self.id, free, cfg.poll)
                errors = 0
            except DsysError as exc:
                errors += 1
                self._log.warning("fetch failed", error=str(exc))
                await self._sleep(min(5.0, 0.05 * 2**errors))
            finally:
                for _ in range(free - len(leases)):
                    self._free.release()
            self._start(leases)

    async def _slot_or_stop(self) -> bool:
        """Wait for a free slot (True, slot taken) or for :meth:`stop` (False)."""
        if not self._free.locked():
            await self._free.acquire()
            return True
        acquire = asyncio.ensure_future(self._free.acquire())
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if acquire.done():
            if self._stopping.is_set():
                self._free.release()
                return False
            return True
        acquire.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquire
            self._free.release()  # it was granted just as it was cancelled
        return False

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _start(self, leases: list[Lease]) -> None:
        now_ms = int(self._wallclock() * 1000)
        for lease in leases:
            self.stats.started += 1
            if lease.enqueued_ms:
                lat = self.stats.latencies_ms
                lat.append(max(0, now_ms - lease.enqueued_ms))
                if len(lat) > 10_000:
                    del lat[:5000]
            t = asyncio.create_task(self._run_one(lease), name=f"dsys-job-{lease.spec.id}")
            self._running[t] = lease
            t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[None]) -> None:
        self._running.pop(t, None)
        self._abandoned.discard(t)
        self._cancelled.discard(t)
        self._free.release()
        if not t.cancelled() and t.exception() is not None:
            self._log.error("job runner crashed", error=repr(t.exception()))

    async def _drain(self) -> None:
        if not self._running:
            return
        pending = set(self._running)
        _, pending = await asyncio.wait(pending, timeout=self.config.shutdown_grace)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)

    # -- running --------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        if self._finished is not None:
            self._finished.labels(outcome).inc()

    async def _report(self, what: str, coro: Any) -> None:
        try:
            outcome = await coro
        except DsysError as exc:
            # The backend is unreachable: the lease will expire and the job run again.
            self._log.warning("report failed", what=what, error=str(exc))
            return
        if outcome == "stale":
            self.stats.stale += 1
            self._count("stale")
            self._log.warning("report refused: the attempt is stale", what=what)
        elif what == "complete":
            self.stats.succeeded += 1
            self._count("succeeded")
        elif what == "retry":
            self.stats.retried += 1
            self._count("retried")
        elif what == "dead":
            self.stats.dead += 1
            self._count("dead")
        elif what == "release":
            self.stats.released += 1

    async def _run_one(self, lease: Lease) -> None:
        spec = lease.spec
        task = self.registry.get(spec.task)
        if task is None:
            known = ", ".join(self.registry.names()[:20]) or "none"
            await self._report(
                "dead",
                self.backend.fail(
                    lease, f"unknown task {spec.task!r} (this worker knows: {known})", None
                ),
            )
            return
        retries = spec.retries if spec.retries is not None else task.retries
        start = decide_start(tries=lease.tries, retries=retries)
        if isinstance(start, DeadLetter):
            await self._report("dead", self.backend.fail(lease, start.reason, None))
            return
        if task.limiter is not None:
            try:
                decision = await task.limiter.hit(spec.task)
            except DsysError as exc:  # fail-closed limiter refused: try again soon
                await self._report("release", self.backend.release(lease, 1.0))
                self._log.warning("rate limiter failed", task=spec.task, error=str(exc))
                return
            if not decision.allowed:
                await self._report(
                    "release", self.backend.release(lease, max(0.001, decision.retry_after))
                )
                return
        me = asyncio.current_task()
        try:
            await self._execute(task, lease, retries)
        except asyncio.CancelledError:
            # cancelled by a heartbeat's answer, while running or while reporting
            if me in self._cancelled:
                self.stats.cancelled += 1
                self._count("cancelled")
                return  # the backend already holds it as cancelled
            if me in self._abandoned:
                self.stats.lost += 1
                self._count("lost")
                return  # another attempt holds it now; a report would be refused
            raise

    async def _execute(self, task: TaskDef, lease: Lease, retries: int) -> None:
        spec = lease.spec
        timeout = spec.timeout if spec.timeout is not None else task.timeout
        me = asyncio.current_task()
        token = _current.set(JobContext(self.backend, lease, self.id))
        error: str
        try:
            async with asyncio.timeout(timeout) as cm:
                if task.is_async:
                    result = await task.fn(*spec.args, **spec.kwargs)
                else:
                    result = await asyncio.to_thread(task.fn, *spec.args, **spec.kwargs)
        except asyncio.CancelledError:
            if me in self._cancelled or me in self._abandoned:
                raise  # counted by _run_one
            # the worker is stopping: give the job back without counting the try
            with contextlib.suppress(DsysError):
                await asyncio.shield(self.backend.release(lease, 0.0))
            self.stats.released += 1
            raise
        except TimeoutError as exc:
            if cm.expired():
                error = f"TimeoutError: the try took longer than {timeout:g} s"
            else:
                error = format_error(exc)
        except Exception as exc:
            error = format_error(exc)
        else:
            try:
                data = encode_value(result, f"the result of job {spec.id!r} ({spec.task})")
            except DsysError as exc:
                # retrying cannot make the result encodable
                await self._report("dead", self.backend.fail(lease, str(exc), None))
                return
            await self._report(
                "complete", self.backend.complete(lease, data, self.config.result_ttl)
            )
            return
        finally:
            _current.reset(token)
        backoff = task.backoff if task.backoff is not None else self.config.backoff
        decision = decide_failure(
            tries=lease.tries, retries=retries, error=error, backoff=backoff, rng=self._rng
        )
        if isinstance(decision, RetryAt):
            await self._report("retry", self.backend.fail(lease, error, decision.delay))
        else:
            self._log.info("job dead-lettered", job=spec.id, reason=decision.reason)
            await self._report("dead", self.backend.fail(lease, decision.reason, None))

    # -- heartbeats -----------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            # read each time: a backend may adopt the lease its queue already has
            await asyncio.sleep(self.backend.lease / 3)
            running = [(t, lease) for t, lease in self._running.items() if not t.done()]
            if not running:
                continue
            try:
                outcomes = await self.backend.heartbeat([lease for _, lease in running])
            except DsysError as exc:
                self._log.warning("heartbeat failed", error=str(exc))
                continue
            for (t, lease), outcome in zip(running, outcomes, strict=True):
                if outcome == "cancelled":
                    self._log.info("job cancelled while running", job=lease.spec.id)
                    self._cancelled.add(t)
                    t.cancel()
                elif outcome == "stale":
                    self._log.warning("lease lost; abandoning the job", job=lease.spec.id)
                    self._abandoned.add(t)
                    t.cancel()

    # -- cron -----------------------------------------------------------------------

    async def _scheduler_loop(self) -> None:
        cfg = self.config
        name = f"scheduler:{cfg.queue}"
        every = min(1.0, cfg.scheduler_lease / 3)
        while True:
            try:
                held = await self.backend.hold_lease(name, self.id, cfg.scheduler_lease)
                if held and not self.is_scheduler:
                    self._log.info("became the cron scheduler")
                    start = datetime.fromtimestamp(self._wallclock() - cfg.cron_catchup, UTC)
                    self._cron_last = {c.name: start for c in self.crons}
                self.is_scheduler = held
                if held:
                    await self.tick_cron()
            except DsysError as exc:
                self._log.warning("scheduler step failed", error=str(exc))
            await asyncio.sleep(every)

    async def tick_cron(self) -> int:
        """Enqueue every cron fire due since the last tick (only call as scheduler);
        returns how many jobs were created."""
        now = datetime.fromtimestamp(self._wallclock(), UTC)
        created = 0
        for c in self.crons:
            last = self._cron_last.get(c.name, now - timedelta(seconds=self.config.cron_catchup))
            for fire in c.schedule.fires_between(last, now, limit=100):
                spec = c.spec_for(fire, self.config.queue)
                r = await self.backend.enqueue(spec, encode_spec(spec), delay=0.0, at_ms=0)
                if r.created:
                    created += 1
                    self.stats.cron_enqueued += 1
                self._cron_last[c.name] = fire
        return created


__all__ = ["Worker", "WorkerConfig", "WorkerStats"]
