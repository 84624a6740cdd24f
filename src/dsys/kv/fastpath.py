"""The KV server's HTTP fast path: hot client requests served by protocol callbacks.

Nearly all client HTTP traffic is ``PUT``/``GET``/``DELETE /v1/kv/{key}`` over HTTP/1.1
keep-alive. Through aiohttp each such request costs a parser, a request object with
header dicts, middleware, the router, a task and a response object: more CPU than the
Raft work the write causes. :class:`KVFastPath` is an ``asyncio.Protocol`` factory
that serves exactly those requests itself:

* writes go to :meth:`KVServer.submit_write <dsys.kv.server.KVServer.submit_write>`
  (no task: the proposal's future carries the request to its answer);
* stale reads are answered at once; linearizable reads run a small task around
  :meth:`KVServer.read_barrier <dsys.kv.server.KVServer.read_barrier>`;
* pipelined requests are answered in order, each answer byte for byte what the
  aiohttp handlers of :mod:`dsys.kv.server` send (status, JSON body, headers).

Anything else — other paths, HTTP/1.0, chunked bodies, ``Expect``, ``Upgrade``, the
cluster token header, percent-encoded or dot-segment keys, bodies over
:data:`~dsys.kv.server.MAX_VALUE_BYTES`, odd or malformed heads — is handed,
connection and buffered bytes included, to aiohttp's protocol (the full path, as in
:mod:`dsys.balance.fastpath`), which answers it or a clean 4xx. A connection stays
with aiohttp once handed over.

Bounds per connection: a head of at most :data:`MAX_HEAD` bytes and lines of at most
:data:`MAX_LINE`; at most :data:`MAX_PIPELINE` requests answered-but-unsent or in
flight (reading pauses beyond that, and while the transport's write buffer is above
its high-water mark); idle connections close after :data:`KEEPALIVE` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import re
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from dsys.aiotools import hand_over
from dsys.errors import (
    BadInputError,
    ConflictError,
    DsysError,
    NotLeaderError,
    RequestTimeout,
    UnavailableError,
)
from dsys.kv.fsm import Delete, Put, Result, validate_key
from dsys.kv.server import MAX_VALUE_BYTES, KVServer, _now_ms, _opt_int
from dsys.raft.node import TOKEN_HEADER

MAX_HEAD = 32 * 1024
"""Largest request head served here; a longer one goes to aiohttp (which answers 4xx)."""

MAX_LINE = 8190
"""aiohttp's own line limit: longer lines go to it for its clean 4xx."""

MAX_PIPELINE = 128
"""Requests in flight or waiting to be sent per connection before reading pauses."""

KEEPALIVE = 75.0
"""Seconds a connection may sit without a request in flight (aiohttp's keep-alive)."""

# request line: METHOD /v1/kv/KEY[?QUERY] HTTP/1.1, with a conservative character set:
# no percent-escapes, no '+' in the query, nothing that yarl would re-encode or decode.
_TARGET = re.compile(rb"/v1/kv/([A-Za-z0-9\-._~!$&'()*,;=:@/]+)(?:\?([A-Za-z0-9\-._~=&]*))?\Z")
_BAD_BYTE = re.compile(rb"[^\t\r\n\x20-\x7e]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_GOOD_NAMES: set[bytes] = set()  # lower-cased header names already checked by _TOKEN
_GET, _PUT, _DELETE = 0, 1, 2
_METHODS = {b"GET": _GET, b"PUT": _PUT, b"DELETE": _DELETE}
# Headers that send a request down the full path.
_SLOW_HEADERS = frozenset(
    {
        b"transfer-encoding",
        b"content-encoding",  # aiohttp would inflate the body
        b"expect",
        b"upgrade",
        TOKEN_HEADER.lower().encode(),
    }
)
# aiohttp answers 400 when one of these comes twice (RFC 9110 singletons).
_SINGLETONS = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"transfer-encoding",
        b"user-agent",
    }
)
_CLIENT_ID = b"x-dsys-client-id"
_SEQ = b"x-dsys-seq"
_JSON = b"application/json; charset=utf-8"
_SERVER = SERVER_SOFTWARE.encode()
_HANDOFF = -1  # _parse_one: hand the connection to aiohttp
_WAIT = 0  # _parse_one: need more bytes
_DONE = 1  # _parse_one: one request started
_BLOCKED = 2  # _parse_one: a read waits for the requests before it


