"""``dsys jobs ...``: run workers and look after jobs from the command line.

::

    dsys jobs worker myapp.tasks:registry --concurrency 8 --backend redis://127.0.0.1:6379/0
    dsys jobs enqueue send_email '["a@example.com"]' --delay 10 --job-id welcome-42
    dsys jobs ls [--state dead] [--queue default] [--limit 100] [--json] [--progress]
    dsys jobs show JOB_ID
    dsys jobs retry JOB_ID            # requeue a dead or cancelled job
    dsys jobs cancel JOB_ID
    dsys jobs purge [--state dead] [--state succeeded ...]

``--backend`` (or ``DSYS_JOBS_BACKEND``) is ``redis://HOST:PORT/DB`` or
``dsys://STREAMS_HOST:PORT,...?kv=KV_HOST:PORT,...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from dsys.errors import BadInputError, ConfigError
from dsys.jobs.backend import Backend, open_backend
from dsys.jobs.core import STATES, JobInfo, parse_state, split_target
from dsys.jobs.queue import Queue
from dsys.jobs.tasks import Registry, default_registry
from dsys.jobs.worker import Worker, WorkerConfig

DEFAULT_BACKEND = "redis://127.0.0.1:6379/0"
PROGRESS_AFTER = 1000
"""Listings longer than this show a progress bar on a terminal's stderr."""


def register(subparsers: Any) -> None:
    """Add the ``jobs`` block and its verbs to the ``dsys`` parser."""
    jobs = subparsers.add_parser(
        "jobs",
        help="background job queue (workers, inspection, dead letters)",
        description="Run job workers and inspect, cancel, requeue and purge jobs of a "
        "dsys.jobs queue on Redis or on dsys streams + KV.",
    )
    jobs.set_defaults(block_parser=jobs)
    verbs = jobs.add_subparsers(dest="verb", metavar="<verb>")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--backend",
            default=os.environ.get("DSYS_JOBS_BACKEND", DEFAULT_BACKEND),
            help="redis://HOST:PORT/DB or dsys://HOST:PORT,...?kv=HOST:PORT,... "
            f"(env DSYS_JOBS_BACKEND; default {DEFAULT_BACKEND})",
        )
        p.add_argument("--queue", default="default", help="the queue (default: default)")

    w = verbs.add_parser(
        "worker",
        help="run a worker",
        description="Import MODULE, take the task registry OBJECT from it (default: the "
        "registry of the module-level @task decorator) and run its jobs until SIGTERM or "
        "Ctrl-C, which stop taking jobs and let running ones finish.",
    )
    w.add_argument("target", metavar="MODULE[:OBJECT]", help="e.g. myapp.tasks:registry")
    common(w)
    w.add_argument("--concurrency", type=int, default=10, help="jobs at once (default 10)")
    w.add_argument("--lease", type=float, default=30.0, help="lease seconds (default 30)")
    w.add_argument("--poll", type=float, default=1.0, help="longest fetch wait, seconds")
    w.add_argument(
        "--result-ttl", type=float, default=86_400.0, help="seconds results are kept (1 day)"
    )
    w.add_argument("--worker-id", default=None, help="this worker's name (default host-pid-rnd)")
    w.add_argument(
        "--shutdown-grace", type=float, default=30.0, help="seconds running jobs get to finish"
    )
    w.set_defaults(func=_worker)

    e = verbs.add_parser(
        "enqueue",
        help="enqueue a job",
        description="Enqueue a call of TASK with ARGS, a JSON list (and --kwargs, a JSON "
        "object). Prints the job id and whether it was created.",
    )
    e.add_argument("task", help="the task name")
    e.add_argument("args", nargs="?", default="[]", help="JSON list of arguments")
    common(e)
    e.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    e.add_argument("--job-id", default=None, help="idempotency key (default: random)")
    e.add_argument("--delay", type=float, default=None, help="run after SECONDS")
    e.add_argument("--priority", type=int, default=0, help="0..9, higher first")
    e.add_argument("--timeout", type=float, default=None, help="seconds per try")
    e.add_argument("--retries", type=int, default=None, help="retries after the first try")
    e.set_defaults(func=_enqueue)

    ls = verbs.add_parser(
        "ls",
        help="list jobs",
        description="List the queue's jobs, newest first (with --state, only those). A "
        f"listing of more than {PROGRESS_AFTER} jobs shows a progress bar on a terminal.",
    )
    common(ls)
    ls.add_argument("--state", choices=STATES, default=None, help="only jobs in this state")
    ls.add_argument("--limit", type=int, default=1000, help="most jobs shown (default 1000)")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.add_argument(
        "--progress", action="store_true", help="always show the progress bar (on stderr)"
    )
    ls.set_defaults(func=_ls)

    for name, text in (
        ("show", "show one job's record (state, attempts, progress, result, error)"),
        ("retry", "requeue a dead or cancelled job with a fresh run of tries"),
        ("cancel", "cancel a job that has not finished"),
    ):
        p = verbs.add_parser(name, help=text, description=text.capitalize() + ".")
        p.add_argument("job_id", help="the job id")
        common(p)
        p.set_defaults(func=_admin, command=name)

    pg = verbs.add_parser(
        "purge",
        help="delete finished jobs' records",
        description="Delete the records of the queue's jobs in the given final states "
        "(default: dead letters only).",
    )
    common(pg)
    pg.add_argument(
        "--state",
        action="append",
        choices=("succeeded", "dead", "cancelled"),
        default=None,
        help="a final state to purge (repeat; default dead)",
    )
    pg.set_defaults(func=_purge)


