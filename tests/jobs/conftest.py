"""Fixtures for the job tests: real servers (redis-server, dsys streams + KV processes).

``backend`` is parametrized over both backends: every behaviour test runs on each. Each
test gets its own key prefix (and, on dsys, its own stream), so tests share the servers
of a module but no state.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dsys.jobs.backend import Backend, open_backend
from dsys.testing.procs import start_dsys, start_redis

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


@pytest.fixture(scope="module")
def dsys_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A one-node ``dsys streams serve`` and a one-node ``dsys kv serve``, as processes."""
    base = tmp_path_factory.mktemp("dsys-jobs")
    with (
        start_dsys(
            "streams", "serve", "--id", "s1", "--listen", "127.0.0.1:0",
            "--data-dir", str(base / "streams"), "--fsync", "none", "--tick", "0.01",
        ) as streams,
        start_dsys(
            "kv", "serve", "--id", "k1", "--listen", "127.0.0.1:0",
            "--data-dir", str(base / "kv"), "--fsync", "none", "--tick", "0.01",
        ) as kv,
    ):  # fmt: skip
        yield streams.addr, kv.addr


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
