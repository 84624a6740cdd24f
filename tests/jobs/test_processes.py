"""Real ``dsys jobs worker`` processes: kill -9 and SIGSTOP mid-job, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsys.jobs import Queue
from dsys.jobs.backend import Lease

from .conftest import APP_DIR, make_backend


def _env(log: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(APP_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "JOBS_TEST_LOG": str(log),
        "DSYS_LOG_LEVEL": "warning",
    }


@contextlib.contextmanager
def worker(url: str, log: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """``dsys jobs worker jobs_app:tasks`` with a 1 s lease; stopped (SIGTERM) at the end."""
    with open(f"{log}.err", "ab") as err:  # the workers' logs, for when a test fails
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsys", "jobs", "worker", "jobs_app:tasks", "--backend", url,
             "--lease", "1", "--poll", "0.2", "--concurrency", "4", *extra],
            stdout=subprocess.PIPE, stderr=err, env=_env(log),
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(b"dsys jobs worker"), line
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def events(log: Path) -> list[tuple[str, str, int, int]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        event, job, attempt, pid = line.split()
        out.append((event, job, int(attempt), int(pid)))
    return out


async def until(cond: object, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        v = cond() if callable(cond) else cond  # type: ignore[operator]
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {limit} s")
        await asyncio.sleep(0.05)


async def test_kill_9_a_worker_mid_job(url: str, tmp_path: Path) -> None:
    """The job runs again once its lease ends, no job is lost, only jobs the dead worker
    had started run twice (counted), and its attempt can no longer complete the job."""
    log = tmp_path / "events.log"
    backend = make_backend(url)
    q = Queue(backend)
    try:
        with worker(url, log) as a:
            await q.enqueue("work", 0.05, first=30.0, job_id="victim")
            await until(lambda: any(e[:2] == ("start", "victim") for e in events(log)))
            for i in range(30):
                await q.enqueue("work", 0.2, job_id=f"j{i}")
            await until(lambda: sum(e[0] == "start" for e in events(log)) >= 4)
            os.kill(a.pid, signal.SIGKILL)
            a.wait(10)
            killed_pid = a.pid
        with worker(url, log) as b:
            infos = {}
            for jid in ["victim", *(f"j{i}" for i in range(30))]:
                infos[jid] = await q.wait(jid, timeout=60)
            b_pid = b.pid
        # nothing lost
        assert {i.state for i in infos.values()} == {"succeeded"}
        assert infos["victim"].attempt == 2
        assert infos["victim"].result == {"pid": b_pid, "attempt": 2}
        # duplicates: exactly the jobs the killed worker started and never finished
        ev = events(log)
        starts = Counter(job for e, job, _, _ in ev if e == "start")
        duplicated = {job for job, n in starts.items() if n > 1}
        unfinished = {job for e, job, _, pid in ev if e == "start" and pid == killed_pid} - {
            job for e, job, _, pid in ev if e == "done" and pid == killed_pid
        }
        assert duplicated == unfinished and "victim" in duplicated
        assert all(n <= 2 for n in starts.values())
        print(f"kill -9: {len(infos)} jobs, {len(duplicated)} ran twice: {sorted(duplicated)}")
        # the killed attempt cannot complete the job now
        victim = infos["victim"]
        stale = Lease(victim.spec, 1, 1, "", 0, "dead-worker")
        assert await backend.complete(stale, b"\xc0", 60) == "stale"
        after = await q.status("victim")
        assert after is not None and after.result == victim.result and after.attempt == 2
    finally:
        await backend.close()


async def test_a_paused_worker_cannot_complete_a_job_taken_over(url: str, tmp_path: Path) -> None:
    """SIGSTOP a worker mid-job past its lease: another worker runs and completes the job;
    when the first one resumes, its completion is refused (or it notices the lost lease
    first and abandons the job)."""
    log = tmp_path / "events.log"
    backend = make_backend(url)
    q = Queue(backend)
    try:
        with worker(url, log) as a:
            await q.enqueue("work", 0.1, first=1.5, job_id="paused")
            await until(lambda: any(e[:2] == ("start", "paused") for e in events(log)))
            a.send_signal(signal.SIGSTOP)
            with worker(url, log) as b:
                info = await q.wait("paused", timeout=60)
                assert info.attempt == 2 and info.result == {"pid": b.pid, "attempt": 2}
                a.send_signal(signal.SIGCONT)
                await asyncio.sleep(2.5)  # A's first attempt reaches its end meanwhile
                a.terminate()
                out, _ = a.communicate(timeout=30)
        text = out.decode()
        stale = int(text.split(" stale")[0].rsplit(" ", 1)[1])
        lost = int(text.split(" lost")[0].rsplit(" ", 1)[1])
        assert stale + lost == 1, text
        final = await q.status("paused")
        assert final is not None and final.result == {"pid": b.pid, "attempt": 2}
    finally:
        await backend.close()


def dsys(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    p = subprocess.run(
        [sys.executable, "-m", "dsys", *args], capture_output=True, timeout=60, env=env
    )
    return p.returncode, p.stdout.decode(), p.stderr.decode()


@pytest.mark.parametrize(
    "verb", [None, "worker", "enqueue", "ls", "show", "retry", "cancel", "purge"]
)
def test_help_on_every_level(verb: str | None) -> None:
    rc, out, _ = dsys("jobs", *([verb] if verb else []), "--help")
    assert (rc == 0 and "usage: dsys jobs" in out and "--backend" in out) or verb is None
    if verb is None:
        assert all(v in out for v in ("worker", "ls", "show", "retry", "purge"))


async def test_cli_ls_show_retry_cancel_purge(url: str, tmp_path: Path) -> None:
    log = tmp_path / "events.log"
    rc, out, err = dsys("jobs", "enqueue", "fail", "--backend", url, "--job-id", "d1")
    assert rc == 0, err
    assert json.loads(out) == {"id": "d1", "created": True, "state": "queued"}
    rc, out, err = dsys("jobs", "enqueue", "work", "[0.01]", "--backend", url, "--delay", "600")
    assert rc == 0 and json.loads(out)["state"] == "scheduled"
    later = json.loads(out)["id"]
    backend = make_backend(url)
    q = Queue(backend)
    try:
        with worker(url, log):
            assert (await q.wait("d1", timeout=60)).state == "dead"
        rc, out, err = dsys("jobs", "ls", "--state", "dead", "--json", "--backend", url)
        assert rc == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert [(r["id"], r["state"]) for r in rows] == [("d1", "dead")]
        assert "always fails" in rows[0]["error"]
        rc, out, err = dsys("jobs", "ls", "--progress", "--backend", url)
        assert rc == 0 and "d1" in out and later in out and "] 2/2" in err
        rc, out, err = dsys("jobs", "show", "d1", "--backend", url)
        assert rc == 0 and json.loads(out)["state"] == "dead"
        rc, out, err = dsys("jobs", "cancel", later, "--backend", url)
        assert rc == 0 and f"cancel: {later}" in out
        rc, out, err = dsys("jobs", "cancel", later, "--backend", url)
        assert rc == 1 and "already finished" in err
        rc, out, err = dsys("jobs", "retry", "d1", "--backend", url)
        assert rc == 0 and "retry: d1" in out
        with worker(url, log):
            assert (await q.wait("d1", timeout=60)).state == "dead"
        rc, out, err = dsys("jobs", "purge", "--state", "dead", "--state", "cancelled",
                            "--backend", url)  # fmt: skip
        assert rc == 0 and "purged 2 job(s)" in out
        rc, out, err = dsys("jobs", "show", "d1", "--backend", url)
        assert rc == 1 and "no job 'd1'" in err
    finally:
        await backend.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker", "no_such_module_xyz:tasks"], "cannot import"),
        (["worker", "jobs_app:nothing"], "has no attribute"),
        (["worker", "jobs_app:os"], "not a dsys.jobs.Registry"),
        (["worker", "a-b:c"], "MODULE:OBJECT"),
        (["enqueue", "work", "{not json"], "not valid JSON"),
        (["enqueue", "work", "{}"], "must be a JSON list"),
        (["ls", "--backend", "http://x"], "unknown job backend URL"),
        (["ls", "--backend", "dsys://h:1"], "expected dsys://"),
    ],
)
def test_cli_bad_input_is_a_clear_error(args: list[str], message: str, tmp_path: Path) -> None:
    rc, _, err = dsys("jobs", *args, env=_env(tmp_path / "log"))
    assert rc == 1 and message in err, err
