"""Tasks: named functions a worker may run, and the context a running job sees.

::

    from dsys.jobs import Registry, current_job

    tasks = Registry()

    @tasks.task(retries=3, timeout=30)
    async def resize(path: str, width: int) -> str:
        await current_job().set_progress(0.5)
        ...
        return out_path

The module-level :func:`task` registers into :data:`default_registry`. A registry is what
``dsys jobs worker module:obj`` loads (``obj`` names the registry).
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from dsys.errors import BadInputError, ConfigError, LocalProtocolError
from dsys.jobs.core import JobSpec, check_retries, check_task_name, check_timeout, encode_value
from dsys.jobs.cron import CronJob
from dsys.resilience.backoff import Backoff

if TYPE_CHECKING:
    from dsys.jobs.backend import Backend, Lease
    from dsys.ratelimit import Limiter

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskDef:
    """A registered task: the function and its defaults.

    Attributes:
        name: the name jobs use to call it.
        fn: the function (``async def`` runs on the worker's loop; a plain function runs
            in a thread).
        retries: retries after the first try when the job names none.
        timeout: seconds one try may take when the job names none.
        backoff: delays between tries.
        limiter: a :class:`~dsys.ratelimit.Limiter` every start of this task passes first
            (one key, the task name; a shared store makes it global across workers).
    """

    name: str
    fn: Callable[..., Any]
    retries: int = 3
    timeout: float = 300.0
    backoff: Backoff | None = None
    limiter: Limiter | None = None

    def __post_init__(self) -> None:
        check_task_name(self.name)
        if not callable(self.fn):
            raise ConfigError(f"task {self.name!r}: {self.fn!r} is not callable")
        check_retries(self.retries, error=ConfigError)
        check_timeout(self.timeout, error=ConfigError)

    @property
    def is_async(self) -> bool:
        """Whether the function is a coroutine function."""
        return inspect.iscoroutinefunction(self.fn)


class Registry:
    """Tasks by name. Workers look jobs' task names up here.

    Example::

        tasks = Registry()

        @tasks.task(retries=5)
        async def send(to: str) -> None: ...
    """

    def __init__(self) -> None:
        self._tasks: dict[str, TaskDef] = {}
        self.crons: list[CronJob] = []
        """Cron schedules every worker of this registry offers to run (see
        :meth:`add_cron`)."""

    def add_cron(self, job: CronJob) -> None:
        """Add a cron schedule; the worker holding its queue's scheduler lease runs it.

        Raises:
            ConfigError: another schedule has the same name.
        """
        if any(c.name == job.name for c in self.crons):
            raise ConfigError(f"a cron schedule named {job.name!r} is already registered")
        self.crons.append(job)

    @overload
    def task(self, fn: Callable[P, R], /) -> Callable[P, R]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 3,
        timeout: float = 300.0,
        backoff: Backoff | None = None,
        limiter: Limiter | None = None,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]: ...

    def task(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 3,
        timeout: float = 300.0,
        backoff: Backoff | None = None,
        limiter: Limiter | None = None,
    ) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
        """Register a function as a task (``@tasks.task`` or ``@tasks.task(retries=3)``).

        Args:
            name: the task's name (default: the function's ``__name__``).
            retries: retries after the first try (0..1000) when a job names none.
            timeout: seconds per try when a job names none.
            backoff: delays between tries (default :data:`~dsys.jobs.core.DEFAULT_BACKOFF`).
            limiter: a rate limit on starts of this task.

        Returns:
            The function unchanged (it can still be called directly).

        Raises:
            ConfigError: a bad option, or another function already has the name.
        """

        def register(f: Callable[P, R]) -> Callable[P, R]:
            self.add(
                TaskDef(
                    name=name if name is not None else f.__name__,
                    fn=f,
                    retries=retries,
                    timeout=timeout,
                    backoff=backoff,
                    limiter=limiter,
                )
            )
            return f

        if fn is not None:
            return register(fn)
        return register

    def add(self, task: TaskDef) -> None:
        """Register a :class:`TaskDef`.

        Raises:
            ConfigError: another function is registered under the same name.
        """
        old = self._tasks.get(task.name)
        if old is not None and old.fn is not task.fn:
            raise ConfigError(f"a task named {task.name!r} is already registered ({old.fn!r})")
        self._tasks[task.name] = task

    def get(self, name: str) -> TaskDef | None:
        """The task named ``name``, or ``None``."""
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskDef]:
        return iter(list(self._tasks.values()))

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        """Registered task names, sorted."""
        return sorted(self._tasks)


default_registry = Registry()
"""The registry the module-level :func:`task` decorator adds to."""


@overload
def task(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def task(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 3,
    timeout: float = 300.0,
    backoff: Backoff | None = None,
    limiter: Limiter | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 3,
    timeout: float = 300.0,
    backoff: Backoff | None = None,
    limiter: Limiter | None = None,
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """Register a function in :data:`default_registry` (see :meth:`Registry.task`)."""
    if fn is not None:
        return default_registry.task(fn)
    return default_registry.task(
        name=name, retries=retries, timeout=timeout, backoff=backoff, limiter=limiter
    )


class JobContext:
    """What a running job knows about itself; :func:`current_job` returns it.

    Attributes:
        spec: the job being run.
        attempt: this hand-over's attempt number (the fencing token).
        tries: the try of the current run (1 for the first).
        worker_id: the worker running it.
    """

    def __init__(self, backend: Backend, lease: Lease, worker_id: str) -> None:
        self._backend = backend
        self._lease = lease
        self.spec: JobSpec = lease.spec
        self.attempt: int = lease.attempt
        self.tries: int = lease.tries
        self.worker_id = worker_id

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.spec.id

    async def set_progress(self, value: object) -> bool:
        """Record progress (any msgpack-encodable value, e.g. ``0.4`` or ``{"done": 40}``).

        Returns:
            False when this attempt no longer holds the job (it was cancelled or handed to
            another worker), so the value was not recorded.

        Raises:
            BadInputError: the value cannot be encoded.
        """
        data = encode_value(value, f"progress of job {self.spec.id!r}")
        return await self._backend.progress(self._lease, data) == "ok"


_current: contextvars.ContextVar[JobContext] = contextvars.ContextVar("dsys_jobs_current")


def current_job() -> JobContext:
    """The :class:`JobContext` of the job running in this task (or thread).

    Raises:
        LocalProtocolError: called outside a job.
    """
    try:
        return _current.get()
    except LookupError:
        raise LocalProtocolError("current_job() was called outside a running job") from None


def resolve(registry: Registry, name: str) -> TaskDef:
    """The task ``name`` in ``registry``.

    Raises:
        BadInputError: no such task (the message lists the known ones).
    """
    t = registry.get(name)
    if t is None:
        known = ", ".join(registry.names()[:20]) or "none"
        raise BadInputError(f"unknown task {name!r} (registered: {known})")
    return t


__all__ = [
    "JobContext",
    "Registry",
    "TaskDef",
    "current_job",
    "default_registry",
    "resolve",
    "task",
]
