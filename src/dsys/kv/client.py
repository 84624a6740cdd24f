"""``KVClient``: async client of a dsys KV cluster over multiplexed WebSockets.

The client keeps one WebSocket per server (opened lazily) and sends every request as a
msgpack map with a request id; many requests share a connection and queued requests go
out together in one frame. It finds the leader by following ``not_leader`` answers (and
remembers which endpoint is which node), retries with exponential backoff and jitter on
``not_leader``, ``unavailable`` and connection failures until the request's timeout, and
makes retried writes idempotent: each write carries this client's id and a sequence
number that stays the same across retries, so the cluster applies it at most once.

Each attempt waits at most ``request_timeout`` (or what is left of the operation's
``timeout``) for its answer; the deadline fires up to 10 ms late, never early. The path
of a request that succeeds at once is kept short, because a write-heavy client shares the
machine's CPU with the servers: no copy of the request, no timer of its own (one timer
per connection and 10 ms covers every request sent in that slot) and no task or helper
coroutine between ``await kv.put(...)`` and the future its answer resolves.

Example::

    async with KVClient(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]) as kv:
        rev = await kv.put("greeting", b"hello")
        value = await kv.get("greeting")          # GetResult(value=b"hello", revision=rev)
        await kv.cas("greeting", b"hi", revision=rev)
        async with kv.watch("app/", start_revision=rev) as changes:
            async for event in changes:                # WatchEvent(revision, type, key, value)
                ...
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import aiohttp

from dsys.aiotools import start_inline
from dsys.codec import decode, encode
from dsys.errors import (
    BadInputError,
    ClosedError,
    CompactedError,
    ConfigError,
    ConflictError,
    ConnectError,
    LocalProtocolError,
    RemoteProtocolError,
    RequestTimeout,
)
from dsys.kv.fsm import WatchEvent
from dsys.raft.timers import GRAIN


@dataclass(frozen=True, slots=True)
class GetResult:
    """A value read from the store and the revision of its last change."""

    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class ScanItem:
    """One key of a scan and its revision."""

    key: str
    revision: int


@dataclass(frozen=True, slots=True)
class ScanPage:
    """One page of a scan: its keys, whether more follow, and the ``after`` that
    continues it (``None`` at the end)."""

    items: list[ScanItem]
    more: bool
    next: str | None


FRAME_BUDGET = 4 * 1024 * 1024
"""Bytes of requests packed into one WebSocket frame (the server accepts 8 MiB)."""

_MAX_FRAME_IN = 32 * 1024 * 1024
"""Largest answer frame the client accepts."""

_REQ_OVERHEAD = 64
"""Bytes counted per request on top of its key and value when splitting frames."""

_RETRY_STATUSES = frozenset({"not_leader", "unavailable", "bad_request"})
"""Answers that are not a final result of the request."""

_monotonic = time.monotonic


class _Retry(Exception):
    """Internal: the attempt failed in a way worth retrying elsewhere."""

    def __init__(self, message: str, *, leader: str | None = None, addr: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader
        self.addr = addr


class _Conn:
    """One WebSocket to one server with its in-flight requests.

    The hot path is :meth:`submit`: it gives the request the next id, queues it for the
    next frame and returns the future its answer resolves. Everything else happens
    once per frame or once per 10 ms, not once per request:

    * :meth:`_flush` (scheduled once per loop iteration) sends every queued request in
      one frame (several when they exceed :data:`FRAME_BUDGET`) and arms the timeouts:
      the ids of one flush are consecutive, so all requests with the connection's usual
      attempt timeout are one id range in a deadline bucket (deadlines rounded *up* to
      :data:`~dsys.raft.timers.GRAIN`, one timer per bucket); a request with another
      timeout gets a range of its own.
    * the reader resolves answers by id and notes which node answers on this endpoint.

    A timeout therefore fires between 0 and ``GRAIN`` seconds late, never early, and an
    abandoned (cancelled) request leaves ``_pending`` when its answer or deadline comes.
    """

    __slots__ = (
        "_buckets",
        "_by_id",
        "_closing",
        "_custom",
        "_flush_scheduled",
        "_lock",
        "_loop",
        "_next_id",
        "_out",
        "_out_bytes",
        "_own",
        "_pending",
        "_reader",
        "_timeout",
        "_ws",
        "endpoint",
        "sinks",
        "up",
    )

    def __init__(
        self,
        endpoint: str,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        by_id: dict[str, str],
    ) -> None:
        self.endpoint = endpoint
        self.up = False  # connected and not known to be broken
        self._loop = loop
        self._timeout = timeout  # the usual attempt timeout (armed per id range)
        self._by_id = by_id  # node id -> endpoint, shared with the client
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._out: list[dict[str, Any]] = []
        self._out_bytes = 0
        self._custom: list[tuple[int, float]] = []  # (id, timeout) of unusual timeouts
        self._own: set[int] = set()  # ids armed with a timeout of their own
        # deadline slot -> (timer, [(first id, end id, own timeout?, timeout), ...])
        self._buckets: dict[int, tuple[asyncio.TimerHandle, list[tuple[int, int, bool, float]]]]
        self._buckets = {}
        self._flush_scheduled = False
        self._reader: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[bool] | None = None  # closing a dropped WebSocket
        self._lock = asyncio.Lock()
        self._next_id = 1
        # watch id -> callback of its pushed answers (None = the connection was lost)
        self.sinks: dict[int, Callable[[dict[str, Any] | None], None]] = {}

    async def connect(self, session: aiohttp.ClientSession, timeout: float) -> None:  # noqa: ASYNC109
        """Open the WebSocket unless it is open (ConnectError when that fails)."""
        async with self._lock:
            old = self._ws
            if old is not None:
                if self.up and not old.closed:
                    return
                # a send on it failed: drop it (its reader no longer answers for us)
                if self._reader is not None:
                    self._reader.cancel()
                if not old.closed:
                    self._closing = asyncio.ensure_future(old.close())
            try:
                ws = await session.ws_connect(
                    f"http://{self.endpoint}/v1/ws",
                    timeout=aiohttp.ClientWSTimeout(ws_close=timeout),
                    max_msg_size=_MAX_FRAME_IN,
                    heartbeat=30.0,
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise ConnectError(f"cannot connect to {self.endpoint}: {exc}") from exc
            self._ws = ws
            self.up = True
            self._reader = asyncio.create_task(self._read_loop(ws))

    def submit(
        self,
        req: dict[str, Any],
        size: int,
        timeout: float,
    ) -> asyncio.Future[dict[str, Any]]:
        """Queue ``req`` for the next frame; the future gets its answer.

        The future fails with RequestTimeout after ``timeout`` seconds, or ConnectError
        when the connection is lost first. ``size`` is the bytes of key and value.
        """
        rid = self._next_id
        self._next_id = rid + 1
        req["id"] = rid
        fut = self._loop.create_future()
        self._pending[rid] = fut
        self._out.append(req)
        self._out_bytes += size
        if timeout != self._timeout:
            self._custom.append((rid, timeout))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        pending = self._pending
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    batch = decode(msg.data, max_size=_MAX_FRAME_IN)
                except RemoteProtocolError:
                    break
                if not isinstance(batch, list):
                    break
                node: dict[str, Any] | None = None
                for resp in batch:
                    if not isinstance(resp, dict):
                        continue
                    try:
                        fut = pending.pop(resp.get("id"), None)  # type: ignore[arg-type]
                    except TypeError:  # an unhashable id: not one of ours
                        continue
                    if fut is not None and not fut.done():
                        fut.set_result(resp)
                    elif fut is None and self.sinks:  # pushed events of a watch
                        sink = self.sinks.get(resp.get("id"))  # type: ignore[arg-type]
                        if sink is not None:
                            sink(resp)
                    node = resp
                # every answer on this connection comes from the same server: its node id
                # (in the last answer of the frame) tells which node this endpoint is
                if node is not None:
                    nid = node.get("node")
                    if isinstance(nid, str) and self._by_id.get(nid) != self.endpoint:
                        self._by_id[nid] = self.endpoint
        finally:
            if self._ws is ws:  # not replaced by a newer connection meanwhile
                self.up = False
                self._fail_all(ConnectError(f"connection to {self.endpoint} lost"))

    def _fail_all(self, exc: Exception) -> None:
        if self.sinks:  # the watches on this connection are gone with it
            sinks = list(self.sinks.values())
            self.sinks.clear()
            for sink in sinks:
                sink(None)
        self._out.clear()
        self._out_bytes = 0
        self._custom.clear()
        if not self._pending:
            return
        futs = list(self._pending.values())
        self._pending.clear()
        for fut in futs:
            if not fut.done():
                fut.set_exception(exc)

    def _flush(self) -> None:
        """Send every queued request and arm its timeout (once per loop iteration)."""
        self._flush_scheduled = False
        batch = self._out
        if not batch:
            return
        size = self._out_bytes + _REQ_OVERHEAD * len(batch)
        custom = self._custom
        self._out = []
        self._out_bytes = 0
        if custom:
            self._custom = []
        ws = self._ws
        if ws is None or ws.closed:
            self.up = False
            self._fail_all(ConnectError(f"connection to {self.endpoint} is closed"))
            return
        now = self._loop.time()
        self._arm(now + self._timeout, batch[0]["id"], batch[-1]["id"] + 1, False, self._timeout)
        for rid, timeout in custom:
            self._own.add(rid)
            self._arm(now + timeout, rid, rid + 1, True, timeout)
        if size <= FRAME_BUDGET:
            self._send(ws, batch)
            return
        # Split into frames the server accepts (values are <= 1 MiB each).
        frame: list[dict[str, Any]] = []
        size = 0
        for req in batch:
            n = _REQ_OVERHEAD + _size(req.get("key"), req.get("value"))
            if frame and size + n > FRAME_BUDGET:
                self._send(ws, frame)
                frame = []
                size = 0
            frame.append(req)
            size += n
        self._send(ws, frame)

    def _send(self, ws: aiohttp.ClientWebSocketResponse, frame: list[dict[str, Any]]) -> None:
        try:
            data = encode(frame, max_size=_MAX_FRAME_IN)
        except LocalProtocolError:
            # a request msgpack cannot carry (say, a value that is not bytes): fail that
            # request alone, send the others
            frame = [req for req in frame if self._encodable(req)]
            if not frame:
                return
            data = encode(frame, max_size=_MAX_FRAME_IN)
        # Run the send's first step here: without compression it writes the frame to the
        # transport and returns, so no task is needed. Only a send that must wait for
        # flow control (a full socket buffer) gets a task to finish it.
        try:
            task = start_inline(ws.send_bytes(data))
        except Exception:
            if self._ws is ws:
                self.up = False
                self._fail_all(ConnectError(f"sending to {self.endpoint} failed"))
            return
        if task is None:
            return
        task.add_done_callback(lambda t: self._sent(t, ws))

    def _encodable(self, req: dict[str, Any]) -> bool:
        try:
            encode(req, max_size=_MAX_FRAME_IN)
        except LocalProtocolError as exc:
            fut = self._pending.pop(req["id"], None)
            if fut is not None and not fut.done():
                # the caller's value, not our bug: their bad input (LocalProtocolError is
                # no longer a BadInputError)
                err = BadInputError(str(exc))
                err.__cause__ = exc
                fut.set_exception(err)
            return False
        return True

    def _sent(self, task: asyncio.Future[None], ws: aiohttp.ClientWebSocketResponse) -> None:
        if (task.cancelled() or task.exception() is not None) and self._ws is ws:
            self.up = False
            self._fail_all(ConnectError(f"sending to {self.endpoint} failed"))

    def _arm(self, when: float, first: int, end: int, own: bool, timeout: float) -> None:
        """Fail the ids ``first <= id < end`` still pending at ``when`` (rounded up)."""
        slot = int(when / GRAIN) + 1
        entry = self._buckets.get(slot)
        if entry is None:
            timer = self._loop.call_at(slot * GRAIN, self._expire, slot)
            entry = self._buckets[slot] = (timer, [])
        entry[1].append((first, end, own, timeout))

    def _expire(self, slot: int) -> None:
        entry = self._buckets.pop(slot, None)
        if entry is None:
            return
        pending, own_ids = self._pending, self._own
        for first, end, own, timeout in entry[1]:
            if own:
                own_ids.discard(first)
                expired = [first] if first in pending else []
            else:
                expired = []
                for rid in pending:  # ids ascend in insertion order
                    if rid >= end:
                        break
                    if rid >= first and rid not in own_ids:
                        expired.append(rid)
            for rid in expired:
                fut = pending.pop(rid)
                if not fut.done():
                    fut.set_exception(
                        RequestTimeout(f"no answer from {self.endpoint} in {timeout:.2f}s")
                    )

    async def close(self) -> None:
        """Close the WebSocket and fail what is still in flight with ClosedError."""
        self.up = False
        if self._ws is not None:
            await self._ws.close()
        if self._closing is not None:
            await self._closing
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for timer, _ in self._buckets.values():
            timer.cancel()
        self._buckets.clear()
        self._own.clear()
        self._fail_all(ClosedError("client closed"))


class KVClient:
    """Async client of a dsys KV cluster.

    Args:
        endpoints: ``host:port`` of some or all servers.
        timeout: default seconds an operation may take, retries included.
        request_timeout: seconds one attempt may wait for an answer.
        client_id: id used for exactly-once writes (random by default).

    Raises:
        ConfigError: no endpoints given.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 10.0,
        request_timeout: float = 3.0,
        client_id: str | None = None,
    ) -> None:
        eps = [e.strip().removeprefix("http://").rstrip("/") for e in endpoints if e.strip()]
        if not eps:
            raise ConfigError("KVClient needs at least one endpoint")
        if timeout <= 0 or request_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        self.endpoints = eps
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.client_id = client_id or uuid.uuid4().hex
        self._first_try = min(request_timeout, timeout)  # attempt timeout of a default call
        self._seq = 0  # the last sequence number given to a write
        self._session: aiohttp.ClientSession | None = None
        self._conns: dict[str, _Conn] = {}
        self._leader: str | None = None  # endpoint believed to be the leader
        self._by_id: dict[str, str] = {}  # node id -> endpoint
        self._rr = 0
        self._closed = False

    async def __aenter__(self) -> KVClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection."""
        self._closed = True
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def leader(self) -> str | None:
        """The endpoint currently believed to be the leader."""
        return self._leader

    # -- operations -------------------------------------------------------------------

    async def get(
        self,
        key: str,
        *,
        stale: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> GetResult | None:
        """The value of ``key`` and its revision, or None when it does not exist.

        Linearizable unless ``stale`` (then any server answers from its local state).
        """
        resp = await self._request(
            {"op": "get", "key": key, "stale": stale}, _size(key, None), timeout, stale
        )
        if resp["status"] == "not_found":
            return None
        return GetResult(value=resp["value"], revision=resp["revision"])

    async def put(
        self,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> int:
        """Set ``key`` to ``value`` (optionally expiring after ``ttl`` seconds); returns the
        new revision."""
        # the hot path of a write-heavy client: no helper coroutine between here and the
        # request loop (see _write for the shared checks)
        self._seq = seq = self._seq + 1  # the same seq on every retry: exactly-once
        req = {
            "op": "put",
            "key": key,
            "value": value,
            "ttl_ms": int(ttl * 1000) if ttl else 0,
            "cid": self.client_id,
            "seq": seq,
        }
        try:
            size = len(key) + len(value)
        except TypeError:  # not a str and bytes: the server will say what is wrong
            size = _size(key, value)
        resp = await self._request(req, size, timeout, False)
        if resp["status"] == "ok":
            return int(resp["revision"])
        return _write_refused(req, resp)

    async def cas(
        self,
        key: str,
        value: bytes,
        *,
        revision: int,
        ttl: float | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> int:
        """Set ``key`` only if its current revision is ``revision`` (0 = must not exist),
        optionally expiring after ``ttl`` seconds.

        Raises:
            ConflictError: the revision did not match (``exc.revision`` is the current one).
        """
        req: dict[str, Any] = {"op": "put", "key": key, "value": value, "if_revision": revision}
        if ttl:
            req["ttl_ms"] = int(ttl * 1000)
        return await self._write(req, _size(key, value), timeout)

    async def delete(
        self,
        key: str,
        *,
        revision: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> int | None:
        """Delete ``key`` (if its revision is ``revision`` when given).

        Returns the new store revision, or None when the key did not exist.
        """
        req: dict[str, Any] = {"op": "del", "key": key}
        if revision is not None:
            req["if_revision"] = revision
        try:
            return await self._write(req, _size(key, None), timeout)
        except _NotFound:
            return None

    async def scan(
        self,
        prefix: str = "",
        *,
        limit: int = 1000,
        after: str | None = None,
        stale: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[ScanItem]:
        """Keys starting with ``prefix`` (in order, at most ``limit``, after the key
        ``after`` when given) and their revisions; :meth:`scan_iter` walks all of them."""
        page = await self.scan_page(prefix, limit=limit, after=after, stale=stale, timeout=timeout)
        return page.items

    async def scan_page(
        self,
        prefix: str = "",
        *,
        limit: int = 1000,
        after: str | None = None,
        stale: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> ScanPage:
        """One page of keys under ``prefix`` after the key ``after`` (None: from the start).

        Raises:
            BadInputError: a bad limit, or ``after`` is not a key under ``prefix``.
        """
        req: dict[str, Any] = {"op": "scan", "prefix": prefix, "limit": limit, "stale": stale}
        if after is not None:
            req["after"] = after
        resp = await self._request(req, _size(prefix, None) + len(after or ""), timeout, stale)
        items = [ScanItem(key=k, revision=r) for k, r in resp["items"]]
        more = bool(resp.get("more", False))
        return ScanPage(items, more, resp.get("next") if more else None)

    async def scan_iter(
        self, prefix: str = "", *, page: int = 1000, stale: bool = False
    ) -> AsyncIterator[ScanItem]:
        """Every key under ``prefix`` in order, fetched ``page`` at a time (each page is
        one consistent read; keys changed between pages may be seen or missed)."""
        after: str | None = None
        while True:
            got = await self.scan_page(prefix, limit=page, after=after, stale=stale)
            for item in got.items:
                yield item
            if not got.more or got.next is None:
                return
            after = got.next

    async def status(self, endpoint: str | None = None) -> dict[str, Any]:
        """The status of one server (the first endpoint by default)."""
        ep = endpoint or self.endpoints[0]
        if self._closed:
            raise ClosedError("client closed")
        conn = self._conn(ep)
        if not conn.up:
            await conn.connect(self._get_session(), self.request_timeout)
        resp = await conn.submit({"op": "status"}, 0, self.request_timeout)
        if resp.get("status") == "bad_request":
            raise BadInputError(str(resp.get("message")))
        info: dict[str, Any] = resp["info"]
        return info

    def watch(
        self,
        prefix: str = "",
        *,
        start_revision: int | None = None,
        max_buffered: int = 1000,
    ) -> Watcher:
        """Every change of keys starting with ``prefix`` from ``start_revision`` on.

        Returns a :class:`Watcher`: iterate it with ``async for`` (it yields
        :class:`~dsys.kv.fsm.WatchEvent` in revision order) and close it with
        :meth:`Watcher.close` or ``async with``. Any server may serve it (watches read
        each replica's applied state); after a lost connection it resumes, on the same
        or another server, from the last delivered revision + 1: no gap, no duplicate.

        Args:
            prefix: only keys starting with this ("" = every key).
            start_revision: the first revision wanted; None or 0 = the next change.
            max_buffered: events held for a slow consumer; beyond that the watch pauses
                (the server stops sending) and resumes when the consumer catches up.

        Raises:
            BadInputError: ``prefix`` is not a string or ``start_revision`` is negative.
        """
        if not isinstance(prefix, str):
            raise BadInputError(f"watch prefix must be a string, got {type(prefix).__name__}")
        if start_revision is not None and (type(start_revision) is not int or start_revision < 0):
            raise BadInputError(
                f"start_revision must be a non-negative integer, got {start_revision!r}"
            )
        if max_buffered < 1:
            raise ConfigError("max_buffered must be >= 1")
        return Watcher(self, prefix, start_revision or 0, max_buffered)

    # -- machinery --------------------------------------------------------------------

    async def _write(self, req: dict[str, Any], size: int, timeout: float | None) -> int:  # noqa: ASYNC109
        self._seq = seq = self._seq + 1  # the same seq on every retry: exactly-once
        req["cid"] = self.client_id
        req["seq"] = seq
        resp = await self._request(req, size, timeout, False)
        if resp["status"] == "ok":
            return int(resp["revision"])
        return _write_refused(req, resp)

    def _pick(self) -> str:
        if self._leader is not None:
            return self._leader
        ep = self.endpoints[self._rr % len(self.endpoints)]
        return ep

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _conn(self, ep: str) -> _Conn:
        conn = self._conns.get(ep)
        if conn is None:
            loop = asyncio.get_running_loop()
            conn = self._conns[ep] = _Conn(ep, loop, self._first_try, self._by_id)
        return conn

    async def _request(
        self,
        req: dict[str, Any],
        size: int,
        timeout: float | None,  # noqa: ASYNC109
        any_node: bool,
    ) -> dict[str, Any]:
        """Send ``req`` until a final answer, following redirects, retrying with backoff.

        The first attempt on an open connection costs a dict lookup, an id and a future;
        deadlines and backoff are computed only once an attempt failed. The same ``req``
        (same ``cid``/``seq``) is sent on every attempt, under a new request id.
        """
        if self._closed:
            raise ClosedError("client closed")
        if not timeout:  # None (or 0): the client's default
            total, per_try = self.timeout, self._first_try
        elif timeout < 0:
            raise RequestTimeout("request failed after 0 attempts: no time left")
        else:
            total, per_try = timeout, min(self.request_timeout, timeout)
        started = _monotonic()
        attempt = 0
        last: Exception | None = None
        while True:
            ep = self._leader or self._pick()
            conn = self._conns.get(ep) or self._conn(ep)
            try:
                if not conn.up:
                    await conn.connect(self._get_session(), per_try)
                resp = await conn.submit(req, size, per_try)
                status = resp.get("status")
                if status not in _RETRY_STATUSES:
                    if not any_node:
                        self._leader = ep
                    return resp
                if status == "bad_request":
                    raise BadInputError(str(resp.get("message")))
                if status == "unavailable":
                    raise _Retry(str(resp.get("message")))
                if any_node:  # not_leader, but any node may answer: the caller decides
                    return resp
                raise _Retry(
                    str(resp.get("message")),
                    leader=resp.get("leader"),
                    addr=resp.get("leader_addr"),
                )
            except _Retry as exc:
                last = exc
                self._on_failure(ep, exc.leader, exc.addr)
            except (ConnectError, RequestTimeout) as exc:
                last = exc
                self._on_failure(ep, None, None)
            if self._closed:
                raise ClosedError("client closed")
            attempt += 1
            deadline = started + total
            # redirect to a known leader at once; otherwise back off with jitter. The cap
            # is short: an election takes a few hundred ms and we want the next leader
            # found soon after it wins.
            if self._leader is None or attempt > 3:
                delay = min(0.1, 0.01 * (2 ** min(attempt, 6))) * (0.5 + random.random())
                await asyncio.sleep(min(delay, max(0.0, deadline - _monotonic())))
            remaining = deadline - _monotonic()
            if remaining <= 0:
                raise RequestTimeout(f"request failed after {attempt} attempts: {last}") from last
            per_try = min(self.request_timeout, remaining)

    def _on_failure(self, ep: str, leader_id: str | None, addr: str | None) -> None:
        hinted = self._by_id.get(leader_id) if leader_id else None
        if hinted is None and addr in self.endpoints:
            hinted = addr
        if hinted is not None and hinted != ep:
            self._leader = hinted
            return
        self._leader = None
        self._rr = (self.endpoints.index(ep) + 1) if ep in self.endpoints else self._rr + 1


class Watcher:
    """An open watch of :meth:`KVClient.watch`: an async iterator of change events.

    The watch starts on the first ``async for`` step, :meth:`start` or ``async with``.
    Events come in revision order, each once; ``revision`` is the last one delivered.
    Iteration ends after :meth:`close`, and raises:

    * :class:`~dsys.errors.CompactedError` when the events from the next revision are
      no longer kept by any server (``exc.revision`` is the oldest still available):
      refetch the state and watch again from its revision + 1;
    * :class:`~dsys.errors.BadInputError` when the server refuses the watch (e.g. too
      many watches on one connection);
    * :class:`~dsys.errors.ClosedError` when the client was closed.

    Lost connections and servers that go away are not errors: the watch resumes on the
    next server from ``next_revision``, retrying with backoff until one answers.
    """

    def __init__(
        self, client: KVClient, prefix: str, start_revision: int, max_buffered: int
    ) -> None:
        self.prefix = prefix
        self.next_revision = start_revision
        """The next revision wanted (0 until the first server fixed it)."""
        self.revision = 0
        """The revision of the last event delivered (0 = none yet)."""
        self.endpoint: str | None = None
        """The server currently streaming the events."""
        self.resumes = 0
        """How many times the watch was re-established (after a loss or a pause)."""
        self._client = client
        self._max = max_buffered
        self._queue: deque[WatchEvent] = deque()
        self._ready = asyncio.Event()  # something to take, or the end
        self._room = asyncio.Event()  # a paused watch may resume
        self._started = asyncio.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._accepts = 0  # subscriptions a server accepted

    async def start(self) -> Watcher:
        """Open the watch and wait until a server accepted it (or it failed)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        await self._started.wait()
        if self._error is not None and not self._queue:
            raise self._error
        return self

    async def close(self) -> None:
        """Stop watching (the server is told); iteration ends."""
        self._closed = True
        self._queue.clear()
        self._ready.set()
        self._started.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Watcher:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run())
        queue = self._queue
        if self._closed:
            raise StopAsyncIteration
        while not queue:
            if self._closed:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            self._ready.clear()
            await self._ready.wait()
        ev = queue.popleft()
        self.revision = ev.revision
        if len(queue) <= self._max // 2:
            self._room.set()
        return ev

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._ready.set()
        self._started.set()

    async def _run(self) -> None:
        client = self._client
        eps = client.endpoints
        # start where requests go (the leader, when known), move on after a failure
        i = eps.index(client._leader) if client._leader in eps else client._rr
        failures = 0
        compacted: set[str] = set()  # servers that no longer have next_revision
        while not self._closed:
            if client._closed:
                self._fail(ClosedError("client closed"))
                return
            ep = eps[i % len(eps)]
            before, accepts = self.next_revision, self._accepts
            self.endpoint = None
            try:
                outcome = await self._subscribe(ep)
            except (ConnectError, RequestTimeout) as exc:
                outcome = f"lost: {exc}"
            if self.next_revision != before:
                compacted.clear()
            if self._accepts != accepts:  # the server had accepted it
                failures = 0
            self.resumes += 1
            if outcome == "paused":  # resume here once the consumer drained the queue
                self._room.clear()
                if len(self._queue) > self._max // 2:
                    await self._room.wait()
                continue
            i += 1
            if isinstance(outcome, CompactedError):
                # another server may still have the revisions (its history is its own)
                compacted.add(ep)
                if len(compacted) >= len(eps):
                    self._fail(outcome)
                    return
                continue
            if isinstance(outcome, BaseException):
                self._fail(outcome)
                return
            failures += 1
            delay = min(0.5, 0.02 * (2 ** min(failures, 5))) * (0.5 + random.random())
            await asyncio.sleep(delay)

    async def _subscribe(self, ep: str) -> str | BaseException:
        """One subscription on ``ep``; returns why it ended (or the error to raise)."""
        client = self._client
        conn = client._conn(ep)
        if not conn.up:
            await conn.connect(client._get_session(), client.request_timeout)
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[str | BaseException] = loop.create_future()

        def sink(resp: dict[str, Any] | None) -> None:
            if ended.done():
                return
            if resp is None:
                ended.set_result("lost")
                return
            status = resp.get("status")
            if status == "events":
                try:
                    self._take(resp["events"])
                except (KeyError, TypeError, ValueError) as exc:
                    conn.sinks.pop(wid, None)
                    ended.set_result(f"lost: bad events from {ep}: {exc}")
                    return
                if len(self._queue) >= self._max:  # pause: the consumer is behind
                    conn.sinks.pop(wid, None)
                    ended.set_result("paused")
            elif status == "compacted":
                conn.sinks.pop(wid, None)
                ended.set_result(_compacted(resp))
            else:  # the server gave up on this watch: try again (elsewhere)
                conn.sinks.pop(wid, None)
                ended.set_result(f"lost: {resp.get('message')}")

        req: dict[str, Any] = {
            "op": "watch",
            "prefix": self.prefix,
            "start_revision": self.next_revision,
        }
        fut = conn.submit(req, len(self.prefix), client.request_timeout)
        wid: int = req["id"]
        conn.sinks[wid] = sink
        try:
            resp = await fut
            status = resp.get("status")
            if status == "compacted":
                return _compacted(resp)
            if status == "bad_request":
                return BadInputError(str(resp.get("message")))
            if status != "ok":
                return f"lost: {resp.get('message')}"
            if not self.next_revision:
                self.next_revision = int(resp["start_revision"])
            self.endpoint = ep
            self._accepts += 1
            self._started.set()
            return await ended
        finally:
            conn.sinks.pop(wid, None)
            self._unwatch(conn, wid)  # harmless when the server already ended it

    def _take(self, events: list[Any]) -> None:
        """Queue pushed events newer than the last one taken (no duplicates)."""
        nxt = self.next_revision
        last = nxt - 1
        batch = []
        for revision, kind, key, value in events:
            if type(revision) is not int or not isinstance(key, str):
                raise TypeError("malformed event")
            if revision < nxt or revision < last:
                continue  # already delivered (or out of order: never from our servers)
            batch.append(WatchEvent(revision, str(kind), key, value))
            last = revision
        if batch:
            self._queue.extend(batch)
            self.next_revision = last + 1
            self._ready.set()

    def _unwatch(self, conn: _Conn, wid: int) -> None:
        """Tell the server to stop watch ``wid`` (best effort, nobody waits)."""
        if not conn.up:
            return
        fut = conn.submit({"op": "unwatch", "watch": wid}, 0, self._client.request_timeout)
        fut.add_done_callback(_ignore_result)


def _compacted(resp: dict[str, Any]) -> CompactedError:
    revision = resp.get("revision")
    return CompactedError(
        str(resp.get("message") or ""), revision=revision if type(revision) is int else 0
    )


def _ignore_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _size(key: object, value: object) -> int:
    """Bytes of ``key`` and ``value`` counted against the frame budget."""
    n = len(key) if isinstance(key, str) else 0
    if isinstance(value, bytes):
        n += len(value)
    return n


def _write_refused(req: dict[str, Any], resp: dict[str, Any]) -> NoReturn:
    """Raise the error of a write answered with a status other than ``ok``."""
    status = resp["status"]
    if status == "conflict":
        exc = ConflictError(
            f"revision of {req['key']!r} is {resp.get('key_revision')}, "
            f"not {req.get('if_revision')}"
        )
        exc.revision = resp.get("key_revision", 0)  # type: ignore[attr-defined]
        raise exc
    if status == "not_found":
        raise _NotFound()
    raise BadInputError(f"write refused: {status}")


class _NotFound(Exception):
    pass


__all__ = ["GetResult", "KVClient", "ScanItem", "ScanPage", "Watcher"]
