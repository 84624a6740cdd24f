"""Fixtures for the rate-limit tests: a real redis-server on a free loopback port."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from dsys.testing.procs import free_port, start_redis

__all__ = ["free_port"]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """Start a throwaway redis-server (no persistence); skip or fail when it is missing.

    With ``DSYS_REQUIRE_REDIS=1`` (set in CI) a missing redis-server fails the tests.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("DSYS_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed but DSYS_REQUIRE_REDIS=1")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with start_redis(exe) as server:
        yield f"redis://{server.addr}/0"
