"""One chat server process: ``python -m examples.chat.server --id s1 --listen HOST:PORT ...``.

Several of these run behind ``dsys lb`` and share state only through dsys blocks:

* **Raft KV** (:class:`~dsys.kv.KVClient`): accounts (argon2id hashes), rooms and their
  epochs, memberships, read markers, presence leases (keys with a TTL) and the list of
  live chat servers (each one's key has a TTL its heartbeat renews).
* **Consistent-hash ring** (:class:`~dsys.sharding.HashRing`) over the live servers:
  each room has one *owner* that gives its messages their per-room offsets, one at a
  time, so a room's offsets are 1, 2, 3... with no gap. A server forwards a post to
  the owner by pub/sub request/reply; adding a server moves only its share of rooms.
* **Durable stream** (:class:`~dsys.streams.client.StreamClient`): one stream ``CHAT``,
  one subject per room (``chat.room.<room>``); a message's headers carry its offset,
  the room's epoch, its author and the client's message id. History pages and resumes
  are reads of that subject.
* **Pub/sub broker** (:class:`~dsys.pubsub.Client`): the owner publishes each stored
  message on ``chat.live.<room>``; every server hands it to its own clients in the
  room. Pub/sub is at most once, so each connection keeps the last offset it sent per
  room and fills any hole from the stream before going on: nobody misses a message,
  nobody gets one twice.
* **Rate limiting** (:class:`~dsys.ratelimit.Limiter` over a
  :class:`~dsys.ratelimit.ClusterStore` of ``dsys ratelimit serve`` nodes): posts per
  user and log-ins per name are counted in the limiter nodes, so a user's limit holds
  across every chat server (with token leases of :data:`POST_LEASE` posts, see
  ``ClusterStore``: at most that many extra posts per server). Without ``--ratelimit``
  each server limits in its own memory (one-server setups only).
* **Delivery receipts**: a client acknowledges each message it receives (``delivered``
  frame); the first acknowledgement from a member other than the author is published on
  ``chat.delivered`` and every server holding a connection of the author shows it
  ``delivered``. So "delivered" means *received by at least one other member's client*
  (like a single grey tick becoming two); it is live only (an author offline at that
  moment is not told later) and independent of read markers and unread counts.
* **Circuit breakers** (:class:`~dsys.resilience.CircuitBreaker`) around the KV store,
  the stream cluster and the calls to other owners: when one is down, clients get an
  ``unavailable`` error frame at once instead of piling up waiting requests.

Fencing of offsets: a post is appended with the message id ``<room>:<epoch>:<offset>``,
which the stream deduplicates; if two servers briefly both believe they own a room (the
ring changed under them), the second append of an offset is answered as a duplicate
of someone else's message, and that server re-reads the room's tail and tries the next
offset. A resent post (the client lost its connection before the ack) is found by its
client message id in the room's recent history and acknowledged, not stored twice; so
is a post a server stores itself after its forward to the owner went unanswered (the
owner may have stored it just before it died).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from dsys.errors import (
    CircuitOpenError,
    ConflictError,
    DsysError,
    NotFoundError,
)
from dsys.kv import KVClient
from dsys.observability import configure_logging, get_logger
from dsys.pubsub import Client as BusClient
from dsys.pubsub import Msg
from dsys.ratelimit import ClusterStore, Limiter
from dsys.resilience import CircuitBreaker
from dsys.streams import StreamConfig
from dsys.streams.client import StreamClient, StreamMsg

from .common import (
    DELIVERED_SUBJECT,
    LIVE_SUBJECT,
    MAX_FRAME,
    MAX_RECEIPT_OFFSETS,
    MAX_TEXT,
    MEMBER_SUBJECT,
    OWNER_SUBJECT,
    PRESENCE_SUBJECT,
    PRESENCE_TTL,
    RECEIPTS_KEPT,
    RESUME_LIMIT,
    ROOM_SUBJECT,
    STREAM,
    TYPING_SECONDS,
    TYPING_SUBJECT,
    FrameError,
    Stored,
    check_name,
    dm_room,
    dm_users,
    global_id,
    room_owner,
    room_ring,
    sign_token,
    verify_token,
)
from .common import (
    field as get_field,
)

STATIC = Path(__file__).resolve().parent / "static"
SERVER_TTL = 4.0  # seconds a server's registration lives without a heartbeat
OUTBOX_LIMIT = 20_000  # frames queued for one slow client before it is disconnected
POST_LEASE = 8
"""Post tokens a chat server takes from the limiter node at once for one user (spent
here for up to :data:`POST_LEASE_TTL` seconds): one round trip per 8 posts, not per post."""
POST_LEASE_TTL = 20.0


def make_hasher(cost: str) -> PasswordHasher:
    """argon2id with RFC 9106's low-memory profile, or a cheap one for load tests."""
    if cost == "fast":  # for tests and load tests only: thousands of sign-ups in seconds
        return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    return PasswordHasher()  # argon2-cffi's defaults: t=3, m=64 MiB, p=4


def _bad_request(code: str, message: str) -> web.HTTPBadRequest:
    body = json.dumps({"error": code, "message": message})
    return web.HTTPBadRequest(text=body, content_type="application/json")


def _stored(room: str, m: StreamMsg) -> Stored | None:
    h = m.headers
    try:
        ts = int(h["ts"])
        return Stored(
            room, int(h["off"]), h["ep"], m.seq, global_id(ts, m.seq), h["from"], h["cid"],
            m.data.decode(), ts,
        )  # fmt: skip
    except (KeyError, ValueError):
        return None  # not a chat message (nothing else writes here, but be safe)


@dataclass(eq=False)
class View:
    """One connection's place in one room: the last message it was sent."""

    room: str
    epoch: str
    last_off: int = 0
    last_seq: int = 0
    syncing: bool = False
    pending: list[Stored] = field(default_factory=list)


@dataclass(eq=False)
class Conn:
    """One client WebSocket."""

    user: str
    ws: web.WebSocketResponse
    out: list[str] = field(default_factory=list)  # encoded frames not written yet
    ending: bool = False  # write what is queued (unless overflowed), then close
    overflowed: bool = False
    wake: asyncio.Future[None] | None = None  # the writer waiting for frames
    views: dict[str, View] = field(default_factory=dict)
    bad_frames: int = 0
    closed: bool = False
    watching: set[str] = field(default_factory=set)  # users whose presence it is shown
    posts: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    poster: asyncio.Task[None] | None = None  # stores this connection's posts in order

    def send(self, frame: dict[str, Any] | str) -> None:
        """Queue one frame (a str is sent as it is: a room's message is encoded once)."""
        if self.closed:
            return
        if len(self.out) > OUTBOX_LIMIT:
            self.closed = self.overflowed = True  # too slow: it will reconnect and resume
            self.end()
            return
        self.out.append(frame if isinstance(frame, str) else json.dumps(frame))
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def end(self) -> None:
        """Have the writer close the WebSocket once the queued frames are written."""
        self.ending = True
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)


