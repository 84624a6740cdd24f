"""A Python chat client that reconnects and resumes: used by the launcher's transcript,
the tests and the load test (the browser page does the same in JavaScript).

It keeps, per room, the last offset, sequence and epoch it received and a log of every
message; after a lost connection it dials the load balancer again, says ``hello`` and
``sub``s each room from where it was, and sends again every post not yet acknowledged
(flagged ``retry`` so the owner finds it instead of storing it twice). A room the server
could not subscribe it to (``unavailable`` with the room) is subscribed again shortly. ``dups`` and
``holes`` count what a correct server never sends: a message twice, or past a gap.

Every message received from someone else is acknowledged: one ``delivered`` frame per
room for all the messages received in :data:`RECEIPT_DELAY` seconds (a receipt frame
per message would double the frames a server handles under load). The client's own
messages that another member received are in ``delivered[room]`` (offsets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

RECEIPT_DELAY = 1.0
"""Seconds a client gathers received messages before acknowledging them in one frame."""


class ChatError(Exception):
    """An ``error`` frame or HTTP error answered to us."""

    def __init__(self, code: str, message: str, frame: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.frame = frame or {}


@dataclass
class RoomState:
    epoch: str = ""
    offset: int = 0
    seq: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    refetches: int = 0
    delivered: set[int] = field(default_factory=set)  # own messages another member got


async def signup_or_login(http: aiohttp.ClientSession, base: str, user: str, password: str) -> str:
    """A session token for ``user`` (signing up first when needed)."""
    body = {"user": user, "password": password}
    async with http.post(f"{base}/api/signup", json=body) as resp:
        data = await resp.json()
        if resp.status == 200:
            return str(data["token"])
        if resp.status != 409:
            raise ChatError(data.get("error", str(resp.status)), data.get("message", ""))
    async with http.post(f"{base}/api/login", json=body) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise ChatError(data.get("error", str(resp.status)), data.get("message", ""))
        return str(data["token"])


class ChatClient:
    """One user's connection through the load balancer at ``base`` (``http://HOST:PORT``)."""

    def __init__(
        self,
        base: str,
        user: str,
        password: str = "correct horse battery",
        *,
        on_msg: Callable[[ChatClient, dict[str, Any]], None] | None = None,
        token: str | None = None,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base = base.rstrip("/")
        self.user = user
        self.password = password
        self.token = token
        self.on_msg = on_msg
        self.rooms: dict[str, RoomState] = {}
        self.server: str | None = None
        self.connects = 0
        self.dups = 0
        self.holes = 0
        self.errors: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # typing, presence, members, rooms ...
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._unacked: dict[str, dict[str, Any]] = {}
        self._http: aiohttp.ClientSession | None = http
        self._own_http = http is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._receipts: dict[tuple[str, str], list[int]] = {}  # to acknowledge
        self._receipt_timer: asyncio.TimerHandle | None = None
        self._resubscribes: dict[str, asyncio.TimerHandle] = {}  # rooms to subscribe again
        self.ack_deliveries = True
        """Acknowledge received messages (a test can turn it off to be a silent reader)."""

    async def __aenter__(self) -> ChatClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        if self._http is None:
            self._http = aiohttp.ClientSession()
        if self.token is None:
            self.token = await signup_or_login(self._http, self.base, self.user, self.password)
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def close(self) -> None:
        self._closed = True
        if self._receipt_timer is not None:
            self._receipt_timer.cancel()
        for timer in self._resubscribes.values():
            timer.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None and self._own_http:
            await self._http.close()

    def drop(self) -> None:
        """Cut the connection abruptly (a network blip); the client reconnects."""
        if self._ws is not None and self._ws._response.connection is not None:
            self._ws._response.connection.transport.abort()  # type: ignore[union-attr]

    # -- connection loop --------------------------------------------------------------

    async def _run(self) -> None:
        assert self._http is not None
        backoff = 0.1
        while not self._closed and not self._http.closed:
            try:
                async with self._http.ws_connect(
                    f"{self.base}/ws", heartbeat=5.0, max_msg_size=0
                ) as ws:
                    self._ws = ws
                    await ws.send_str(json.dumps({"type": "hello", "token": self.token}))
                    async for raw in ws:
                        if raw.type != aiohttp.WSMsgType.TEXT:
                            break
                        data = json.loads(raw.data)
                        for frame in data if isinstance(data, list) else [data]:
                            if frame["type"] == "welcome":
                                backoff = 0.1
                                await self._on_welcome(frame)
                            else:
                                self._on_frame(frame)
                        if self._receipts and self._receipt_timer is None:
                            self._receipt_timer = asyncio.get_running_loop().call_later(
                                RECEIPT_DELAY, self._send_receipts
                            )
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            finally:
                self._send_receipts()  # the last ones, if the socket can still take them
                self._ws = None
                self._ready.clear()
                for fut in self._replies.values():
                    fut.cancel()  # request() reports it as "disconnected"
                self._replies.clear()
            if not self._closed:
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)

    def _send_receipts(self) -> None:
        if self._receipt_timer is not None:
            self._receipt_timer.cancel()
            self._receipt_timer = None
        for (room, epoch), offs in self._receipts.items():
            for i in range(0, len(offs), 500):  # the server takes 500 offsets a frame
                chunk = offs[i : i + 500]
                self._send({"type": "delivered", "room": room, "epoch": epoch, "offsets": chunk})
        self._receipts.clear()

    async def _on_welcome(self, frame: dict[str, Any]) -> None:
        self.server = frame["server"]
        self.connects += 1
        for room, st in self.rooms.items():
            self._send(
                {"type": "sub", "room": room, "offset": st.offset, "epoch": st.epoch, "seq": st.seq}
            )
        for post in list(self._unacked.values()):
            self._send({**post, "retry": True})
        self._ready.set()

    def _send(self, frame: dict[str, Any]) -> None:
        if self._ws is not None and not self._ws.closed:
            task = asyncio.ensure_future(self._ws.send_str(json.dumps(frame)))
            task.add_done_callback(lambda t: t.exception())

    def _on_frame(self, f: dict[str, Any]) -> None:
        kind = f["type"]
        if kind == "msg":
            st = self.rooms.setdefault(f["room"], RoomState())
            if f["epoch"] != st.epoch and st.epoch:
                self.holes += 1  # the server should have said refetch
            if st.epoch and f["offset"] <= st.offset:
                self.dups += 1
                return
            if st.epoch and st.offset and f["offset"] != st.offset + 1:
                self.holes += 1
            st.epoch, st.offset, st.seq = f["epoch"], f["offset"], f["seq"]
            st.log.append(f)
            if f["from"] != self.user and self.ack_deliveries:
                self._receipts.setdefault((f["room"], f["epoch"]), []).append(f["offset"])
            if self.on_msg is not None:
                self.on_msg(self, f)
        elif kind == "ack":
            post = self._unacked.pop(f["cid"], None)
            fut = self._waiters.pop(f["cid"], None)
            if fut is not None and not fut.done():
                fut.set_result(f)
            del post
        elif kind == "delivered":
            st = self.rooms.setdefault(f["room"], RoomState())
            if f["epoch"] == st.epoch:
                st.delivered.update(f["offsets"])
            self._resolve(f"delivered:{f['room']}", f)
        elif kind == "refetch":
            st = self.rooms.setdefault(f["room"], RoomState())
            st.refetches += 1
            st.epoch, st.offset, st.seq, st.log = "", 0, 0, []  # start over from the latest page
            st.delivered = set()
            self._send({"type": "sub", "room": f["room"]})
            self._resolve("refetch", f)
        elif kind == "subscribed":
            st = self.rooms.setdefault(f["room"], RoomState())
            st.epoch = st.epoch or f["epoch"]
            self._resolve(f"sub:{f['room']}", f)
        elif kind == "error":
            self.errors.append(f)
            ref = f.get("ref")
            if ref is not None and ref in self._waiters:
                if f["code"] in ("unavailable", "rate_limited"):
                    # retried by send(); keep it in _unacked so a reconnect resends it
                    self._waiters.pop(ref).set_exception(ChatError(f["code"], f["message"], f))
                else:
                    self._unacked.pop(ref, None)
                    self._waiters.pop(ref).set_exception(ChatError(f["code"], f["message"], f))
            else:
                room = f.get("room")
                if f["code"] == "unavailable" and isinstance(room, str) and room in self.rooms:
                    # the server could not subscribe us to the room (or resume it) and
                    # dropped the subscription: ask again, or hear nothing more of it
                    self._resubscribe_later(room, float(f.get("retry_after", 0.5)))
                self._resolve("error", f)
        else:
            self.events.append(f)
            key = kind if "room" not in f or kind in ("typing",) else f"{kind}:{f['room']}"
            self._resolve(key, f)
            self._resolve(kind, f)

    def _resubscribe_later(self, room: str, delay: float) -> None:
        if room in self._resubscribes:
            return

        def again() -> None:
            del self._resubscribes[room]
            st = self.rooms.get(room)
            if st is not None and self._ready.is_set():  # (a reconnect subscribes anyway)
                self._send(
                    {"type": "sub", "room": room, "offset": st.offset, "epoch": st.epoch,
                     "seq": st.seq}
                )  # fmt: skip

        self._resubscribes[room] = asyncio.get_running_loop().call_later(delay, again)

    def _resolve(self, key: str, frame: dict[str, Any]) -> None:
        fut = self._replies.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(frame)

    # -- requests ----------------------------------------------------------------------

    async def request(
        self,
        frame: dict[str, Any],
        reply: str,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Send ``frame`` and wait for the first frame of kind ``reply`` (or an error)."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[reply] = fut
        err: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies["error"] = err
        self._send(frame)
        done, _ = await asyncio.wait({fut, err}, timeout=timeout, return_when="FIRST_COMPLETED")
        if self._replies.get("error") is err:
            del self._replies["error"]
        if any(f.cancelled() for f in done):
            raise ChatError("disconnected", "connection lost")
        if err in done:
            e = err.result()
            raise ChatError(e["code"], e["message"], e)
        if not done:
            raise TimeoutError(f"no {reply} answer to {frame['type']}")
        return fut.result()

    async def create(self, room: str) -> None:
        await self.request({"type": "create", "room": room}, f"joined:{room}")
        await self.subscribe(room)

    async def join(self, room: str) -> None:
        await self.request({"type": "join", "room": room}, f"joined:{room}")
        await self.subscribe(room)

    async def subscribe(self, room: str) -> None:
        self.rooms.setdefault(room, RoomState())
        await self.request({"type": "sub", "room": room}, f"sub:{room}")

    async def send(
        self,
        room: str,
        text: str,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109
        cid: str | None = None,
    ) -> dict[str, Any]:
        """Post ``text``; returns the ack (offset, id). Retried until ``timeout`` while
        the service is unavailable or we are reconnecting; never stored twice."""
        cid = cid or uuid.uuid4().hex
        post = {"type": "send", "room": room, "cid": cid, "text": text}
        self._unacked[cid] = post
        deadline = time.monotonic() + timeout
        retry = False
        fut: asyncio.Future[dict[str, Any]] | None = None
        sent_on = -1  # the connection (count) the post was last sent on
        while True:
            if fut is None or fut.done():
                fut = asyncio.get_running_loop().create_future()
                self._waiters[cid] = fut
            # Sent once per connection (a reconnect resends it from _on_welcome), again
            # after an error frame, and again after 10 s without an answer: resending
            # a slow post on the same connection only adds load to a loaded server.
            if self._ready.is_set() and sent_on != self.connects:
                self._send({**post, "retry": True} if retry else post)
                sent_on, retry = self.connects, True
            left = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(asyncio.shield(fut), min(left, 10.0))
            except ChatError as exc:
                if exc.code not in ("unavailable", "rate_limited"):
                    raise
                sent_on = -1
                await asyncio.sleep(float(exc.frame.get("retry_after", 0.3)))
            except TimeoutError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    return fut.result()
                # no answer in 10 s on the connection it went out on: send it again;
                # after a reconnect, _on_welcome has resent it already
                sent_on = -1 if sent_on == self.connects else self.connects
            if time.monotonic() > deadline:
                self._unacked.pop(cid, None)
                raise TimeoutError(f"post {cid} not acknowledged in {timeout} s")

    def raw(self, text: str) -> None:
        """Send a raw text frame (tests of bad input)."""
        if self._ws is not None:
            task = asyncio.ensure_future(self._ws.send_str(text))
            task.add_done_callback(lambda t: t.exception())

    def offsets(self, room: str) -> list[int]:
        return [m["offset"] for m in self.rooms[room].log] if room in self.rooms else []

    def texts(self, room: str) -> list[str]:
        return [m["text"] for m in self.rooms[room].log] if room in self.rooms else []
