"""The raw Raft peer stream on the KV server's port: handshake checks, bad frames,
oversized frames, reconnects, and the WebSocket fallback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsys.kv.client import KVClient
from dsys.kv.server import KVServer
from dsys.raft.messages import CODEC, Heartbeat
from dsys.raft.peerwire import MAX_FRAME, FrameDecoder, frame, handshake, parse_handshake

from .helpers import running_cluster, wait_leader

TOKEN = "s3cret"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[KVServer]]:
    async with running_cluster(tmp_path, token=TOKEN) as servers:
        yield servers


def _refused(server: KVServer) -> float:
    return server.node._m_refused._value.get()  # type: ignore[attr-defined,no-any-return]


async def _upgrade(
    port: int, src: str, token: str | None
) -> tuple[int, bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Ask for the raw stream as peer ``src``: (status, bytes after the head, r, w)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshake(f"127.0.0.1:{port}", src, token))
    buf = b""
    while (got := parse_handshake(buf)) is None:
        chunk = await asyncio.wait_for(reader.read(4096), 10)
        assert chunk, f"closed during the handshake: {buf!r}"
        buf += chunk
    status, rest, _ = got
    return status, rest, reader, writer


async def _closed_with(reader: asyncio.StreamReader, rest: bytes = b"") -> str:
    """What the server said in its last frame before closing (it must close)."""
    data = rest + await asyncio.wait_for(reader.read(), 10)  # until EOF
    frames = FrameDecoder().feed(data)
    assert len(frames) == 1, data
    return frames[0].decode()


def _hb(src: str, dst: str) -> bytes:
    return msgpack.packb([CODEC.to_plain(Heartbeat(src=src, dst=dst, term=0, commit=0))])


def _raw_links(server: KVServer) -> dict[str, object]:
    """The peers this server sends to over a raw stream (not the WebSocket)."""
    return {
        p: st.link
        for p, st in server.node.transport._state.items()
        if st.link is not None and st.ws_queue is None
    }


async def test_peers_replicate_over_raw_streams_and_bad_peers_are_refused(
    cluster: list[KVServer],
) -> None:
    leader = await wait_leader(cluster)
    async with KVClient([f"127.0.0.1:{s.port}" for s in cluster]) as kv:
        await kv.put("k", b"v")
    me = leader.config.id
    for s in cluster:  # leader and followers talk over raw streams, not WebSockets
        want = set(s.config.peers) if s is leader else {me}
        assert set(_raw_links(s)) == want, s.config.id
        assert s.node._raw_streams and not s.node._streams
    peer = next(iter(leader.config.peers))
    port = leader.port
    before = _refused(leader)
    for src, token, word in [
        (peer, "wrong", "token"),
        (peer, None, "token"),
        ("intruder", TOKEN, "unknown peer"),
    ]:
        status, rest, reader, writer = await _upgrade(port, src, token)
        assert status == 403, (src, token)
        assert word in (rest + await reader.read()).decode()
        writer.close()
    # good handshake, then bad frames: each closes its connection with the reason
    bad_frames = [
        (frame(b"\xc1\xff garbage"), "malformed"),
        (frame(msgpack.packb({"t": "raft.nope"})), "malformed"),
        (frame(msgpack.packb([{"t": "raft.heartbeat", "v": 1}])), "missing field"),
        (frame(_hb("n9", me)), "src/dst"),
        (frame(_hb(peer, me))[:-1] + b"\xc1" + frame(b"\xc1"), "malformed"),
        ((MAX_FRAME + 1).to_bytes(4, "big"), "exceeds"),
    ]
    for data, word in bad_frames:
        status, rest, reader, writer = await _upgrade(port, peer, TOKEN)
        assert status == 101
        writer.write(frame(_hb(peer, me)) + data)  # a good frame first: still served
        assert word in await _closed_with(reader, rest), word
        writer.close()
    assert _refused(leader) - before == 3 + len(bad_frames)
    assert leader.node.is_leader  # a stale-term heartbeat does not disturb the leader
    async with KVClient([f"127.0.0.1:{s.port}" for s in cluster]) as kv:
        await kv.put("after-garbage", b"ok")
        got = await kv.get("after-garbage")
        assert got is not None and got.value == b"ok"


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bodies=st.lists(st.binary(max_size=200), max_size=3), junk=st.binary(max_size=200))
async def test_random_frames_and_bytes_on_a_raw_stream_close_it_cleanly(
    cluster: list[KVServer], bodies: list[bytes], junk: bytes
) -> None:
    node = cluster[0]
    status, rest, reader, writer = await _upgrade(node.port, "n2", TOKEN)
    assert status == 101
    # random frame bodies, then one that is refused for sure (if none of them was)
    writer.write(b"".join(frame(b) for b in bodies) + frame(b"\xc1"))
    assert await _closed_with(reader, rest)
    writer.close()
    # random bytes (maybe half a frame), then end of stream: the server closes too
    status, rest, reader, writer = await _upgrade(node.port, "n2", TOKEN)
    assert status == 101
    writer.write(junk)
    writer.write_eof()
    await asyncio.wait_for(reader.read(), 10)
    writer.close()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{node.port}/healthz") as r,
    ):
        assert r.status == 200


async def test_a_cut_stream_reconnects_and_writes_go_on(cluster: list[KVServer]) -> None:
    leader = await wait_leader(cluster)
    async with KVClient([f"http://127.0.0.1:{leader.port}"]) as kv:
        await kv.put("a", b"1")
        old = _raw_links(leader)
        for s in cluster:  # cut every inbound stream (as a peer restart would)
            if s is not leader:
                for raw in list(s.node._raw_streams):
                    raw.close("test cut")
        for i in range(20):
            await kv.put(f"b{i}", b"2")
        await asyncio.sleep(0.2)
        new = _raw_links(leader)
        assert set(new) == set(old)
        assert all(new[p] is not old[p] for p in new)  # new connections
        for s in cluster:
            await s.node.wait_applied(leader.node.applied_index, timeout=5)
            got = s.fsm.get("b19")
            assert got is not None and got.value == b"2"


async def test_a_peer_without_the_raw_stream_gets_the_websocket(tmp_path: Path) -> None:
    # fast_path=False: aiohttp alone serves the port and answers the upgrade 404
    async with running_cluster(tmp_path, fast_path=False) as servers:
        leader = await wait_leader(servers)
        async with KVClient([f"127.0.0.1:{s.port}" for s in servers]) as kv:
            await kv.put("k", b"v")
        for s in servers:
            assert not _raw_links(s)
            on_ws = {p for p, st in s.node.transport._state.items() if st.ws_queue is not None}
            assert on_ws == (set(s.config.peers) if s is leader else {leader.config.id})
        assert leader.node._streams  # inbound WebSockets


async def test_followers_apply_the_last_write_with_none_after_it(
    cluster: list[KVServer],
) -> None:
    leader = await wait_leader(cluster)
    async with KVClient([f"http://127.0.0.1:{leader.port}"]) as kv:
        await kv.put("last", b"1")  # no append follows: the held notice (or a heartbeat)
    index = leader.node.applied_index
    for s in cluster:
        await s.node.wait_applied(index, timeout=5)
        got = s.fsm.get("last")
        assert got is not None and got.value == b"1"
    assert not leader.node._notices  # sent (or made redundant), none left behind
