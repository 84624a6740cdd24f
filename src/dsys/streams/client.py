"""``StreamClient``: publish, fetch, subscribe and acknowledge over one WebSocket.

The client keeps one multiplexed WebSocket (``/v1/ws``) to the cluster's leader, with the
conventions of :class:`~dsys.kv.client.KVClient` and :class:`dsys.pubsub.Client`:

* **Batching.** Requests made in the same event-loop iteration travel in one frame; the
  server proposes a frame's publishes as one Raft entry.
* **Leader following and retries.** A ``not_leader`` answer names the leader's address;
  a lost connection or ``unavailable`` answer moves on to the next endpoint. Requests are
  retried until ``timeout``. A publish always carries a message id (a random one when the
  caller gives none), so a retried publish is deduplicated by the stream instead of
  stored twice.
* **Resume.** Push subscriptions are re-established on the new connection after a
  reconnect. The consumer's state lives in the cluster, so delivery resumes after the
  last acknowledged message; what was delivered but not acknowledged on the lost
  connection is released by the server and delivered again.

Example::

    async with StreamClient(["127.0.0.1:7501", "127.0.0.1:7502"]) as c:
        await c.add_stream(StreamConfig(name="ORDERS", subjects=("orders.>",)))
        await c.publish("orders.eu.1", b"{...}")
        await c.add_consumer("ORDERS", ConsumerConfig(name="billing"))
        for msg in await c.fetch("ORDERS", "billing", batch=10, expires=1.0):
            await msg.ack()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from dsys.codec import decode, encode
from dsys.errors import (
    BadInputError,
    ClosedError,
    ConflictError,
    ConnectError,
    DsysError,
    LocalProtocolError,
    NotFoundError,
    PayloadTooLargeError,
    RemoteProtocolError,
    RequestTimeout,
    StreamFullError,
    UnavailableError,
)
from dsys.streams.fsm import ConsumerConfig, PubAck, StreamConfig

_MAX_FRAME = 64 * 1024 * 1024
_GRAIN = 0.05


@dataclass(slots=True, eq=False)
class StreamMsg:
    """A message read from a stream, or delivered by a consumer (then ack it).

    Attributes:
        deliveries: the delivery this is (1 = first); 0 for a message read, not delivered.
    """

    stream: str
    consumer: str
    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes
    ts_ms: int
    deliveries: int
    _client: StreamClient | None = field(default=None, repr=False)
    _sid: int | None = field(default=None, repr=False)

    async def _answer(self, kind: str, **kw: Any) -> str:
        if self._client is None or not self.consumer:
            raise BadInputError("only a delivered message can be acknowledged")
        statuses = await self._client.ack(
            self.stream,
            self.consumer,
            [(self.seq, self.deliveries)],
            kind=kind,
            _sid=self._sid,
            **kw,
        )
        return statuses[0]

    async def ack(self) -> str:
        """Acknowledge: ``"ok"``, ``"stale"`` (redelivered since; another worker holds it)
        or ``"not_pending"`` (already acknowledged, or gone)."""
        return await self._answer("ack")

    async def nak(self, delay: float = 0.0) -> str:
        """Ask for redelivery after ``delay`` seconds."""
        return await self._answer("nak", delay_ms=int(delay * 1000))

    async def in_progress(self) -> str:
        """Still working on it: extend the ack deadline by the consumer's ack wait."""
        return await self._answer("progress")

    async def term(self, reason: str = "") -> str:
        """Give up on it: move it to the dead-letter stream with ``reason``."""
        return await self._answer("term", reason=reason)


class _Retry(Exception):
    def __init__(self, message: str, addr: str | None = None) -> None:
        super().__init__(message)
        self.addr = addr


