"""Bad input gets a clear 4xx; the server stays up and loses nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsys.kv.client import KVClient
from dsys.kv.server import MAX_VALUE_BYTES, KVServer
from dsys.raft.messages import CODEC, Heartbeat
from dsys.raft.node import FROM_HEADER, PEER_PATH, TOKEN_HEADER

from .helpers import cluster_configs, wait_leader

TOKEN = "s3cret"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[KVServer]]:
    servers = [KVServer(c) for c in cluster_configs(tmp_path, 3, token=TOKEN)]
    for s in servers:
        await s.start()
    try:
        yield servers
    finally:
        for s in servers:
            await s.close()


async def _post_peer(
    http: aiohttp.ClientSession, port: int, body: bytes, headers: dict[str, str]
) -> tuple[int, str]:
    async with http.post(f"http://127.0.0.1:{port}{PEER_PATH}", data=body, headers=headers) as r:
        return r.status, (await r.read()).decode("utf-8", "replace")


async def test_peer_endpoint_refuses_bad_peers_and_bad_bytes(cluster: list[KVServer]) -> None:
    leader = await wait_leader(cluster)
    port = leader.port
    good = {FROM_HEADER: "n2" if leader.config.id != "n2" else "n1", TOKEN_HEADER: TOKEN}
    hb = Heartbeat(src=good[FROM_HEADER], dst=leader.config.id, term=0, commit=0)
    body = msgpack.packb([CODEC.to_plain(hb)])
    async with aiohttp.ClientSession() as http:
        status, text = await _post_peer(http, port, body, {**good, TOKEN_HEADER: "wrong"})
        assert status == 403 and "token" in text
        status, text = await _post_peer(http, port, body, {FROM_HEADER: good[FROM_HEADER]})
        assert status == 403
        status, text = await _post_peer(http, port, body, {**good, FROM_HEADER: "intruder"})
        assert status == 403 and "unknown peer" in text
        status, text = await _post_peer(http, port, b"\xc1\xff garbage", good)
        assert status == 400 and "malformed" in text
        status, text = await _post_peer(http, port, msgpack.packb({"t": "raft.nope"}), good)
        assert status == 400
        status, text = await _post_peer(
            http, port, msgpack.packb([{"t": "raft.heartbeat", "v": 1}]), good
        )
        assert status == 400 and "missing field" in text
        spoofed = Heartbeat(src="n3", dst="n9", term=0, commit=0)
        status, text = await _post_peer(http, port, msgpack.packb([CODEC.to_plain(spoofed)]), good)
        assert status == 400
        status, _ = await _post_peer(http, port, body, good)
        assert status in (200, 204)
    assert leader.node.is_leader  # a stale-term heartbeat does not disturb the leader


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=st.binary(max_size=200))
async def test_random_bytes_to_peer_port_get_4xx(cluster: list[KVServer], junk: bytes) -> None:
    port = cluster[0].port
    async with aiohttp.ClientSession() as http:
        status, _ = await _post_peer(http, port, junk, {FROM_HEADER: "n2", TOKEN_HEADER: TOKEN})
    assert status in (200, 204, 400)


async def test_client_api_bad_requests_and_nothing_lost(cluster: list[KVServer]) -> None:
    leader = await wait_leader(cluster)
    base = f"http://127.0.0.1:{leader.port}"
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{base}/v1/kv/keep", data=b"safe") as r:
            assert r.status == 200
        cases = [
            ("PUT", "/v1/kv/k?if_revision=abc", b"x", 400, "if_revision"),
            ("PUT", "/v1/kv/k?if_revision=-1", b"x", 400, "if_revision"),
            ("PUT", "/v1/kv/" + "k" * 2000, b"x", 400, "longer"),
            ("GET", "/v1/kv/k?consistency=maybe", b"", 400, "consistency"),
            ("GET", "/v1/kv?limit=0", b"", 400, "limit"),
            ("GET", "/v1/kv?limit=x", b"", 400, "limit"),
            ("PUT", "/v1/kv/big", b"x" * (MAX_VALUE_BYTES + 1), 413, ""),
        ]
        for method, path, body, want, word in cases:
            async with http.request(method, base + path, data=body) as r:
                text = await r.text()
                assert r.status == want, (path, r.status, text)
                assert word in text, (path, text)
        # garbage on the WebSocket channel: an error answer, the connection stays usable
        async with http.ws_connect(f"{base}/v1/ws") as ws:
            await ws.send_bytes(b"\xc1 not msgpack")
            reply = msgpack.unpackb((await ws.receive()).data)
            assert reply[0]["status"] == "bad_request"
            await ws.send_bytes(msgpack.packb([{"id": 1, "op": "frobnicate", "key": "k"}]))
            reply = msgpack.unpackb((await ws.receive()).data)
            assert reply[0]["status"] == "bad_request" and "unknown op" in reply[0]["message"]
            await ws.send_bytes(msgpack.packb([{"id": 2, "op": "put", "key": "", "value": b""}]))
            reply = msgpack.unpackb((await ws.receive()).data)
            assert reply[0]["status"] == "bad_request"
            await ws.send_str("text frame")
            reply = msgpack.unpackb((await ws.receive()).data)
            assert reply[0]["status"] == "bad_request"
        async with http.get(f"{base}/v1/kv/keep") as r:
            assert r.status == 200 and await r.read() == b"safe"
    async with KVClient([f"127.0.0.1:{s.port}" for s in cluster]) as kv:
        got = await kv.get("keep")
        assert got is not None and got.value == b"safe"


async def test_no_leader_gives_503_with_retry_after(tmp_path: Path) -> None:
    # a single node of a 3-node cluster can never elect a leader
    cfg = cluster_configs(tmp_path, 3)[0]
    async with KVServer(cfg) as server, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.port}/v1/kv/k"
        async with http.put(url, data=b"v") as r:
            assert r.status == 503 and "Retry-After" in r.headers
        async with http.get(url) as r:
            assert r.status == 503
        async with http.get(url + "?consistency=stale") as r:
            assert r.status == 404  # stale reads answer locally even without a leader