class _DateCache:
    """The ``Date`` header value, formatted once per second."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = email.utils.formatdate(now, usegmt=True).encode()
        return self.value


_DATE = _DateCache()
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def _response(
    status: int, ctype: bytes, body: bytes, close: bool, before: bytes = b"", after: bytes = b""
) -> bytes:
    """An HTTP/1.1 response laid out like aiohttp's: its header order, Date and Server."""
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n%sContent-Type: %s\r\n%sContent-Length: %d\r\nDate: %s\r\n"
            b"Server: %s\r\n%s\r\n"
            % (
                status,
                _REASONS.get(status, b"Unknown"),
                before,
                ctype,
                after,
                len(body),
                _DATE.get(),
                _SERVER,
                b"Connection: close\r\n" if close else b"",
            ),
            body,
        )
    )


def _json_error(status: int, kind: str, message: str, close: bool, **extra: object) -> bytes:
    """What :func:`dsys.observability.json_error` sends."""
    body = json.dumps({"error": kind, "message": message, **extra}).encode()
    return _response(status, _JSON, body, close)


def _error_answer(server: KVServer, exc: BaseException, target: bytes, close: bool) -> bytes:
    """The answer the handlers plus :func:`~dsys.observability.error_middleware` give."""
    if isinstance(exc, NotLeaderError):
        exc = server._redirect_error(exc)
        if exc.leader_hint:
            body = json.dumps(
                {"error": "not_leader", "message": str(exc), "leader": exc.leader_hint}
            ).encode()
            location = exc.leader_hint.rstrip("/").encode() + target
            return _response(307, _JSON, body, close, after=b"Location: %s\r\n" % location)
        body = json.dumps(
            {"error": "no_leader", "message": str(exc) or "no leader is known"}
        ).encode()
        retry = b"Retry-After: %d\r\n" % max(1, round(exc.retry_after or 1))
        return _response(503, _JSON, body, close, after=retry)
    if isinstance(exc, BadInputError):
        return _json_error(400, "bad_request", str(exc), close)
    if isinstance(exc, ConflictError):
        return _json_error(409, "conflict", str(exc), close)
    if isinstance(exc, UnavailableError):
        body = json.dumps({"error": "unavailable", "message": str(exc)}).encode()
        retry = b""
        if exc.retry_after is not None:
            retry = b"Retry-After: %d\r\n" % max(1, round(exc.retry_after))
        return _response(503, _JSON, body, close, after=retry)
    if isinstance(exc, RequestTimeout):
        return _json_error(504, "timeout", str(exc), close)
    if isinstance(exc, DsysError):
        return _json_error(500, type(exc).__name__, str(exc), close)
    server.log.error("fast_path_request_failed", error=repr(exc))
    body = b"500 Internal Server Error\n\nServer got itself in trouble"
    return _response(500, b"text/plain; charset=utf-8", body, True)


def _query(qs: bytes) -> dict[str, str]:
    """``request.query`` for the restricted query syntax of :data:`_TARGET` (first wins)."""
    out: dict[str, str] = {}
    for part in qs.split(b"&"):
        if part:
            name, _, value = part.partition(b"=")
            out.setdefault(name.decode(), value.decode())
    return out


def _session(cid: bytes | None, seq: bytes | None) -> tuple[str, int]:
    """``KVServer._http_session`` on raw header values: ``(client_id, seq)``."""
    if not cid:
        return "", 0
    if len(cid) > 128:
        raise BadInputError("X-Dsys-Client-Id is longer than 128 characters")
    n = _opt_int(seq.decode() if seq is not None else None, "X-Dsys-Seq", minimum=1)
    if n is None:
        raise BadInputError("X-Dsys-Seq is required with X-Dsys-Client-Id")
    return cid.decode(), n