# -- helpers ------------------------------------------------------------------------------


def load_registry(target: str) -> Registry:
    """Import ``module[:object]`` and return the task registry it names.

    Raises:
        BadInputError: a malformed target.
        ConfigError: the module cannot be imported or the object is not a registry.
    """
    module_name, obj_name = split_target(target)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from exc
    if obj_name is None:
        return default_registry
    obj: Any = module
    for part in obj_name.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{module_name!r} has no attribute {obj_name!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Registry):
        raise ConfigError(f"{target!r} is a {type(obj).__name__}, not a dsys.jobs.Registry")
    return obj


def _ms_text(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def info_dict(info: JobInfo) -> dict[str, Any]:
    """A job's record as JSON-friendly values (bytes as text when UTF-8, else hex)."""

    def plain(v: Any) -> Any:
        if isinstance(v, bytes):
            try:
                return v.decode()
            except UnicodeDecodeError:
                return v.hex()
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    s = info.spec
    return {
        "id": s.id,
        "task": s.task,
        "queue": s.queue,
        "state": info.state,
        "attempt": info.attempt,
        "tries": info.tries,
        "args": plain(list(s.args)),
        "kwargs": plain(dict(s.kwargs)),
        "priority": s.priority,
        "timeout": s.timeout,
        "retries": s.retries,
        "progress": plain(info.progress),
        "result": plain(info.result),
        "error": info.error,
        "worker": info.worker,
        "enqueued": _ms_text(info.enqueued_ms),
        "started": _ms_text(info.started_ms),
        "finished": _ms_text(info.finished_ms),
        "not_before": _ms_text(info.not_before_ms),
    }


class ProgressBar:
    """A one-line text progress bar on a stream (stderr), redrawn in place."""

    def __init__(self, total: int, out: TextIO, width: int = 30) -> None:
        self.total = max(1, total)
        self.out = out
        self.width = width
        self.done = 0
        self._last = -1

    def update(self, done: int) -> None:
        """Show ``done`` of ``total`` (redrawn when the bar's fill changes)."""
        self.done = min(done, self.total)
        filled = self.width * self.done // self.total
        if filled != self._last or self.done == self.total:
            self._last = filled
            bar = "#" * filled + "." * (self.width - filled)
            self.out.write(f"\r[{bar}] {self.done}/{self.total}")
            self.out.flush()

    def close(self) -> None:
        """End the line."""
        self.out.write("\n")
        self.out.flush()


def _json_arg(text: str, what: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, kind):
        raise BadInputError(f"{what} must be a JSON {kind.__name__}, got {text!r}")
    return value


# -- verbs --------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    registry = load_registry(args.target)
    config = WorkerConfig(
        queue=args.queue,
        concurrency=args.concurrency,
        worker_id=args.worker_id,
        poll=args.poll,
        result_ttl=args.result_ttl,
        shutdown_grace=args.shutdown_grace,
    )
    return asyncio.run(_worker_async(args.backend, args.lease, registry, config))


async def _worker_async(url: str, lease: float, registry: Registry, config: WorkerConfig) -> int:
    backend = open_backend(url, lease=lease)
    try:
        worker = Worker(backend, registry, config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, worker.stop)
        print(
            f"dsys jobs worker {worker.id} on queue {config.queue!r}: "
            f"{len(registry)} tasks, concurrency {config.concurrency}",
            flush=True,
        )
        await worker.run()
        s = worker.stats
        print(
            f"stopped: {s.started} started, {s.succeeded} succeeded, {s.retried} retried, "
            f"{s.dead} dead, {s.stale} stale, {s.lost} lost",
            flush=True,
        )
    finally:
        await backend.close()
    return 0


def _enqueue(args: argparse.Namespace) -> int:
    return asyncio.run(_enqueue_async(args))


async def _enqueue_async(args: argparse.Namespace) -> int:
    call_args = _json_arg(args.args, "ARGS", list)
    kwargs = _json_arg(args.kwargs, "--kwargs", dict)
    backend = open_backend(args.backend)
    try:
        q = Queue(backend, args.queue)
        r = await q.enqueue(
            args.task,
            *call_args,
            delay=args.delay,
            job_id=args.job_id,
            priority=args.priority,
            timeout=args.timeout,
            retries=args.retries,
            **kwargs,
        )
    finally:
        await backend.close()
    print(json.dumps({"id": r.id, "created": r.created, "state": r.state}))
    return 0


def _ls(args: argparse.Namespace) -> int:
    return asyncio.run(_ls_async(args))


async def _ls_async(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise BadInputError(f"--limit must be at least 1, got {args.limit}")
    backend: Backend = open_backend(args.backend)
    try:
        q = Queue(backend, args.queue)
        state = parse_state(args.state) if args.state else None
        total = min(args.limit, await q.count(state))
        bar = (
            ProgressBar(total, sys.stderr)
            if args.progress or (total > PROGRESS_AFTER and sys.stderr.isatty())
            else None
        )
        rows: list[JobInfo] = []
        scanned = 0
        async for info in q.list(state, page=min(500, max(1, args.limit))):
            rows.append(info)
            scanned += 1
            if bar is not None:
                bar.update(scanned)
            if len(rows) >= args.limit:
                break
        if bar is not None:
            bar.update(total)
            bar.close()
    finally:
        await backend.close()
    if args.json:
        for info in rows:
            print(json.dumps(info_dict(info)))
        return 0
    print(f"{'ID':<34} {'STATE':<10} {'TASK':<20} {'TRIES':>5} {'ENQUEUED':<24} ERROR")
    for info in rows:
        err = (info.error or "")[:60]
        print(
            f"{info.id:<34} {info.state:<10} {info.spec.task:<20} {info.tries:>5} "
            f"{_ms_text(info.enqueued_ms):<24} {err}"
        )
    print(f"{len(rows)} job(s)", file=sys.stderr)
    return 0


def _admin(args: argparse.Namespace) -> int:
    return asyncio.run(_admin_async(args))


async def _admin_async(args: argparse.Namespace) -> int:
    backend = open_backend(args.backend)
    try:
        q = Queue(backend, args.queue)
        if args.command == "show":
            info = await q.status(args.job_id)
            if info is None:
                raise BadInputError(f"no job {args.job_id!r}")
            print(json.dumps(info_dict(info), indent=2))
            return 0
        outcome = await (q.retry(args.job_id) if args.command == "retry" else q.cancel(args.job_id))
    finally:
        await backend.close()
    if outcome == "not_found":
        raise BadInputError(f"no job {args.job_id!r}")
    if outcome == "wrong_state":
        why = "is neither dead nor cancelled" if args.command == "retry" else "already finished"
        raise BadInputError(f"job {args.job_id!r} {why}; see `dsys jobs show`")
    print(f"{args.command}: {args.job_id}")
    return 0


def _purge(args: argparse.Namespace) -> int:
    return asyncio.run(_purge_async(args))


async def _purge_async(args: argparse.Namespace) -> int:
    backend = open_backend(args.backend)
    try:
        n = await Queue(backend, args.queue).purge([parse_state(s) for s in args.state or ["dead"]])
    finally:
        await backend.close()
    print(f"purged {n} job(s)")
    return 0
