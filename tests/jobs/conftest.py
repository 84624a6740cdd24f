"""Fixtures for the job tests: real servers (redis-server, dsys streams + KV processes).

``backend`` is parametrized over both backends: every behaviour test runs on each. Each
test gets its own key prefix (and, on dsys, its own stream), so tests share the servers
of a module but no state.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dsys.jobs.backend import Backend, open_backend
from dsys.testing.procs import free_port, start_redis, stop_process, wait_healthy

LEASE = 1.0
"""Lease of the test backends: short, so lost leases are noticed within a test."""

_names = itertools.count()


def unique(stem: str) -> str:
    """A name no other test in this session uses."""
    return f"{stem}{os.getpid()}x{next(_names)}"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A throwaway redis-server; skipped when missing unless ``DSYS_REQUIRE_REDIS=1``."""
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("DSYS_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed but DSYS_REQUIRE_REDIS=1")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with start_redis(exe) as server:
        yield f"redis://{server.addr}/0"


@contextlib.contextmanager
def serve(block: str, data_dir: Path) -> Iterator[str]:
    """``dsys BLOCK serve`` (one node, fsync none) on a free port until the block ends."""
    addr = f"127.0.0.1:{free_port()}"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir.parent / f"{block}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsys", block, "serve", "--id", "n1", "--listen", addr,
             "--data-dir", str(data_dir), "--fsync", "none", "--tick", "0.01"],
            stdout=log, stderr=log, env={**os.environ, "DSYS_LOG_LEVEL": "warning"},
        )  # fmt: skip
    try:
        wait_healthy(addr, timeout=60)
        yield addr
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def dsys_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A one-node ``dsys streams serve`` and a one-node ``dsys kv serve``, as processes."""
    base = tmp_path_factory.mktemp("dsys-jobs")
    with serve("streams", base / "streams") as streams, serve("kv", base / "kv") as kv:
        yield streams, kv


def backend_url(kind: str, request: pytest.FixtureRequest) -> str:
    """A URL of a fresh namespace on the ``kind`` backend's servers."""
    if kind == "redis":
        url: str = request.getfixturevalue("redis_url")
        return f"{url}?prefix={unique('t')}:"
    streams, kv = request.getfixturevalue("dsys_servers")
    name = unique("T")
    return f"dsys://{streams}?kv={kv}&stream={name}&prefix={name}/"


def make_backend(url: str, lease: float = LEASE) -> Backend:
    """Open the backend a :func:`backend_url` names."""
    return open_backend(url, lease=lease)


@pytest.fixture(params=["redis", "dsys"])
def url(request: pytest.FixtureRequest) -> str:
    """A fresh namespace on each backend in turn."""
    return backend_url(request.param, request)


@pytest.fixture
async def backend(url: str) -> AsyncIterator[Backend]:
    """A backend on a fresh namespace (closed afterwards)."""
    b = make_backend(url)
    try:
        yield b
    finally:
        await b.close()


APP_DIR = Path(__file__).resolve().parent / "app"
"""Where ``jobs_app`` (the tasks the worker subprocesses run) lives."""
