"""Tasks run by ``dsys jobs worker jobs_app:tasks`` subprocesses in the process tests.

Each task appends ``<event> <job id> <attempt> <pid>`` lines to the file named by
``JOBS_TEST_LOG``, so a test can see what ran where without sharing memory.
"""

from __future__ import annotations

import asyncio
import os

from dsys.jobs import Registry, current_job

tasks = Registry()


def _log(event: str) -> None:
    job = current_job()
    with open(os.environ["JOBS_TEST_LOG"], "a") as f:
        f.write(f"{event} {job.job_id} {job.attempt} {os.getpid()}\n")


@tasks.task(retries=5, timeout=60)
async def work(seconds: float, first: float | None = None) -> dict[str, int]:
    """Log the start, sleep ``seconds`` (``first`` on the first attempt, when given), log
    the end; returns who ran it."""
    _log("start")
    await asyncio.sleep(first if first is not None and current_job().attempt == 1 else seconds)
    _log("done")
    job = current_job()
    return {"pid": os.getpid(), "attempt": job.attempt}


@tasks.task(retries=0)
async def fail() -> None:
    """Always fails (to make dead letters)."""
    raise RuntimeError("this task always fails")
