"""Stream servers in-process over real sockets: client, HTTP API, push, failover, snapshots."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dsys.codec import decode, encode
from dsys.errors import BadInputError, ConflictError, NotFoundError, PayloadTooLargeError
from dsys.raft.messages import EntryKind, decode_batch
from dsys.streams import ConsumerConfig, StreamConfig
from dsys.streams.client import StreamClient
from dsys.streams.fsm import decode_command
from dsys.streams.server import StreamServer

from .helpers import endpoints, running_cluster, wait_leader


async def test_publish_fetch_ack_and_consumer_state_survive_leader_failover(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as servers:
        leader = await wait_leader(servers)
        async with StreamClient(endpoints(servers), timeout=10.0) as c:
            await c.add_stream(StreamConfig(name="S", subjects=("o.>",)))
            acks = await asyncio.gather(*[c.publish(f"o.{i}", b"m%d" % i) for i in range(50)])
            assert sorted(a.seq for a in acks) == list(range(1, 51))
            await c.add_consumer("S", ConsumerConfig(name="C", ack_wait_ms=600))
            got = await c.fetch("S", "C", batch=20, expires=1.0)
            assert [m.seq for m in got] == list(range(1, 21))
            assert [await m.ack() for m in got[:10]] == ["ok"] * 10
            await leader.close()  # the leader goes away with 10 deliveries unacked
            survivors = [s for s in servers if s is not leader]
            await wait_leader(survivors)
            info = await c.consumer_info("S", "C")
            assert info is not None
            assert (info["ack_floor"], info["num_ack_pending"], info["next_seq"]) == (10, 10, 21)
            # new messages first, then the unacked ten once their ack wait passed
            more = await c.fetch("S", "C", batch=30, expires=1.0)
            assert [m.seq for m in more][:30] == list(range(21, 51))
            redelivered = await c.fetch("S", "C", batch=30, expires=3.0)
            assert [(m.seq, m.deliveries) for m in redelivered] == [(s, 2) for s in range(11, 21)]
            assert await got[10].ack() == "stale"  # the first delivery cannot be acked now
            assert await redelivered[0].ack() == "ok"


async def test_expected_last_seq_dedup_and_typed_errors(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1) as servers, StreamClient(endpoints(servers)) as c:
        await c.add_stream(StreamConfig(name="S", subjects=("a.*",), max_msg_size=10))
        first = await c.publish("a.b", b"1", msg_id="x")
        again = await c.publish("a.b", b"1", msg_id="x")
        assert (again.seq, again.duplicate) == (first.seq, True)
        with pytest.raises(ConflictError, match="last sequence is 1"):
            await c.publish("a.b", b"2", expected_last_seq=0)
        assert (await c.publish("a.b", b"2", expected_last_seq=1)).seq == 2
        with pytest.raises(NotFoundError, match="no stream captures"):
            await c.publish("zzz", b"")
        with pytest.raises(PayloadTooLargeError):
            await c.publish("a.b", b"x" * 11)
        with pytest.raises(BadInputError, match="wildcard"):
            await c.publish("a.*", b"")
        with pytest.raises(NotFoundError):
            await c.fetch("S", "nobody", batch=1)
        with pytest.raises(ConflictError, match="overlap"):
            await c.add_stream(StreamConfig(name="T", subjects=("a.>",)))
        with pytest.raises(BadInputError, match="max_bytes"):
            await c.add_stream(StreamConfig(name="Big", max_bytes=1 << 40))
        assert await c.stream_info("nope") is None
        assert [m.data for m in await c.read("S")] == [b"1", b"2"]


async def test_push_subscribers_share_a_consumer_and_release_on_close(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1) as servers:
        eps = endpoints(servers)
        async with StreamClient(eps) as a, StreamClient(eps) as b:
            await a.add_stream(StreamConfig(name="S", subjects=("w.>",)))
            await a.add_consumer("S", ConsumerConfig(name="G", ack_wait_ms=60_000))
            sub_a = await a.subscribe("S", "G", max_inflight=5)
            sub_b = await b.subscribe("S", "G", max_inflight=5)
            await asyncio.gather(*[a.publish(f"w.{i}", b"%d" % i) for i in range(40)])
            seen: dict[int, str] = {}

            async def drain(sub: Any, who: str, n: int) -> None:
                for _ in range(n):
                    m = await sub.next(5.0)
                    assert m.seq not in seen, f"{m.seq} delivered twice"
                    seen[m.seq] = who
                    assert await m.ack() == "ok"

            await asyncio.gather(drain(sub_a, "a", 15), drain(sub_b, "b", 15))
            assert set(seen.values()) == {"a", "b"}
            # a holds up to 5 unacked when it goes away: they are released to b at once
            held = [await sub_a.next(5.0) for _ in range(3)]
            await sub_a.close()
            rest = []
            while len(rest) < 10:
                m = await sub_b.next(5.0)
                rest.append(m)
                await m.ack()
            assert {m.seq for m in held} <= {m.seq for m in rest}
            assert sorted(seen) + sorted(m.seq for m in rest) != []
            info = await b.consumer_info("S", "G")
            assert info is not None and info["ack_floor"] == 40 and info["num_ack_pending"] == 0


async def test_fetch_long_poll_wakes_on_publish(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1) as servers, StreamClient(endpoints(servers)) as c:
        await c.add_stream(StreamConfig(name="S", subjects=("p",)))
        await c.add_consumer("S", ConsumerConfig(name="C"))
        assert await c.fetch("S", "C", batch=1, no_wait=True) == []
        waiting = asyncio.create_task(c.fetch("S", "C", batch=5, expires=10.0))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await c.publish("p", b"hello")
        got = await asyncio.wait_for(waiting, 5.0)
        assert [m.data for m in got] == [b"hello"]
        # an idle long poll costs no log entries
        before = servers[0].node.applied_index
        assert await c.fetch("S", "C", batch=1, expires=0.3) == []
        assert servers[0].node.applied_index - before <= 1  # at most one clock tick


async def test_a_waiting_fetch_rides_in_the_publishs_log_entry(tmp_path: Path) -> None:
    """A fetch waiting on a stream is proposed with the next publish to it, in one entry."""
    async with running_cluster(tmp_path) as servers:
        leader = await wait_leader(servers)
        async with StreamClient(endpoints(servers), timeout=10.0) as c:
            await c.add_stream(StreamConfig(name="S", subjects=("p",)))
            await c.add_consumer("S", ConsumerConfig(name="C"))
            waiting = asyncio.create_task(c.fetch("S", "C", batch=5, expires=10.0))
            for _ in range(100):  # until the long poll waits on the leader
                if leader._waiters.get("S"):
                    break
                await asyncio.sleep(0.02)
            before = leader.node.core.last_index
            ack = await c.publish("p", b"hello")
            got = await asyncio.wait_for(waiting, 5.0)
            assert [(m.seq, m.data, m.deliveries) for m in got] == [(ack.seq, b"hello", 1)]
            entries = leader.node.core.entries(before + 1, leader.node.core.last_index + 1)
            kinds = [
                [type(decode_command(cmd)).__name__ for cmd in decode_batch(e.data)]
                for e in entries
                if e.kind == EntryKind.BATCH
            ]
            assert ["Publish", "Fetch"] in kinds  # one entry: no second consensus round
            assert await got[0].ack() == "ok"
            info = await c.consumer_info("S", "C")
            assert info is not None and (info["ack_floor"], info["num_ack_pending"]) == (1, 0)


async def test_slow_consumer_memory_is_bounded_by_the_stream_limits(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1) as servers, StreamClient(endpoints(servers)) as c:
        await c.add_stream(StreamConfig(name="S", subjects=("m",), max_bytes=10_000))
        await c.add_consumer("S", ConsumerConfig(name="slow"))
        for _ in range(10):
            await asyncio.gather(*[c.publish("m", b"x" * 99) for _ in range(100)])
        info = await c.stream_info("S")
        assert info is not None and info["bytes"] <= 10_000 and info["last_seq"] == 1000
        got = await c.fetch("S", "slow", batch=1000, expires=1.0)
        assert got and got[0].seq == info["first_seq"] and got[-1].seq == 1000


async def test_snapshots_compact_the_log_and_a_restarted_node_catches_up(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, snapshot_every=50) as servers:
        await wait_leader(servers)
        follower = next(s for s in servers if not s.node.is_leader)
        await follower.close()
        async with StreamClient(endpoints(servers), timeout=10.0) as c:
            await c.add_stream(StreamConfig(name="S", subjects=("s",), retention="workqueue"))
            await c.add_consumer("S", ConsumerConfig(name="C"))
            for _ in range(4):
                await asyncio.gather(*[c.publish("s", b"v") for _ in range(100)])
            for m in await c.fetch("S", "C", batch=150, expires=1.0):
                await m.ack()
            idx = servers.index(follower)
            servers[idx] = restarted = StreamServer(follower.config)
            await restarted.start()
            leader = await wait_leader(servers)
            assert leader.node.snapshot_index > 0
            for _ in range(200):
                if restarted.node.applied_index >= leader.node.applied_index:
                    break
                await asyncio.sleep(0.05)
            assert restarted.fsm.snapshot() == leader.fsm.snapshot()
            info = restarted.fsm.stream_info("S")
            assert info is not None and info["messages"] == 250 and info["first_seq"] == 151


async def test_http_api_for_curl(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1) as servers, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{servers[0].port}"
        await wait_leader(servers)

        async def call(method: str, path: str, **kw: Any) -> tuple[int, Any]:
            async with http.request(method, base + path, **kw) as r:
                body = await r.read()
                if r.content_type == "application/json":
                    return r.status, decode_json(body)
                return r.status, (body, dict(r.headers))

        assert (await call("POST", "/v1/streams", json={"name": "S", "subjects": ["o.>"]}))[
            0
        ] == 200
        status, ack = await call(
            "POST",
            "/v1/pub/o.eu",
            data=b"payload",
            headers={"X-Dsys-Msg-Id": "m1", "X-Dsys-Header-Trace": "t1"},
        )
        assert (status, ack) == (200, {"stream": "S", "seq": 1, "duplicate": False})
        status, (raw, headers) = await call("GET", "/v1/streams/S/msgs/1")
        assert raw == b"payload" and headers["X-Dsys-Subject"] == "o.eu"
        assert headers["X-Dsys-Header-trace"] == "t1"
        status, msgs = await call("GET", "/v1/streams/S/msgs?start_seq=1&limit=5")
        assert [base64.b64decode(m["data"]) for m in msgs] == [b"payload"]
        cfg = {"name": "C", "ack_wait_ms": 1000}
        assert (await call("POST", "/v1/streams/S/consumers", json=cfg))[0] == 200
        status, got = await call(
            "POST", "/v1/streams/S/consumers/C/fetch", json={"batch": 5, "expires_ms": 500}
        )
        assert [(m["seq"], m["deliveries"]) for m in got] == [(1, 1)]
        status, pending = await call("GET", "/v1/streams/S/consumers/C/pending")
        assert [p["seq"] for p in pending] == [1]
        status, claimed = await call(
            "POST",
            "/v1/streams/S/consumers/C/claim",
            json={"worker": "me", "min_idle_ms": 0, "count": 5},
        )
        assert [(m["seq"], m["deliveries"]) for m in claimed] == [(1, 2)]
        status, out = await call("POST", "/v1/streams/S/consumers/C/ack", json={"acks": [[1, 2]]})
        assert (status, out) == (200, {"statuses": ["ok"]})
        status, info = await call("GET", "/v1/streams/S/consumers/C")
        assert info["ack_floor"] == 1
        # errors: each with a status and a message that says what was wrong
        cases = [
            ("GET", "/v1/streams/nope", {}, 404, "no stream"),
            ("GET", "/v1/streams/S/msgs/99", {}, 404, "no message 99"),
            ("GET", "/v1/streams/S/msgs/x", {}, 400, "positive integer"),
            ("POST", "/v1/streams", {"json": {"name": "S", "subjects": ["x"]}}, 409, "exists"),
            ("POST", "/v1/streams", {"json": {"name": "T", "bogus": 1}}, 400, "bogus"),
            ("POST", "/v1/streams", {"json": {"name": "T", "max_msgs": "1"}}, 400, "max_msgs"),
            ("POST", "/v1/streams", {"data": b"{not json"}, 400, "JSON"),
            ("POST", "/v1/pub/nothing.here", {"data": b""}, 404, "captures"),
            ("POST", "/v1/pub/o.x", {"data": b"x" * (2 << 20)}, 413, "larger"),
            (
                "POST",
                "/v1/pub/o.x",
                {"data": b"", "headers": {"X-Dsys-Expected-Last-Seq": "0"}},
                409,
                "last sequence",
            ),
            (
                "POST",
                "/v1/streams/S/consumers/C/fetch",
                {"json": {"batch": 0}},
                400,
                "batch",
            ),
            (
                "POST",
                "/v1/streams/S/consumers/C/fetch",
                {"json": {"batch": 1, "extra": 1}},
                400,
                "extra",
            ),
            ("POST", "/v1/streams/S/consumers/C/ack", {"json": {"acks": "no"}}, 400, "acks"),
            ("POST", "/v1/streams/S/consumers/Z/ack", {"json": {"acks": [[1, 1]]}}, 404, "Z"),
        ]
        for method, path, kw, want, needle in cases:
            status, body = await call(method, path, **kw)
            assert status == want, (path, kw, status, body)
            assert needle in body["message"], (path, body)
        # full with discard=new
        await call(
            "POST",
            "/v1/streams",
            json={"name": "F", "subjects": ["f"], "max_msgs": 1, "discard": "new"},
        )
        assert (await call("POST", "/v1/pub/f", data=b"1"))[0] == 200
        assert (await call("POST", "/v1/pub/f", data=b"2"))[0] == 507
        assert (await call("DELETE", "/v1/streams/S/consumers/C"))[0] == 200
        assert (await call("DELETE", "/v1/streams/S"))[0] == 200
        assert (await call("GET", "/healthz"))[0] == 200
        status, (metrics, _) = await call("GET", "/metrics")
        assert b"dsys_streams_published_total" in metrics


def decode_json(body: bytes) -> Any:
    import json

    return json.loads(body)


async def test_malformed_websocket_frames_get_errors_and_the_server_stays_up(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path, n=1) as servers, aiohttp.ClientSession() as http:
        await wait_leader(servers)
        async with http.ws_connect(f"http://127.0.0.1:{servers[0].port}/v1/ws") as ws:

            async def ask(frame: bytes | str) -> list[Any]:
                if isinstance(frame, str):
                    await ws.send_str(frame)
                else:
                    await ws.send_bytes(frame)
                msg = await ws.receive(timeout=5.0)
                out = decode(msg.data)
                assert isinstance(out, list)
                return out

            assert (await ask("hello"))[0]["status"] == "bad_request"
            assert (await ask(b"\xc1\xc1"))[0]["status"] == "bad_request"
            assert (await ask(encode({"op": "status"})))[0]["status"] == "bad_request"
            bad = [
                ({"op": "status"}, "integer 'id'"),
                ({"id": 1, "op": "explode"}, "unknown op"),
                ({"id": 2, "op": "streams", "junk": 1}, "junk"),
                ({"id": 3, "op": "pub", "subject": "a", "data": "text"}, "bytes"),
                ({"id": 4, "op": "pub", "subject": 5, "data": b""}, "string"),
                ({"id": 5, "op": "fetch", "stream": "S", "consumer": "C", "batch": -1}, "batch"),
                ({"id": 6, "op": "ack", "stream": "S", "consumer": "C", "acks": [[1]]}, "ack"),
                ({"id": 7, "op": "sub", "sid": "x", "stream": "S", "consumer": "C"}, "sid"),
                ({"id": 8, "op": "read", "stream": "S", "limit": -5}, "limit"),
                ({"id": 9, "op": "add_stream", "config": {"name": "../etc"}}, "stream name"),
            ]
            for req, needle in bad:
                answers = await ask(encode([req]))
                assert answers[0]["status"] == "bad_request", (req, answers)
                assert needle in answers[0]["message"], (req, answers)
            ok = await ask(encode([{"id": 10, "op": "status"}]))
            assert ok[0]["status"] == "ok"
        async with http.get(f"http://127.0.0.1:{servers[0].port}/healthz") as r:
            assert r.status == 200


async def test_push_subscription_resumes_on_the_new_leader(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as servers:
        leader = await wait_leader(servers)
        async with StreamClient(endpoints(servers), timeout=10.0) as c:
            await c.add_stream(StreamConfig(name="S", subjects=("r",)))
            await c.add_consumer("S", ConsumerConfig(name="C", ack_wait_ms=60_000))
            sub = await c.subscribe("S", "C", max_inflight=10)
            await asyncio.gather(*[c.publish("r", b"%d" % i) for i in range(20)])
            got = []
            for _ in range(10):
                m = await sub.next(5.0)
                got.append(m.seq)
                await m.ack()
            await leader.close()
            await wait_leader([s for s in servers if s is not leader])
            await asyncio.gather(*[c.publish("r", b"%d" % i) for i in range(20, 30)])
            done = set(got)
            while len(done) < 30:
                m = await sub.next(10.0)
                got.append(m.seq)
                status = await m.ack()
                # a delivery superseded by a redelivery (its worker connection went away
                # during the failover) answers "stale"; the redelivery is acked instead
                # and an ack retried after its answer was lost reports "not_pending"
                assert status in ("ok", "not_pending", "stale"), status
                if status in ("ok", "not_pending"):
                    done.add(m.seq)
            assert sorted(done) == list(range(1, 31))
            assert got[:10] == list(range(1, 11))
            info = await c.consumer_info("S", "C")
            assert info is not None and info["ack_floor"] == 30
            await sub.close()


async def test_client_nak_progress_term_claim_and_dead_letters(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1) as servers, StreamClient(endpoints(servers)) as c:
        await c.add_stream(StreamConfig(name="J", subjects=("j.*",), retention="workqueue"))
        await c.add_consumer("J", ConsumerConfig(name="w", ack_wait_ms=60_000, max_deliver=2))
        for i in range(4):
            await c.publish(f"j.{i}", b"job %d" % i)
        a, b, d, e = await c.fetch("J", "w", batch=4, worker="w1")
        assert await a.nak(delay=0.0) == "ok"
        assert await b.in_progress() == "ok"
        assert await d.term(reason="poison") == "ok"
        again = await c.fetch("J", "w", batch=4, expires=2.0, worker="w2")
        assert [(m.seq, m.deliveries) for m in again] == [(a.seq, 2)]
        assert await again[0].nak() == "ok"  # a third delivery would pass max_deliver
        assert await c.fetch("J", "w", batch=4, expires=0.5) == []
        claimed = await c.claim("J", "w", worker="w3", min_idle=0, count=1)
        assert [(m.seq, m.deliveries) for m in claimed] == [(b.seq, 2)]
        assert await b.ack() == "stale"
        assert await claimed[0].ack() == "ok"
        assert await e.ack() == "ok"
        dead = await c.read("J-dlq")
        reasons = {m.headers["dsys-dlq-seq"]: m.headers["dsys-dlq-reason"] for m in dead}
        assert reasons == {str(d.seq): "terminated: poison", str(a.seq): "max_deliver"}
        pending = await c.pending("J", "w")
        assert pending == []
        info = await c.stream_info("J")
        assert info is not None and info["messages"] == 0  # acked or dead: all gone
