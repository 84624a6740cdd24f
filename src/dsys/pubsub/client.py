"""The asyncio pub/sub client.

::

    async with Client(["127.0.0.1:7201", "127.0.0.1:7202"]) as c:
        await c.publish("prices.NSE.INFY", b"1523.5")
        async for msg in await c.subscribe("prices.>"):
            print(msg.subject, msg.data)

The client keeps one WebSocket to one broker of the list. Publishes are buffered (up to
``max_buffer_bytes``) and a single writer task sends them several per WebSocket frame.
When the connection drops, the client dials the brokers in turn with exponential
backoff, subscribes again to everything it had, and sends what was buffered meanwhile;
messages published while no broker was reachable and not yet buffered-and-sent may be
lost (delivery is at most once, as in NATS core).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import aiohttp
import msgpack

from dsys.errors import (
    BadInputError,
    ClosedError,
    ConfigError,
    ConnectError,
    RemoteProtocolError,
    RequestTimeout,
)
from dsys.observability import get_logger
from dsys.pubsub.core import SlowConsumerPolicy
from dsys.pubsub.subjects import validate_pattern, validate_subject


class Msg(NamedTuple):
    """A message received from the broker (an immutable named tuple, cheap to build).

    Attributes:
        subject: the subject it was published to.
        data: the payload.
        reply: the subject to answer on (set by ``request``), or ``None``.
    """

    subject: str
    data: bytes
    reply: str | None = None


_MAX_FRAME = 64 * 1024 * 1024  # largest WebSocket frame accepted from a broker

MsgHandler = Callable[[Msg], Awaitable[None]]
"""An async callback receiving each message of a subscription."""


class Subscription:
    """A subscription: an async iterator of :class:`Msg` (or a callback's driver).

    Iteration ends after :meth:`unsubscribe` or when the client closes (messages already
    received are still yielded first). The client keeps at most ``max_buffered``
    unread messages per subscription, dropping the oldest beyond that (counted in
    ``dropped``); the broker applies its own bound and policy before that.
    """

    def __init__(
        self,
        client: Client,
        sid: int,
        subject: str,
        queue: str | None,
        *,
        max_buffered: int,
        policy: SlowConsumerPolicy,
        max_pending: int | None,
    ) -> None:
        self._client = client
        self.sid = sid
        self.subject = subject
        self.queue = queue
        self.policy = policy
        self.max_pending = max_pending
        self.dropped = 0
        self.delivered = 0
        self._buf: deque[Msg] = deque()
        self._max_buffered = max_buffered
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    def _frame(self) -> dict[str, object]:
        frame: dict[str, object] = {"op": "sub", "sid": self.sid, "subject": self.subject}
        if self.queue is not None:
            frame["queue"] = self.queue
        if self.policy is not SlowConsumerPolicy.DROP_OLDEST:
            frame["policy"] = self.policy.value
        if self.max_pending is not None:
            frame["max_pending"] = self.max_pending
        return frame

    def _push(self, msg: Msg) -> None:
        if self._closed:
            return
        buf = self._buf
        if len(buf) >= self._max_buffered:
            buf.popleft()
            self.dropped += 1
        buf.append(msg)
        self.delivered += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _close(self, error: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def closed(self) -> bool:
        """Whether the subscription ended (its iterator stops once emptied)."""
        return self._closed

    def pending(self) -> int:
        """Messages received and not yet read."""
        return len(self._buf)

    def __aiter__(self) -> AsyncIterator[Msg]:
        return self

    async def __anext__(self) -> Msg:
        while not self._buf:
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._buf.popleft()

    async def next_msg(self, timeout: float = 5.0) -> Msg:  # noqa: ASYNC109
        """The next message, waiting at most ``timeout`` seconds.

        Raises:
            RequestTimeout: nothing arrived in time.
            ClosedError: the subscription ended.
        """
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError:
            raise RequestTimeout(f"no message on {self.subject!r} within {timeout}s") from None
        except StopAsyncIteration:
            raise ClosedError(f"subscription to {self.subject!r} ended") from None

    async def unsubscribe(self) -> None:
        """Stop receiving; messages already received can still be read."""
        if self._closed:
            return
        self._client._forget(self)
        self._close()
        await self._client._send({"op": "unsub", "sid": self.sid})

    async def _run_callback(self, cb: MsgHandler) -> None:
        log = self._client.log
        async for msg in self:
            try:
                await cb(msg)
            except Exception:
                log.exception("subscription callback failed", subject=self.subject)


class _ReplySubscription(Subscription):
    """The client's single ``_INBOX.<id>.*`` subscription that resolves requests."""

    def _push(self, msg: Msg) -> None:
        fut = self._client._requests.pop(msg.subject, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)


class Client:
    """An asyncio client of one or more pub/sub brokers.

    Args:
        servers: brokers as ``HOST:PORT`` or ``ws://HOST:PORT/v1/ws`` URLs; the client
            uses one at a time and moves to the next when it fails.
        token: sent in ``connect`` when the brokers require tokens.
        name: a label the broker logs.
        connect_timeout: seconds one connection attempt (with handshake) may take.
        reconnect: dial again (with backoff) when the connection drops.
        max_reconnect_wait: longest pause between reconnect rounds, in seconds.
        max_buffer_bytes: bytes of publishes buffered before ``publish`` waits.
        max_buffered_msgs: unread messages kept per subscription (oldest dropped).
        heartbeat: seconds between WebSocket pings detecting a dead broker.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        token: str | None = None,
        name: str = "",
        connect_timeout: float = 5.0,
        reconnect: bool = True,
        max_reconnect_wait: float = 2.0,
        max_buffer_bytes: int = 8 * 1024 * 1024,
        max_buffered_msgs: int = 65_536,
        heartbeat: float = 10.0,
    ) -> None:
        if isinstance(servers, str) or not servers:
            raise ConfigError("servers must be a non-empty list of HOST:PORT or ws:// URLs")
        if connect_timeout <= 0 or max_reconnect_wait <= 0 or heartbeat <= 0:
            raise ConfigError("timeouts must be positive")
        if max_buffer_bytes <= 0 or max_buffered_msgs <= 0:
            raise ConfigError("buffer bounds must be positive")
        self.servers = [_ws_url(s) for s in servers]
        self.token = token
        self.name = name
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.max_reconnect_wait = max_reconnect_wait
        self.max_buffer_bytes = max_buffer_bytes
        self.max_buffered_msgs = max_buffered_msgs
        self.heartbeat = heartbeat
        self.log = get_logger("pubsub.client", name=name)
        self.max_payload = 1024 * 1024
        self.server_id: str | None = None
        self.reconnects = 0
        self.errors: deque[str] = deque(maxlen=100)
        self._server_index = 0
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._out: list[dict[str, object]] = []
        self._out_bytes = 0
        self._out_event = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._subs: dict[int, Subscription] = {}
        self._sids = itertools.count(1)
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._ping_ids = itertools.count(1)
        self._requests: dict[str, asyncio.Future[Msg]] = {}
        self._inbox = f"_INBOX.{uuid.uuid4().hex}"
        self._reply_sub: _ReplySubscription | None = None
        self._req_ids = itertools.count(1)
        self._valid: set[str] = set()
        self._closed = False

    # -- connection ----------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to the first broker of the list that answers.

        Raises:
            ConnectError: no broker could be reached (or the token was refused).
        """
        if self._closed:
            raise ClosedError("client is closed")
        if self._run_task is not None:
            return
        self._http = aiohttp.ClientSession()
        try:
            self._ws = await self._dial_round()
        except BaseException:
            await self._http.close()
            self._http = None
            raise
        self._connected.set()
        self._run_task = asyncio.get_running_loop().create_task(self._run())

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def is_connected(self) -> bool:
        """Whether a broker connection is up right now."""
        return self._connected.is_set()

    @property
    def connected_url(self) -> str | None:
        """The broker URL in use, or ``None`` while disconnected."""
        return self.servers[self._server_index] if self.is_connected else None

    async def _dial_round(self) -> aiohttp.ClientWebSocketResponse:
        """Try each broker once, starting with the current one."""
        errors: list[str] = []
        n = len(self.servers)
        for i in range(n):
            index = (self._server_index + i) % n
            url = self.servers[index]
            try:
                ws = await self._open(url)
            except ConnectError as exc:
                if "authentication" in str(exc):
                    raise
                errors.append(f"{url}: {exc}")
                continue
            self._server_index = index
            return ws
        raise ConnectError("could not connect to any broker: " + "; ".join(errors))

    async def _open(self, url: str) -> aiohttp.ClientWebSocketResponse:
        assert self._http is not None, "client session missing"
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await self._http.ws_connect(
                    url, heartbeat=self.heartbeat, max_msg_size=_MAX_FRAME, compress=0
                )
                try:
                    hello: dict[str, object] = {"op": "connect", "name": self.name}
                    if self.token is not None:
                        hello["token"] = self.token
                    frames: list[dict[str, object]] = [hello]
                    frames.extend(sub._frame() for sub in self._subs.values())
                    await ws.send_bytes(msgpack.packb(frames, use_bin_type=True))
                    reply = await ws.receive()
                    info = _decode(reply)
                    first = info[0] if info else None
                    if not isinstance(first, dict) or first.get("op") != "info":
                        reason = first.get("reason") if isinstance(first, dict) else reply.type
                        raise ConnectError(f"broker refused the connection: {reason}")
                    self.server_id = str(first.get("server_id"))
                    max_payload = first.get("max_payload")
                    if isinstance(max_payload, int):
                        self.max_payload = max_payload
                    self._dispatch(info[1:])
                except BaseException:
                    await ws.close()
                    raise
        except TimeoutError:
            raise ConnectError(f"{url}: no answer within {self.connect_timeout}s") from None
        except (aiohttp.ClientError, OSError, RemoteProtocolError) as exc:
            raise ConnectError(f"{url}: {exc}") from exc
        return ws

    async def _run(self) -> None:
        """Serve the current connection; on loss, reconnect with backoff."""
        error: BaseException | None = None
        try:
            while not self._closed:
                await self._serve_connection()
                if self._closed_now():
                    break
                if not self.reconnect:
                    error = ConnectError("connection to the broker lost (reconnect=False)")
                    break
                self.log.info("connection lost; reconnecting", url=self.servers[self._server_index])
                self._ws = await self._reconnect()
                if self._ws is None:
                    break
                self.reconnects += 1
                # _open re-sent every live subscription; queued sub/unsub frames were for
                # the old connection: keep publishes, and the pings of flushes started
                # after the loss (those of earlier flushes failed with it).
                pings = self._pings
                self._out[:] = [
                    f
                    for f in self._out
                    if f.get("op") == "pub" or (f.get("op") == "ping" and f.get("id") in pings)
                ]
                self._out_bytes = sum(_frame_size(f) for f in self._out)
                if self._out_bytes < self.max_buffer_bytes:
                    self._space.set()
                self._connected.set()
        except Exception as exc:
            # Never die silently: subscriptions and pending requests end with the cause.
            error = exc
            raise
        finally:
            self._finish(error)

    def _closed_now(self) -> bool:
        # A call, so that type checkers do not assume the flag kept its value over awaits.
        return self._closed

    async def _serve_connection(self) -> None:
        ws = self._ws
        assert ws is not None
        reader = asyncio.get_running_loop().create_task(self._reader(ws))
        writer = asyncio.get_running_loop().create_task(self._writer(ws))
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._connected.clear()
            # Pings sent on this connection will never be answered. Flushes started from
            # now on are answered on the next connection: keep their futures apart.
            lost, self._pings = self._pings, {}
            for fut in lost.values():
                if not fut.done():
                    fut.set_exception(ConnectError("connection lost before the broker answered"))
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), timeout=1.0)

    async def _reconnect(self) -> aiohttp.ClientWebSocketResponse | None:
        backoff = 0.05
        self._server_index = (self._server_index + 1) % len(self.servers)
        while not self._closed:
            try:
                return await self._dial_round()
            except ConnectError as exc:
                self.log.debug("reconnect round failed", error=str(exc))
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.max_reconnect_wait)
        return None

    def _finish(self, error: BaseException | None) -> None:
        """End subscriptions (with ``error`` if the connection failed) and requests."""
        self._connected.clear()
        for sub in list(self._subs.values()):
            sub._close(error)
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(error or ClosedError("client closed before a reply arrived"))
        self._requests.clear()
        for ping in self._pings.values():
            if not ping.done():
                ping.set_exception(error or ClosedError("client closed before the broker answered"))
        self._pings.clear()
        self._space.set()

    async def _writer(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            if not self._out:
                self._out_event.clear()
                await self._out_event.wait()
                continue
            out = self._out
            # Cap one WebSocket frame at ~512 KiB / 4096 operations.
            n = size = 0
            for frame in out:
                size += _frame_size(frame)
                n += 1
                if size > 512 * 1024 or n >= 4096:
                    break
            batch = out[:n]
            del out[:n]
            self._out_bytes = self._out_bytes - size if out else 0
            if self._out_bytes < self.max_buffer_bytes:
                self._space.set()
            payload: Any = batch[0] if len(batch) == 1 else batch
            await ws.send_bytes(msgpack.packb(payload, use_bin_type=True))

    async def _reader(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for m in ws:
            if m.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                try:
                    frames = _decode(m)
                except RemoteProtocolError as exc:
                    self.log.warning("bad frame from broker", error=str(exc))
                    continue
                self._dispatch(frames)
            elif m.type is aiohttp.WSMsgType.ERROR:
                break

    def _dispatch(self, frames: list[Any]) -> None:
        subs = self._subs
        for f in frames:
            if not isinstance(f, dict):
                continue
            try:
                op = f.get("op")
                if op == "msg":
                    sub = subs.get(f.get("sid", -1))
                    if sub is not None:
                        subject, data, reply = f.get("subject"), f.get("data"), f.get("reply")
                        if (
                            type(subject) is not str
                            or type(data) is not bytes
                            or (reply is not None and type(reply) is not str)
                        ):
                            raise TypeError("msg needs a str subject and bytes data")
                        sub._push(Msg(subject, data, reply))
                elif op == "pong":
                    fut = self._pings.pop(f.get("id", -1), None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                elif op == "ping":
                    self._enqueue({"op": "pong", "id": f.get("id")})
                elif op == "err":
                    reason = str(f.get("reason"))
                    self.errors.append(reason)
                    self.log.warning("broker reported an error", reason=reason, re=f.get("re"))
                    sid = f.get("sid")
                    if f.get("re") == "sub" and isinstance(sid, int):
                        sub = subs.pop(sid, None)
                        if sub is not None:
                            sub._close(BadInputError(reason))
            except TypeError as exc:  # a broken broker (e.g. unhashable ids): skip the frame
                reason = f"malformed frame from the broker ({exc}): {str(f)[:200]}"
                self.errors.append(reason)
                self.log.warning("bad frame from broker", error=reason)

    # -- sending -------------------------------------------------------------------

    def _enqueue(self, frame: dict[str, object]) -> None:
        self._out.append(frame)
        self._out_bytes += _frame_size(frame)
        if self._out_bytes >= self.max_buffer_bytes:
            self._space.clear()
        self._out_event.set()

    async def _send(self, frame: dict[str, object]) -> None:
        if self._closed:
            raise ClosedError("client is closed")
        while not self._space.is_set():
            await self._space.wait()
            if self._closed:
                raise ClosedError("client is closed")
        self._enqueue(frame)

    async def publish(self, subject: str, data: bytes = b"", *, reply: str | None = None) -> None:
        """Publish ``data`` to ``subject`` (buffered; see :meth:`flush`).

        Waits only when ``max_buffer_bytes`` of publishes are already buffered.

        Raises:
            BadInputError: the subject or reply subject is malformed, ``data`` is not
                bytes, or it exceeds the broker's ``max_payload``.
            ClosedError: the client is closed.
        """
        if subject not in self._valid:
            validate_subject(subject)
            if len(self._valid) > 10_000:
                self._valid.clear()
            self._valid.add(subject)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BadInputError(f"data must be bytes, got {type(data).__name__}")
        if len(data) > self.max_payload:
            raise BadInputError(f"payload of {len(data)} bytes exceeds {self.max_payload}")
        frame: dict[str, object] = {"op": "pub", "subject": subject, "data": bytes(data)}
        if reply is not None:
            validate_subject(reply)
            frame["reply"] = reply
        if self._closed:
            raise ClosedError("client is closed")
        if self._space.is_set():
            self._enqueue(frame)
        else:
            await self._send(frame)

    async def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        cb: MsgHandler | None = None,
        policy: SlowConsumerPolicy | str = SlowConsumerPolicy.DROP_OLDEST,
        max_pending: int | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> Subscription:
        """Subscribe to ``subject`` (wildcards allowed), optionally in a queue group.

        Waits for the broker to confirm (one round trip), so a refused subscription
        raises here.

        Args:
            queue: queue-group name; each message goes to one member of the group.
            cb: an async callback run for each message, in order; without it, iterate
                the returned subscription.
            policy: what the broker does when this subscriber falls behind.
            max_pending: messages the broker queues for it before ``policy`` applies.
            timeout: seconds to wait for the broker's confirmation.

        Raises:
            BadInputError: the pattern is malformed or the broker refused it
                (permission denied, too many subscriptions ...).
            RequestTimeout: the broker did not confirm in time.
        """
        validate_pattern(subject)
        policy = SlowConsumerPolicy(policy)
        sub = Subscription(
            self,
            next(self._sids),
            subject,
            queue,
            max_buffered=self.max_buffered_msgs,
            policy=policy,
            max_pending=max_pending,
        )
        self._subs[sub.sid] = sub
        try:
            await self._send(sub._frame())
            try:
                await self.flush(timeout)
            except ConnectError:
                # The connection dropped; reconnecting re-subscribes everything in
                # self._subs, so confirm on the new connection.
                try:
                    await asyncio.wait_for(self._connected.wait(), timeout)
                except TimeoutError:
                    raise RequestTimeout(
                        f"no broker to confirm {subject!r} within {timeout}s"
                    ) from None
                await self.flush(timeout)
        except BaseException:
            self._forget(sub)
            raise
        if sub._error is not None:
            raise sub._error
        if cb is not None:
            sub._task = asyncio.get_running_loop().create_task(sub._run_callback(cb))
        return sub

    def _forget(self, sub: Subscription) -> None:
        self._subs.pop(sub.sid, None)

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until the broker processed everything sent so far (a ping round trip).

        Raises:
            RequestTimeout: no answer within ``timeout`` seconds.
            ConnectError: the connection was lost meanwhile.
            ClosedError: the client is closed.
        """
        ping_id = next(self._ping_ids)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = fut
        try:
            await self._send({"op": "ping", "id": ping_id})
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise RequestTimeout(f"broker did not answer a flush within {timeout}s") from None
        finally:
            self._pings.pop(ping_id, None)

    async def request(self, subject: str, data: bytes = b"", *, timeout: float = 2.0) -> Msg:  # noqa: ASYNC109
        """Publish a request and wait for the first reply.

        The first request subscribes to this client's reply inbox and waits for the
        broker to confirm it (one round trip).

        Raises:
            RequestTimeout: no reply within ``timeout`` seconds.
            BadInputError: the broker refused the inbox subscription (with tokens,
                requesters need permission to subscribe to ``_INBOX.>``).
            ConnectError: the connection was lost while the inbox was being set up.
        """
        if self._reply_sub is not None and self._reply_sub.closed:
            self._reply_sub = None  # refused (or ended): subscribe again
        if self._reply_sub is None:
            sub = _ReplySubscription(
                self,
                next(self._sids),
                f"{self._inbox}.*",
                None,
                max_buffered=1,
                policy=SlowConsumerPolicy.DROP_NEWEST,
                max_pending=None,
            )
            self._subs[sub.sid] = sub
            self._reply_sub = sub
            try:
                await self._send(sub._frame())
                await self.flush(timeout)
            except BaseException:
                self._forget(sub)
                self._reply_sub = None
                raise
            if sub._error is not None:
                self._reply_sub = None
                raise sub._error
        reply = f"{self._inbox}.{next(self._req_ids)}"
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._requests[reply] = fut
        try:
            await self.publish(subject, data, reply=reply)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RequestTimeout(f"no reply to {subject!r} within {timeout}s") from None
        finally:
            self._requests.pop(reply, None)

    # -- shutdown --------------------------------------------------------------------

    async def drain(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Unsubscribe everything, let callbacks finish what was received, then close."""
        if self._closed:
            return
        subs = [s for s in self._subs.values() if not isinstance(s, _ReplySubscription)]
        for sub in subs:
            with contextlib.suppress(ClosedError):
                await self._send({"op": "unsub", "sid": sub.sid})
        # The broker answers the flush's ping after the unsubs, so every message it sent
        # to these subscriptions has arrived (and was dispatched) once flush returns. Keep
        # them registered until then, or those messages would be dropped as unknown.
        with contextlib.suppress(RequestTimeout, ConnectError, ClosedError):
            await self.flush(timeout)
        for sub in subs:
            self._subs.pop(sub.sid, None)
            sub._close()
        tasks = [s._task for s in subs if s._task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await self.close(timeout=timeout)

    async def close(self, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Send what is buffered (waiting at most ``timeout``), then disconnect.

        Subscriptions end; their iterators still yield messages already received.
        """
        if self._closed:
            return
        if self.is_connected and (self._out or self._subs):
            with contextlib.suppress(RequestTimeout, ConnectError, ClosedError):
                await self.flush(timeout)
        self._closed = True
        self._out_event.set()
        self._space.set()
        if self._run_task is not None:
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run_task
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), timeout=1.0)
        for sub in self._subs.values():
            if sub._task is not None:
                sub._task.cancel()
        self._finish(None)
        if self._http is not None:
            await self._http.close()
            self._http = None


def _ws_url(server: str) -> str:
    if server.startswith(("ws://", "wss://")):
        return server
    if server.startswith(("http://", "https://")):
        return "ws" + server[4:].rstrip("/") + "/v1/ws"
    if not server or "/" in server:
        raise ConfigError(f"bad broker address {server!r}; use HOST:PORT or a ws:// URL")
    return f"ws://{server}/v1/ws"


def _frame_size(frame: dict[str, object]) -> int:
    data = frame.get("data")
    return 32 + (len(data) if isinstance(data, bytes) else 0)


def _decode(m: aiohttp.WSMessage) -> list[Any]:
    if m.type is aiohttp.WSMsgType.BINARY:
        try:
            value = msgpack.unpackb(m.data, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"malformed frame from broker: {exc}") from exc
    elif m.type is aiohttp.WSMsgType.TEXT:
        try:
            value = json.loads(m.data)
        except ValueError as exc:
            raise RemoteProtocolError(f"malformed JSON from broker: {exc}") from exc
    else:
        raise RemoteProtocolError(f"connection closed ({m.type.name}: {m.extra})")
    return value if isinstance(value, list) else [value]


__all__ = ["Client", "Msg", "MsgHandler", "Subscription"]