class Subscription:
    """Push deliveries of one consumer; iterate it, and ack each message.

    Made by :meth:`StreamClient.subscribe`; ``close()`` (or ``async with``) ends it.
    """

    def __init__(
        self,
        client: StreamClient,
        sid: int,
        stream: str,
        consumer: str,
        max_inflight: int,
        worker: str,
    ) -> None:
        self._client = client
        self.sid = sid
        self.stream = stream
        self.consumer = consumer
        self.max_inflight = max_inflight
        self.worker = worker
        self._queue: asyncio.Queue[StreamMsg | BaseException] = asyncio.Queue()
        self.closed = False
        self.active = False  # the server confirmed it once: resubscribe after reconnects

    def _request(self) -> dict[str, Any]:
        req: dict[str, Any] = {
            "op": "sub",
            "sid": self.sid,
            "stream": self.stream,
            "consumer": self.consumer,
            "max_inflight": self.max_inflight,
        }
        if self.worker:
            req["worker"] = self.worker
        if self.active:
            # a resubscription after a reconnect: what this subscription held on the lost
            # connection (some of it may never have arrived) is released at once
            req["resume"] = True
        return req

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> StreamMsg:
        if self.closed and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, StopAsyncIteration):
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def next(self, timeout: float | None = None) -> StreamMsg:  # noqa: ASYNC109
        """The next delivery (``TimeoutError`` after ``timeout`` seconds)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    async def close(self) -> None:
        """End the subscription; unacknowledged deliveries are released for redelivery."""
        if self.closed:
            return
        self.closed = True
        self._client._subs.pop(self.sid, None)
        self._queue.put_nowait(StopAsyncIteration())
        with contextlib.suppress(DsysError):
            await self._client._call({"op": "unsub", "sid": self.sid}, retry=False)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class StreamClient:
    """A client of a stream cluster (see the module docstring).

    Args:
        endpoints: ``host:port`` of one or more servers (a comma-separated string too).
        timeout: seconds a request may take, retries included.
        token: sent as ``X-Dsys-Token`` when connecting (for deployments that check it).
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        timeout: float = 5.0,
        token: str | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e]
        if not endpoints:
            raise BadInputError("StreamClient needs at least one endpoint")
        if timeout <= 0:
            raise BadInputError("timeout must be > 0")
        self.endpoints = [e.removeprefix("http://").rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._token = token
        self._idx = 0
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._endpoint: str | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._out: list[dict[str, Any]] = []
        self._flush_scheduled = False
        self._ids = itertools.count(1)
        self._sids = itertools.count(1)
        self._subs: dict[int, Subscription] = {}
        self._closed = False
        self._buckets: dict[int, list[int]] = {}
        self._connect_waiting = 0
        self._sweeper: asyncio.Future[None] | None = None
        self._msg_prefix = uuid.uuid4().hex[:16] + "-"
        self._msg_ids = itertools.count(1)
        self.reconnects = 0

    async def __aenter__(self) -> StreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; pending requests fail with :class:`ClosedError`."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for sub in list(self._subs.values()):
            sub.closed = True
            sub._queue.put_nowait(StopAsyncIteration())
        self._subs.clear()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        self._fail_all(ClosedError("stream client closed"))

    @property
    def endpoint(self) -> str | None:
        """The server this client is connected to now (normally the leader)."""
        return self._endpoint

    # -- connection ----------------------------------------------------------------------------

    async def _connect(self, prefer: str | None) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._ws is not None and not self._ws.closed and prefer in (None, self._endpoint):
                return
            if self._session is None:
                headers = {"X-Dsys-Token": self._token} if self._token else None
                self._session = aiohttp.ClientSession(headers=headers)
            await self._drop()
            ep = prefer or self.endpoints[self._idx % len(self.endpoints)]
            try:
                ws = await self._session.ws_connect(
                    f"http://{ep}/v1/ws",
                    max_msg_size=_MAX_FRAME,
                    heartbeat=30.0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._idx += 1
                raise _Retry(f"cannot connect to {ep}: {exc}") from None
            self._ws, self._endpoint = ws, ep
            self._reader = asyncio.create_task(self._read_loop(ws))
            for sub in self._subs.values():  # resume push subscriptions here
                if sub.active:
                    rid = next(self._ids)
                    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                    self._pending[rid] = fut
                    fut.add_done_callback(functools.partial(self._resubscribed, sub, ws))
                    self._send(sub._request() | {"id": rid})

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if ws is not None:
            self.reconnects += 1
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1.0)
        self._fail_all(_Retry("connection replaced"))

    def _fail_all(self, exc: BaseException) -> None:
        futs = list(self._pending.values())
        self._pending.clear()
        self._out.clear()
        for fut in futs:
            if not fut.done():
                fut.set_exception(exc)

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    batch = decode(msg.data, max_size=_MAX_FRAME)
                except RemoteProtocolError:
                    break
                if not isinstance(batch, list):
                    break
                for resp in batch:
                    if not isinstance(resp, dict):
                        continue
                    rid = resp.get("id")
                    if type(rid) is int:
                        fut = self._pending.pop(rid, None)
                        if fut is not None and not fut.done():
                            fut.set_result(resp)
                    elif type(resp.get("sid")) is int:
                        self._on_push(resp)
        finally:
            if self._ws is ws:
                self._ws = None
                self._fail_all(_Retry(f"connection to {self._endpoint} lost"))
                if self._subs and not self._closed:
                    asyncio.get_running_loop().call_soon(self._resubscribe)

    def _resubscribe(self) -> None:
        async def again() -> None:
            deadline = time.monotonic() + 3600
            while self._subs and not self._closed and time.monotonic() < deadline:
                try:
                    await self._call({"op": "streams"})  # served by the leader only
                    return
                except DsysError:
                    await asyncio.sleep(0.1)

        t = asyncio.ensure_future(again())
        t.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _resubscribed(
        self,
        sub: Subscription,
        ws: aiohttp.ClientWebSocketResponse,
        fut: asyncio.Future[dict[str, Any]],
    ) -> None:
        """A resubscription's answer: subscribe again when this server could not take it."""
        if fut.cancelled() or fut.exception() is not None:
            return  # the connection went away: the next connect resubscribes
        status = fut.result().get("status")
        if status == "ok" or self._closed or sub.closed or sub.sid not in self._subs:
            return
        if self._ws is not ws:
            return  # answered on a connection since replaced (and resubscribed there)
        if status in ("not_leader", "unavailable"):
            self._subscribe_again(sub)
        else:
            sub._queue.put_nowait(_error(fut.result()))

    def _subscribe_again(self, sub: Subscription) -> None:
        """Send ``sub`` again through the normal path (it follows the leader, retries)."""

        async def again() -> None:
            try:
                await self._call(sub._request())
            except DsysError as exc:
                if not sub.closed:
                    sub._queue.put_nowait(exc)

        t = asyncio.ensure_future(again())
        t.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _on_push(self, resp: dict[str, Any]) -> None:
        sub = self._subs.get(resp["sid"])
        if sub is None:
            return
        if resp.get("end"):
            if resp.get("status") in ("not_leader", "unavailable"):
                self._subscribe_again(sub)  # e.g. this server stopped being the leader
                return
            sub._queue.put_nowait(_error(resp))
            return
        for w in resp.get("msgs", ()):
            sub._queue.put_nowait(self._msg(sub.stream, sub.consumer, w, sub.sid))

    def _send(self, req: dict[str, Any]) -> None:
        self._out.append(req)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._out = self._out, []
        ws = self._ws
        if not batch or ws is None:
            return
        try:
            frame = encode(batch, max_size=_MAX_FRAME)
        except LocalProtocolError as exc:
            for req in batch:
                fut = self._pending.pop(req["id"], None)
                if fut is not None and not fut.done():
                    fut.set_exception(BadInputError(f"request cannot be encoded: {exc}"))
            return
        t = asyncio.ensure_future(ws.send_bytes(frame))
        t.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _call(self, req: dict[str, Any], *, retry: bool = True) -> dict[str, Any]:
        """Send one request (to the leader), retrying until the client's timeout."""
        if self._closed:
            raise ClosedError("stream client closed")
        deadline = time.monotonic() + self.timeout
        prefer: str | None = None
        attempt = 0
        last = "no answer"
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout(f"{req.get('op')}: no answer in {self.timeout} s ({last})")
            try:
                ws = self._ws
                if (
                    ws is None
                    or ws.closed
                    or (prefer is not None and prefer != self._endpoint)
                    or self._connect_waiting
                ):  # (queue behind a connect in progress: requests keep their order)
                    self._connect_waiting += 1
                    try:
                        await self._connect(prefer)
                    finally:
                        self._connect_waiting -= 1
                rid = next(self._ids)
                fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                self._pending[rid] = fut
                req["id"] = rid
                self._send(req)
                self._arm(rid, left + req.get("expires_ms", 0) / 1000)
                try:
                    resp = await fut
                finally:
                    self._pending.pop(rid, None)
                status = resp.get("status")
                if status == "ok":
                    return resp
                if status == "not_leader":
                    addr = resp.get("leader_addr")
                    raise _Retry("not the leader", addr if isinstance(addr, str) else None)
                if status == "unavailable":
                    raise _Retry(str(resp.get("message")))
                raise _error(resp)
            except _Retry as exc:
                last = str(exc)
                if not retry:
                    raise UnavailableError(last) from None
                if exc.addr:
                    prefer = exc.addr
                else:
                    prefer = None
                    if self._endpoint is not None and "not the leader" in last:
                        self._idx += 1
                    with contextlib.suppress(Exception):
                        await self._drop()
                await asyncio.sleep(min(0.05 * attempt, 0.5) * random.uniform(0.5, 1.0))
            except TimeoutError:
                raise RequestTimeout(f"{req.get('op')}: no answer in {self.timeout} s") from None

    def _arm(self, rid: int, timeout: float) -> None:
        """Fail request ``rid`` with TimeoutError after ``timeout`` s (0 to 50 ms late).

        Deadlines go into 50 ms buckets swept by one task: much cheaper per request than
        a timer handle or ``asyncio.wait_for``.
        """
        key = int((time.monotonic() + timeout) / _GRAIN) + 1
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [rid]
        else:
            bucket.append(rid)
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        done_key = int(time.monotonic() / _GRAIN)
        while not self._closed:
            await asyncio.sleep(_GRAIN)
            now_key = int(time.monotonic() / _GRAIN)
            if len(self._buckets) < now_key - done_key:
                keys = sorted(k for k in self._buckets if k <= now_key)
            else:
                keys = [k for k in range(done_key + 1, now_key + 1) if k in self._buckets]
            for key in keys:
                for rid in self._buckets.pop(key):
                    fut = self._pending.pop(rid, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(TimeoutError())
            done_key = now_key

    def _msg(self, stream: str, consumer: str, w: Any, sid: int | None = None) -> StreamMsg:
        seq, subject, headers, data, ts, deliveries = w
        return StreamMsg(stream, consumer, seq, subject, headers, data, ts, deliveries, self, sid)

    # -- streams ---------------------------------------------------------------------------

    async def add_stream(self, config: StreamConfig, *, update: bool = False) -> dict[str, Any]:
        """Create a stream (the same configuration again is fine); returns its info.

        Raises:
            ConflictError: it exists with another configuration, or its subjects overlap
                another stream's.
        """
        resp = await self._call({"op": "add_stream", "config": config.to_plain(), "update": update})
        info: dict[str, Any] = resp["info"]
        return info

    async def delete_stream(self, name: str) -> None:
        """Delete a stream with its messages and consumers."""
        await self._call({"op": "del_stream", "stream": name})

    async def purge(self, stream: str, *, subject: str = "", upto_seq: int = 0) -> int:
        """Delete messages (matching ``subject``, below ``upto_seq``); returns how many."""
        resp = await self._call(
            {"op": "purge", "stream": stream, "subject": subject, "upto_seq": upto_seq}
        )
        return int(resp["info"].get("purged", 0))

    async def streams(self) -> list[str]:
        """The names of every stream."""
        resp = await self._call({"op": "streams"})
        return list(resp["streams"])

    async def stream_info(self, name: str) -> dict[str, Any] | None:
        """A stream's configuration and state (None = no such stream)."""
        try:
            resp = await self._call({"op": "stream_info", "stream": name})
        except NotFoundError:
            return None
        info: dict[str, Any] = resp["info"]
        return info

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: dict[str, str] | None = None,
        msg_id: str = "",
        expected_last_seq: int | None = None,
        stream: str = "",
    ) -> PubAck:
        """Append a message; returns once it is committed on a quorum.

        Args:
            msg_id: deduplication id (within the stream's window); a random one is used
                when empty, so the client's own retries never store a message twice.
            expected_last_seq: refuse (``ConflictError``) unless the stream's last
                sequence is this.
            stream: the stream to append to (default: the one capturing ``subject``).

        Raises:
            NotFoundError: no stream captures the subject.
            ConflictError: ``expected_last_seq`` did not match.
            StreamFullError: the stream is at a limit with ``discard="new"``.
            PayloadTooLargeError: the payload is larger than the stream takes.
        """
        if type(data) is not bytes:
            raise BadInputError("data must be bytes")
        req: dict[str, Any] = {
            "op": "pub",
            "subject": subject,
            "data": data,
            "msg_id": msg_id or f"{self._msg_prefix}{next(self._msg_ids)}",
        }
        if headers:
            req["headers"] = headers
        if expected_last_seq is not None:
            req["expected_last_seq"] = expected_last_seq
        if stream:
            req["stream"] = stream
        resp = await self._call(req)
        return PubAck(resp["stream"], resp["seq"], bool(resp.get("dup")))

    async def get(self, stream: str, seq: int) -> StreamMsg | None:
        """One stored message by sequence (None = no such message)."""
        resp = await self._call({"op": "get", "stream": stream, "seq": seq})
        w = resp.get("msg")
        return None if w is None else self._msg(stream, "", w)

    async def read(
        self,
        stream: str,
        *,
        start_seq: int = 0,
        limit: int = 100,
        subject: str = "",
        reverse: bool = False,
    ) -> list[StreamMsg]:
        """Stored messages from ``start_seq`` on (down from it with ``reverse``; 0 = the end)."""
        resp = await self._call(
            {
                "op": "read",
                "stream": stream,
                "start_seq": start_seq,
                "limit": limit,
                "subject": subject,
                "reverse": reverse,
            }
        )
        return [self._msg(stream, "", w) for w in resp["msgs"]]

    async def delete_message(self, stream: str, seq: int) -> None:
        """Delete one stored message."""
        await self._call({"op": "del_msg", "stream": stream, "seq": seq})

    # -- consumers -------------------------------------------------------------------------

    async def add_consumer(self, stream: str, config: ConsumerConfig) -> dict[str, Any]:
        """Create a consumer (the same configuration again is fine); returns its info."""
        resp = await self._call(
            {"op": "add_consumer", "stream": stream, "config": config.to_plain()}
        )
        info: dict[str, Any] = resp["info"]
        return info

    async def delete_consumer(self, stream: str, consumer: str) -> None:
        """Delete a consumer and its pending list."""
        await self._call({"op": "del_consumer", "stream": stream, "consumer": consumer})

    async def consumers(self, stream: str) -> list[str]:
        """Names of a stream's consumers."""
        resp = await self._call({"op": "consumers", "stream": stream})
        return list(resp["info"]["consumers"])

    async def consumer_info(self, stream: str, consumer: str) -> dict[str, Any] | None:
        """A consumer's configuration and state (None = no such consumer)."""
        try:
            resp = await self._call({"op": "consumer_info", "stream": stream, "consumer": consumer})
        except NotFoundError:
            return None
        info: dict[str, Any] = resp["info"]
        return info

    async def pending(
        self, stream: str, consumer: str, *, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Delivered-but-unacknowledged messages: seq, deliveries, worker, idle_ms."""
        resp = await self._call(
            {"op": "pending", "stream": stream, "consumer": consumer, "limit": limit}
        )
        return list(resp["info"]["pending"])

    async def fetch(
        self,
        stream: str,
        consumer: str,
        *,
        batch: int = 1,
        expires: float = 0.0,
        worker: str = "",
        no_wait: bool = False,
    ) -> list[StreamMsg]:
        """Pull up to ``batch`` deliveries, waiting up to ``expires`` seconds for some.

        Several workers fetching from one durable consumer share its messages (a
        consumer group): each message goes to one of them at a time.
        """
        req: dict[str, Any] = {
            "op": "fetch",
            "stream": stream,
            "consumer": consumer,
            "batch": batch,
            "expires_ms": int(expires * 1000),
            "no_wait": no_wait,
        }
        if worker:
            req["worker"] = worker
        resp = await self._call(req)
        return [self._msg(stream, consumer, w) for w in resp["msgs"]]

    async def ack(
        self,
        stream: str,
        consumer: str,
        acks: Sequence[tuple[int, int]],
        *,
        kind: str = "ack",
        delay_ms: int = 0,
        reason: str = "",
        _sid: int | None = None,
    ) -> list[str]:
        """Answer deliveries ``(seq, deliveries)``: one status per delivery.

        Args:
            kind: ``ack``, ``nak`` (redeliver after ``delay_ms``), ``progress`` or ``term``.
        """
        req: dict[str, Any] = {
            "op": "ack",
            "stream": stream,
            "consumer": consumer,
            "acks": [list(a) for a in acks],
            "kind": kind,
        }
        if delay_ms:
            req["delay_ms"] = delay_ms
        if reason:
            req["reason"] = reason
        if _sid is not None:
            req["sid"] = _sid
        resp = await self._call(req)
        return list(resp["statuses"])

    async def claim(
        self, stream: str, consumer: str, *, worker: str, min_idle: float, count: int = 10
    ) -> list[StreamMsg]:
        """Take over deliveries idle for ``min_idle`` seconds (Redis's XAUTOCLAIM)."""
        resp = await self._call(
            {
                "op": "claim",
                "stream": stream,
                "consumer": consumer,
                "worker": worker,
                "min_idle_ms": int(min_idle * 1000),
                "count": count,
            }
        )
        return [self._msg(stream, consumer, w) for w in resp["msgs"]]

    async def subscribe(
        self, stream: str, consumer: str, *, max_inflight: int = 256, worker: str = ""
    ) -> Subscription:
        """Push deliveries of a consumer to this client, ``max_inflight`` unacked at most.

        Several subscribers (in any processes) of one durable consumer share its messages.
        ``worker`` names this subscriber in the consumer's pending list (a unique one by
        default); after a reconnect, the deliveries it held are released for redelivery.
        """
        sid = next(self._sids)
        # a stable worker id (not the server's per-connection one), so that after a
        # reconnect the server can release what this subscription held
        worker = worker or f"{self._msg_prefix}sub{sid}"
        sub = Subscription(self, sid, stream, consumer, max_inflight, worker)
        self._subs[sub.sid] = sub
        try:
            await self._call(sub._request())
        except BaseException:
            self._subs.pop(sub.sid, None)
            raise
        sub.active = True
        return sub

    async def status(self) -> dict[str, Any]:
        """The connected server's status."""
        resp = await self._call({"op": "status"})
        info: dict[str, Any] = resp["info"]
        return info

    async def messages(
        self, stream: str, consumer: str, *, batch: int = 100, expires: float = 1.0
    ) -> AsyncIterator[StreamMsg]:
        """Pull deliveries forever (an async generator over :meth:`fetch`)."""
        while not self._closed:
            for m in await self.fetch(stream, consumer, batch=batch, expires=expires):
                yield m


def _error(resp: dict[str, Any]) -> DsysError:
    status, message = resp.get("status"), str(resp.get("message", ""))
    if status == "not_found":
        return NotFoundError(message)
    if status == "conflict":
        return ConflictError(message)
    if status == "full":
        return StreamFullError(message)
    if status == "too_large":
        return PayloadTooLargeError(message)
    if status == "bad_request":
        return BadInputError(message)
    if status == "not_leader":
        return UnavailableError(message)
    return ConnectError(f"server answered {status}: {message}")


__all__ = ["PubAck", "StreamClient", "StreamMsg", "Subscription"]
