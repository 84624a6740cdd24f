"""Watches on in-process clusters: WebSocket (KVClient) and NDJSON over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dsys.codec import decode, encode
from dsys.errors import BadInputError, CompactedError
from dsys.kv.client import KVClient, Watcher
from dsys.kv.fsm import WatchEvent
from dsys.kv.server import KVServer
from dsys.kv.watch import OUTBOX_LIMIT

from .helpers import cluster_configs, running_cluster, wait_leader


async def take(w: Watcher, n: int, timeout: float = 10.0) -> list[WatchEvent]:  # noqa: ASYNC109
    out: list[WatchEvent] = []

    async def run() -> None:
        async for ev in w:
            out.append(ev)
            if len(out) >= n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_client_watch_order_prefix_values_deletes_and_expiry(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as servers:
        leader = await wait_leader(servers)
        follower = next(s for s in servers if s is not leader)
        async with (
            KVClient([f"127.0.0.1:{leader.port}"]) as kv,
            KVClient([f"127.0.0.1:{follower.port}"]) as watcher_client,
        ):
            r0 = await kv.put("other/x", b"0")
            # a follower serves the watch from its applied state
            async with watcher_client.watch("app/", start_revision=r0) as w:
                assert w.endpoint == f"127.0.0.1:{follower.port}"
                r1 = await kv.put("app/a", b"1")
                await kv.put("other/y", b"2")
                r3 = await kv.put("app/b", b"\xff\x00")
                r4 = await kv.delete("app/a")
                await kv.put("app/t", b"short-lived", ttl=1)
                evs = await take(w, 5, timeout=15)
        assert evs[:4] == [
            WatchEvent(r1, "put", "app/a", b"1"),
            WatchEvent(r3, "put", "app/b", b"\xff\x00"),
            WatchEvent(r4 or 0, "delete", "app/a"),
            WatchEvent(r4 + 1 if r4 else 0, "put", "app/t", b"short-lived"),
        ]
        assert evs[4].type == "expire" and evs[4].key == "app/t" and evs[4].value is None
        assert w.revision == evs[4].revision


async def test_watch_from_now_and_from_the_past(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as servers:
        await wait_leader(servers)
        async with KVClient([f"127.0.0.1:{s.port}" for s in servers]) as kv:
            revs = [await kv.put(f"k{i}", b"%d" % i) for i in range(5)]
            w = await kv.watch("k").start()  # from the next change
            assert w.next_revision == revs[-1] + 1
            r = await kv.put("k9", b"9")
            assert [e.revision for e in await take(w, 1)] == [r]
            await w.close()
            past = kv.watch("", start_revision=revs[1])
            got = await take(past, 4)
            assert [e.key for e in got] == ["k1", "k2", "k3", "k4"]
            await past.close()
            with pytest.raises(StopAsyncIteration):
                await past.__anext__()


async def test_compacted_start_is_a_typed_error_and_410(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, watch_history=5) as servers:
        leader = await wait_leader(servers)
        async with KVClient([f"127.0.0.1:{s.port}" for s in servers]) as kv:
            revs = [await kv.put(f"c{i}", b"x") for i in range(12)]
            await asyncio.sleep(0.2)  # every replica applied them
            with pytest.raises(CompactedError) as info:
                await kv.watch("c", start_revision=revs[0]).start()
            assert info.value.revision == revs[-1] - 4
            assert "refetch" in str(info.value)
            # from the revision it names, every later event comes
            w = kv.watch("c", start_revision=info.value.revision)
            assert [e.revision for e in await take(w, 5)] == revs[-5:]
            await w.close()
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{leader.port}/v1/watch?start_revision=1") as r,
        ):
            assert r.status == 410
            body = await r.json()
            assert body["error"] == "compacted" and body["revision"] == revs[-1] - 4


async def test_http_ndjson_stream(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as servers:
        leader = await wait_leader(servers)
        follower = next(s for s in servers if s is not leader)
        async with KVClient([f"127.0.0.1:{leader.port}"]) as kv, aiohttp.ClientSession() as http:
            r1 = await kv.put("n/a", b"hello")
            await kv.put("m/skip", b"-")
            r3 = await kv.put("n/b", b"\xff")
            r4 = await kv.delete("n/a")
            url = f"http://127.0.0.1:{follower.port}/v1/watch?prefix=n/&start_revision={r1}"
            async with http.get(url) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("application/x-ndjson")
                assert resp.headers["X-Dsys-Start-Revision"] == str(r1)
                lines = [json.loads(await resp.content.readline()) for _ in range(3)]
                r5 = await kv.put("n/c", b"live")
                lines.append(json.loads(await resp.content.readline()))
            assert lines == [
                {"revision": r1, "type": "put", "key": "n/a", "value": "hello"},
                {"revision": r3, "type": "put", "key": "n/b", "value_b64": "/w=="},
                {"revision": r4, "type": "delete", "key": "n/a"},
                {"revision": r5, "type": "put", "key": "n/c", "value": "live"},
            ]
            base = f"http://127.0.0.1:{follower.port}/v1/watch"
            for query in ("start_revision=-1", "start_revision=x", "prefix=" + "p" * 1100):
                async with http.get(f"{base}?{query}") as resp:
                    assert resp.status == 400, query
                    assert (await resp.json())["error"] == "bad_request"
        # the server stays up, and notices that the client went away
        for _ in range(100):
            if follower.watches.count == 0:
                break
            await asyncio.sleep(0.05)
        assert follower.watches.count == 0


async def _ws(http: aiohttp.ClientSession, port: int) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(f"http://127.0.0.1:{port}/v1/ws")


async def _call(ws: aiohttp.ClientWebSocketResponse, *reqs: dict[str, Any]) -> list[Any]:
    await ws.send_bytes(encode(list(reqs)))
    out: list[Any] = []
    while len(out) < len(reqs):
        msg = await asyncio.wait_for(ws.receive(), 5)
        out += decode(msg.data)
    return out


async def test_bad_watch_requests_get_clear_errors_and_the_server_stays_up(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path, max_watches_per_ws=2) as servers:
        leader = await wait_leader(servers)
        async with aiohttp.ClientSession() as http:
            ws = await _ws(http, leader.port)
            bad = await _call(
                ws,
                {"id": 1, "op": "watch", "prefix": 5},
                {"id": 2, "op": "watch", "start_revision": -1},
                {"id": 3, "op": "watch", "start_revision": True},
                {"id": 4, "op": "watch", "start_revision": "7"},
                {"op": "watch"},
                {"id": 6, "op": "unwatch", "watch": 99},
            )
            assert [r["status"] for r in bad] == ["bad_request"] * 6
            assert "prefix must be a string" in bad[0]["message"]
            assert "non-negative" in bad[1]["message"]
            ok = await _call(ws, {"id": 10, "op": "watch"}, {"id": 11, "op": "watch"})
            assert [r["status"] for r in ok] == ["ok", "ok"]
            [third] = await _call(ws, {"id": 12, "op": "watch"})
            assert third["status"] == "bad_request" and "too many watches" in third["message"]
            [dup] = await _call(ws, {"id": 12, "op": "unwatch", "watch": 10})
            assert dup["status"] == "ok"
            [again] = await _call(ws, {"id": 11, "op": "watch"})
            assert again["status"] == "bad_request" and "already open" in again["message"]
            assert leader.watches.count == 1
            await ws.close()
            await asyncio.sleep(0.1)
            assert leader.watches.count == 0  # the connection's watches went with it
        async with KVClient([f"127.0.0.1:{leader.port}"]) as kv:
            with pytest.raises(BadInputError):
                kv.watch(5)  # type: ignore[arg-type]
            with pytest.raises(BadInputError):
                kv.watch("", start_revision=-3)
            assert await kv.put("still", b"up") > 0


async def test_server_wide_watch_limit(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1, max_watches=1) as servers:
        leader = await wait_leader(servers)
        async with aiohttp.ClientSession() as http:
            ws = await _ws(http, leader.port)
            [ok, full] = await _call(ws, {"id": 1, "op": "watch"}, {"id": 2, "op": "watch"})
            assert ok["status"] == "ok" and full["status"] == "unavailable"
            async with http.get(f"http://127.0.0.1:{leader.port}/v1/watch") as r:
                assert r.status == 503
            await ws.close()


async def test_slow_consumer_pauses_and_resumes_without_loss(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1) as servers:
        await wait_leader(servers)
        async with KVClient([f"127.0.0.1:{servers[0].port}"]) as kv:
            w = await kv.watch("s/", max_buffered=8).start()
            revs = await asyncio.gather(*(kv.put(f"s/{i}", b"%d" % i) for i in range(60)))
            got: list[WatchEvent] = []
            async for ev in w:
                got.append(ev)
                await asyncio.sleep(0.002)
                if len(got) == 60:
                    break
            await w.close()
            assert [e.revision for e in got] == sorted(revs)
            assert w.resumes >= 1  # it paused at least once


class _StuckOutbox:
    """An outbox whose writer never drains it (a client that stopped reading)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = [{}] * OUTBOX_LIMIT

    def put_nowait(self, resp: dict[str, Any]) -> None:
        self.items.append(resp)

    def __len__(self) -> int:
        return len(self.items)


