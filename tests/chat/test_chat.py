"""The chat example on real processes (the ``cluster`` fixture: 3 KV nodes, a stream
node, a broker, 2 chat servers and ``dsys lb``, started once for tests/chat)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import aiohttp
import pytest
from examples.chat.client import ChatClient, ChatError
from examples.chat.cluster import ChatCluster
from examples.chat.common import MAX_FRAME, STREAM, room_owner, room_ring, sign_token
from examples.chat.server import POST_LEASE, ChatServer

from dsys.streams.client import StreamClient

pytestmark = pytest.mark.timeout(90)


async def _until(cond: Any, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"condition not reached in {limit} s"
        await asyncio.sleep(0.05)


async def _connect_elsewhere(cluster: ChatCluster, user: str, avoid: str | None) -> ChatClient:
    """A client on a server other than ``avoid`` (the lb picks; reconnect until it does)."""
    token = None  # log in once: logins are rate-limited (10 a minute per user)
    held: list[ChatClient] = []  # connections to ``avoid`` kept open, so that a
    try:  # least-outstanding lb turns to the other server whatever other tests left open
        for _ in range(40):
            c = ChatClient(cluster.url, user, token=token)
            await c.start()
            token = c.token
            if avoid is None or c.server != avoid:
                return c
            held.append(c)
            # a server restarted by an earlier test may not be back in the lb's rotation
            await asyncio.sleep(0.5)
        raise AssertionError("the load balancer never picked the other server")
    finally:
        for h in held:
            await h.close()


async def test_two_clients_chat_through_a_sigkill_and_miss_nothing(cluster: ChatCluster) -> None:
    alice = await _connect_elsewhere(cluster, "alice", None)
    bob = await _connect_elsewhere(cluster, "bob", alice.server)
    try:
        assert {alice.server, bob.server} == {"s1", "s2"}
        await alice.create("kill-test")
        await bob.join("kill-test")
        acked: dict[str, list[str]] = {"alice": [], "bob": []}

        async def talk(c: ChatClient, n: int) -> None:
            for i in range(n):
                text = f"{c.user} {i}"
                await c.send("kill-test", text, timeout=30)
                acked[c.user].append(text)
                await asyncio.sleep(0.01)

        talkers = [asyncio.create_task(talk(alice, 40)), asyncio.create_task(talk(bob, 40))]
        await _until(lambda: len(acked["alice"]) >= 10)
        victim = alice.server
        assert victim is not None
        cluster.kill(victim)  # SIGKILL: no close frames, no goodbye to the KV store
        await asyncio.wait_for(asyncio.gather(*talkers), 60)
        for c in (alice, bob):
            try:
                await _until(lambda c=c: len(c.offsets("kill-test")) == 80, 30)
            except AssertionError:  # say what is missing, or stored twice
                got, texts = c.offsets("kill-test"), c.texts("kill-test")
                missing = sorted(set(range(1, 81)) - set(got))
                twice = sorted({t for t in texts if texts.count(t) > 1})
                raise AssertionError(
                    f"{c.user} on {c.server} has {len(got)} of 80 messages after 30 s: "
                    f"missing {missing}, twice {twice}; connects {c.connects}, "
                    f"holes {c.holes}, dups {c.dups}"
                ) from None
        assert alice.server != victim and alice.connects >= 2
        for c in (alice, bob):
            assert c.offsets("kill-test") == list(range(1, 81))  # in order, none missing
            assert c.dups == c.holes == 0
            texts = c.texts("kill-test")
            assert len(set(texts)) == 80  # none twice
            for user in ("alice", "bob"):  # each author's messages in the order sent
                assert [t for t in texts if t.startswith(user)] == acked[user]
        assert alice.texts("kill-test") == bob.texts("kill-test")
        ids = [m["id"] for m in alice.rooms["kill-test"].log]
        assert ids == sorted(ids) and len(set(ids)) == 80  # time-sortable global ids
    finally:
        await alice.close()
        await bob.close()
        for name in cluster.names("chat"):
            if not cluster.procs[name].alive:
                cluster.restart(name)


async def test_sign_up_log_in_and_tokens(cluster: ChatCluster) -> None:
    async with aiohttp.ClientSession() as http:
        good = {"user": "dora", "password": "long enough pw"}
        async with http.post(f"{cluster.url}/api/signup", json=good) as r:
            assert r.status == 200 and (await r.json())["token"]
        async with http.post(f"{cluster.url}/api/signup", json=good) as r:
            assert r.status == 409 and (await r.json())["error"] == "user_exists"
        async with http.post(
            f"{cluster.url}/api/login", json={**good, "password": "wrong password"}
        ) as r:
            assert r.status == 401 and (await r.json())["error"] == "bad_login"
        async with http.post(f"{cluster.url}/api/login", json=good) as r:
            assert r.status == 200
        for body, code in [
            ({"user": "Bad Name!", "password": "long enough pw"}, "bad_name"),
            ({"user": "erin", "password": "short"}, "bad_password"),
            ([1, 2], "bad_request"),
        ]:
            async with http.post(f"{cluster.url}/api/signup", json=body) as r:
                assert r.status == 400 and (await r.json())["error"] == code
        # the stored password is a salted argon2id hash, not the password
        async with ChatClient(cluster.url, "dora", "long enough pw"):
            pass
        forged = sign_token(b"not the cluster's secret", "dora")
        for token in (forged, "garbage", forged.split(".")[0] + ".AAAA"):
            async with http.ws_connect(f"{cluster.url}/ws") as ws:
                await ws.send_str(json.dumps({"type": "hello", "token": token}))
                err = json.loads((await ws.receive(timeout=5)).data)
                assert err["type"] == "error" and err["code"] == "bad_token"
                closed = await ws.receive(timeout=5)
                assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4001


async def test_a_user_reads_and_posts_only_where_they_belong(cluster: ChatCluster) -> None:
    async with (
        ChatClient(cluster.url, "frank") as frank,
        ChatClient(cluster.url, "grace") as grace,
        ChatClient(cluster.url, "mallory") as mallory,
    ):
        await frank.create("private")
        await grace.join("private")
        for frame, code in [
            ({"type": "sub", "room": "private"}, "not_member"),
            ({"type": "history", "room": "private"}, "not_member"),
            ({"type": "typing", "room": "private"}, "not_member"),
            ({"type": "members", "room": "private"}, "not_member"),
            ({"type": "sub", "room": "nowhere"}, "unknown_room"),
            ({"type": "join", "room": "nowhere"}, "unknown_room"),
            ({"type": "join", "room": "dm--frank--grace"}, "forbidden"),
            ({"type": "dm", "user": "nobody"}, "unknown_user"),
        ]:
            with pytest.raises(ChatError) as exc:
                await mallory.request(frame, "never")
            assert exc.value.code == code, frame
        with pytest.raises(ChatError, match="not_member"):
            await mallory.send("private", "let me in")
        # a post names its author from the session, never from the frame
        await mallory.request({"type": "create", "room": "mallorys"}, "joined:mallorys")
        ack = await mallory.send("mallorys", "hi")
        assert ack["offset"] == 1
        await frank.send("private", "for grace only")
        await _until(lambda: grace.texts("private") == ["for grace only"])
        assert "private" not in mallory.rooms or not mallory.rooms["private"].log
        # direct messages: a room of the two users only
        await frank.request({"type": "dm", "user": "grace"}, "joined:dm--frank--grace")
        await frank.subscribe("dm--frank--grace")
        await grace.subscribe("dm--frank--grace")
        await frank.send("dm--frank--grace", "psst")
        await _until(lambda: grace.texts("dm--frank--grace") == ["psst"])
        assert all(m["from"] == "frank" for m in grace.rooms["dm--frank--grace"].log)


async def test_bad_frames_get_clear_errors_and_reach_nobody(cluster: ChatCluster) -> None:
    async with (
        ChatClient(cluster.url, "henry") as henry,
        ChatClient(cluster.url, "iris") as iris,
    ):
        await henry.create("noisy")
        await iris.join("noisy")
        cases = [
            ("not json at all", "bad_frame"),
            ("[1, 2, 3]", "bad_frame"),
            (json.dumps({"type": "launch_missiles"}), "unknown_type"),
            (json.dumps({"type": "send", "room": "noisy"}), "bad_frame"),
            (json.dumps({"type": "send", "room": "noisy", "cid": 7, "text": "x"}), "bad_frame"),
            (json.dumps({"type": "send", "room": "noisy", "cid": "c1", "text": "x" * 5000}),
             "bad_text"),
            (json.dumps({"type": "send", "room": "noisy", "cid": "c2", "text": "   "}), "bad_text"),
            (json.dumps({"type": "send", "room": "../etc", "cid": "c3", "text": "x"}), "bad_name"),
            (json.dumps({"type": "send", "room": "noisy", "cid": "c4", "text": "a" * MAX_FRAME}),
             "too_large"),
            (json.dumps({"type": "sub", "room": "noisy", "offset": "1"}), "bad_frame"),
        ]  # fmt: skip
        for raw, code in cases:
            before = len(henry.errors)
            henry.raw(raw)
            await _until(lambda b=before: len(henry.errors) > b)
            assert henry.errors[-1]["code"] == code, raw
            assert henry.errors[-1]["message"]
        # a flood is refused per user with a retry hint; the rest still go through
        for i in range(100):
            henry.raw(
                json.dumps({"type": "send", "room": "noisy", "cid": f"f{i}", "text": f"flood {i}"})
            )
        await _until(lambda: sum(e["code"] == "rate_limited" for e in henry.errors) >= 30)
        assert all(e["retry_after"] > 0 for e in henry.errors if e["code"] == "rate_limited")
        await asyncio.sleep(0.5)
        assert 25 <= len(iris.texts("noisy")) <= 70
        assert all(t.startswith("flood ") for t in iris.texts("noisy"))  # nothing else leaked
        assert iris.errors == [] and iris.dups == iris.holes == 0
        await henry.send("noisy", "still connected", timeout=10)


async def test_resume_refetch_unread_typing_presence(cluster: ChatCluster) -> None:
    async with (
        ChatClient(cluster.url, "judy") as judy,
        ChatClient(cluster.url, "karl") as karl,
    ):
        await judy.create("lounge")
        await karl.join("lounge")
        for i in range(3):
            await judy.send("lounge", f"m{i}")
        await _until(lambda: len(karl.offsets("lounge")) == 3)
        # read markers and unread counts
        karl._send({"type": "read", "room": "lounge", "offset": 1})
        await asyncio.sleep(0.3)
        rooms = (await karl.request({"type": "rooms"}, "rooms"))["rooms"]
        lounge = next(r for r in rooms if r["room"] == "lounge")
        assert (lounge["last_offset"], lounge["read"], lounge["unread"]) == (3, 1, 2)
        karl._send({"type": "read", "room": "lounge", "offset": 3, "fully": True})
        await asyncio.sleep(0.3)
        rooms = (await karl.request({"type": "rooms"}, "rooms"))["rooms"]
        lounge = next(r for r in rooms if r["room"] == "lounge")
        assert (lounge["unread"], lounge["fully_read"]) == (0, 3)
        # a stale epoch is told to refetch
        ans = await karl.request(
            {"type": "sub", "room": "lounge", "offset": 2, "epoch": "stale", "seq": 1}, "refetch"
        )
        assert ans["room"] == "lounge" and ans["epoch"] != "stale"
        # resume from an offset: only what came after it
        st = karl.rooms["lounge"]
        await _until(lambda: st.epoch != "" and len(st.log) >= 3)
        st.log = st.log[:1]
        st.offset, st.seq = 1, st.log[0]["seq"]
        karl._send({"type": "sub", "room": "lounge", "offset": 1, "epoch": st.epoch, "seq": st.seq})
        await _until(lambda: karl.offsets("lounge") == [1, 2, 3])
        # typing lasts about 30 s; presence comes from a lease in the KV store
        judy._send({"type": "typing", "room": "lounge"})
        await _until(lambda: any(e["type"] == "typing" for e in karl.events))
        typing = next(e for e in karl.events if e["type"] == "typing")
        assert typing["user"] == "judy" and 25 < typing["until"] - time.time() <= 30
        members = await karl.request({"type": "members", "room": "lounge"}, "members:lounge")
        assert {m["user"]: m["state"] for m in members["members"]} == {
            "judy": "online", "karl": "online",
        }  # fmt: skip
        # history pages go backwards by stream sequence
        page = await karl.request(
            {"type": "history", "room": "lounge", "before_seq": st.log[-1]["seq"], "limit": 1},
            "history:lounge",
        )
        assert [m["offset"] for m in page["messages"]] == [2] and page["more"]


async def test_a_gap_older_than_the_history_is_told_to_refetch(cluster: ChatCluster) -> None:
    async with (
        ChatClient(cluster.url, "lena") as lena,
        StreamClient(cluster.addrs("streams")) as sc,
    ):
        await lena.create("retained")
        acks = [await lena.send("retained", f"r{i}") for i in range(1, 6)]
        await _until(lambda: lena.offsets("retained") == [1, 2, 3, 4, 5])
        # the stream drops offsets 1-3 of the room (as retention limits would)
        await sc.purge(STREAM, subject="chat.room.retained", upto_seq=acks[3]["seq"])
        st = lena.rooms["retained"]
        st.log, st.offset, st.seq = st.log[:1], 1, acks[0]["seq"]
        ans = await lena.request(
            {"type": "sub", "room": "retained", "offset": 1, "epoch": st.epoch, "seq": st.seq},
            "refetch",
        )
        assert ans["reason"] == "gap older than the history"
        await _until(lambda: lena.offsets("retained") == [4, 5])  # the latest page, again
        assert st.refetches == 1 and lena.dups == lena.holes == 0


async def test_a_post_the_unreachable_owner_stored_is_not_stored_again(
    cluster: ChatCluster,
) -> None:
    # The race of the sigkill test, without the kill: a server forwards a post to the
    # room's owner, the owner stores it and dies (or is too slow) before it answers,
    # and the server stores the post itself. It must find the owner's copy, not give
    # the same post a second offset.
    def server(name: str) -> ChatServer:
        return ChatServer(
            name, kv=cluster.addrs("kv"), streams=cluster.addrs("streams"),
            brokers=cluster.addrs("broker"), secret=b"s" * 32,
        )  # fmt: skip

    # two in-process servers that never register, so the cluster's ring is untouched
    owner, other = server("ghost-owner"), server("forwarder")
    other.ring = room_ring(["ghost-owner", "forwarder"])
    room = next(r for i in range(100) if room_owner(other.ring, r := f"orphan-{i}") == owner.id)
    try:
        await owner.bus.connect()
        await other.bus.connect()  # ghost-owner answers nothing on chat.owner.ghost-owner
        await owner.create_room(room, "olga")
        req = {"room": room, "user": "olga", "cid": "c-1", "text": "once", "retry": False}
        first = await owner.store_local(dict(req))  # stored by the owner, never answered
        again = await other.post(dict(req))  # the forward times out: stored here
        assert other.stats["fallbacks"] == 1
        assert again == first and first.offset == 1
        stored = await other.streams.read(STREAM, subject=f"chat.room.{room}", limit=10)
        assert [m.headers["cid"] for m in stored] == ["c-1"]
    finally:
        await owner.close()
        await other.close()


@pytest.mark.slow  # ~10 s: the chat server's stream timeout is 8 s
async def test_a_resume_the_stream_could_not_serve_is_tried_again(cluster: ChatCluster) -> None:
    # The stream node stops answering (SIGSTOP) while a client resumes a room: the
    # server's read of what the client missed fails after its timeout, the server
    # says so (unavailable, with the room) and forgets the subscription. The client
    # must subscribe again until it works, or it never hears of the room again.
    streams = cluster.procs[cluster.names("streams")[0]].proc
    assert streams is not None
    async with (
        ChatClient(cluster.url, "nora") as nora,
        ChatClient(cluster.url, "oscar") as oscar,
    ):
        await nora.create("paused")
        await oscar.join("paused")
        await oscar.send("paused", "before")
        await _until(lambda: nora.texts("paused") == ["before"])
        os.killpg(streams.pid, signal.SIGSTOP)
        try:
            nora.drop()  # she reconnects and resumes the room from "before"
            await _until(
                lambda: any(e.get("room") == "paused" for e in nora.errors), 30
            )  # fmt: skip
        finally:
            os.killpg(streams.pid, signal.SIGCONT)
        await oscar.send("paused", "after", timeout=30)
        await _until(lambda: nora.texts("paused") == ["before", "after"], 30)
        assert nora.connects == 2 and nora.dups == nora.holes == 0


async def _health(http: aiohttp.ClientSession, addr: str) -> dict[str, Any]:
    async with http.get(f"http://{addr}/healthz") as r:
        return dict(await r.json())


async def test_each_room_is_stored_by_its_owner_on_the_ring(cluster: ChatCluster) -> None:
    servers = cluster.names("chat")
    ring = room_ring(servers)
    rooms = [f"ring-{i}" for i in range(12)]
    async with aiohttp.ClientSession() as http, ChatClient(cluster.url, "ringo") as ringo:
        # a server restarted by an earlier test is back on every ring first
        for name in servers:
            addr = cluster.procs[name].addr
            for _ in range(100):
                if sorted((await _health(http, addr))["ring"]) == sorted(servers):
                    break
                await asyncio.sleep(0.1)
        for room in rooms:
            await ringo.create(room)
            await ringo.send(room, "where am I stored?")
        owners = {room_owner(ring, room) for room in rooms}
        assert owners == set(servers)  # both servers own some of these rooms
        for name in servers:
            owned = set((await _health(http, cluster.procs[name].addr))["owned"])
            assert {r for r in rooms if room_owner(ring, r) == name} <= owned
            assert not owned & {r for r in rooms if room_owner(ring, r) != name}


async def test_a_users_post_limit_holds_across_two_chat_servers(cluster: ChatCluster) -> None:
    # the fixture allows 20 posts/s, bursts of 30; each server could take POST_LEASE
    # tokens ahead (a lease), so over the test at most 30 + 20 * t + 2 * POST_LEASE posts
    # get through, where each server limiting alone would let 2 * (30 + 20 * t) through.
    token = None
    clients = []
    try:
        for name in cluster.names("chat"):
            c = ChatClient(f"http://{cluster.procs[name].addr}", "flooder", token=token)
            await c.start()
            token = c.token
            clients.append(c)
        assert {c.server for c in clients} == set(cluster.names("chat"))
        await clients[0].create("flood-room")
        await clients[1].subscribe("flood-room")
        per_server = 120
        started = time.monotonic()
        for i in range(per_server):
            for k, c in enumerate(clients):
                c.raw(json.dumps({"type": "send", "room": "flood-room", "cid": f"{k}-{i}",
                                  "text": f"flood {k} {i}"}))  # fmt: skip

        def answered() -> int:
            acks = sum(len(c.offsets("flood-room")) for c in clients[:1])
            return acks + sum(len([e for e in c.errors if e.get("code") == "rate_limited"])
                              for c in clients)  # fmt: skip

        await _until(lambda: answered() >= 2 * per_server, 60)
        elapsed = time.monotonic() - started
        limited = [sum(e.get("code") == "rate_limited" for e in c.errors) for c in clients]
        admitted = 2 * per_server - sum(limited)
        assert all(n > 0 for n in limited)  # both servers refused some
        assert admitted <= 30 + 20 * elapsed + 2 * POST_LEASE, (admitted, elapsed)
    finally:
        for c in clients:
            await c.close()


async def test_delivery_receipts_reach_the_author_once_another_member_has_it(
    cluster: ChatCluster,
) -> None:
    alice = await _connect_elsewhere(cluster, "rita", None)
    bob = await _connect_elsewhere(cluster, "sam", alice.server)

    async def bobs_room() -> dict[str, Any]:
        rooms = (await bob.request({"type": "rooms"}, "rooms"))["rooms"]
        return next(r for r in rooms if r["room"] == "receipts")

    try:
        await alice.create("receipts")
        await alice.send("receipts", "anyone here?")  # only the author has it
        await _until(lambda: alice.offsets("receipts") == [1])
        await alice.request({"type": "ping"}, "pong")
        assert alice.rooms["receipts"].delivered == set()  # its own copy is no receipt
        bob.ack_deliveries = False  # a client that receives but does not acknowledge
        await bob.join("receipts")
        await _until(lambda: bob.offsets("receipts") == [1])
        await bob.request({"type": "ping"}, "pong")
        assert alice.rooms["receipts"].delivered == set()
        # a receipt for messages the server did not send to that client counts for nothing
        epoch = bob.rooms["receipts"].epoch
        bob.raw(json.dumps({"type": "delivered", "room": "receipts", "epoch": epoch,
                            "offsets": [1, 2, 3]}))  # fmt: skip
        await _until(lambda: alice.rooms["receipts"].delivered == {1})  # 1: bob has it
        bob.ack_deliveries = True
        await alice.send("receipts", "two")
        await alice.send("receipts", "three")
        await bob.send("receipts", "four")
        await _until(lambda: alice.offsets("receipts") == bob.offsets("receipts") == [1, 2, 3, 4])
        await _until(lambda: alice.rooms["receipts"].delivered == {1, 2, 3})
        await _until(lambda: bob.rooms["receipts"].delivered == {4})
        await bob.request({"type": "ping"}, "pong")
        await alice.request({"type": "ping"}, "pong")
        assert alice.rooms["receipts"].delivered == {1, 2, 3}  # bob's 4 is not alice's
        # receipts leave read markers alone: unread counts only move with read
        mine = await bobs_room()
        assert mine["last_offset"] == 4 and mine["read"] == 0 and mine["unread"] == 4
        bob.raw(json.dumps({"type": "read", "room": "receipts", "offset": 4}))
        for _ in range(50):
            if (mine := await bobs_room())["unread"] == 0:
                break
        assert mine["read"] == 4 and mine["unread"] == 0
        with pytest.raises(ChatError) as bad:
            await bob.request(
                {"type": "delivered", "room": "receipts", "epoch": "x", "offsets": "1"}, "never"
            )
        assert bad.value.code == "bad_frame"
    finally:
        await alice.close()
        await bob.close()
