"""KVClient under faults: per-request timeouts, dropped connections, unsendable values.

A real single-node cluster sits behind the fault-injecting TCP proxy of the kv tests, so
the client's timeouts and retries run against the real server's answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from dsys.errors import BadInputError, RequestTimeout
from dsys.kv.client import KVClient
from dsys.kv.server import KVServer

from .helpers import running_cluster, wait_leader
from .proxy import FaultProxy


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[tuple[KVServer, FaultProxy]]:
    """A one-node cluster (fsync off) and a proxy in front of it."""
    async with running_cluster(tmp_path, 1, fsync=False) as servers:
        server = await wait_leader(servers)
        proxy = await FaultProxy(server.port).start()
        try:
            yield server, proxy
        finally:
            await proxy.close()


async def wait_until(cond: Any, limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_each_request_gets_its_own_timeout(
    proxied: tuple[KVServer, FaultProxy],
) -> None:
    server, proxy = proxied
    async with KVClient([f"127.0.0.1:{proxy.port}"], timeout=0.3) as kv:
        await kv.put("warm", b"up")
        proxy.delay = 0.4  # each way: an answer now takes ~0.8 s
        # the same frame: one request with the client's 0.3 s, one allowed 5 s
        short, long = await asyncio.gather(
            kv.put("short", b"x"), kv.put("long", b"y", timeout=5.0), return_exceptions=True
        )
        assert isinstance(short, RequestTimeout)
        assert isinstance(long, int)  # the short deadline did not take it along
        proxy.heal()
        got = await kv.get("long")
        assert got is not None and got.value == b"y"
        assert server.fsm.get("short") is not None  # it was sent; only its answer was late
        # timed-out requests do not linger in the connection's table
        await wait_until(lambda: not kv._conns[f"127.0.0.1:{proxy.port}"]._pending)


async def test_many_requests_time_out_and_the_client_recovers(
    proxied: tuple[KVServer, FaultProxy],
) -> None:
    server, proxy = proxied
    async with KVClient([f"127.0.0.1:{proxy.port}"], timeout=0.5, request_timeout=0.2) as kv:
        await kv.put("warm", b"up")
        proxy.delay = 2.0
        results = await asyncio.gather(
            *(kv.put(f"k{i}", b"v") for i in range(50)), return_exceptions=True
        )
        assert all(isinstance(r, RequestTimeout) for r in results), results
        proxy.partition()  # drop the connection holding the delayed traffic
        proxy.heal()
        assert isinstance(await kv.put("after", b"v", timeout=5.0), int)
        assert server.fsm.get("after") is not None


async def test_retry_after_a_dropped_connection_keeps_the_seq(
    proxied: tuple[KVServer, FaultProxy],
) -> None:
    server, proxy = proxied
    async with KVClient([f"127.0.0.1:{proxy.port}"], timeout=10.0) as kv:
        await kv.put("warm", b"up")
        before = server.fsm.revision
        proxy.delay = 0.3  # the answer waits 0.3 s in the proxy: time to cut it off
        put = asyncio.create_task(kv.put("once", b"v"))
        # the write reached the server and was applied; its answer is still in the proxy
        await wait_until(lambda: server.fsm.revision == before + 1)
        proxy.partition()
        await asyncio.sleep(0.2)  # the client sees the connection drop and retries
        assert not put.done()
        proxy.heal()
        rev = await put
        # the retry carried the same client id and seq: answered from the session
        # table, not applied a second time
        assert rev == before + 1
        assert server.fsm.revision == before + 1
        assert await kv.put("next", b"v") == before + 2


async def test_an_unsendable_value_fails_alone(
    proxied: tuple[KVServer, FaultProxy],
) -> None:
    server, proxy = proxied
    async with KVClient([f"127.0.0.1:{proxy.port}"]) as kv:
        await kv.put("warm", b"up")
        good, bad = await asyncio.gather(
            kv.put("good", b"v"), kv.put("bad", cast(bytes, object())), return_exceptions=True
        )
        assert isinstance(good, int)
        assert isinstance(bad, BadInputError)
        assert "cannot encode" in str(bad)
        assert server.fsm.get("good") is not None and server.fsm.get("bad") is None


async def test_a_spent_timeout_sends_nothing_and_zero_means_the_default(
    proxied: tuple[KVServer, FaultProxy],
) -> None:
    server, proxy = proxied
    async with KVClient([f"127.0.0.1:{proxy.port}"]) as kv:
        with pytest.raises(RequestTimeout):
            await kv.put("spent", b"v", timeout=-1.0)
        assert isinstance(await kv.put("zero", b"v", timeout=0), int)
        assert server.fsm.get("spent") is None and server.fsm.get("zero") is not None