async def test_watcher_that_does_not_keep_up_is_cancelled_not_buffered(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1, watch_history=10) as servers:
        server: KVServer = await wait_leader(servers)
        out = _StuckOutbox()
        session = server.watches.ws_session(out)
        session.handle({"id": 1, "op": "watch", "start_revision": 0})
        async with KVClient([f"127.0.0.1:{server.port}"]) as kv:
            for i in range(30):
                await kv.put(f"k{i}", b"x")
        for _ in range(100):
            if len(out.items) > OUTBOX_LIMIT + 1:
                break
            await asyncio.sleep(0.02)
        ack, final = out.items[OUTBOX_LIMIT:]
        assert ack["status"] == "ok"
        assert final["status"] == "compacted" and "did not keep up" in final["message"]
        await asyncio.sleep(0.05)
        assert len(session) == 0 and server.watches.count == 0


async def test_resume_after_leader_failover_without_gaps_or_duplicates(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as servers:
        leader = await wait_leader(servers)
        eps = [f"127.0.0.1:{s.port}" for s in servers]
        # the watcher starts on the leader, which is then shut down under write load
        leader_ep = f"127.0.0.1:{leader.port}"
        async with (
            KVClient([leader_ep, *[e for e in eps if e != leader_ep]]) as wc,
            KVClient(eps, timeout=20) as kv,
        ):
            start = await kv.put("f/start", b"s")
            w = await wc.watch("f/", start_revision=start).start()
            assert w.endpoint == leader_ep
            acked: list[int] = [start]
            stop = asyncio.Event()

            async def writer(n: int) -> None:
                i = 0
                while not stop.is_set():
                    acked.append(await kv.put(f"f/{n}/{i}", b"%d" % i))
                    i += 1

            writers = [asyncio.create_task(writer(n)) for n in range(4)]
            await asyncio.sleep(0.3)
            await leader.close()
            await wait_leader([s for s in servers if s is not leader])
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*writers)
            last = max(acked)
            got: list[WatchEvent] = []
            async for ev in w:
                got.append(ev)
                if ev.revision >= last:
                    break
            await w.close()
        revs = [e.revision for e in got]
        # every change, once, in order: the revisions are exactly start..last
        assert revs == list(range(start, last + 1))
        assert set(acked) <= set(revs)
        assert w.resumes >= 1 and w.endpoint != leader_ep


