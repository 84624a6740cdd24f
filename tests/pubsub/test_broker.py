"""The broker and client over real loopback sockets (in-process broker)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator

import aiohttp
import msgpack
import pytest

from dsys.errors import BadInputError, ConnectError, RequestTimeout
from dsys.pubsub import Broker, BrokerConfig, BrokerLimits, Client, Msg, Permissions


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with Broker(BrokerConfig(port=0, heartbeat=5.0)) as b:
        yield b


def addr(b: Broker) -> list[str]:
    return [f"127.0.0.1:{b.port}"]


async def raw_ws(
    session: aiohttp.ClientSession, b: Broker, query: str = ""
) -> aiohttp.ClientWebSocketResponse:
    return await session.ws_connect(f"http://127.0.0.1:{b.port}/v1/ws{query}")


async def recv_frames(ws: aiohttp.ClientWebSocketResponse) -> list[dict]:
    m = await asyncio.wait_for(ws.receive(), 5.0)
    if m.type is aiohttp.WSMsgType.BINARY:
        value = msgpack.unpackb(m.data, raw=False)
    elif m.type is aiohttp.WSMsgType.TEXT:
        value = json.loads(m.data)
    else:
        raise AssertionError(f"socket closed: {m.type} {m.data} {m.extra}")
    return value if isinstance(value, list) else [value]


async def recv_op(ws: aiohttp.ClientWebSocketResponse, op: str, limit: int = 50) -> dict:
    for _ in range(limit):
        for f in await recv_frames(ws):
            if f["op"] == op:
                return f
    raise AssertionError(f"no {op} frame")


async def test_publish_reaches_wildcard_subscribers(broker: Broker) -> None:
    async with Client(addr(broker)) as pub, Client(addr(broker)) as sub:
        everything = await sub.subscribe("prices.>")
        infy = await sub.subscribe("prices.*.INFY")
        await pub.publish("prices.NSE.INFY", b"1523.5")
        await pub.publish("prices.NSE.TCS", b"3410")
        got = [await everything.next_msg(5), await everything.next_msg(5)]
        assert got == [
            Msg("prices.NSE.INFY", b"1523.5"),
            Msg("prices.NSE.TCS", b"3410"),
        ]
        assert await infy.next_msg(5) == Msg("prices.NSE.INFY", b"1523.5")
        await infy.unsubscribe()
        await pub.publish("prices.NSE.INFY", b"1524")
        assert (await everything.next_msg(5)).data == b"1524"
        await sub.flush()
        assert infy.pending() == 0


async def test_async_iterator_and_order_per_publisher(broker: Broker) -> None:
    async with Client(addr(broker)) as pub, Client(addr(broker)) as sub:
        s = await sub.subscribe("seq")
        for i in range(2000):
            await pub.publish("seq", str(i).encode())
        seen = []

        async def read() -> None:
            async for m in s:
                seen.append(int(m.data))
                if len(seen) == 2000:
                    return

        await asyncio.wait_for(read(), 10)
        assert seen == list(range(2000))


async def test_queue_group_shares_messages_beside_plain_subscribers(broker: Broker) -> None:
    clients = [Client(addr(broker)) for _ in range(4)]
    for c in clients:
        await c.connect()
    try:
        workers = [await c.subscribe("jobs.*", queue="workers") for c in clients[:3]]
        audit = await clients[3].subscribe("jobs.>")
        for i in range(300):
            await clients[3].publish(f"jobs.{i % 5}", str(i).encode())
        await clients[3].flush()
        for _ in range(300):
            await audit.next_msg(5)
        # The publisher's flush means the broker queued everything; each worker's own
        # flush (its pong comes behind its messages) means everything arrived.
        for c in clients[:3]:
            await c.flush()
        counts = [w.pending() for w in workers]
        assert sum(counts) == 300
        assert counts == [100, 100, 100]  # round robin
    finally:
        for c in clients:
            await c.close()


async def test_request_reply_and_timeout(broker: Broker) -> None:
    async with Client(addr(broker)) as requester, Client(addr(broker)) as responder:

        async def double(msg: Msg) -> None:
            assert msg.reply is not None
            await responder.publish(msg.reply, str(2 * int(msg.data)).encode())

        await responder.subscribe("math.double", cb=double)
        replies = await asyncio.gather(
            *(requester.request("math.double", str(i).encode(), timeout=5) for i in range(50))
        )
        assert [int(r.data) for r in replies] == [2 * i for i in range(50)]
        with pytest.raises(RequestTimeout):
            await requester.request("nobody.home", b"?", timeout=0.2)
        with pytest.raises(TimeoutError):  # RequestTimeout is also a TimeoutError
            await requester.request("nobody.home", b"?", timeout=0.2)


async def test_permissions_per_token() -> None:
    tokens = {
        "reader": Permissions(publish=("_INBOX.>",), subscribe=("prices.>", "_INBOX.>")),
        "writer": Permissions(publish=("prices.>",), subscribe=()),
    }
    async with Broker(BrokerConfig(port=0, tokens=tokens)) as b:
        with pytest.raises(ConnectError, match="authentication"):
            async with Client(addr(b), token="wrong", reconnect=False):
                pass
        async with Client(addr(b), token="reader") as r, Client(addr(b), token="writer") as w:
            s = await r.subscribe("prices.*.INFY")
            with pytest.raises(BadInputError, match="permission denied"):
                await r.subscribe("orders.>")
            with pytest.raises(BadInputError, match="permission denied"):
                await w.subscribe("prices.>")
            await w.publish("orders.new", b"nope")  # refused asynchronously
            await w.publish("prices.NSE.INFY", b"ok")  # the connection survived
            assert (await s.next_msg(5)).data == b"ok"
            await w.flush()
            assert any("permission denied: publish" in e for e in w.errors)
        async with aiohttp.ClientSession() as session:
            ws = await raw_ws(session, b)
            await ws.send_bytes(msgpack.packb({"op": "sub", "sid": 1, "subject": "x"}))
            err = await recv_op(ws, "err")
            assert "authentication required" in err["reason"]
            await ws.close()
            url = f"http://127.0.0.1:{b.port}/v1/publish/prices.X"
            async with session.post(url, data=b"x") as resp:
                assert resp.status == 401
            headers = {"Authorization": "Bearer writer"}
            async with session.post(url, data=b"x", headers=headers) as resp:
                assert resp.status == 200
            bad = f"http://127.0.0.1:{b.port}/v1/publish/orders.X"
            async with session.post(bad, data=b"x", headers=headers) as resp:
                assert resp.status == 403


async def test_request_without_inbox_permission_says_so_instead_of_timing_out() -> None:
    tokens = {"client": Permissions(subscribe=("svc.>",))}  # no _INBOX.> subscription
    async with (
        Broker(BrokerConfig(port=0, tokens=tokens)) as b,
        Client(addr(b), token="client") as c,
    ):
        for _ in range(2):  # the refusal is not remembered as a working inbox
            with pytest.raises(BadInputError, match="permission denied: subscribe"):
                await c.request("svc.echo", b"?", timeout=30)


async def test_garbage_frames_get_error_frames_and_the_connection_survives(
    broker: Broker,
) -> None:
    rng = random.Random(7)
    garbage: list[bytes] = [rng.randbytes(rng.randint(1, 64)) for _ in range(100)]
    structured = [
        {"op": "nope"},
        {"no": "op"},
        [1, 2, 3],
        "a string",
        {"op": "sub", "sid": "one", "subject": "a"},
        {"op": "sub", "sid": 1, "subject": "a..b"},
        {"op": "sub", "sid": 1, "subject": "a", "policy": "sometimes"},
        {"op": "pub", "subject": "a.*", "data": b"x"},
        {"op": "pub", "subject": 5, "data": b"x"},
        {"op": "pub", "subject": "a", "data": "not bytes"},
        {"op": "pub", "subject": "a", "data": b"x" * (1024 * 1024 + 1)},
        {"op": "unsub", "sid": 42},
        {"op": "rmsg", "subject": "a", "data": b"x", "queues": []},
        {"op": "connect", "route": True},
    ]
    async with aiohttp.ClientSession() as session:
        ws = await raw_ws(session, broker)
        errors = 0
        for frame in garbage:
            await ws.send_bytes(frame)
        for value in structured:
            await ws.send_bytes(msgpack.packb(value, use_bin_type=True))
        await ws.send_bytes(msgpack.packb({"op": "ping", "id": 99}))
        for _ in range(1000):
            frames = await recv_frames(ws)
            errors += sum(1 for f in frames if f["op"] == "err")
            if any(f["op"] == "pong" for f in frames):
                break
        assert errors >= len(structured) - 1  # every bad op was answered (garbage may decode)
        assert not ws.closed
        # text frames are JSON: garbage there is refused the same way
        await ws.send_str("{not json")
        err = await recv_op(ws, "err")
        assert "JSON" in err["reason"]
        await ws.close()
    async with Client(addr(broker)) as c:
        s = await c.subscribe("still.up")
        await c.publish("still.up", b"yes")
        assert (await s.next_msg(5)).data == b"yes"


async def test_oversized_frame_closes_that_connection_only() -> None:
    limits = BrokerLimits(max_payload=1024)
    async with (
        Broker(BrokerConfig(port=0, limits=limits, max_frame=4096)) as b,
        aiohttp.ClientSession() as session,
        Client(addr(b)) as bystander,
    ):
        s = await bystander.subscribe("a")
        ws = await raw_ws(session, b)
        await ws.send_bytes(b"\x00" * 10_000)
        m = await asyncio.wait_for(ws.receive(), 5)
        assert m.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        await bystander.publish("a", b"fine")
        assert (await s.next_msg(5)).data == b"fine"
        with pytest.raises(BadInputError, match="exceeds"):
            await bystander.publish("a", b"x" * 2000)
        async with session.get(f"http://127.0.0.1:{b.port}/healthz") as resp:
            assert resp.status == 200
        url = f"http://127.0.0.1:{b.port}/v1/publish/a"
        async with session.post(url, data=b"x" * 5000) as resp:
            assert resp.status == 413


async def test_slow_consumer_does_not_stall_others_and_memory_stays_bounded() -> None:
    limits = BrokerLimits(max_pending_bytes=256 * 1024)
    async with (
        Broker(BrokerConfig(port=0, limits=limits)) as b,
        aiohttp.ClientSession() as session,
        Client(addr(b)) as pub,
    ):
        stalled = await raw_ws(session, b)  # subscribes, then never reads
        await stalled.send_bytes(
            msgpack.packb(
                [
                    {"op": "sub", "sid": 1, "subject": "feed"},
                    {"op": "sub", "sid": 2, "subject": "feed", "policy": "drop_newest"},
                ]
            )
        )
        kicked = await raw_ws(session, b)
        await kicked.send_bytes(
            msgpack.packb({"op": "sub", "sid": 1, "subject": "feed", "policy": "disconnect"})
        )
        fast = Client(addr(b))
        await fast.connect()
        s = await fast.subscribe("feed")
        await pub.flush()
        n = 20_000
        payload = b"x" * 1000
        received = 0
        peak = 0
        for i in range(n):
            await pub.publish("feed", payload)
            if i % 100 == 99:
                await pub.flush()
                peak = max(peak, *(c.pending_bytes for c in b.state.connections()))
                while s.pending():
                    await s.next_msg(1)
                    received += 1
        while received < n:
            await s.next_msg(5)
            received += 1
        assert received == n
        assert peak <= limits.max_pending_bytes
        drops = b.state.stats.drops
        assert drops["drop_oldest"] > 0 and drops["drop_newest"] > 0
        assert b.state.stats.slow_consumer_disconnects == 1
        m = await asyncio.wait_for(kicked.receive(), 10)
        while m.type is aiohttp.WSMsgType.BINARY:  # queued data, then the close
            m = await asyncio.wait_for(kicked.receive(), 10)
        assert m.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        async with session.get(f"http://127.0.0.1:{b.port}/metrics") as resp:
            text = await resp.text()
        assert 'dsys_pubsub_slow_consumer_drops_total{policy="drop_oldest"}' in text
        assert "dsys_pubsub_slow_consumer_disconnects_total 1.0" in text
        await fast.close()
        await stalled.close()


async def test_callback_subscription_and_drain(broker: Broker) -> None:
    got: list[bytes] = []
    async with Client(addr(broker)) as pub:
        worker = Client(addr(broker))
        await worker.connect()

        async def handle(msg: Msg) -> None:
            await asyncio.sleep(0)
            got.append(msg.data)

        await worker.subscribe("work", cb=handle)
        for i in range(100):
            await pub.publish("work", str(i).encode())
        await pub.flush()
        await worker.flush()
        await worker.drain(timeout=5)
        assert got == [str(i).encode() for i in range(100)]
        assert not worker.is_connected


async def test_browser_json_protocol(broker: Broker) -> None:
    async with aiohttp.ClientSession() as session, Client(addr(broker)) as pub:
        ws = await raw_ws(session, broker)
        await ws.send_str(
            json.dumps([{"op": "connect"}, {"op": "sub", "sid": 1, "subject": "chat.*"}])
        )
        info = await recv_op(ws, "info")
        assert info["server_id"] == broker.server_id
        await ws.send_str(json.dumps({"op": "ping", "id": 1}))
        await recv_op(ws, "pong")
        await pub.publish("chat.room1", "héllo".encode())
        await pub.publish("chat.room1", b"\xff\xfe")
        got: list[dict] = []
        while len(got) < 2:
            got.extend(f for f in await recv_frames(ws) if f["op"] == "msg")
        assert got[0]["data"] == "héllo" and got[0]["subject"] == "chat.room1"
        assert got[1]["data_b64"] == "//4="
        s = await pub.subscribe("chat.out")
        await ws.send_str(json.dumps({"op": "pub", "subject": "chat.out", "data": "from browser"}))
        assert (await s.next_msg(5)).data == b"from browser"
        await ws.close()


async def test_http_publish_health_and_metrics(broker: Broker) -> None:
    async with aiohttp.ClientSession() as session, Client(addr(broker)) as c:
        s = await c.subscribe("orders.*")
        base = f"http://127.0.0.1:{broker.port}"
        async with session.post(f"{base}/v1/publish/orders.new", data=b'{"id": 1}') as resp:
            assert resp.status == 200
            assert (await resp.json())["queued"] == 1
        assert (await s.next_msg(5)).data == b'{"id": 1}'
        async with session.post(f"{base}/v1/publish/orders..bad", data=b"") as resp:
            assert resp.status == 400
            assert "empty token" in (await resp.json())["message"]
        async with session.get(f"{base}/healthz") as resp:
            health = await resp.json()
        assert health["ok"] and health["subscriptions"] == 1
        async with session.get(f"{base}/metrics") as resp:
            text = await resp.text()
        assert "dsys_pubsub_msgs_in_total 1.0" in text
        assert 'dsys_pubsub_connections{kind="client"} 1.0' in text


async def test_client_reconnects_to_a_restarted_broker_and_resubscribes() -> None:
    b1 = Broker(BrokerConfig(port=0))
    port = await b1.start()
    async with Client([f"127.0.0.1:{port}"], max_reconnect_wait=0.2) as c:
        s = await c.subscribe("r")
        await b1.close()
        async with Broker(BrokerConfig(port=port)) as b2:
            for _ in range(200):
                if c.is_connected and b2.state.subscription_count() == 1:
                    break
                await asyncio.sleep(0.05)
            assert c.reconnects == 1
            await c.publish("r", b"again")
            assert (await s.next_msg(5)).data == b"again"


async def test_connect_fails_cleanly_when_no_broker_listens() -> None:
    with pytest.raises(ConnectError, match="could not connect"):
        async with Client(["127.0.0.1:1"], connect_timeout=1):
            pass


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, -1, 0, 2**40, 1.5])
    if kind == 2:
        return rng.choice(["", "a", "a.b", "*", ">", "a.>", "a b", "x" * 600, "ü.ñ", "_INBOX.x"])
    if kind == 3:
        return rng.randbytes(rng.randrange(0, 40))
    if kind == 4:
        return rng.choice(["pub", "sub", "unsub", "ping", "connect", "rmsg", "msg", "err"])
    if kind == 5:
        return rng.randrange(-5, 5)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["op", "sid", "subject", "data", "reply", "queue", "policy", "max_pending", "id"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(6))}


def random_op(rng: random.Random) -> dict[str, object]:
    op: dict[str, object] = {"op": rng.choice(["pub", "sub", "unsub", "ping", "connect", "rmsg"])}
    for key in ("sid", "subject", "data", "reply", "queue", "policy", "max_pending", "id", "route"):
        if rng.random() < 0.5:
            op[key] = random_value(rng)
    return op


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_fuzzed_operations_never_break_the_connection(broker: Broker, seed: int) -> None:
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        ws = await raw_ws(session, broker)
        for _ in range(300):
            op = random_op(rng)
            if rng.random() < 0.3:
                text = json.dumps(op, default=lambda b: b.hex())
                await ws.send_str(text)
            else:
                await ws.send_bytes(msgpack.packb(op, use_bin_type=True))
        await ws.send_bytes(msgpack.packb({"op": "ping", "id": "end"}))
        await recv_op(ws, "pong", limit=1000)
        assert broker.protocol_errors > 0
        await ws.close()
        async with session.get(f"http://127.0.0.1:{broker.port}/healthz") as resp:
            assert resp.status == 200
            assert all(r["peer"].startswith("127.0.0.1:") for r in (await resp.json())["routes"])


@pytest.mark.parametrize("first", ["json", "msgpack"])
async def test_mixed_encodings_and_odd_ping_ids_are_answered(broker: Broker, first: str) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await raw_ws(session, broker)
        if first == "json":
            await ws.send_str(json.dumps({"op": "ping", "id": 1}))
        else:
            await ws.send_bytes(msgpack.packb({"op": "ping", "id": 1}))
        assert (await recv_op(ws, "pong"))["id"] == 1
        await ws.send_bytes(msgpack.packb({"op": "ping", "id": b"\x00bytes"}))
        await ws.send_str('{"op": "ping", "id": 1180591620717411303424}')
        await ws.send_str('{"op": "pub", "subject": "a", "data_b64": "!!"}')
        await ws.send_bytes(msgpack.packb({"op": "ping", "id": "last"}))
        frames: list[dict] = []
        while not any(f.get("id") == "last" for f in frames):
            frames.extend(await recv_frames(ws))
        assert [f["op"] for f in frames] == ["pong", "pong", "err", "pong"]
        assert "id" not in frames[0] and "id" not in frames[1]
        assert "base64" in frames[2]["reason"]
        await ws.close()


async def disconnected(c: Client) -> None:
    """Wait (at most 2 s) until the client noticed its broker went away."""
    for _ in range(200):
        if not c.is_connected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the client did not notice the broker closing")


async def test_publishes_are_buffered_bounded_while_disconnected_then_sent() -> None:
    b1 = Broker(BrokerConfig(port=0))
    port = await b1.start()
    c = Client([f"127.0.0.1:{port}"], max_reconnect_wait=0.1, max_buffer_bytes=64 * 1024)
    await c.connect()
    try:
        s = await c.subscribe("buf")
        await b1.close()
        await disconnected(c)
        sent = 0
        with pytest.raises(TimeoutError):
            for i in range(1000):  # 1 MiB would be needed; the buffer holds 64 KiB
                await asyncio.wait_for(c.publish("buf", str(i).encode().ljust(1024)), 0.5)
                sent += 1
        assert 0 < sent < 100
        assert c._out_bytes <= 64 * 1024 + 1024 + 64
        async with Broker(BrokerConfig(port=port)):
            got = [await s.next_msg(10) for _ in range(sent)]
        assert [int(m.data) for m in got] == list(range(sent))
    finally:
        await c.close(timeout=1)


async def test_without_reconnect_a_lost_connection_ends_subscriptions_with_an_error() -> None:
    b = Broker(BrokerConfig(port=0))
    await b.start()
    c = Client(addr(b), reconnect=False)
    await c.connect()
    try:
        s = await c.subscribe("x")
        await b.close()
        with pytest.raises(ConnectError, match="lost"):
            await asyncio.wait_for(s.__anext__(), 10)
        assert not c.is_connected
    finally:
        await c.close()


async def test_flush_and_subscribe_while_reconnecting_complete_on_the_new_connection() -> None:
    b1 = Broker(BrokerConfig(port=0))
    port = await b1.start()
    c = Client([f"127.0.0.1:{port}"], max_reconnect_wait=0.1)
    await c.connect()
    try:
        await b1.close()
        await disconnected(c)
        # Started while no broker listens: their pings must survive the reconnection.
        flush = asyncio.ensure_future(c.flush(timeout=10))
        subscribing = asyncio.ensure_future(c.subscribe("late", timeout=10))
        await asyncio.sleep(0.3)
        async with Broker(BrokerConfig(port=port)):
            await flush
            sub = await subscribing
            await c.publish("late", b"hello")
            assert (await sub.next_msg(5)).data == b"hello"
    finally:
        await c.close(timeout=1)


async def test_malformed_frames_from_a_broker_are_skipped_not_fatal() -> None:
    # A broken or hostile broker: msg frames without subject/data, with a non-bytes
    # payload or an unhashable sid, then a good message. The client logs the bad ones
    # (those for a live subscription) and keeps the connection.
    from aiohttp import web

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # connect (+ nothing else)
        info = {"op": "info", "server_id": "fake"}
        bad = [{"op": "msg", "sid": 1}, {"op": "msg", "sid": 1, "subject": "s", "data": 5}]
        await ws.send_bytes(msgpack.packb([info, *bad], use_bin_type=True))
        sub = msgpack.unpackb((await ws.receive()).data)
        sid = sub["sid"] if isinstance(sub, dict) else sub[0]["sid"]
        await ws.send_bytes(msgpack.packb({"op": "pong", "id": 1}))
        frames = [
            {"op": "msg", "sid": sid},  # no subject, no data
            {"op": "msg", "sid": [sid]},  # unhashable sid
            {"op": "msg", "sid": sid, "subject": "s", "data": b"ok"},
        ]
        await ws.send_bytes(msgpack.packb(frames, use_bin_type=True))
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/v1/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with Client([f"127.0.0.1:{port}"], reconnect=False) as c:
            s = await c.subscribe("s", timeout=5)
            assert (await s.next_msg(5)).data == b"ok"
            assert c.is_connected and c.reconnects == 0
            # the frames sent before the subscription existed were for no one
            assert sum("malformed frame" in e for e in c.errors) == 2, list(c.errors)
    finally:
        await runner.cleanup()