class KVFastPath:
    """Accepts client connections of one :class:`~dsys.kv.server.KVServer`.

    Args:
        server: the KV server whose requests are served.
        fallback: aiohttp's protocol factory (``AppRunner.server``) for the full path.
    """

    def __init__(self, server: KVServer, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.server = server
        self.fallback = fallback
        self.conns: set[_Conn] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.handoffs = 0  # connections given to aiohttp (for tests and curiosity)
        self.loop = asyncio.get_running_loop()
        self._emptied = asyncio.Event()
        self._listener: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def protocol(self) -> _Conn:
        """Protocol factory for ``loop.create_server``."""
        return _Conn(self)

    async def listen(self, host: str, port: int) -> int:
        """Listen on ``host:port``; returns the bound port."""
        self._listener = await self.loop.create_server(
            self.protocol, host, port, backlog=1024, reuse_address=True
        )
        self._sweeper = self.loop.create_task(self._sweep(), name="dsys-kv-fastpath-sweeper")
        return int(self._listener.sockets[0].getsockname()[1])

    def forget(self, conn: _Conn) -> None:
        """A connection closed or went to aiohttp."""
        self.conns.discard(conn)
        if self.draining and not self.conns:
            self._emptied.set()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            now = self.loop.time()
            for c in list(self.conns):
                if not c.pending and now - c.active_at > KEEPALIVE:
                    c.close()

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop listening; let requests in flight finish for ``timeout`` s, then cut."""
        if self._listener is not None:
            self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.draining = True
        for c in list(self.conns):
            if not c.pending:
                c.close()
        if self.conns:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), timeout)
        for c in list(self.conns):
            c.abort()
        for t in list(self.tasks):
            t.cancel()


class _Slot:
    """One request's place in its connection's answer order."""

    __slots__ = ("close", "cmd", "conn", "op", "out", "read", "started", "target")

    def __init__(self, conn: _Conn, target: bytes, close: bool) -> None:
        self.conn = conn
        self.target = target
        self.close = close
        self.out: bytes | None = None
        self.cmd: Put | Delete | None = None
        self.op = ""
        self.started = 0.0
        self.read = False  # a GET: nothing after it starts before it is answered

    def answer(self, out: bytes) -> None:
        self.out = out
        self.conn.ready(self)

    def fail(self, exc: BaseException) -> None:
        if not isinstance(exc, DsysError):
            self.close = True  # a bug, not bad input: answer 500 and close, as aiohttp does
        self.answer(_error_answer(self.conn.fast.server, exc, self.target, self.close))

    def write_done(self, result: Result | None, exc: BaseException | None) -> None:
        """``submit_write``'s callback: what ``KVServer._http_write`` answers."""
        if exc is not None or result is None:
            self.fail(exc or RuntimeError("write finished without a result"))
            return
        cmd = self.cmd
        assert cmd is not None
        close = self.close
        if result.ok:
            status = 200
            out = _response(200, _JSON, b'{"revision": %d}' % result.revision, close)
        elif result.status == "conflict":
            status = 409
            out = _json_error(
                409,
                "conflict",
                f"revision of {cmd.key!r} is {result.key_revision}, not {cmd.if_revision}",
                close,
                revision=result.key_revision,
            )
        elif result.status == "not_found":
            status = 404
            out = _json_error(404, "not_found", f"key {cmd.key!r} does not exist", close)
        else:
            status = 400
            out = _json_error(400, result.status, f"write refused: {result.status}", close)
        self.conn.fast.server._count(self.op, status, self.started)
        self.answer(out)


class _Conn(asyncio.Protocol):
    """A client connection: serves the hot requests, hands anything else to aiohttp."""

    __slots__ = (
        "active_at",
        "buf",
        "closing",
        "fast",
        "handoff_wanted",
        "need",
        "parsing",
        "pending",
        "read_paused",
        "transport",
        "write_paused",
    )

    def __init__(self, fast: KVFastPath) -> None:
        self.fast = fast
        self.buf = b""
        self.need = 0  # bytes the buffered request needs before it can be parsed again
        self.parsing = False  # inside _next
        self.pending: deque[_Slot] = deque()
        self.transport: asyncio.Transport | None = None
        self.read_paused = False
        self.write_paused = False
        self.closing = False  # a request asked to close: parse nothing after it
        self.handoff_wanted = False  # hand off once the pending answers are sent
        self.active_at = fast.loop.time()

    # ---- asyncio callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.fast.conns.add(self)
        if self.fast.draining:
            self.close()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.buf = self.buf + data if self.buf else data
        if len(self.buf) >= self.need:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pending.clear()
        self.fast.forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.handoff_wanted and not self.pending:
            self._handoff()
        elif not self.closing:
            self._next()

    def eof_received(self) -> bool | None:
        if not self.pending:
            return None  # nothing left to answer: close
        self.closing = True  # answer what is in flight, then close
        return True

    # ---- parsing ------------------------------------------------------------------

    def _pause(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _next(self) -> None:
        """Start every complete buffered request (in order), within the bounds."""
        if self.parsing:
            return  # an answer ready at once, from inside this loop
        self.parsing = True
        try:
            while self.buf and self.transport is not None:
                if self.closing or self.handoff_wanted or self.fast.draining:
                    return
                if (
                    len(self.pending) >= MAX_PIPELINE
                    or self.write_paused
                    or (self.pending and self.pending[-1].read)
                ):
                    self._pause()  # resumed by ready()
                    return
                state = self._parse_one()
                if state == _WAIT:
                    break
                if state == _BLOCKED:
                    self._pause()
                    return
                if state == _HANDOFF:
                    if self.pending or self.write_paused:
                        self.handoff_wanted = True
                        self._pause()
                    else:
                        self._handoff()
                    return
        finally:
            self.parsing = False
        if self.read_paused and self.transport is not None and self._may_read():
            self.read_paused = False
            self.transport.resume_reading()

    def _may_read(self) -> bool:
        return (
            len(self.pending) < MAX_PIPELINE
            and not self.write_paused
            and not self.closing
            and not self.handoff_wanted
        )

    def _parse_one(self) -> int:
        """Parse and start the first buffered request."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            # Not a whole head yet. Let aiohttp judge (and answer) anything that does
            # not start like a request line, so garbage gets its 400 at once.
            if (
                len(buf) > MAX_HEAD
                or not 65 <= buf[0] <= 90
                or buf.count(b"\n") != buf.count(b"\r\n")  # bare LF
                or _BAD_BYTE.search(buf) is not None
            ):
                return _HANDOFF
            self.need = len(buf) + 1
            return _WAIT
        if end > MAX_HEAD:
            return _HANDOFF
        head = buf[:end]
        n_lines = head.count(b"\r\n")
        if head.count(b"\n") != n_lines or head.count(b"\r") != n_lines:
            return _HANDOFF  # bare CR or LF: aiohttp answers 400 with the reason
        if _BAD_BYTE.search(head) is not None:
            return _HANDOFF  # control or non-ASCII bytes: aiohttp decides
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1" or len(lines[0]) > MAX_LINE:
            return _HANDOFF
        method = _METHODS.get(parts[0])
        m = _TARGET.match(parts[1])
        if method is None or m is None:
            return _HANDOFF
        if method == _GET and self.pending:
            # A read sees every write before it on the connection and none after it,
            # as when aiohttp serves pipelined requests one at a time: wait.
            return _BLOCKED
        key = m.group(1)
        if b"/." in key or key.startswith(b"."):
            return _HANDOFF  # dot segments: let yarl normalise them
        length: int | None = None
        close = False
        cid: bytes | None = None
        seq: bytes | None = None
        singles: set[bytes] = set()
        for line in lines[1:]:
            colon = line.find(b":")
            if colon <= 0 or len(line) > MAX_LINE:
                return _HANDOFF
            name = line[:colon].lower()
            if name not in _GOOD_NAMES:
                if not _TOKEN.match(name):
                    return _HANDOFF
                if len(_GOOD_NAMES) < 4096:
                    _GOOD_NAMES.add(name)
            if name in _SLOW_HEADERS:
                return _HANDOFF
            if name in _SINGLETONS:
                if name in singles:
                    return _HANDOFF  # aiohttp: "Duplicate ... header found" (400)
                singles.add(name)
                if name == b"content-length":
                    value = line[colon + 1 :].strip(b" \t")
                    if not value.isdigit() or len(value) > 18:
                        return _HANDOFF
                    length = int(value)
            elif name == b"connection":
                for token in line[colon + 1 :].split(b","):
                    token = token.strip(b" \t").lower()
                    if token == b"close":
                        close = True
                    elif token not in (b"keep-alive", b""):
                        return _HANDOFF
            elif name == _CLIENT_ID:
                if cid is not None:
                    return _HANDOFF
                cid = line[colon + 1 :].strip(b" \t")
            elif name == _SEQ:
                if seq is not None:
                    return _HANDOFF
                seq = line[colon + 1 :].strip(b" \t")
        if b"host" not in singles:
            return _HANDOFF  # aiohttp: "Missing 'Host' header in request." (400)
        start = end + 4
        if method == _PUT:
            length = length or 0
            if length > MAX_VALUE_BYTES:
                return _HANDOFF  # aiohttp's 413 (after its own checks, in its order)
            if len(buf) < start + length:
                self.need = start + length
                return _WAIT
            body = buf[start : start + length]
        elif length:
            return _HANDOFF  # a body on GET/DELETE: unusual, the full path
        else:
            length = 0
        self.need = 0
        rest = start + length
        if close and rest < len(buf):
            return _HANDOFF  # aiohttp: 400 "Data after `Connection: close`"
        self.buf = buf[rest:] if rest < len(buf) else b""
        if close:
            self.closing = True
        slot = _Slot(self, parts[1], close or self.fast.draining)
        slot.read = method == _GET
        self.pending.append(slot)
        qs = m.group(2)
        try:
            if method == _PUT:
                self._put(slot, key, qs, cid, seq, body)
            elif method == _GET:
                self._get(slot, key, qs)
            else:
                self._delete(slot, key, qs, cid, seq)
        except Exception as exc:
            slot.fail(exc)
        return _DONE

    # ---- requests -----------------------------------------------------------------

    def _put(
        self,
        slot: _Slot,
        key_b: bytes,
        qs: bytes | None,
        cid: bytes | None,
        seq: bytes | None,
        body: bytes,
    ) -> None:
        """``KVServer.handle_put`` (a body over the limit never gets here)."""
        slot.started = time.perf_counter()
        key = validate_key(key_b.decode())
        if_revision = ttl = None
        if qs:
            q = _query(qs)
            if_revision = _opt_int(q.get("if_revision"), "if_revision")
            ttl = _opt_int(q.get("ttl"), "ttl")
        client_id, n = _session(cid, seq)
        slot.op = "put"
        slot.cmd = Put(
            key=key,
            value=body,
            if_revision=if_revision,
            ttl_ms=(ttl or 0) * 1000,
            now_ms=_now_ms(),
            client_id=client_id,
            seq=n,
        )
        self.fast.server.submit_write(slot.cmd, slot.write_done)

    def _delete(
        self, slot: _Slot, key_b: bytes, qs: bytes | None, cid: bytes | None, seq: bytes | None
    ) -> None:
        """``KVServer.handle_delete``."""
        slot.started = time.perf_counter()
        key = validate_key(key_b.decode())
        if_revision = _opt_int(_query(qs).get("if_revision") if qs else None, "if_revision")
        client_id, n = _session(cid, seq)
        slot.op = "delete"
        slot.cmd = Delete(
            key=key, if_revision=if_revision, now_ms=_now_ms(), client_id=client_id, seq=n
        )
        self.fast.server.submit_write(slot.cmd, slot.write_done)

    def _get(self, slot: _Slot, key_b: bytes, qs: bytes | None) -> None:
        """``KVServer.handle_get``: stale reads at once, linearizable ones in a task."""
        slot.started = time.perf_counter()
        key = validate_key(key_b.decode())
        consistency = _query(qs).get("consistency", "linearizable") if qs else "linearizable"
        if consistency not in ("linearizable", "stale"):
            raise BadInputError(
                f"consistency must be 'linearizable' or 'stale', not {consistency!r}"
            )
        if consistency == "stale":
            self._read_answer(slot, key)
            return
        fast = self.fast
        t = fast.loop.create_task(self._linearizable_get(slot, key))
        fast.tasks.add(t)
        t.add_done_callback(fast.tasks.discard)

    async def _linearizable_get(self, slot: _Slot, key: str) -> None:
        try:
            await self.fast.server.read_barrier(False)
        except Exception as exc:
            slot.fail(exc)
            return
        self._read_answer(slot, key)

    def _read_answer(self, slot: _Slot, key: str) -> None:
        server = self.fast.server
        kv = server.fsm.get(key)
        if kv is None:
            server._count("get", 404, slot.started)
            slot.answer(_json_error(404, "not_found", f"key {key!r} does not exist", slot.close))
            return
        server._count("get", 200, slot.started)
        revision = b"X-Dsys-Revision: %d\r\n" % kv.mod_revision
        slot.answer(
            _response(200, b"application/octet-stream", kv.value, slot.close, before=revision)
        )

    # ---- answers ------------------------------------------------------------------

    def ready(self, slot: _Slot) -> None:
        """``slot`` has its answer: send every answer that is next in order."""
        transport = self.transport
        pending = self.pending
        if transport is None or not pending or pending[0] is not slot:
            return  # gone, or an earlier request is still in flight
        close = False
        if len(pending) == 1:
            pending.popleft()
            out = cast(bytes, slot.out)
            close = slot.close
        else:
            chunks = []
            while pending and pending[0].out is not None:
                s = pending.popleft()
                chunks.append(cast(bytes, s.out))
                if s.close:
                    close = True
                    break
            out = b"".join(chunks)
        transport.write(out)
        self.active_at = self.fast.loop.time()
        if close:
            pending.clear()
            self.closing = True
            transport.close()
            return
        if pending:
            return
        if self.closing or self.fast.draining:
            self.closing = True
            transport.close()
        elif self.handoff_wanted:
            if not self.write_paused:
                self._handoff()
        elif self.parsing:
            return  # _next goes on by itself
        elif self.buf and len(self.buf) >= self.need:
            self._next()
        elif self.read_paused and self._may_read():
            self.read_paused = False
            transport.resume_reading()

    def _handoff(self) -> None:
        """Give the connection (and its unparsed bytes) to aiohttp's full path."""
        transport = self.transport
        if transport is None:
            return
        self.fast.forget(self)
        self.fast.handoffs += 1
        self.transport = None
        buf, self.buf = self.buf, b""
        hand_over(transport, self.fast.fallback(), buf)

    def close(self) -> None:
        """Close the connection (buffered answers are still sent)."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Cut the connection at once."""
        if self.transport is not None:
            self.transport.abort()


async def start_fast_site(server: KVServer) -> tuple[web.AppRunner, KVFastPath, int]:
    """Serve ``server.app`` behind a :class:`KVFastPath`; returns runner, fast path, port.

    Stop with ``await fast.close(timeout)`` then ``await runner.cleanup()``.
    """
    runner = web.AppRunner(server.app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    fallback = runner.server
    assert fallback is not None
    fast = KVFastPath(server, fallback)
    try:
        port = await fast.listen(server.config.host, server.config.port)
    except BaseException:
        await runner.cleanup()
        raise
    return runner, fast, port


__all__ = ["KEEPALIVE", "MAX_HEAD", "MAX_LINE", "MAX_PIPELINE", "KVFastPath", "start_fast_site"]
