"""The limiter node's HTTP API (in-process, real sockets) and ClusterStore against it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.clock import ManualClock
from dsys.errors import BadInputError, ConfigError
from dsys.observability import start_site
from dsys.ratelimit import ClusterStore, Limiter, LimiterServer, ServerConfig
from dsys.ratelimit.limiter import store_from_url

from .conftest import free_port

BUCKET = ["token_bucket", 10.0, 1.0, 5]


@pytest.fixture
async def node() -> AsyncIterator[tuple[str, LimiterServer, ManualClock]]:
    clock = ManualClock(1000.0)
    server = LimiterServer(ServerConfig(max_body=2048, max_policies=4), clock=clock)
    runner, port = await start_site(server.app(), "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}", server, clock
    finally:
        await runner.cleanup()


async def _post(addr: str, body: bytes, **headers: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://{addr}/v1/hit", data=body, headers=headers) as r,
    ):
        return r.status, await r.read()


async def test_hit_and_lease_over_http(node: tuple[str, LimiterServer, ManualClock]) -> None:
    addr, _, clock = node
    body = msgpack.packb({"key": "k", "cost": 2, "policy": BUCKET})
    status, raw = await _post(addr, body)
    assert status == 200
    assert msgpack.unpackb(raw) == {
        "allowed": True,
        "remaining": 3,
        "retry_after": 0.0,
        "reset": pytest.approx(0.2),
        "granted": 2,
    }
    status, raw = await _post(addr, msgpack.packb({"key": "k", "policy": BUCKET, "lease": [1, 5]}))
    assert msgpack.unpackb(raw)["granted"] == 3
    status, raw = await _post(addr, msgpack.packb({"key": "k", "policy": BUCKET, "lease": [1, 5]}))
    answer = msgpack.unpackb(raw)
    assert answer["granted"] == 0 and not answer["allowed"]
    assert answer["retry_after"] == pytest.approx(0.1)
    clock.advance(0.1)
    status, raw = await _post(addr, msgpack.packb({"key": "k", "policy": BUCKET}))
    assert msgpack.unpackb(raw)["allowed"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xc1", "malformed"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({"key": "k", "policy": ["leaky", 1]}), "unknown policy"),
        (msgpack.packb({"key": "k", "policy": ["token_bucket", -1.0, 1.0, 5]}), "rate must be"),
        (msgpack.packb({"key": "k", "policy": BUCKET, "cost": 6}), "exceeds"),
        (msgpack.packb({"key": "", "policy": BUCKET}), "key must be"),
        (msgpack.packb({"key": "x" * 1025, "policy": BUCKET}), "key must be"),
        (msgpack.packb({"key": "k", "policy": BUCKET, "extra": 1}), "unknown field"),
        (msgpack.packb({"key": "k", "policy": BUCKET, "lease": [3, 2]}), "lease must be"),
        (
            msgpack.packb({"key": "k", "policy": ["fixed_window", 5, 1.0], "lease": [1, 2]}),
            "leases",
        ),
    ],
    ids=[
        "garbage",
        "list",
        "kind",
        "rate",
        "cost",
        "empty-key",
        "long-key",
        "field",
        "lease",
        "wl",
    ],
)
async def test_bad_requests_get_400_and_the_node_stays_up(
    node: tuple[str, LimiterServer, ManualClock], body: bytes, fragment: str
) -> None:
    addr, _, _ = node
    status, raw = await _post(addr, body)
    assert status == 400, raw
    assert fragment in raw.decode()
    status, _ = await _post(addr, msgpack.packb({"key": "k", "policy": BUCKET}))
    assert status == 200


async def test_oversized_body_and_too_many_policies(
    node: tuple[str, LimiterServer, ManualClock],
) -> None:
    addr, _, _ = node
    status, raw = await _post(addr, b"\x00" * 5000)
    assert status == 413 and b"exceeds the limit of 2048 bytes" in raw
    for i in range(4):
        pol = ["token_bucket", 10.0 + i, 1.0, 5]
        status, _ = await _post(addr, msgpack.packb({"key": "k", "policy": pol}))
        assert status == 200
    status, raw = await _post(addr, msgpack.packb({"key": "k", "policy": ["fixed_window", 3, 1.0]}))
    assert status == 400 and b"distinct policies" in raw


async def test_health_and_metrics(node: tuple[str, LimiterServer, ManualClock]) -> None:
    addr, _, _ = node
    await _post(addr, msgpack.packb({"key": "k", "policy": BUCKET}))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{addr}/healthz") as r:
            assert r.status == 200 and (await r.json())["ok"] is True
        async with s.get(f"http://{addr}/metrics") as r:
            text = await r.text()
    assert 'dsys_ratelimit_server_decisions_total{result="allowed"} 1.0' in text
    assert "dsys_ratelimit_server_keys 1.0" in text


async def test_token_is_required_when_configured() -> None:
    server = LimiterServer(ServerConfig(token="s3cret"))
    runner, port = await start_site(server.app(), "127.0.0.1", 0)
    addr = f"127.0.0.1:{port}"
    try:
        status, raw = await _post(addr, msgpack.packb({"key": "k", "policy": BUCKET}))
        assert status == 401 and b"bearer token" in raw
        good = Limiter(rate=10, store=ClusterStore([addr], token="s3cret"))
        assert (await good.hit("k")).allowed
        bad = Limiter(rate=10, store=ClusterStore([addr], token="wrong"))
        with pytest.raises(ConfigError, match="refused our token"):
            await bad.hit("k")
        await good.close()
        await bad.close()
    finally:
        await runner.cleanup()


async def test_cluster_store_over_two_in_process_nodes() -> None:
    servers = [LimiterServer(clock=ManualClock(5.0)) for _ in range(2)]
    sites = [await start_site(s.app(), "127.0.0.1", 0) for s in servers]
    nodes = [f"127.0.0.1:{port}" for _, port in sites]
    store = ClusterStore(nodes)
    lim = Limiter(rate=1, per=60.0, burst=3, store=store)
    try:
        keys = [f"user{i}" for i in range(20)]
        for k in keys:
            assert [(await lim.hit(k)).allowed for _ in range(4)] == [True, True, True, False]
        owners = {store.owner(k) for k in keys}
        assert owners == set(nodes)  # both nodes own some keys
        assert store.round_trips == 80
        with pytest.raises(BadInputError, match="exceeds"):
            await lim.hit("k", cost=4)
        win = Limiter(rate=2, per=10.0, algorithm="sliding_window", store=store)
        assert [(await win.hit("w")).allowed for _ in range(3)] == [True, True, False]
    finally:
        await lim.close()
        for runner, _ in sites:
            await runner.cleanup()


async def test_leases_spend_locally_and_stay_bounded() -> None:
    server = LimiterServer(clock=ManualClock(5.0))
    runner, port = await start_site(server.app(), "127.0.0.1", 0)
    store = ClusterStore([f"127.0.0.1:{port}"], lease_size=10, lease_ttl=60.0)
    lim = Limiter(rate=1, per=60.0, burst=25, store=store)
    try:
        results = [await lim.hit("k") for _ in range(30)]
        assert sum(d.allowed for d in results) == 25  # exactly the burst, never more
        assert store.round_trips == 4  # 10 + 10 + 5, then one refused request
        assert results[0].remaining == 9  # the local lease
        assert store.leased_tokens() == 0
    finally:
        await lim.close()
        await runner.cleanup()


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_failure_policy_when_the_owner_is_down(policy: str) -> None:
    lim = Limiter(
        rate=5,
        store=ClusterStore([f"127.0.0.1:{free_port()}"], timeout=0.5),
        on_store_error=policy,  # type: ignore[arg-type]
        failure_retry_after=2.0,
    )
    try:
        d = await lim.hit("k")
        assert d.allowed is (policy == "open")
        assert lim.store_errors == 1
        if policy == "closed":
            assert d.retry_after == 2.0
    finally:
        await lim.close()


def test_bad_cluster_configuration() -> None:
    with pytest.raises(ConfigError, match="non-empty list"):
        ClusterStore([])
    with pytest.raises(ConfigError, match="use host:port"):
        ClusterStore(["nohost"])
    with pytest.raises(ConfigError, match="lease_size"):
        ClusterStore(["127.0.0.1:1"], lease_size=-1)
    with pytest.raises(ConfigError, match="unknown parameter"):
        store_from_url("dsys://127.0.0.1:1?leases=3")
    store = store_from_url("dsys://127.0.0.1:1,127.0.0.1:2?lease=5&ttl=0.5")
    assert isinstance(store, ClusterStore)
    assert store.lease_size == 5 and store.lease_ttl == 0.5
    weighted = ClusterStore({"127.0.0.1:1": 3, "127.0.0.1:2": 1})
    owners = [weighted.owner(f"k{i}") for i in range(2000)]
    assert owners.count("127.0.0.1:1") > 2 * owners.count("127.0.0.1:2")  # weights count


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_bodies = st.fixed_dictionaries(
    {},
    optional={
        "key": _values | st.text(min_size=1, max_size=20),
        "cost": _values | st.integers(0, 8),
        "policy": _values
        | st.tuples(
            st.sampled_from(["token_bucket", "sliding_window", "fixed_window", "x"]),
            _values,
            _values,
            _values,
        ).map(list),
        "lease": _values,
    },
)


@settings(max_examples=300, deadline=None)
@given(body=_bodies | _values)
def test_any_decoded_body_gets_an_answer_or_bad_input(body: object) -> None:
    server = LimiterServer(clock=ManualClock(1.0))
    try:
        answer = server.decide(body)
    except BadInputError:
        return
    assert set(answer) == {"allowed", "remaining", "retry_after", "reset", "granted"}


async def _spend_schedule(
    events: list[tuple[int, float, int]], lease: int, ttl: float, clients: int
) -> list[tuple[float, int]]:
    clock = ManualClock(100.0)  # shared by the node and the clients' lease expiry
    runner, port = await start_site(LimiterServer(clock=clock).app(), "127.0.0.1", 0)
    stores = [
        ClusterStore([f"127.0.0.1:{port}"], lease_size=lease, lease_ttl=ttl, clock=clock)
        for _ in range(clients)
    ]
    lims = [Limiter(rate=10, per=1.0, burst=6, store=s) for s in stores]
    spends = []
    try:
        for client, dt, cost in events:
            clock.advance(dt)
            d = await lims[client % clients].hit("k", cost)
            if d.allowed:
                spends.append((clock.now(), cost))
        for s in stores:
            assert s.leased_tokens() <= lease
    finally:
        for lim in lims:
            await lim.close()
        await runner.cleanup()
    return spends


@settings(max_examples=25, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.integers(0, 2), st.floats(0.0, 0.3), st.integers(1, 3)),
        min_size=1,
        max_size=50,
    ),
    lease=st.integers(1, 6),
    ttl=st.sampled_from([0.05, 0.2, 1.0, 5.0]),
)
def test_leases_never_exceed_the_stated_over_admission_bound(
    events: list[tuple[int, float, int]], lease: int, ttl: float
) -> None:
    """Any window of length t spends at most b + r*t + min(C*lease, r*ttl) tokens."""
    import asyncio

    clients, rate, burst = 3, 10.0, 6
    spends = asyncio.run(_spend_schedule(events, lease, ttl, clients))
    extra = min(clients * lease, rate * ttl)
    for i in range(len(spends)):
        total = 0
        for j in range(i, len(spends)):
            total += spends[j][1]
            length = spends[j][0] - spends[i][0]
            assert total <= burst + rate * length + extra + 1e-6, (i, j, total, length)


async def test_leases_do_over_admit_by_the_unspent_tokens() -> None:
    # Client 0 leases 6 tokens at t=0 and spends 1; at t=0.6 the bucket is full again,
    # client 1 leases and spends all 6, and client 0 spends its 5 leftovers: 11 tokens
    # in a zero-length window where a plain bucket allows 6 (b + r*0). The excess, 5,
    # is within min(C * lease_size, r * lease_ttl) = min(12, 50).
    events = [(0, 0.0, 1)] + [(1, 0.6 if i == 0 else 0.0, 1) for i in range(6)]
    events += [(0, 0.0, 1)] * 5
    spends = await _spend_schedule(events, 6, 5.0, 2)
    at_06 = [c for t, c in spends if t == pytest.approx(100.6)]
    assert sum(at_06) == 11


async def test_lease_locks_stay_bounded_while_the_owner_is_down() -> None:
    # Each key gets a lock serializing its lease requests; when every request fails no
    # lease is ever stored, and the locks must not pile up (one per key ever seen).
    store = ClusterStore([f"127.0.0.1:{free_port()}"], lease_size=5, timeout=0.5, max_leases=20)
    lim = Limiter(rate=5, store=store, on_store_error="open")
    try:
        for i in range(200):
            assert (await lim.hit(f"client-{i}")).allowed
        assert lim.store_errors == 200
        assert len(store._locks) <= 20
    finally:
        await lim.close()


ODD_KEYS = ["", "x" * 5000, "h:X-Key:\udcff\udcfe", "\ud800", "ü" * 1024]


@pytest.mark.parametrize("lease", [0, 3])
async def test_any_string_key_is_limited_through_the_cluster(lease: int) -> None:
    # Keys come from clients (headers may hold undecodable bytes, as lone surrogates):
    # every string is a key, limited like any other, never a node-side 400.
    server = LimiterServer(clock=ManualClock(5.0))
    runner, port = await start_site(server.app(), "127.0.0.1", 0)
    lim = Limiter(
        rate=1, per=60.0, burst=2, store=ClusterStore([f"127.0.0.1:{port}"], lease_size=lease)
    )
    try:
        for key in ODD_KEYS:
            assert [(await lim.hit(key)).allowed for _ in range(3)] == [True, True, False], key
        assert await lim.hit("x" * 5001)  # a different long key has its own bucket
        assert lim.store_errors == 0
    finally:
        await lim.close()
        await runner.cleanup()
