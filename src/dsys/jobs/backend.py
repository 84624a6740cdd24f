"""The :class:`Backend` protocol: where jobs are stored and how workers lease them.

Two implementations share it: :class:`~dsys.jobs.redis_backend.RedisBackend` (Redis
Streams with a consumer group) and :class:`~dsys.jobs.dsys_backend.DsysBackend`
(``dsys.streams`` + ``dsys.kv``). :class:`~dsys.jobs.queue.Queue` and
:class:`~dsys.jobs.worker.Worker` only talk to this protocol; the decisions (when to
retry, when to give up) come from :mod:`dsys.jobs.core`, so both backends behave alike.

Every operation on a leased job names the :class:`Lease` (job id and attempt) and is
refused with ``"stale"`` when the job has since been handed to another attempt, cancelled
or finished: the fencing that keeps a slow worker from completing someone else's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias, runtime_checkable

from dsys.errors import ConfigError
from dsys.jobs.core import JobInfo, JobSpec, JobState

Outcome: TypeAlias = Literal["ok", "stale"]
"""Answer to an operation on a lease: done, or refused because the lease is not current."""

HeartbeatOutcome: TypeAlias = Literal["ok", "stale", "cancelled"]
"""Answer to a heartbeat: renewed, lost (another attempt holds the job), or cancelled."""

AdminOutcome: TypeAlias = Literal["ok", "not_found", "wrong_state"]
"""Answer to cancel and requeue."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A job handed to one worker for one attempt.

    Attributes:
        spec: the job.
        attempt: the fencing token (increases with every hand-over, never reused).
        tries: the try of the current run (1 for the first).
        handle: backend-specific (a stream entry id, a stream sequence).
        enqueued_ms: when the job was enqueued (ms since the epoch), for latency figures.
        worker: the worker holding it.
    """

    spec: JobSpec
    attempt: int
    tries: int
    handle: str = ""
    enqueued_ms: int = 0
    worker: str = ""


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The answer to an enqueue.

    Attributes:
        id: the job id.
        created: False when a job with this id already existed (nothing was added).
        state: the job's state (of the existing job when not created).
    """

    id: str
    created: bool
    state: JobState


@runtime_checkable
class Backend(Protocol):
    """Storage and leasing of jobs (see the module docstring).

    Attributes:
        lease: seconds a worker holds a job without a heartbeat before it is handed out
            again.
    """

    lease: float

    async def enqueue(self, spec: JobSpec, data: bytes, *, delay: float, at_ms: int) -> Enqueued:
        """Store a new job (``data`` is ``encode_spec(spec)``) unless its id exists.

        It becomes ``queued`` at once, or ``scheduled`` until ``max(at_ms, now + delay)``.
        """
        ...

    async def fetch(self, queue: str, worker: str, batch: int, wait: float) -> list[Lease]:
        """Lease up to ``batch`` due jobs (highest priority first), waiting up to ``wait``
        seconds for one; expired leases of other workers are taken over too."""
        ...

    async def heartbeat(self, leases: Sequence[Lease]) -> list[HeartbeatOutcome]:
        """Renew the leases, one answer each."""
        ...

    async def complete(self, lease: Lease, result: bytes, result_ttl: float) -> Outcome:
        """Record success with the encoded result, kept ``result_ttl`` seconds."""
        ...

    async def fail(self, lease: Lease, error: str, retry_delay: float | None) -> Outcome:
        """Record a failed try: retry after ``retry_delay`` seconds, or (``None``) move the
        job to the dead letters."""
        ...

    async def release(self, lease: Lease, delay: float) -> Outcome:
        """Give the job back without counting the try (rate limited, worker stopping)."""
        ...

    async def progress(self, lease: Lease, value: bytes) -> Outcome:
        """Record the job's progress (an encoded value)."""
        ...

    async def get(self, job_id: str) -> JobInfo | None:
        """The job's record, or ``None`` (never enqueued, expired or purged)."""
        ...

    async def cancel(self, job_id: str) -> AdminOutcome:
        """Cancel a job that is not final; a running attempt learns it at its next
        heartbeat and its completion is refused."""
        ...

    async def requeue(self, job_id: str) -> AdminOutcome:
        """Queue a dead or cancelled job again, with a new run of tries."""
        ...

    async def list_jobs(
        self, queue: str, state: JobState | None, offset: int, limit: int
    ) -> list[JobInfo]:
        """Jobs of ``queue`` (newest first), optionally only those in ``state``."""
        ...

    async def count(self, queue: str, state: JobState | None) -> int:
        """How many jobs :meth:`list_jobs` would list at most (an upper bound)."""
        ...

    async def purge(self, queue: str, states: Sequence[JobState]) -> int:
        """Delete the records of ``queue``'s jobs in ``states`` (final states only);
        returns how many."""
        ...

    async def hold_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the named lease for ``owner`` (scheduler election); True when
        ``owner`` holds it for the next ``ttl`` seconds."""
        ...

    async def queues(self) -> list[str]:
        """Names of queues that have had jobs."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def open_backend(url: str, *, lease: float = 30.0) -> Backend:
    """A backend from a URL: ``redis://HOST:PORT/DB[?prefix=P]`` (or ``rediss://``,
    ``unix://``) for :class:`~dsys.jobs.redis_backend.RedisBackend`;
    ``dsys://HOST:PORT,...?kv=HOST:PORT,...[&stream=S&prefix=P&token=T]`` for
    :class:`~dsys.jobs.dsys_backend.DsysBackend` (streams servers, then KV servers).

    Raises:
        ConfigError: an unknown scheme or a malformed URL.
    """
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        import urllib.parse

        from dsys.jobs.redis_backend import RedisBackend

        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        prefix = [v for k, v in query if k == "prefix"]
        rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "prefix"])
        plain = urllib.parse.urlunsplit(parts._replace(query=rest))
        if prefix:
            return RedisBackend(plain, prefix=prefix[-1], lease=lease)
        return RedisBackend(plain, lease=lease)
    if scheme == "dsys":
        import importlib

        try:
            mod = importlib.import_module("dsys.jobs.dsys_backend")
        except ModuleNotFoundError as exc:
            raise ConfigError("the dsys backend is not available in this installation") from exc
        backend: Backend = mod.DsysBackend.from_url(url, lease=lease)
        return backend
    raise ConfigError(
        f"unknown job backend URL {url!r}: use redis://HOST:PORT/DB or "
        "dsys://STREAMS_HOST:PORT,...?kv=KV_HOST:PORT,..."
    )


__all__ = [
    "AdminOutcome",
    "Backend",
    "Enqueued",
    "HeartbeatOutcome",
    "Lease",
    "Outcome",
    "open_backend",
]