@dataclass(eq=False)
class OwnedRoom:
    """A room this server owns: its next offset and a queue of posts to store in order."""

    name: str
    next_off: int = 0  # 0 = unknown: read the stream's tail first
    epoch: str = ""
    last_ts: int = 0
    gen: int = -1  # ring generation the offset was read under
    posted: bool = False  # the room record says a message was stored under its epoch
    queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[Stored]]] = field(
        default_factory=asyncio.Queue
    )
    recent: OrderedDict[tuple[str, str], Stored] = field(default_factory=OrderedDict)
    worker: asyncio.Task[None] | None = None


class ChatServer:
    """The chat service of one process (see the module docstring)."""

    def __init__(
        self,
        server_id: str,
        *,
        kv: list[str],
        streams: list[str],
        brokers: list[str],
        secret: bytes,
        password_cost: str = "default",
        post_rate: float = 20.0,
        post_burst: int = 40,
        ratelimit: list[str] | None = None,
    ) -> None:
        self.id = server_id
        self.secret = secret
        self.log = get_logger("chat", server=server_id)
        self.kv = KVClient(kv, timeout=8.0)
        self.streams = StreamClient(streams, timeout=8.0)
        self.bus = BusClient(brokers, name=f"chat-{server_id}", max_reconnect_wait=0.5)
        self.hasher = make_hasher(password_cost)
        # Shared limits: a user's posts are counted by the limiter node owning their key
        # whichever chat server they come through. If the node is down, posts are let
        # through (a chat that stops for a limiter is worse) but log-ins are refused.
        post_store = login_store = None
        if ratelimit:
            post_store = ClusterStore(ratelimit, lease_size=POST_LEASE,
                                      lease_ttl=POST_LEASE_TTL, timeout=2.0)  # fmt: skip
            login_store = ClusterStore(ratelimit, timeout=2.0)
        self.post_limit = Limiter(
            rate=post_rate, burst=post_burst, name="chat_posts", store=post_store
        )
        self.login_limit = Limiter(
            rate=10, per=60.0, burst=10, name="chat_logins", store=login_store,
            on_store_error="closed", failure_retry_after=5.0,
        )  # fmt: skip
        ignore = (FrameError, ConflictError, NotFoundError)
        common: dict[str, Any] = {
            "window": 20, "minimum_calls": 10, "failure_rate_threshold": 60,
            "open_wait": 1.0, "ignore_exceptions": ignore,
        }  # fmt: skip
        self.kv_breaker = CircuitBreaker(f"chat-{server_id}-kv", **common)
        self.streams_breaker = CircuitBreaker(f"chat-{server_id}-streams", **common)
        self.owner_breakers: dict[str, CircuitBreaker] = {}
        self.ring = room_ring([server_id])
        self.ring_gen = 0
        self.conns: set[Conn] = set()
        self.by_room: dict[str, set[Conn]] = {}
        self.by_user: dict[str, set[Conn]] = {}
        self.owned: dict[str, OwnedRoom] = {}
        self.members: dict[tuple[str, str], tuple[bool, float]] = {}
        self.rooms_cache: dict[str, tuple[dict[str, Any], float]] = {}
        self.typing_sent: dict[tuple[str, str], float] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.presence: dict[str, str] = {}  # state of the users connected here
        # room -> (epoch, offset -> author) of the messages sent to clients here (None
        # once its delivery was reported: each server reports a message once at most);
        # forgotten when no client here follows the room
        self.authors: dict[str, tuple[str, OrderedDict[int, str | None]]] = {}
        self.receipts: list[list[Any]] = []  # [room, epoch, offset, author] to publish
        self.stats = {"posts": 0, "delivered": 0, "forwarded": 0, "fallbacks": 0, "gaps": 0}

    # -- life cycle -----------------------------------------------------------------

    async def start(self) -> None:
        await self.bus.connect()
        await self._streams(
            self.streams.add_stream,
            StreamConfig(name=STREAM, subjects=(ROOM_SUBJECT.format(room="*"),)),
        )
        await self.bus.subscribe(LIVE_SUBJECT.format(room="*"), cb=self._on_live)
        await self.bus.subscribe(TYPING_SUBJECT.format(room="*"), cb=self._on_typing)
        await self.bus.subscribe(PRESENCE_SUBJECT, cb=self._on_presence)
        await self.bus.subscribe(MEMBER_SUBJECT, cb=self._on_member)
        await self.bus.subscribe(DELIVERED_SUBJECT, cb=self._on_delivered)
        await self.bus.subscribe(OWNER_SUBJECT.format(server=self.id), cb=self._on_owner_request)
        await self._register()
        await self._refresh_ring()
        for loop in (self._heartbeat_loop, self._ring_loop, self._presence_loop, self._bus_watch):
            self.tasks.add(asyncio.create_task(loop()))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for room in self.owned.values():
            if room.worker is not None:
                room.worker.cancel()
        for conn in list(self.conns):
            conn.closed = True
            conn.end()
            with contextlib.suppress(Exception):
                await conn.ws.close()
        with contextlib.suppress(Exception):
            await self.kv.delete(f"chat/servers/{self.id}", timeout=1.0)
        await self.bus.close()
        await self.streams.close()
        await self.kv.close()
        await self.post_limit.close()  # closes its store too
        await self.login_limit.close()

    # -- guarded calls to the blocks ------------------------------------------------

    async def _kv(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return await self.kv_breaker.call_async(fn, *args, **kw)

    async def _streams(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return await self.streams_breaker.call_async(fn, *args, **kw)

    async def _get_json(self, key: str) -> tuple[dict[str, Any] | None, int]:
        got = await self._kv(self.kv.get, key)
        if got is None:
            return None, 0
        return json.loads(got.value), got.revision

    # -- cluster membership and the ring --------------------------------------------

    async def _register(self) -> None:
        await self._kv(self.kv.put, f"chat/servers/{self.id}", b"1", ttl=SERVER_TTL)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(SERVER_TTL / 3)
            with contextlib.suppress(DsysError):
                await self._register()

    async def _refresh_ring(self) -> None:
        items = await self._kv(self.kv.scan, "chat/servers/")
        alive = sorted({item.key.rsplit("/", 1)[1] for item in items} | {self.id})
        if tuple(alive) != tuple(sorted(self.ring.nodes)):
            self.ring = room_ring(alive)
            self.ring_gen += 1
            self.log.info("ring_changed", servers=alive, generation=self.ring_gen)

    async def _ring_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            with contextlib.suppress(DsysError):
                await self._refresh_ring()

    async def _bus_watch(self) -> None:
        # Pub/sub is at most once: after the broker connection was lost, check every
        # room a local client follows against the stream.
        seen = self.bus.reconnects
        while True:
            await asyncio.sleep(0.5)
            if self.bus.reconnects != seen:
                seen = self.bus.reconnects
                self.log.info("bus_reconnected_resync", rooms=len(self.by_room))
                for conns in list(self.by_room.values()):
                    for conn in list(conns):
                        for view in conn.views.values():
                            self._start_sync(conn, view)

    # -- rooms, members -------------------------------------------------------------

    async def room_record(self, room: str, *, fresh: bool = False) -> dict[str, Any]:
        cached = self.rooms_cache.get(room)
        if cached and not fresh and cached[1] > time.monotonic():
            return cached[0]
        rec, _ = await self._get_json(f"chat/rooms/{room}")
        if rec is None:
            raise FrameError("unknown_room", f"no room {room!r}", room=room)
        self.rooms_cache[room] = (rec, time.monotonic() + 2.0)
        return rec

    async def is_member(self, room: str, user: str) -> bool:
        cached = self.members.get((room, user))
        if cached and cached[1] > time.monotonic():
            return cached[0]
        got = await self._kv(self.kv.get, f"chat/members/{room}/{user}")
        member = got is not None
        self.members[(room, user)] = (member, time.monotonic() + (10.0 if member else 1.0))
        return member

    async def require_member(self, room: str, user: str) -> None:
        if not await self.is_member(room, user):
            await self.room_record(room)  # unknown_room first, when it is
            raise FrameError(
                "not_member", f"you are not in room {room!r}; join it first", room=room
            )

    async def create_room(self, room: str, user: str, *, dm: bool = False) -> None:
        rec = {"epoch": uuid.uuid4().hex[:12], "posted": False, "by": user, "dm": dm}
        await self._kv(self.kv.cas, f"chat/rooms/{room}", json.dumps(rec).encode(), revision=0)

    async def add_member(self, room: str, user: str) -> None:
        await self._kv(self.kv.put, f"chat/members/{room}/{user}", b"1")
        await self._kv(self.kv.put, f"chat/userrooms/{user}/{room}", b"1")
        self.members[(room, user)] = (True, time.monotonic() + 10.0)
        await self.bus.publish(
            MEMBER_SUBJECT, json.dumps({"room": room, "user": user, "in": True}).encode()
        )

    async def remove_member(self, room: str, user: str) -> None:
        await self._kv(self.kv.delete, f"chat/members/{room}/{user}")
        await self._kv(self.kv.delete, f"chat/userrooms/{user}/{room}")
        self._member_left(room, user)
        await self.bus.publish(
            MEMBER_SUBJECT, json.dumps({"room": room, "user": user, "in": False}).encode()
        )

    def _member_left(self, room: str, user: str) -> None:
        self.members[(room, user)] = (False, time.monotonic() + 1.0)
        for conn in list(self.by_user.get(user, ())):
            self._drop_view(conn, room)

    async def _on_member(self, msg: Msg) -> None:
        ev = json.loads(msg.data)
        if ev["in"]:
            self.members.pop((ev["room"], ev["user"]), None)
        else:
            self._member_left(ev["room"], ev["user"])
        text = json.dumps({"type": "member", **ev})
        for conn in list(self.by_room.get(ev["room"], ())):
            conn.send(text)

    # -- posting: the owner side ----------------------------------------------------

    def owner_of(self, room: str) -> str:
        return room_owner(self.ring, room)

    async def post(self, req: dict[str, Any]) -> Stored:
        """Store a post through the room's owner (or here, when the owner is unreachable)."""
        owner = self.owner_of(req["room"])
        if owner != self.id:
            breaker = self.owner_breakers.get(owner)
            if breaker is None:
                breaker = self.owner_breakers[owner] = CircuitBreaker(
                    f"chat-{self.id}-owner-{owner}", window=10, minimum_calls=3,
                    failure_rate_threshold=50, open_wait=2.0,
                )  # fmt: skip
            try:
                reply = await breaker.call_async(
                    self.bus.request,
                    OWNER_SUBJECT.format(server=owner),
                    json.dumps(req).encode(),
                    timeout=2.0,
                )
            except (DsysError, TimeoutError) as exc:
                # The owner is down or unreachable: store it here. Offsets stay unique
                # and gap-free (see "fencing" in the module docstring). The owner may
                # have stored the post before it stopped answering (killed, or slower
                # than the timeout): look for it first, as for a client's resend.
                req = {**req, "retry": True}
                self.stats["fallbacks"] += 1
                self.log.info("owner_unreachable", owner=owner, room=req["room"], error=str(exc))
            else:
                self.stats["forwarded"] += 1
                ans = json.loads(reply.data)
                if "error" in ans:
                    raise FrameError(ans["error"], ans["message"])
                return Stored.from_frame(ans["msg"])
        return await self.store_local(req)

    async def _on_owner_request(self, msg: Msg) -> None:
        req = json.loads(msg.data)
        reply = msg.reply

        async def answer() -> None:
            try:
                stored = await self.store_local(req)
                out: dict[str, Any] = {"msg": stored.frame()}
            except FrameError as exc:
                out = {"error": exc.code, "message": str(exc)}
            except (DsysError, TimeoutError) as exc:
                out = {"error": "unavailable", "message": f"could not store: {exc}"}
            if reply:
                await self.bus.publish(reply, json.dumps(out).encode())

        task = asyncio.create_task(answer())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def store_local(self, req: dict[str, Any]) -> Stored:
        room = self.owned.get(req["room"])
        if room is None:
            room = self.owned[req["room"]] = OwnedRoom(req["room"])
        fut: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        room.queue.put_nowait((req, fut))  # before any await: posts keep their order
        if room.worker is None or room.worker.done():
            room.worker = asyncio.create_task(self._room_worker(room))
        return await fut

    async def _room_worker(self, room: OwnedRoom) -> None:
        while True:
            try:
                req, fut = await asyncio.wait_for(room.queue.get(), 30.0)
            except TimeoutError:
                if room.queue.empty():
                    self.owned.pop(room.name, None)  # idle: forget its offset
                    return
                continue
            if fut.done():
                continue
            try:
                fut.set_result(await self._append(room, req))
            except Exception as exc:
                room.next_off = 0  # unsure what is stored: read the tail next time
                if not fut.done():
                    fut.set_exception(exc)

    async def _load_tail(self, room: OwnedRoom) -> None:
        subject = ROOM_SUBJECT.format(room=room.name)
        rec = await self.room_record(room.name, fresh=True)
        tail = await self._streams(
            self.streams.read, STREAM, subject=subject, reverse=True, limit=1
        )
        last = _stored(room.name, tail[0]) if tail else None
        if last is not None and last.epoch == rec["epoch"]:
            room.next_off, room.epoch, room.last_ts = last.offset + 1, last.epoch, last.ts
        elif not rec.get("posted"):
            room.next_off, room.epoch = 1, rec["epoch"]  # nothing stored in this epoch yet
        else:
            # No history under this epoch although the room was posted to (``posted`` is
            # set only after a first message is stored, so a second owner racing the
            # first one's first post never lands here): the history is gone, and a new
            # epoch tells every client holding old offsets to refetch.
            got = await self._kv(self.kv.get, f"chat/rooms/{room.name}")
            assert got is not None
            if json.loads(got.value) == rec:
                new = dict(rec, epoch=uuid.uuid4().hex[:12], posted=False)
                self.log.warning("room_new_epoch", room=room.name, old=rec["epoch"],
                                 epoch=new["epoch"])  # fmt: skip
                with contextlib.suppress(ConflictError):  # another owner did it: reread
                    await self._kv(
                        self.kv.cas, f"chat/rooms/{room.name}", json.dumps(new).encode(),
                        revision=got.revision,
                    )  # fmt: skip
            rec = await self.room_record(room.name, fresh=True)
            room.next_off, room.epoch = 1, rec["epoch"]
            if last is not None and last.epoch == rec["epoch"]:
                room.next_off = last.offset + 1
        room.posted = bool(rec.get("posted"))
        room.gen = self.ring_gen

    async def _mark_posted(self, room: OwnedRoom) -> None:
        """Record in the room's record that its epoch has a stored message."""
        got = await self._kv(self.kv.get, f"chat/rooms/{room.name}")
        if got is not None:
            rec = json.loads(got.value)
            if rec["epoch"] == room.epoch and not rec.get("posted"):
                with contextlib.suppress(ConflictError):
                    new = json.dumps(dict(rec, posted=True)).encode()
                    await self._kv(self.kv.cas, f"chat/rooms/{room.name}", new,
                                   revision=got.revision)  # fmt: skip
        room.posted = True

    async def _find_resent(self, room: OwnedRoom, user: str, cid: str) -> Stored | None:
        if (user, cid) in room.recent:
            return room.recent[(user, cid)]
        msgs = await self._streams(
            self.streams.read, STREAM, subject=ROOM_SUBJECT.format(room=room.name),
            reverse=True, limit=500,
        )  # fmt: skip
        for m in msgs:
            s = _stored(room.name, m)
            if s is not None and s.user == user and s.cid == cid:
                return s
        return None

    async def _append(self, room: OwnedRoom, req: dict[str, Any]) -> Stored:
        user, cid, text = req["user"], req["cid"], req["text"]
        for _ in range(8):
            if room.next_off == 0 or room.gen != self.ring_gen:
                await self._load_tail(room)
            if req.get("retry") or (user, cid) in room.recent:
                found = await self._find_resent(room, user, cid)
                if found is not None:
                    await self._announce(found)  # its first announcement may be lost
                    return found
            off, ts = room.next_off, max(int(time.time() * 1000), room.last_ts)
            headers = {"off": str(off), "ep": room.epoch, "from": user, "cid": cid, "ts": str(ts)}
            ack = await self._streams(
                self.streams.publish, ROOM_SUBJECT.format(room=room.name), text.encode(),
                headers=headers, msg_id=f"{room.name}:{room.epoch}:{off}",
            )  # fmt: skip
            if ack.duplicate:
                got = await self._streams(self.streams.get, STREAM, ack.seq)
                mine = got is not None and got.headers.get("cid") == cid
                if not mine or got is None or got.headers.get("from") != user:
                    room.next_off = 0  # someone else holds this offset: reread the tail
                    continue
            stored = Stored(room.name, off, room.epoch, ack.seq, global_id(ts, ack.seq),
                            user, cid, text, ts)  # fmt: skip
            room.next_off, room.last_ts = off + 1, ts
            if not room.posted:
                with contextlib.suppress(DsysError, TimeoutError):  # tried again next post
                    await self._mark_posted(room)
            room.recent[(user, cid)] = stored
            if len(room.recent) > 1000:
                room.recent.popitem(last=False)
            self.stats["posts"] += 1
            await self._announce(stored)
            return stored
        raise FrameError("unavailable", "could not give the message an offset; retry")

    async def _announce(self, stored: Stored) -> None:
        await self.bus.publish(
            LIVE_SUBJECT.format(room=stored.room), json.dumps(stored.frame()).encode()
        )

    # -- delivery: every server -----------------------------------------------------

    async def _on_live(self, msg: Msg) -> None:
        frame = json.loads(msg.data)
        conns = self.by_room.get(frame["room"])
        if not conns:
            return
        stored = Stored.from_frame(frame)
        self._remember(stored)
        text = msg.data.decode()
        for conn in list(conns):
            view = conn.views.get(stored.room)
            if view is not None:
                self._deliver(conn, view, stored, text)

    def _deliver(self, conn: Conn, view: View, m: Stored, text: str | None = None) -> None:
        if view.syncing:
            view.pending.append(m)
            return
        if m.epoch != view.epoch:
            self._refetch(conn, view.room, m.epoch, "the room's history has a new epoch")
            return
        if m.offset <= view.last_off:
            return  # already sent (a resent post's announcement, or a fill)
        if m.offset != view.last_off + 1:
            view.pending.append(m)  # a hole: fill it from the stream first
            self.stats["gaps"] += 1
            self._start_sync(conn, view)
            return
        conn.send(text if text is not None else m.frame())
        view.last_off, view.last_seq = m.offset, m.seq
        self.stats["delivered"] += 1

    def _refetch(self, conn: Conn, room: str, epoch: str, reason: str) -> None:
        self._drop_view(conn, room)
        conn.send({"type": "refetch", "room": room, "epoch": epoch, "reason": reason})

    def _drop_view(self, conn: Conn, room: str) -> None:
        conn.views.pop(room, None)
        conns = self.by_room.get(room)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_room[room]
                self.authors.pop(room, None)

    def _start_sync(self, conn: Conn, view: View) -> None:
        if view.syncing:
            return
        view.syncing = True
        task = asyncio.create_task(self._sync(conn, view))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _sync(self, conn: Conn, view: View) -> None:
        """Send ``view`` everything after its last offset from the stream, then go live."""
        subject = ROOM_SUBJECT.format(room=view.room)
        sent = 0
        try:
            while True:
                msgs = await self._streams(
                    self.streams.read, STREAM, subject=subject,
                    start_seq=view.last_seq + 1, limit=200,
                )  # fmt: skip
                for raw in msgs:
                    m = _stored(view.room, raw)
                    if m is None or m.epoch != view.epoch or m.offset <= view.last_off:
                        view.last_seq = max(view.last_seq, raw.seq)
                        continue
                    if m.offset != view.last_off + 1:
                        self._refetch(conn, view.room, view.epoch, "gap older than the history")
                        return
                    conn.send(m.frame())
                    self._remember(m)
                    view.last_off, view.last_seq = m.offset, m.seq
                    sent += 1
                    if sent > RESUME_LIMIT:
                        self._refetch(conn, view.room, view.epoch, "too many missed messages")
                        return
                if len(msgs) < 200:
                    break
            pending, view.pending = sorted(view.pending, key=lambda p: p.offset), []
            view.syncing = False
            for m in pending:
                self._deliver(conn, view, m)
        except (DsysError, TimeoutError) as exc:
            view.syncing = False
            self.log.info("sync_failed", room=view.room, error=str(exc))
            conn.send({"type": "error", "code": "unavailable", "room": view.room,
                       "message": "history is unavailable; subscribe again",
                       "retry_after": 0.5})  # fmt: skip
            self._drop_view(conn, view.room)

    # -- delivery receipts ------------------------------------------------------------

    def _remember(self, m: Stored) -> None:
        got = self.authors.get(m.room)
        if got is None or got[0] != m.epoch:
            got = self.authors[m.room] = (m.epoch, OrderedDict())
        authors = got[1]
        if m.offset not in authors:
            authors[m.offset] = m.user
            if len(authors) > RECEIPTS_KEPT:
                authors.popitem(last=False)

    async def _op_delivered(self, conn: Conn, f: dict[str, Any]) -> None:
        room = check_name(get_field(f, "room", str), "room")
        epoch = get_field(f, "epoch", str)
        offsets = get_field(f, "offsets", list)
        if len(offsets) > MAX_RECEIPT_OFFSETS or not all(type(o) is int for o in offsets):
            raise FrameError("bad_frame", f"offsets: at most {MAX_RECEIPT_OFFSETS} integers")
        view = conn.views.get(room)
        got = self.authors.get(room)
        if view is None or view.epoch != epoch or got is None or got[0] != epoch:
            return  # not (or no longer) subscribed here: nothing this server sent it
        authors = got[1]
        for off in offsets:
            author = authors.get(off)
            # only what this connection was sent, and only for the author's first reader
            if author is not None and author != conn.user and off <= view.last_off:
                authors[off] = None
                if not self.receipts:
                    asyncio.get_running_loop().call_soon(self._flush_receipts)
                self.receipts.append([room, epoch, off, author])

    def _flush_receipts(self) -> None:
        # the receipts of one loop turn (every frame read meanwhile) in one bus message
        batch, self.receipts = self.receipts, []
        task = asyncio.create_task(self.bus.publish(DELIVERED_SUBJECT, json.dumps(batch).encode()))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _on_delivered(self, msg: Msg) -> None:
        out: dict[tuple[str, str, str], list[int]] = {}
        for room, epoch, off, author in json.loads(msg.data):
            got = self.authors.get(room)
            if got is not None and got[0] == epoch and off in got[1]:
                got[1][off] = None  # reported by some server: do not report it again
            if author in self.by_user:
                out.setdefault((author, room, epoch), []).append(off)
        for (author, room, epoch), offs in out.items():
            text = json.dumps({"type": "delivered", "room": room, "epoch": epoch, "offsets": offs})
            for conn in list(self.by_user.get(author, ())):
                conn.send(text)

    # -- typing and presence --------------------------------------------------------

    async def _on_typing(self, msg: Msg) -> None:
        ev = json.loads(msg.data)
        text = json.dumps({"type": "typing", **ev})
        for conn in list(self.by_room.get(ev["room"], ())):
            conn.send(text)

    async def _on_presence(self, msg: Msg) -> None:
        ev = json.loads(msg.data)
        if ev["state"] == "offline" and self.by_user.get(ev["user"]):
            await self.set_presence(ev["user"], "online")  # still here, on this server
            return
        text = json.dumps({"type": "presence", **ev})
        for conn in list(self.conns):  # only to those shown this user (members of a room)
            if ev["user"] in conn.watching:
                conn.send(text)

    async def set_presence(self, user: str, state: str) -> None:
        key = f"chat/presence/{user}"
        if state == "offline":
            self.presence.pop(user, None)
            await self._kv(self.kv.delete, key)
        else:
            self.presence[user] = state
            await self._kv(self.kv.put, key, json.dumps({"state": state}).encode(),
                           ttl=PRESENCE_TTL)  # fmt: skip
        ev = {"user": user, "state": state}
        await self.bus.publish(PRESENCE_SUBJECT, json.dumps(ev).encode())

    async def _presence_loop(self) -> None:
        # The lease: a user's key expires PRESENCE_TTL after the last heartbeat of the
        # last server holding a connection of theirs (a killed server stops renewing).
        while True:
            await asyncio.sleep(PRESENCE_TTL / 3)
            renewals = [
                self._kv(self.kv.put, f"chat/presence/{user}",
                         json.dumps({"state": self.presence.get(user, "online")}).encode(),
                         ttl=PRESENCE_TTL)
                for user in list(self.by_user)
            ]  # fmt: skip
            await asyncio.gather(*renewals, return_exceptions=True)

    async def presence_of(self, user: str) -> str:
        got = await self._kv(self.kv.get, f"chat/presence/{user}", stale=True)
        return "offline" if got is None else str(json.loads(got.value)["state"])

    # -- HTTP: sign-up, log-in, static page, health ---------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_post("/api/signup", self.signup)
        app.router.add_post("/api/login", self.login)
        app.router.add_get("/ws", self.websocket)
        return app

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "ok": True,
                "server": self.id,
                "connections": len(self.conns),
                **self.stats,
                "ring": list(self.ring.nodes),
                "owned": sorted(self.owned),
            }
        )

    async def _credentials(self, request: web.Request) -> tuple[str, str]:
        try:
            body = await request.json()
        except ValueError:
            raise _bad_request("bad_request", "the body must be JSON") from None
        if not isinstance(body, dict):
            raise _bad_request("bad_request", "the body must be a JSON object")
        try:
            user = check_name(body.get("user"), "user")
        except FrameError as exc:
            raise _bad_request(exc.code, str(exc)) from None
        password = body.get("password")
        if not isinstance(password, str) or not 8 <= len(password) <= 256:
            raise _bad_request("bad_password", "a password has 8 to 256 characters")
        return user, password

    async def signup(self, request: web.Request) -> web.Response:
        user, password = await self._credentials(request)
        digest = await asyncio.to_thread(self.hasher.hash, password)
        try:
            await self._kv(self.kv.cas, f"chat/users/{user}", digest.encode(), revision=0)
        except ConflictError:
            return web.json_response(
                {"error": "user_exists", "message": f"{user!r} is taken"}, status=409
            )
        return web.json_response({"user": user, "token": sign_token(self.secret, user)})

    async def login(self, request: web.Request) -> web.Response:
        user, password = await self._credentials(request)
        decision = await self.login_limit.hit(user)
        if not decision.allowed:
            return web.json_response(
                {"error": "rate_limited", "retry_after": decision.retry_after}, status=429
            )
        got = await self._kv(self.kv.get, f"chat/users/{user}")
        ok = False
        if got is not None:
            with contextlib.suppress(VerificationError, InvalidHashError):
                ok = await asyncio.to_thread(self.hasher.verify, got.value.decode(), password)
        if not ok:
            return web.json_response(
                {"error": "bad_login", "message": "wrong user or password"}, status=401
            )
        return web.json_response({"user": user, "token": sign_token(self.secret, user)})

    # -- the WebSocket ----------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        # no permessage-deflate: every socket of a room gets the same bytes, not a zlib
        # pass per recipient (browsers offer it; our clients do not)
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=1024 * 1024, compress=False)
        await ws.prepare(request)
        try:
            first = await ws.receive(timeout=10.0)
            hello = json.loads(first.data) if first.type == WSMsgType.TEXT else None
            if not isinstance(hello, dict) or hello.get("type") != "hello":
                raise FrameError("bad_frame", "the first frame must be {type: hello, token}")
            user = verify_token(self.secret, hello.get("token"))
        except (TimeoutError, ValueError, FrameError) as exc:
            err = exc if isinstance(exc, FrameError) else FrameError("bad_frame", "no hello")
            await ws.send_str(json.dumps(err.frame()))
            await ws.close(code=4001, message=b"unauthenticated")
            return ws
        conn = Conn(user, ws)
        self.conns.add(conn)
        first_conn = not self.by_user.get(user)
        self.by_user.setdefault(user, set()).add(conn)
        writer = asyncio.create_task(self._writer(conn))
        conn.send({"type": "welcome", "user": user, "server": self.id})
        if first_conn:
            with contextlib.suppress(DsysError):
                await self.set_presence(user, "online")
        try:
            async for raw in ws:
                if raw.type != WSMsgType.TEXT:
                    if raw.type == WSMsgType.BINARY:
                        conn.send(FrameError("bad_frame", "frames are JSON text").frame())
                    continue
                await self._on_frame(conn, raw.data)
                if conn.closed or conn.bad_frames > 50:
                    break
        finally:
            conn.closed = True
            conn.end()
            self.conns.discard(conn)
            for room in list(conn.views):
                self._drop_view(conn, room)
            left = self.by_user.get(user)
            if left is not None:
                left.discard(conn)
                if not left:
                    del self.by_user[user]
                    with contextlib.suppress(DsysError):
                        await self.set_presence(user, "offline")
            writer.cancel()
            if conn.poster is not None:
                conn.poster.cancel()
            await ws.close()
        return ws

    async def _writer(self, conn: Conn) -> None:
        # Frames queued while the last one was being sent go out together as one JSON
        # array (at most 64): under load a client, the load balancer and this server
        # handle one WebSocket frame for many messages.
        # The writer sleeps on a bare future that send() resolves: one wake-up per loop
        # turn however many frames arrived in it (no queue, no per-frame future).
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                if not conn.out and not conn.ending:
                    conn.wake = loop.create_future()
                    await conn.wake
                    conn.wake = None
                    continue
                if conn.overflowed:
                    await conn.ws.close(code=1011)
                    return
                frames, conn.out = conn.out, []
                for i in range(0, len(frames), 64):
                    chunk = frames[i : i + 64]
                    await conn.ws.send_str(
                        chunk[0] if len(chunk) == 1 else "[" + ",".join(chunk) + "]"
                    )
                if conn.ending and not conn.out:
                    await conn.ws.close(code=1000)
                    return

    async def _on_frame(self, conn: Conn, data: str) -> None:
        ref = None
        where: dict[str, str] = {}  # the room of a failed sub: the client subscribes again
        try:
            if len(data) > MAX_FRAME:
                raise FrameError("too_large", f"frames are at most {MAX_FRAME} bytes")
            try:
                frame = json.loads(data)
            except ValueError:
                raise FrameError("bad_frame", "not JSON") from None
            if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
                raise FrameError("bad_frame", "a frame is a JSON object with a type")
            ref = frame.get("cid") if isinstance(frame.get("cid"), str) else None
            if frame["type"] == "sub" and isinstance(frame.get("room"), str):
                where = {"room": frame["room"]}
            handler = getattr(self, f"_op_{frame['type']}", None)
            if handler is None:
                raise FrameError("unknown_type", f"unknown frame type {frame['type']!r:.30}")
            await handler(conn, frame)
        except FrameError as exc:
            if exc.code in ("bad_frame", "too_large", "unknown_type", "bad_name"):
                conn.bad_frames += 1
            conn.send(exc.frame(ref))
        except CircuitOpenError as exc:
            conn.send({"type": "error", "code": "unavailable", "ref": ref, **where,
                       "message": str(exc), "retry_after": 1.0})  # fmt: skip
        except (DsysError, TimeoutError) as exc:
            conn.send({"type": "error", "code": "unavailable", "ref": ref, **where,
                       "message": f"{type(exc).__name__}: {exc}", "retry_after": 0.5})  # fmt: skip

    # -- frame handlers -------------------------------------------------------------

    async def _op_ping(self, conn: Conn, f: dict[str, Any]) -> None:
        conn.send({"type": "pong"})

    async def _op_send(self, conn: Conn, f: dict[str, Any]) -> None:
        room = check_name(get_field(f, "room", str), "room")
        cid = get_field(f, "cid", str)
        text = get_field(f, "text", str)
        if not 1 <= len(cid) <= 64:
            raise FrameError("bad_frame", "cid must be 1-64 characters")
        if not text.strip() or len(text) > MAX_TEXT:
            raise FrameError("bad_text", f"text must be 1-{MAX_TEXT} characters, not blank")
        # The limit is applied as the frame arrives (not after the posts queued before
        # it are stored), so a flood is refused at once, whatever the store's latency.
        decision = await self.post_limit.hit(conn.user)
        if not decision.allowed:
            raise FrameError("rate_limited", "slow down", retry_after=decision.retry_after)
        conn.posts.put_nowait({"room": room, "user": conn.user, "cid": cid, "text": text,
                               "retry": bool(f.get("retry"))})  # fmt: skip
        if conn.poster is None or conn.poster.done():
            conn.poster = asyncio.create_task(self._poster(conn))

    async def _poster(self, conn: Conn) -> None:
        """Store one connection's posts one after the other (its messages keep its order)."""
        while not conn.closed:
            req = await conn.posts.get()
            room, cid = req["room"], req["cid"]
            try:
                await self.require_member(room, conn.user)
                stored = await self.post(req)
            except FrameError as exc:
                conn.send(exc.frame(cid))
                continue
            except (DsysError, TimeoutError) as exc:
                message = f"{type(exc).__name__}: {exc}"
                conn.send({"type": "error", "code": "unavailable", "ref": cid,
                           "message": message, "retry_after": 0.5})  # fmt: skip
                continue
            self.typing_sent.pop((room, conn.user), None)  # the next keystroke is news again
            conn.send({"type": "ack", "cid": cid, "room": room, "offset": stored.offset,
                       "seq": stored.seq, "id": stored.id, "epoch": stored.epoch})  # fmt: skip

    async def _op_sub(self, conn: Conn, f: dict[str, Any]) -> None:
        room = check_name(get_field(f, "room", str), "room")
        offset = get_field(f, "offset", int, 0)
        epoch = get_field(f, "epoch", str, "")
        seq = get_field(f, "seq", int, 0)
        await self.require_member(room, conn.user)
        rec = await self.room_record(room, fresh=True)
        self._drop_view(conn, room)
        if epoch and epoch != rec["epoch"]:
            conn.send({"type": "refetch", "room": room, "epoch": rec["epoch"],
                       "reason": "the room's history has a new epoch"})  # fmt: skip
            return
        view = View(room, rec["epoch"], syncing=True)
        conn.views[room] = view
        self.by_room.setdefault(room, set()).add(conn)
        if epoch:  # resume: everything after (offset, seq)
            view.last_off, view.last_seq = offset, seq
        else:  # fresh: the last page, then live
            latest = await self._streams(
                self.streams.read, STREAM, subject=ROOM_SUBJECT.format(room=room),
                reverse=True, limit=int(get_field(f, "limit", int, 50)) or 1,
            )  # fmt: skip
            page = [
                s for m in reversed(latest) if (s := _stored(room, m)) and s.epoch == view.epoch
            ]
            if page:
                view.last_off, view.last_seq = page[0].offset - 1, page[0].seq - 1
        conn.send({"type": "subscribed", "room": room, "epoch": view.epoch})
        view.syncing = False
        self._start_sync(conn, view)

    async def _op_unsub(self, conn: Conn, f: dict[str, Any]) -> None:
        self._drop_view(conn, check_name(get_field(f, "room", str), "room"))

    async def _op_history(self, conn: Conn, f: dict[str, Any]) -> None:
        room = check_name(get_field(f, "room", str), "room")
        before = get_field(f, "before_seq", int, 0)
        limit = max(1, min(100, get_field(f, "limit", int, 50)))
        await self.require_member(room, conn.user)
        msgs: list[StreamMsg] = []
        if before != 1:
            msgs = await self._streams(
                self.streams.read, STREAM, subject=ROOM_SUBJECT.format(room=room),
                reverse=True, start_seq=max(0, before - 1), limit=limit,
            )  # fmt: skip
        page = [s.frame() for m in reversed(msgs) if (s := _stored(room, m))]
        conn.send({"type": "history", "room": room, "messages": page, "more": len(msgs) == limit})

    async def _op_create(self, conn: Conn, f: dict[str, Any]) -> None:
        room = check_name(get_field(f, "room", str), "room")
        if room.startswith("dm--"):
            raise FrameError("bad_name", "room names starting with dm-- are for direct messages")
        try:
            await self.create_room(room, conn.user)
        except ConflictError:
            raise FrameError("room_exists", f"room {room!r} exists; join it", room=room) from None
        await self.add_member(room, conn.user)
        conn.send({"type": "joined", "room": room})

    async def _op_join(self, conn: Conn, f: dict[str, Any]) -> None:
        room = check_name(get_field(f, "room", str), "room")
        pair = dm_users(room)
        if pair is not None and conn.user not in pair:
            raise FrameError("forbidden", "that is someone else's direct-message room")
        await self.room_record(room)
        await self.add_member(room, conn.user)
        conn.send({"type": "joined", "room": room})

    async def _op_leave(self, conn: Conn, f: dict[str, Any]) -> None:
        room = check_name(get_field(f, "room", str), "room")
        await self.require_member(room, conn.user)
        await self.remove_member(room, conn.user)
        conn.send({"type": "left", "room": room})

    async def _op_dm(self, conn: Conn, f: dict[str, Any]) -> None:
        other = check_name(get_field(f, "user", str), "user")
        if other == conn.user or await self._kv(self.kv.get, f"chat/users/{other}") is None:
            raise FrameError("unknown_user", f"no user {other!r} to write to")
        room = dm_room(conn.user, other)
        with contextlib.suppress(ConflictError):
            await self.create_room(room, conn.user, dm=True)
        await self.add_member(room, conn.user)
        await self.add_member(room, other)
        conn.send({"type": "joined", "room": room})

    async def _op_rooms(self, conn: Conn, f: dict[str, Any]) -> None:
        mine = {
            i.key.rsplit("/", 1)[1]
            for i in await self._kv(self.kv.scan, f"chat/userrooms/{conn.user}/")
        }
        names = {
            i.key.rsplit("/", 1)[1] for i in await self._kv(self.kv.scan, "chat/rooms/", limit=500)
        }
        rooms = []
        for room in sorted(names | mine):
            pair = dm_users(room)
            if pair is not None and conn.user not in pair:
                continue
            entry: dict[str, Any] = {"room": room, "member": room in mine, "dm": pair is not None}
            if room in mine:
                tail = await self._streams(
                    self.streams.read, STREAM, subject=ROOM_SUBJECT.format(room=room),
                    reverse=True, limit=1,
                )  # fmt: skip
                last = _stored(room, tail[0]) if tail else None
                marker, _ = await self._get_json(f"chat/read/{conn.user}/{room}")
                read = (marker or {}).get("read", 0)
                rec = await self.room_record(room)
                same = last is not None and last.epoch == rec["epoch"]
                entry["last_offset"] = last.offset if same and last else 0
                entry["epoch"] = rec["epoch"]
                entry["read"] = read
                entry["fully_read"] = (marker or {}).get("fully_read", 0)
                entry["unread"] = max(0, entry["last_offset"] - read)
            rooms.append(entry)
        conn.send({"type": "rooms", "rooms": rooms})

    async def _op_read(self, conn: Conn, f: dict[str, Any]) -> None:
        room = check_name(get_field(f, "room", str), "room")
        offset = get_field(f, "offset", int)
        fully = bool(f.get("fully", False))
        await self.require_member(room, conn.user)
        key = f"chat/read/{conn.user}/{room}"
        for _ in range(5):
            marker, rev = await self._get_json(key)
            marker = marker or {"read": 0, "fully_read": 0}
            new = dict(marker, read=max(marker["read"], offset))
            if fully:
                new["fully_read"] = max(marker["fully_read"], offset)
            if new == marker:
                return
            with contextlib.suppress(ConflictError):
                await self._kv(self.kv.cas, key, json.dumps(new).encode(), revision=rev)
                return

    async def _op_typing(self, conn: Conn, f: dict[str, Any]) -> None:
        room = check_name(get_field(f, "room", str), "room")
        await self.require_member(room, conn.user)
        now = time.monotonic()
        if now - self.typing_sent.get((room, conn.user), 0.0) < 2.0:
            return  # at most one typing event per user and room every 2 s
        self.typing_sent[(room, conn.user)] = now
        ev = {"room": room, "user": conn.user, "until": time.time() + TYPING_SECONDS}
        await self.bus.publish(TYPING_SUBJECT.format(room=room), json.dumps(ev).encode())

    async def _op_presence(self, conn: Conn, f: dict[str, Any]) -> None:
        state = get_field(f, "state", str)
        if state not in ("online", "away"):
            raise FrameError("bad_frame", "state is online or away")
        await self.set_presence(conn.user, state)

    async def _op_members(self, conn: Conn, f: dict[str, Any]) -> None:
        room = check_name(get_field(f, "room", str), "room")
        await self.require_member(room, conn.user)
        items = await self._kv(self.kv.scan, f"chat/members/{room}/")
        users = [i.key.rsplit("/", 1)[1] for i in items]
        conn.watching = set(users)
        states = await asyncio.gather(*(self.presence_of(u) for u in users))
        members = [{"user": u, "state": s} for u, s in zip(users, states, strict=True)]
        conn.send({"type": "members", "room": room, "members": members})