async def test_large_values_reach_a_watcher_that_starts_behind(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1) as servers:
        await wait_leader(servers)
        async with KVClient([f"127.0.0.1:{servers[0].port}"]) as kv:
            revs = [await kv.put(f"big/{i}", bytes([i]) * 900_000) for i in range(24)]
            w = kv.watch("big/", start_revision=revs[0])
            got = await take(w, 24, timeout=30)
            await w.close()
            assert [e.value for e in got] == [bytes([i]) * 900_000 for i in range(24)]
            assert await kv.put("after", b"x") > revs[-1]  # the connection is fine


async def test_a_node_whose_history_is_too_short_sends_the_watch_elsewhere(
    tmp_path: Path,
) -> None:
    configs = cluster_configs(tmp_path, 3)
    configs[0] = dataclasses.replace(configs[0], watch_history=2)  # n1 keeps 2 events
    servers = [KVServer(c) for c in configs]
    try:
        for s in servers:
            await s.start()
        await wait_leader(servers)
        eps = [f"127.0.0.1:{s.port}" for s in servers]
        async with KVClient(eps) as kv:
            revs = [await kv.put(f"h{i}", b"x") for i in range(6)]
            for s in servers:
                await s.node.wait_applied(servers[0].node.applied_index, 5.0)
            assert servers[0].fsm.compacted_revision == revs[-3]
            async with KVClient(eps) as wc:  # n1 first: compacted there, fine on n2
                wc._leader = eps[0]
                w = wc.watch("h", start_revision=revs[0])
                assert [e.revision for e in await take(w, 6)] == revs
                assert w.endpoint == eps[1]
                await w.close()
            async with KVClient(eps[:1]) as only_n1:
                with pytest.raises(CompactedError) as info:
                    await only_n1.watch("h", start_revision=revs[0]).start()
                assert info.value.revision == revs[-2]
    finally:
        for s in servers:
            await s.close()


async def test_idle_http_watch_writes_progress_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dsys.kv.watch.PROGRESS_EVERY", 0.3)
    async with running_cluster(tmp_path, n=1) as servers:
        server = await wait_leader(servers)
        async with KVClient([f"127.0.0.1:{server.port}"]) as kv, aiohttp.ClientSession() as http:
            rev = await kv.put("other", b"x")  # not under the prefix
            url = f"http://127.0.0.1:{server.port}/v1/watch?prefix=p/&start_revision=1"
            async with http.get(url) as resp:
                line = json.loads(await asyncio.wait_for(resp.content.readline(), 5))
                # nothing under p/ up to `rev`: resuming from rev + 1 misses nothing
                assert line == {"type": "progress", "revision": rev}
                r2 = await kv.put("p/a", b"1")
                line = json.loads(await asyncio.wait_for(resp.content.readline(), 5))
                assert line == {"revision": r2, "type": "put", "key": "p/a", "value": "1"}
