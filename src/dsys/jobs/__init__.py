"""A background job queue: ``Queue``, ``@task``, ``Worker``, on Redis or on dsys itself.

::

    from dsys.jobs import Queue, Registry, Worker, WorkerConfig, current_job
    from dsys.jobs.redis_backend import RedisBackend

    tasks = Registry()

    @tasks.task(retries=3, timeout=30)
    async def send_email(to: str, subject: str) -> str:
        await current_job().set_progress(0.5)
        return "sent"

    async with RedisBackend("redis://127.0.0.1:6379/0") as backend:
        job = await Queue(backend).enqueue("send_email", "a@example.com", "hi", delay=5)
        await Worker(backend, tasks, WorkerConfig(concurrency=8)).run()

At-least-once delivery with leases renewed by heartbeat and fenced by attempt numbers,
retries with exponential backoff and jitter, dead letters, delayed and cron jobs, results
with a TTL, progress, cancel and per-task rate limits. The pure decisions live in
:mod:`dsys.jobs.core` and :mod:`dsys.jobs.cron`.
"""

from __future__ import annotations

from dsys.jobs.backend import Backend, Enqueued, Lease
from dsys.jobs.core import JobInfo, JobSpec, JobState
from dsys.jobs.cron import CronExpr, CronJob
from dsys.jobs.queue import Queue
from dsys.jobs.tasks import JobContext, Registry, TaskDef, current_job, default_registry, task
from dsys.jobs.worker import Worker, WorkerConfig, WorkerStats

__all__ = [
    "Backend",
    "CronExpr",
    "CronJob",
    "Enqueued",
    "JobContext",
    "JobInfo",
    "JobSpec",
    "JobState",
    "Lease",
    "Queue",
    "Registry",
    "TaskDef",
    "Worker",
    "WorkerConfig",
    "WorkerStats",
    "current_job",
    "default_registry",
    "task",
]