async def serve(args: argparse.Namespace) -> None:
    secret = os.environ.get("DSYS_CHAT_SECRET", "")
    if not secret:
        print("DSYS_CHAT_SECRET is not set; using a random one (tokens work on this server only)",
              file=sys.stderr)  # fmt: skip
        secret = secrets.token_hex(32)
    server = ChatServer(
        args.id,
        kv=args.kv.split(","),
        streams=args.streams.split(","),
        brokers=args.brokers.split(","),
        secret=secret.encode(),
        password_cost=args.password_cost,
        post_rate=args.post_rate,
        post_burst=args.post_burst,
        ratelimit=args.ratelimit.split(",") if args.ratelimit else None,
    )
    profile = None
    if os.environ.get("DSYS_CHAT_PROFILE"):  # cProfile this server; stats written on exit
        import cProfile

        profile = cProfile.Profile(time.process_time)  # CPU time: the machine is shared
        profile.enable()
    await server.start()
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = args.listen.rsplit(":", 1)
    site = web.TCPSite(runner, host, int(port))
    await site.start()
    bound = runner.addresses[0][1]
    print(f"chat server {args.id} listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if profile is not None:
        profile.disable()
        profile.dump_stats(f"{os.environ['DSYS_CHAT_PROFILE']}.{args.id}")
    await server.close()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m examples.chat.server", description=__doc__.split("\n")[0]
    )
    p.add_argument("--id", required=True, help="this server's id, e.g. s1")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    p.add_argument("--kv", required=True, help="KV servers, HOST:PORT,...")
    p.add_argument("--streams", required=True, help="stream servers, HOST:PORT,...")
    p.add_argument("--brokers", required=True, help="pub/sub brokers, HOST:PORT,...")
    p.add_argument("--password-cost", choices=("default", "fast"), default="default",
                   help="argon2 cost: default, or fast (tests and load tests only)")  # fmt: skip
    p.add_argument("--post-rate", type=float, default=20.0, help="posts per second per user")
    p.add_argument("--post-burst", type=int, default=40, help="burst of posts per user")
    p.add_argument(
        "--ratelimit",
        default="",
        help="dsys ratelimit serve nodes, HOST:PORT,... (default: memory)",
    )
    args = p.parse_args(argv)
    configure_logging(level=os.environ.get("DSYS_LOG_LEVEL", "warning"))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
