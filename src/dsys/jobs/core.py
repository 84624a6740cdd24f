"""The job queue's pure core: job records, states, retry decisions (no I/O, no clock).

Theory of operation
-------------------
A *job* is a call of a named task with msgpack-encodable arguments, recorded once under
its id. Backends (:mod:`dsys.jobs.redis_backend`, :mod:`dsys.jobs.dsys_backend`) keep the
record and hand jobs to workers; this module decides everything that is not I/O, so that
every backend behaves the same:

* **Encoding.** :func:`encode_spec` turns a :class:`JobSpec` into msgpack bytes (never
  pickle: a queue is shared by processes of different trust and versions), refusing
  values msgpack cannot carry with a :class:`~dsys.errors.BadInputError` that names the
  argument. :func:`decode_spec` checks every field of what it reads back.
* **At-least-once with fencing.** Every hand-over of a job to a worker increments the
  job's ``attempt`` (never reset, also not by a requeue) and gives the worker a *lease*
  that the worker renews by heartbeat while the job runs. A worker that stops (crash,
  kill -9, a long pause) loses the lease; the job is handed out again with a higher
  attempt. Completions, failures, heartbeats and progress carry the attempt they belong
  to, and the backend refuses (``"stale"``) any that names an older one. A slow or
  paused worker therefore cannot complete a job another worker now holds.
* **Tries and retries.** ``tries`` counts the attempts of the current run (a requeue
  from the dead letters starts a new run at 0). After a failure :func:`decide_failure`
  answers :class:`RetryAt` (exponential backoff with jitter from
  :class:`~dsys.resilience.backoff.Backoff`) while ``tries <= retries``, else
  :class:`DeadLetter`. A job whose lease expired on its last try (its worker died every
  time) is dead-lettered when it is next handed out (:func:`decide_start`).
* **States.** Every change of a job's state is one of :data:`TRANSITIONS`; backends
  apply them atomically (a Lua script, a KV compare-and-set)::

          enqueue(delay/at)             enqueue
               |                           |
               v          due              v       fetch (attempt+1)
          scheduled ----------------->  queued  -------------------->  running
               ^                         ^  ^                          | | | |
               | release (rate limited)  |  '-- lease expired --------' | | |
               '-------------------------|------------------------------' | |
                                         |        fail, tries <= retries   | |
          retrying <---------------------|---------------------------------' |
              |  due                     |                                   |
              '--------------------------'   complete       fail, last try   |
                                                 |                 |         |
                                                 v                 v         |
                                             succeeded            dead <-----'
                                           (result, TTL)     (kept; `retry` requeues)

  ``cancel`` moves queued, scheduled, retrying and running jobs to ``cancelled`` (and
  fences a running attempt); ``retry`` (requeue) moves dead and cancelled jobs back to
  ``queued``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import msgpack

from dsys.errors import BadInputError, ConfigError, RemoteProtocolError
from dsys.resilience.backoff import Backoff, Random

JobState: TypeAlias = Literal[
    "scheduled", "queued", "running", "retrying", "succeeded", "dead", "cancelled"
]

STATES: Final[tuple[JobState, ...]] = (
    "scheduled",
    "queued",
    "running",
    "retrying",
    "succeeded",
    "dead",
    "cancelled",
)
"""Every job state, in the order a job usually passes through them."""

FINAL_STATES: Final[frozenset[str]] = frozenset({"succeeded", "dead", "cancelled"})
"""States a job leaves only by an explicit requeue (dead, cancelled) or never."""

TRANSITIONS: Final[Mapping[str, frozenset[str]]] = {
    "scheduled": frozenset({"queued", "cancelled"}),
    "queued": frozenset({"running", "cancelled", "dead"}),
    "running": frozenset(
        {"succeeded", "retrying", "dead", "cancelled", "scheduled", "queued", "running"}
    ),
    "retrying": frozenset({"queued", "cancelled"}),
    "succeeded": frozenset(),
    "dead": frozenset({"queued"}),
    "cancelled": frozenset({"queued"}),
}
"""Allowed state changes (``running -> running`` is a redelivery after a lost lease;
``running -> queued`` the same seen from a backend that requeues first)."""

MIN_PRIORITY: Final = 0
MAX_PRIORITY: Final = 9
"""Priorities are integers 0..9; a higher priority is handed out first."""

MAX_NAME_LEN: Final = 200
"""Longest task name, queue name or job id."""

MAX_SPEC_BYTES: Final = 1024 * 1024
"""Largest encoded job (task name, arguments and options)."""

MAX_RESULT_BYTES: Final = 1024 * 1024
"""Largest encoded result or progress value."""

MAX_RETRIES: Final = 1000
MAX_TIMEOUT: Final = 7 * 24 * 3600.0
"""Upper bounds of a job's retries and timeout (seconds): larger values are mistakes."""

