"""The client-side balanced Session against real backend processes."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable

import pytest

from conftest import Proc
from dsys.balance import PoolConfig, Session, SessionConfig
from dsys.balance.health import OutlierConfig
from dsys.errors import (
    BadInputError,
    ClosedError,
    ConfigError,
    ConnectError,
    NoHealthyBackendError,
    RequestTimeout,
)


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_session_balances_and_retries_around_a_dead_endpoint(
    backend: Callable[..., Proc],
) -> None:
    a, b = backend("a"), backend("b")
    dead = _dead_url()
    cfg = SessionConfig(pool=PoolConfig(strategy="round-robin", seed=1))
    async with Session([a.url, b.url, dead], config=cfg) as s:
        seen: Counter[str] = Counter()
        for _ in range(30):
            resp = await s.get("/")
            assert resp.status == 200
            seen[resp.text()] += 1
        # POST is not idempotent, but a refused connection never reached a server.
        resp = await s.post("/upload", data=b"x" * 10)
        assert resp.status == 200 and resp.json()["bytes"] == 10
        states = {e["url"]: e for e in s.pool.snapshot()}
    assert set(seen) == {"hello from a", "hello from b"}
    assert states[dead]["failures"] >= 1
    assert states[dead]["state"] in ("ejected", "circuit_open", "up")


async def test_per_try_timeout_retries_idempotent_and_deadline_bounds_all(
    backend: Callable[..., Proc],
) -> None:
    slow = backend("slow", delay_ms=4000)
    fast = backend("fast")
    cfg = SessionConfig(
        pool=PoolConfig(strategy="round-robin", outlier=None, circuit_breaker=False),
        try_timeout=1.0,
        deadline=10.0,
    )
    async with Session([slow.url, fast.url], config=cfg) as s:
        texts = Counter()
        for _ in range(3):
            resp = await s.get("/")
            texts[resp.text()] += 1
            assert resp.tries in (1, 2)
        assert texts == {"hello from fast": 3}
        # Not idempotent: a timeout may have reached the server, so no retry.
        with pytest.raises(RequestTimeout, match="within 1 s"):
            await s.post("/slow?ms=4000", data=b"")

    only_slow = SessionConfig(
        pool=PoolConfig(outlier=None, circuit_breaker=False), try_timeout=5.0, deadline=0.5
    )
    async with Session([slow.url], config=only_slow) as s:
        with pytest.raises(RequestTimeout):
            await s.get("/")


async def test_server_errors_are_returned_and_5xx_retry_statuses_retried(
    backend: Callable[..., Proc],
) -> None:
    a = backend("a")
    async with Session([a.url]) as s:
        resp = await s.get("/fail")
        assert resp.status == 500 and resp.tries == 1
        with pytest.raises(Exception, match="answered 500"):
            resp.raise_for_status()
        resp = await s.get("/headers")
        assert resp.json()["name"] == "a"


async def test_consistent_hash_key_sticks_to_one_endpoint(backend: Callable[..., Proc]) -> None:
    bs = [backend(f"c{i}") for i in range(3)]
    cfg = SessionConfig(pool=PoolConfig(strategy="consistent-hash"))
    async with Session([b.url for b in bs], config=cfg) as s:
        for key in ("user:1", "user:2", "user:3"):
            owners = {(await s.get("/", key=key)).endpoint for _ in range(5)}
            assert len(owners) == 1


async def test_errors_are_typed(backend: Callable[..., Proc]) -> None:
    cfg = SessionConfig(
        pool=PoolConfig(outlier=OutlierConfig(consecutive_errors=1), circuit_breaker=False),
        max_tries=2,
    )
    async with Session([_dead_url()], config=cfg) as s:
        with pytest.raises(ConnectError, match="cannot connect"):
            await s.get("/")
        with pytest.raises(BadInputError):
            await s.get("no-slash")
        with pytest.raises(BadInputError):
            await s.post("/", json={}, data=b"x")
    with pytest.raises(ClosedError):
        await s.get("/")
    async with Session([]) as empty:
        with pytest.raises(NoHealthyBackendError, match="no endpoints"):
            await empty.get("/")
    with pytest.raises(ConfigError):
        SessionConfig(max_tries=0)
