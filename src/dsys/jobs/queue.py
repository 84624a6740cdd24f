"""The producer side: :class:`Queue` enqueues jobs and inspects, cancels and requeues them.

::

    async with RedisBackend("redis://127.0.0.1:6379/0") as backend:
        queue = Queue(backend)
        job = await queue.enqueue("resize", "cat.png", 640, delay=10, job_id="resize-cat")
        info = await queue.wait(job.id, timeout=60)
        print(info.state, info.result)
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

from dsys.errors import BadInputError, ConfigError, RequestTimeout
from dsys.jobs.backend import AdminOutcome, Backend, Enqueued
from dsys.jobs.core import (
    FINAL_STATES,
    JobInfo,
    JobSpec,
    JobState,
    check_delay,
    check_job_id,
    check_priority,
    check_queue_name,
    check_retries,
    check_timeout,
    encode_spec,
)
from dsys.jobs.tasks import Registry, TaskDef, resolve


def _epoch_ms(at: datetime | float) -> int:
    if isinstance(at, datetime):
        if at.tzinfo is None:
            raise BadInputError(
                f"at= needs a timezone-aware datetime (e.g. datetime.now(UTC)), got {at!r}"
            )
        return int(at.timestamp() * 1000)
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) or at < 0:
        raise BadInputError(f"at= must be an aware datetime or epoch seconds, got {at!r}")
    return int(at * 1000)


class Queue:
    """Enqueue jobs on one named queue of a backend, and look after them.

    Args:
        backend: where jobs live (:class:`~dsys.jobs.redis_backend.RedisBackend`,
            :class:`~dsys.jobs.dsys_backend.DsysBackend`).
        name: the queue (workers of this queue run its jobs).
        registry: when given, enqueue refuses task names it does not know.

    Raises:
        ConfigError: a bad queue name.
    """

    def __init__(
        self, backend: Backend, name: str = "default", *, registry: Registry | None = None
    ) -> None:
        self.backend = backend
        self.name = check_queue_name(name)
        self.registry = registry

    async def enqueue(
        self,
        fn_name: str | TaskDef | Callable[..., Any],
        /,
        *args: Any,
        delay: float | None = None,
        at: datetime | float | None = None,
        job_id: str | None = None,
        priority: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109 - the job's timeout, not this call's
        retries: int | None = None,
        **kwargs: Any,
    ) -> Enqueued:
        """Enqueue a call of the task ``fn_name`` with ``args`` and ``kwargs``.

        Arguments must be msgpack-encodable (None, bool, int, float, str, bytes, lists and
        dicts of them); tuples arrive as lists.

        Args:
            fn_name: the task's registered name (or the decorated function itself, whose
                ``__name__`` is used).
            delay: run no sooner than this many seconds from now.
            at: run no sooner than this time (aware datetime or epoch seconds).
            job_id: the job's id; enqueueing an id that exists adds nothing and answers
                ``created=False`` (idempotent enqueue). Default: a random id.
            priority: 0..9, higher runs first.
            timeout: seconds one try may take (default: the task's).
            retries: retries after the first try (default: the task's).

        Returns:
            :class:`~dsys.jobs.backend.Enqueued` (id, whether it was created, state).

        Raises:
            BadInputError: unknown task (with a registry), arguments msgpack cannot
                encode, a bad id, priority, delay, timeout or retry count.
        """
        if isinstance(fn_name, TaskDef):
            name = fn_name.name
        elif isinstance(fn_name, str):
            name = fn_name
        elif callable(fn_name):
            name = getattr(fn_name, "__name__", "")
        else:
            raise BadInputError(f"expected a task name, got {fn_name!r}")
        if self.registry is not None:
            resolve(self.registry, name)
        check_priority(priority)
        check_timeout(timeout)
        check_retries(retries)
        d = check_delay(delay) if delay is not None else 0.0
        at_ms = _epoch_ms(at) if at is not None else 0
        jid = check_job_id(job_id) if job_id is not None else uuid.uuid4().hex
        spec = JobSpec(
            id=jid,
            task=name,
            args=tuple(args),
            kwargs=kwargs,
            queue=self.name,
            priority=priority,
            timeout=timeout,
            retries=retries,
        )
        data = encode_spec(spec)
        return await self.backend.enqueue(spec, data, delay=d, at_ms=at_ms)

    async def status(self, job_id: str) -> JobInfo | None:
        """The job's record (state, attempt, progress, result, error), or ``None``."""
        return await self.backend.get(check_job_id(job_id))

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109
        poll: float = 0.05,
    ) -> JobInfo:
        """Wait until the job is final (succeeded, dead or cancelled) and return it.

        Raises:
            RequestTimeout: it is not final after ``timeout`` seconds.
            BadInputError: no such job.
        """
        deadline = time.monotonic() + timeout
        delay = poll
        while True:
            info = await self.status(job_id)
            if info is None:
                raise BadInputError(f"no job {job_id!r}")
            if info.state in FINAL_STATES:
                return info
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout(f"job {job_id!r} is still {info.state} after {timeout:g} s")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 1.5, 1.0)

    async def cancel(self, job_id: str) -> AdminOutcome:
        """Cancel a job that has not finished (``"ok"``, ``"not_found"``, ``"wrong_state"``)."""
        return await self.backend.cancel(check_job_id(job_id))

    async def retry(self, job_id: str) -> AdminOutcome:
        """Requeue a dead or cancelled job with a fresh run of tries."""
        return await self.backend.requeue(check_job_id(job_id))

    async def list(
        self, state: JobState | None = None, *, page: int = 200
    ) -> AsyncIterator[JobInfo]:
        """Every job of the queue (newest first), optionally only those in ``state``."""
        if isinstance(page, bool) or not isinstance(page, int) or page < 1:
            raise ConfigError(f"page must be a positive integer, got {page!r}")
        offset = 0
        while True:
            batch = await self.backend.list_jobs(self.name, state, offset, page)
            got = await self.backend.count(self.name, state)
            for info in batch:
                yield info
            offset += page
            if offset >= got:
                return

    async def count(self, state: JobState | None = None) -> int:
        """An upper bound of the jobs :meth:`list` yields."""
        return await self.backend.count(self.name, state)

    async def purge(self, states: Sequence[JobState] = ("dead",)) -> int:
        """Delete the records of final jobs in ``states``; returns how many.

        Raises:
            BadInputError: a state that is not final (queued, running ... jobs are
                cancelled first, never purged).
        """
        bad = [s for s in states if s not in FINAL_STATES]
        if bad:
            raise BadInputError(
                f"only final jobs can be purged (succeeded, dead, cancelled), not {bad}"
            )
        return await self.backend.purge(self.name, list(states))


__all__ = ["Queue"]