_NAME = re.compile(r"^[A-Za-z0-9_.:\-]+$")
_QUEUE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_SPEC_VERSION = 1


def can_transition(old: str, new: str) -> bool:
    """Whether a job may go from state ``old`` to ``new`` (see :data:`TRANSITIONS`)."""
    return new in TRANSITIONS.get(old, frozenset())


# -- validation ---------------------------------------------------------------------------


def check_task_name(name: object) -> str:
    """Check a task name: 1-200 characters of ``A-Z a-z 0-9 _ . : -``.

    Raises:
        BadInputError: it is not such a string.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN or not _NAME.match(name):
        raise BadInputError(
            f"a task name must be 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . : -, got {name!r}"
        )
    return name


def check_job_id(job_id: object) -> str:
    """Check a job id: 1-200 characters of ``A-Z a-z 0-9 _ . : -``.

    Raises:
        BadInputError: it is not such a string.
    """
    if (
        not isinstance(job_id, str)
        or not job_id
        or len(job_id) > MAX_NAME_LEN
        or not _NAME.match(job_id)
    ):
        raise BadInputError(
            f"a job id must be 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . : -, got {job_id!r}"
        )
    return job_id


def check_queue_name(name: object) -> str:
    """Check a queue name: 1-64 characters of ``A-Z a-z 0-9 _ -``.

    Raises:
        ConfigError: it is not such a string.
    """
    if not isinstance(name, str) or not _QUEUE.match(name):
        raise ConfigError(f"a queue name must be 1-64 characters of A-Z a-z 0-9 _ -, got {name!r}")
    return name


def _is_number(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)


def check_retries(retries: object, *, error: type[Exception] = BadInputError) -> int | None:
    """Check a retry count: ``None`` (the task's default) or an integer in 0..1000."""
    if retries is None:
        return None
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise error(f"retries must be an integer in 0..{MAX_RETRIES}, got {retries!r}")
    return retries


def check_timeout(timeout: object, *, error: type[Exception] = BadInputError) -> float | None:
    """Check a timeout: ``None`` (the task's default) or seconds in (0, 7 days]."""
    if timeout is None:
        return None
    if not _is_number(timeout) or not 0 < timeout <= MAX_TIMEOUT:  # type: ignore[operator]
        raise error(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {timeout!r}")
    return float(timeout)  # type: ignore[arg-type]


def check_priority(priority: object) -> int:
    """Check a priority: an integer in 0..9.

    Raises:
        BadInputError: it is not.
    """
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        raise BadInputError(
            f"priority must be an integer in {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority!r}"
        )
    return priority


def check_delay(delay: object) -> float:
    """Check a delay: seconds >= 0 (at most a year).

    Raises:
        BadInputError: it is not.
    """
    if not _is_number(delay) or not 0 <= delay <= 366 * 86400:  # type: ignore[operator]
        raise BadInputError(f"delay must be a number of seconds in [0, 1 year], got {delay!r}")
    return float(delay)  # type: ignore[arg-type]


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    """What to run: a task name, its arguments and the per-job options.

    ``retries`` and ``timeout`` of ``None`` mean "the task's default" (decided by the
    worker that runs it, which knows the task's ``@task`` options).
    """

    id: str
    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    timeout: float | None = None
    retries: int | None = None

    def __post_init__(self) -> None:
        check_job_id(self.id)
        check_task_name(self.task)
        check_queue_name(self.queue)
        check_priority(self.priority)
        check_timeout(self.timeout)
        check_retries(self.retries)
        if not isinstance(self.args, tuple):
            raise BadInputError(f"args must be a tuple, got {type(self.args).__name__}")
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise BadInputError("kwargs must be a mapping with str keys")


def _pack(value: object, what: str, limit: int) -> bytes:
    try:
        data: bytes = msgpack.packb(value, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInputError(
            f"{what} cannot be encoded with msgpack ({exc}); pass plain values: "
            "None, bool, int, float, str, bytes, lists/tuples and dicts of them"
        ) from exc
    if len(data) > limit:
        raise BadInputError(f"{what} encodes to {len(data)} bytes, more than the {limit} allowed")
    return data


def encode_spec(spec: JobSpec) -> bytes:
    """Encode a job for storage (msgpack).

    Raises:
        BadInputError: an argument cannot be encoded (the message names it), or the job is
            larger than :data:`MAX_SPEC_BYTES`.
    """
    for i, arg in enumerate(spec.args):
        _pack(arg, f"argument {i} of job {spec.id!r} ({spec.task})", MAX_SPEC_BYTES)
    for key, arg in spec.kwargs.items():
        _pack(arg, f"keyword argument {key!r} of job {spec.id!r} ({spec.task})", MAX_SPEC_BYTES)
    return _pack(
        {
            "v": _SPEC_VERSION,
            "id": spec.id,
            "task": spec.task,
            "args": list(spec.args),
            "kwargs": dict(spec.kwargs),
            "queue": spec.queue,
            "priority": spec.priority,
            "timeout": spec.timeout,
            "retries": spec.retries,
        },
        f"job {spec.id!r}",
        MAX_SPEC_BYTES,
    )


def decode_spec(data: bytes) -> JobSpec:
    """Decode what :func:`encode_spec` wrote.

    Raises:
        RemoteProtocolError: the bytes are not a job record of a known version.
    """
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise RemoteProtocolError(f"a stored job is not valid msgpack: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("v") != _SPEC_VERSION:
        raise RemoteProtocolError(f"a stored job has an unknown layout: {str(obj)[:80]}")
    try:
        return JobSpec(
            id=obj["id"],
            task=obj["task"],
            args=tuple(obj["args"]),
            kwargs=obj["kwargs"],
            queue=obj["queue"],
            priority=obj["priority"],
            timeout=obj["timeout"],
            retries=obj["retries"],
        )
    except (KeyError, TypeError, BadInputError, ConfigError) as exc:
        raise RemoteProtocolError(f"a stored job is malformed: {exc}") from exc


def encode_value(value: object, what: str = "the result") -> bytes:
    """Encode a result or progress value (msgpack).

    Raises:
        BadInputError: msgpack cannot carry it, or it is larger than
            :data:`MAX_RESULT_BYTES`.
    """
    return _pack(value, what, MAX_RESULT_BYTES)


def decode_value(data: bytes | None) -> Any:
    """Decode what :func:`encode_value` wrote (``None`` stays ``None``).

    Raises:
        RemoteProtocolError: the bytes are not msgpack.
    """
    if data is None:
        return None
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise RemoteProtocolError(f"a stored value is not valid msgpack: {exc}") from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class JobInfo:
    """A job's record as the backend holds it: what to run and how far it got.

    Attributes:
        spec: the job (task, arguments, options).
        state: one of :data:`STATES`.
        attempt: hand-overs to workers so far, over every run (the fencing token).
        tries: attempts of the current run (reset by a requeue).
        progress: the last value the task reported, or ``None``.
        result: the task's return value once ``succeeded``.
        error: the last failure (``"TypeError: ..."``), or ``None``.
        enqueued_ms, started_ms, finished_ms, not_before_ms: milliseconds since the epoch
            (0 when not yet).
        worker: the worker holding or last holding the job.
    """

    spec: JobSpec
    state: JobState
    attempt: int = 0
    tries: int = 0
    progress: Any = None
    result: Any = None
    error: str | None = None
    enqueued_ms: int = 0
    started_ms: int = 0
    finished_ms: int = 0
    not_before_ms: int = 0
    worker: str | None = None

    @property
    def id(self) -> str:
        """The job id."""
        return self.spec.id

    @property
    def done(self) -> bool:
        """Whether the job is in a final state (succeeded, dead or cancelled)."""
        return self.state in FINAL_STATES


def parse_state(value: object) -> JobState:
    """Check a state name read from a backend or the command line.

    Raises:
        BadInputError: not one of :data:`STATES`.
    """
    for s in STATES:
        if value == s:
            return s
    raise BadInputError(f"unknown job state {value!r}; one of {', '.join(STATES)}")


# -- decisions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """Run the job now."""


@dataclass(frozen=True, slots=True)
class RetryAt:
    """Retry the job after ``delay`` seconds (it goes to ``retrying``)."""

    delay: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Give up: move the job to the dead letters with ``reason``."""

    reason: str


Decision: TypeAlias = Run | RetryAt | DeadLetter


DEFAULT_BACKOFF: Final = Backoff(initial=1.0, maximum=300.0, multiplier=2.0, jitter="full")
"""The backoff between tries when a task names none: 1 s, 2 s, 4 s ... up to 5 min,
full jitter."""


def decide_failure(
    *,
    tries: int,
    retries: int,
    error: str,
    backoff: Backoff,
    rng: Random,
    previous_delay: float = 0.0,
) -> RetryAt | DeadLetter:
    """What to do after try number ``tries`` (1-based) of a job failed.

    Args:
        tries: the try that failed (1 for the first).
        retries: retries allowed after the first try.
        error: the failure, kept as the dead letter's reason.
        backoff: the schedule of delays.
        rng: randomness for the jitter (seeded in tests).
        previous_delay: the delay before this try (for decorrelated jitter).
    """
    if tries <= retries:
        return RetryAt(backoff.delay(tries, previous_delay, rng))
    return DeadLetter(f"failed after {tries} tr{'y' if tries == 1 else 'ies'}: {error}")


def decide_start(*, tries: int, retries: int) -> Run | DeadLetter:
    """Whether a job handed out for try number ``tries`` may run.

    A try beyond ``retries + 1`` only happens when earlier tries lost their lease (the
    worker died or hung): the job is dead-lettered instead of running again.
    """
    if tries <= retries + 1:
        return Run()
    return DeadLetter(f"lease expired on the last of {retries + 1} tries (worker lost)")


def format_error(exc: BaseException, limit: int = 2000) -> str:
    """``"TypeError: message"``, cut to ``limit`` characters, for a job's ``error``."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_target(target: str) -> tuple[str, str | None]:
    """Split ``"module:obj"`` (or ``"module"``) as the worker command line takes it.

    Raises:
        BadInputError: the target is empty or malformed.
    """
    module, sep, obj = target.partition(":")
    if not module or (sep and not obj) or not all(p.isidentifier() for p in module.split(".")):
        raise BadInputError(f"expected MODULE:OBJECT (e.g. myapp.tasks:registry), got {target!r}")
    if sep and not all(p.isidentifier() for p in obj.split(".")):
        raise BadInputError(f"expected MODULE:OBJECT (e.g. myapp.tasks:registry), got {target!r}")
    return module, (obj or None)


__all__ = [
    "DEFAULT_BACKOFF",
    "FINAL_STATES",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "STATES",
    "TRANSITIONS",
    "DeadLetter",
    "Decision",
    "JobInfo",
    "JobSpec",
    "JobState",
    "RetryAt",
    "Run",
    "can_transition",
    "check_delay",
    "check_job_id",
    "check_priority",
    "check_queue_name",
    "check_retries",
    "check_task_name",
    "check_timeout",
    "decide_failure",
    "decide_start",
    "decode_spec",
    "decode_value",
    "encode_spec",
    "encode_value",
    "format_error",
    "parse_state",
    "split_target",
]
