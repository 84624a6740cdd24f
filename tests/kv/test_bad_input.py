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
from dsys.raft.node import FROM_HEADER, PEER_PATH, STREAM_PATH, TOKEN_HEADER

from .helpers import cluster_configs, running_cluster, wait_leader

TOKEN = "s3cret"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[KVServer]]:
    async with running_cluster(tmp_path, token=TOKEN) as servers:
        yield servers


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


async def test_peer_post_is_refused_with_503_when_the_inbox_is_full(
    cluster: list[KVServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsys.raft.node import RaftNode

    leader = await wait_leader(cluster)
    src = next(s.config.id for s in cluster if s is not leader)
    good = {FROM_HEADER: src, TOKEN_HEADER: TOKEN}
    body = msgpack.packb(
        [CODEC.to_plain(Heartbeat(src=src, dst=leader.config.id, term=0, commit=0))]
    )
    monkeypatch.setattr(RaftNode, "_inbox_limit", property(lambda self: 0))
    async with aiohttp.ClientSession() as http:
        status, text = await _post_peer(http, leader.port, body, good)
    assert status == 503 and "inbox full" in text
    assert len(leader.node._inbox) == 0


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=st.binary(max_size=200))
async def test_random_bytes_to_peer_port_get_4xx(cluster: list[KVServer], junk: bytes) -> None:
    port = cluster[0].port
    async with aiohttp.ClientSession() as http:
        status, _ = await _post_peer(http, port, junk, {FROM_HEADER: "n2", TOKEN_HEADER: TOKEN})
    assert status in (200, 204, 400)


def _refused(server: KVServer) -> float:
    return server.node._m_refused._value.get()  # type: ignore[attr-defined,no-any-return]


async def _expect_refused_frame(ws: aiohttp.ClientWebSocketResponse, word: str) -> None:
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE, msg
    assert ws.close_code == aiohttp.WSCloseCode.UNSUPPORTED_DATA
    assert word in msg.extra, msg.extra


async def test_peer_stream_refuses_bad_peers_and_bad_frames(cluster: list[KVServer]) -> None:
    leader = await wait_leader(cluster)
    url = f"http://127.0.0.1:{leader.port}{STREAM_PATH}"
    src = "n2" if leader.config.id != "n2" else "n1"
    good = {FROM_HEADER: src, TOKEN_HEADER: TOKEN}
    hb = Heartbeat(src=src, dst=leader.config.id, term=0, commit=0)
    body = msgpack.packb([CODEC.to_plain(hb)])
    before = _refused(leader)
    async with aiohttp.ClientSession() as http:
        # token and peer id are checked before the upgrade: a clear 403
        for headers, word in (
            ({**good, TOKEN_HEADER: "wrong"}, "token"),
            ({FROM_HEADER: src}, "token"),
            ({**good, FROM_HEADER: "intruder"}, "unknown peer"),
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(url, headers=headers)
            assert err.value.status == 403
            async with http.get(url, headers=headers) as r:
                assert r.status == 403 and word in await r.text()
        spoofed = Heartbeat(src="n3", dst="n9", term=0, commit=0)
        bad_frames = [
            (b"\xc1\xff garbage", "malformed"),
            (msgpack.packb({"t": "raft.nope"}), "malformed"),
            (msgpack.packb([{"t": "raft.heartbeat", "v": 1}]), "missing field"),
            (msgpack.packb([["A", src, leader.config.id, 1, 0, 0, 0, "x"]]), "malformed"),
            (msgpack.packb([CODEC.to_plain(spoofed)]), "src/dst"),
        ]
        for frame, word in bad_frames:
            async with http.ws_connect(url, headers=good) as ws:
                await ws.send_bytes(body)  # a good frame first: the connection stays open
                await ws.send_bytes(frame)
                await _expect_refused_frame(ws, word)
        async with http.ws_connect(url, headers=good) as ws:
            await ws.send_str("text")
            await _expect_refused_frame(ws, "binary")
    assert _refused(leader) - before == len(bad_frames) + 1
    assert leader.node.is_leader  # a stale-term heartbeat does not disturb the leader
    async with KVClient([f"127.0.0.1:{s.port}" for s in cluster]) as kv:
        await kv.put("after-garbage", b"ok")
        got = await kv.get("after-garbage")
        assert got is not None and got.value == b"ok"


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=st.binary(max_size=200))
async def test_random_frames_on_peer_stream_close_it_cleanly(
    cluster: list[KVServer], junk: bytes
) -> None:
    node = cluster[0]
    url = f"http://127.0.0.1:{node.port}{STREAM_PATH}"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers={FROM_HEADER: "n2", TOKEN_HEADER: TOKEN}) as ws:
            await ws.send_bytes(junk)
            await ws.send_bytes(b"\xc1")  # refused for sure, if the junk was not
            await _expect_refused_frame(ws, "malformed")
        async with http.get(f"http://127.0.0.1:{node.port}/healthz") as r:
            assert r.status == 200


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
            await ws.send_bytes(msgpack.packb([{"op": "put", "key": "k", "value": 5}]))
            reply = msgpack.unpackb((await ws.receive()).data)
            assert reply[0]["status"] == "bad_request" and "'id'" in reply[0]["message"]
            await ws.send_bytes(msgpack.packb([{"id": 3, "op": "put", "key": "k", "value": 5}]))
            reply = msgpack.unpackb((await ws.receive()).data)
            assert reply[0] == {
                "id": 3,
                "status": "bad_request",
                "message": reply[0]["message"],
                "node": leader.config.id,
            }
            assert "value must be bytes" in reply[0]["message"]
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
