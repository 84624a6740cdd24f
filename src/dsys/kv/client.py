"""``KVClient``: async client of a dsys KV cluster over multiplexed WebSockets.

The client keeps one WebSocket per server (opened lazily) and sends every request as a
msgpack map with a request id; many requests share a connection and queued requests go
out together in one frame. It finds the leader by following ``not_leader`` answers (and
remembers which endpoint is which node), retries with exponential backoff and jitter on
``not_leader``, ``unavailable`` and connection failures until the request's timeout, and
makes retried writes idempotent: each write carries this client's id and a sequence
number that stays the same across retries, so the cluster applies it at most once.

Example::

    async with KVClient(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]) as kv:
        rev = await kv.put("greeting", b"hello")
        value = await kv.get("greeting")          # GetResult(value=b"hello", revision=rev)
        await kv.cas("greeting", b"hi", revision=rev)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from dsys.codec import decode, encode
from dsys.errors import (
    BadInputError,
    ClosedError,
    ConfigError,
    ConflictError,
    ConnectError,
    RemoteProtocolError,
    RequestTimeout,
)
from dsys.raft.timers import wait_future


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


FRAME_BUDGET = 4 * 1024 * 1024
"""Bytes of requests packed into one WebSocket frame (the server accepts 8 MiB)."""


class _Retry(Exception):
    """Internal: the attempt failed in a way worth retrying elsewhere."""

    def __init__(self, message: str, *, leader: str | None = None, addr: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader
        self.addr = addr


class _Conn:
    """One WebSocket to one server with its in-flight requests."""

    def __init__(self, endpoint: str, session: aiohttp.ClientSession) -> None:
        self.endpoint = endpoint
        self._session = session
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._out: list[dict[str, Any]] = []
        self._flush_scheduled = False
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    @property
    def open(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def connect(self, timeout: float) -> None:  # noqa: ASYNC109
        async with self._lock:
            if self.open:
                return
            try:
                self._ws = await self._session.ws_connect(
                    f"http://{self.endpoint}/v1/ws",
                    timeout=aiohttp.ClientWSTimeout(ws_close=timeout),
                    max_msg_size=32 * 1024 * 1024,
                    heartbeat=30.0,
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise ConnectError(f"cannot connect to {self.endpoint}: {exc}") from exc
            self._reader = asyncio.create_task(self._read_loop(self._ws))

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    batch = decode(msg.data, max_size=32 * 1024 * 1024)
                except RemoteProtocolError:
                    break
                if not isinstance(batch, list):
                    break
                for resp in batch:
                    if not isinstance(resp, dict):
                        continue
                    fut = self._pending.pop(resp.get("id"), None)  # type: ignore[arg-type]
                    if fut is not None and not fut.done():
                        fut.set_result(resp)
        finally:
            self._fail_all(ConnectError(f"connection to {self.endpoint} lost"))

    def _fail_all(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def call(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        await self.connect(timeout)
        rid = next(self._ids)
        req["id"] = rid
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._out.append(req)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        try:
            return await wait_future(fut, timeout)
        except TimeoutError:
            raise RequestTimeout(f"no answer from {self.endpoint} in {timeout:.2f}s") from None
        finally:
            self._pending.pop(rid, None)

    def _flush(self) -> None:
        """Send every queued request in one frame (called once per loop iteration)."""
        self._flush_scheduled = False
        batch, self._out = self._out, []
        ws = self._ws
        if not batch:
            return
        if ws is None or ws.closed:
            self._fail_all(ConnectError(f"connection to {self.endpoint} is closed"))
            return
        # Split into frames the server accepts (values are <= 1 MiB each).
        frames: list[list[dict[str, Any]]] = [[]]
        size = 0
        for req in batch:
            n = 64 + len(req.get("key", "")) + len(req.get("value", b""))
            if frames[-1] and size + n > FRAME_BUDGET:
                frames.append([])
                size = 0
            frames[-1].append(req)
            size += n
        for frame in frames:
            data = encode(frame, max_size=32 * 1024 * 1024)
            task = asyncio.ensure_future(ws.send_bytes(data))
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Future[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._fail_all(ConnectError(f"sending to {self.endpoint} failed"))

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
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
        self._seq = itertools.count(1)
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
        resp = await self._request({"op": "get", "key": key, "stale": stale}, timeout, stale)
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
        return await self._write(
            {"op": "put", "key": key, "value": value, "ttl_ms": int((ttl or 0) * 1000)}, timeout
        )

    async def cas(
        self,
        key: str,
        value: bytes,
        *,
        revision: int,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> int:
        """Set ``key`` only if its current revision is ``revision`` (0 = must not exist).

        Raises:
            ConflictError: the revision did not match (``exc.revision`` is the current one).
        """
        return await self._write(
            {"op": "put", "key": key, "value": value, "if_revision": revision}, timeout
        )

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
            return await self._write(req, timeout)
        except _NotFound:
            return None

    async def scan(
        self,
        prefix: str = "",
        *,
        limit: int = 1000,
        stale: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[ScanItem]:
        """Keys starting with ``prefix`` (in order, at most ``limit``) and their revisions."""
        resp = await self._request(
            {"op": "scan", "prefix": prefix, "limit": limit, "stale": stale}, timeout, stale
        )
        return [ScanItem(key=k, revision=r) for k, r in resp["items"]]

    async def status(self, endpoint: str | None = None) -> dict[str, Any]:
        """The status of one server (the first endpoint by default)."""
        ep = endpoint or self.endpoints[0]
        resp = await self._attempt(ep, {"op": "status"}, self.request_timeout)
        info: dict[str, Any] = resp["info"]
        return info

    # -- machinery --------------------------------------------------------------------

    async def _write(self, req: dict[str, Any], timeout: float | None) -> int:  # noqa: ASYNC109
        req["cid"] = self.client_id
        req["seq"] = next(self._seq)  # the same seq on every retry: exactly-once
        resp = await self._request(req, timeout, False)
        status = resp["status"]
        if status == "ok":
            return int(resp["revision"])
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

    def _pick(self) -> str:
        if self._leader is not None:
            return self._leader
        ep = self.endpoints[self._rr % len(self.endpoints)]
        return ep

    async def _request(
        self,
        req: dict[str, Any],
        timeout: float | None,  # noqa: ASYNC109
        any_node: bool,
    ) -> dict[str, Any]:
        if self._closed:
            raise ClosedError("client closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout)
        attempt = 0
        last: Exception | None = None
        while True:
            ep = self._pick()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RequestTimeout(f"request failed after {attempt} attempts: {last}") from last
            try:
                resp = await self._attempt(ep, dict(req), min(self.request_timeout, remaining))
                if any_node or resp["status"] != "not_leader":
                    if resp["status"] == "unavailable":
                        raise _Retry(str(resp.get("message")))
                    if not any_node:
                        self._leader = ep
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
            attempt += 1
            # redirect to a known leader at once; otherwise back off with jitter. The cap
            # is short: an election takes a few hundred ms and we want the next leader
            # found soon after it wins.
            if self._leader is None or attempt > 3:
                delay = min(0.1, 0.01 * (2 ** min(attempt, 6))) * (0.5 + random.random())
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))

    def _on_failure(self, ep: str, leader_id: str | None, addr: str | None) -> None:
        hinted = self._by_id.get(leader_id) if leader_id else None
        if hinted is None and addr in self.endpoints:
            hinted = addr
        if hinted is not None and hinted != ep:
            self._leader = hinted
            return
        self._leader = None
        self._rr = (self.endpoints.index(ep) + 1) if ep in self.endpoints else self._rr + 1

    async def _attempt(self, ep: str, req: dict[str, Any], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        if self._session is None:
            self._session = aiohttp.ClientSession()
        conn = self._conns.get(ep)
        if conn is None:
            conn = self._conns[ep] = _Conn(ep, self._session)
        resp = await conn.call(req, timeout)
        node = resp.get("node")
        if isinstance(node, str):
            self._by_id[node] = ep
        if resp.get("status") == "bad_request":
            raise BadInputError(str(resp.get("message")))
        return resp


class _NotFound(Exception):
    pass


__all__ = ["GetResult", "KVClient", "ScanItem"]
