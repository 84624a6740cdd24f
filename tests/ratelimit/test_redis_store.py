"""RedisStore against a real redis-server started by the fixture."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from dsys.errors import ConfigError
from dsys.observability import Metrics
from dsys.ratelimit import Limiter
from dsys.ratelimit.limiter import MemoryStore, store_from_url
from dsys.ratelimit.redis_store import RedisStore

from .conftest import free_port

_names = itertools.count()


def _key() -> str:
    return f"k{next(_names)}"


async def test_burst_then_refusal(redis_url: str) -> None:
    store = RedisStore(redis_url)
    lim = Limiter(rate=1, per=60.0, burst=5, store=store)
    try:
        key = _key()
        decisions = [await lim.hit(key) for _ in range(6)]
        assert [d.allowed for d in decisions] == [True] * 5 + [False]
        assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
        assert decisions[-1].retry_after == pytest.approx(60.0, abs=0.1)
        assert decisions[-1].reset == pytest.approx(300.0, abs=0.1)
        d = await lim.hit(_key(), cost=5)
        assert d.allowed and d.remaining == 0
    finally:
        await lim.close()


async def test_concurrent_hits_are_atomic(redis_url: str) -> None:
    stores = [RedisStore(redis_url) for _ in range(4)]
    lims = [Limiter(rate=1, per=3600.0, burst=20, store=s) for s in stores]
    key = _key()
    try:
        results = await asyncio.gather(*(lims[i % 4].hit(key) for i in range(100)))
        assert sum(d.allowed for d in results) == 20
    finally:
        for lim in lims:
            await lim.close()


async def test_idle_keys_expire_when_the_bucket_is_full(redis_url: str) -> None:
    import redis.asyncio as aioredis

    store = RedisStore(redis_url, prefix="exp:")
    lim = Limiter(rate=10, per=1.0, burst=10, store=store)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        key = _key()
        await lim.hit(key, cost=3)
        ttl = await raw.pttl(f"exp:{key}")
        assert 0 < ttl <= 300  # the bucket is full again 300 ms later: the key goes then
    finally:
        await raw.aclose()
        await lim.close()


async def test_reloads_the_script_after_a_flush(redis_url: str) -> None:
    import redis.asyncio as aioredis

    store = RedisStore(redis_url)
    lim = Limiter(rate=10, burst=10, store=store)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        assert (await lim.hit(_key())).allowed
        await raw.script_flush()
        assert (await lim.hit(_key())).allowed  # NOSCRIPT -> load -> retry
        assert lim.store_errors == 0
    finally:
        await raw.aclose()
        await lim.close()


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_failure_policy_when_redis_is_down(policy: str) -> None:
    metrics = Metrics("ratelimit")
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    lim = Limiter(rate=10, store=store, on_store_error=policy, metrics=metrics, name="down")  # type: ignore[arg-type]
    try:
        d = await lim.hit("k")
        assert d.allowed is (policy == "open")
        if policy == "closed":
            assert d.retry_after == 1.0
        assert lim.store_errors == 1
        assert 'dsys_ratelimit_store_errors_total{limit="down"} 1.0' in metrics.render().decode()
    finally:
        await lim.close()


def test_bad_configuration() -> None:
    with pytest.raises(ConfigError, match="not a Redis URL"):
        RedisStore("http://127.0.0.1:6379")
    with pytest.raises(ConfigError, match="supports token_bucket"):
        Limiter(rate=5, algorithm="fixed_window", store=RedisStore())
    with pytest.raises(ConfigError, match="unknown store URL scheme 'mongodb'"):
        store_from_url("mongodb://127.0.0.1")
    with pytest.raises(ConfigError, match="not a store URL"):
        store_from_url("127.0.0.1:6379")
    assert isinstance(store_from_url("memory://"), MemoryStore)
    assert isinstance(store_from_url("redis://127.0.0.1:1/0"), RedisStore)
    lim = Limiter(rate=5, store=RedisStore())
    with pytest.raises(ConfigError, match="hit_sync needs a MemoryStore"):
        lim.hit_sync("k")


async def test_keys_with_undecodable_bytes_are_limited(redis_url: str) -> None:
    # aiohttp hands undecodable header bytes over as lone surrogates.
    lim = Limiter(rate=1, per=60.0, burst=2, store=RedisStore(redis_url))
    try:
        for key in (f"h:\udcff{_key()}", f"\ud800{_key()}"):
            assert [(await lim.hit(key)).allowed for _ in range(3)] == [True, True, False]
        assert lim.store_errors == 0
    finally:
        await lim.close()
