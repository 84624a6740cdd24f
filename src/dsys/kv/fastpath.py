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
import re
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from dsys.aiotools import hand_over
from dsys.errors import BadInputError, DsysError, NotLeaderError, RemoteProtocolError
from dsys.http11 import Parser, Request
from dsys.kv.api import (
    MAX_VALUE_BYTES,
    Answer,
    error_answer,
    opt_int,
    read_answer,
    session_fields,
    write_answer,
)
from dsys.kv.fsm import Delete, Put, Result, validate_key
from dsys.raft.node import TOKEN_HEADER
from dsys.raft.peerwire import RAW_PATH, UPGRADE_TOKEN

if TYPE_CHECKING:
    from dsys.kv.server import KVServer

MAX_HEAD = 32 * 1024
"""Largest request head served here; a longer one goes to aiohttp (which answers 4xx)."""

MAX_LINE = 8190
"""aiohttp's own line limit: longer lines go to it for its clean 4xx."""

MAX_PIPELINE = 128
"""Requests in flight or waiting to be sent per connection before reading pauses."""

KEEPALIVE = 75.0
"""Seconds a connection may sit without a request in flight (aiohttp's keep-alive)."""

# request-target: /v1/kv/KEY[?QUERY], with a conservative character set: no
# percent-escapes, no '+' in the query, nothing that yarl would re-encode or decode.
_TARGET = re.compile(rb"/v1/kv/([A-Za-z0-9\-._~!$&'()*,;=:@/]+)(?:\?([A-Za-z0-9\-._~=&]*))?\Z")
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
# aiohttp answers 400 when one of these comes twice (RFC 9110 singletons); the parser
# itself refuses a second Content-Length or Host.
_SINGLETONS = frozenset(
    {
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"max-forwards",
        b"server",
        b"user-agent",
    }
)
_PLAIN_CONNECTION = frozenset({b"close", b"keep-alive"})
_CLIENT_ID = b"x-dsys-client-id"
_SEQ = b"x-dsys-seq"
_ONCE = _SINGLETONS | {_CLIENT_ID, _SEQ}
_SERVER = SERVER_SOFTWARE.encode()
_HANDOFF = -1  # _parse_one: hand the connection to aiohttp
_WAIT = 0  # _parse_one: need more bytes
_DONE = 1  # _parse_one: one request started
_BLOCKED = 2  # _parse_one: a read waits for the requests before it


_RAW_TARGET = RAW_PATH.encode()


def _raw_upgrade(req: Request) -> bool:
    """Whether ``req`` asks for the raw Raft peer stream (``GET``, ``Upgrade: dsys-raft/1``)."""
    if req.method != b"GET" or b"upgrade" not in req.connection:
        return False
    return any(name == b"upgrade" and value == UPGRADE_TOKEN for _, name, value in req.headers)


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


def _now_ms() -> int:
    return int(time.time() * 1000)


def render(answer: Answer, close: bool) -> bytes:
    """An :class:`~dsys.kv.api.Answer` laid out as aiohttp sends it.

    Its header order, then ``Content-Length``, ``Date`` and ``Server``, and
    ``Connection: close`` when the connection closes after it.
    """
    status, ctype, body, before, after, bug = answer
    return (
        b"HTTP/1.1 %d %s\r\n%sContent-Type: %s\r\n%sContent-Length: %d\r\nDate: %s\r\n"
        b"Server: %s\r\n%s\r\n"
        % (
            status,
            _REASONS.get(status, b"Unknown"),
            b"".join(b"%s: %s\r\n" % f for f in before) if before else b"",
            ctype,
            b"".join(b"%s: %s\r\n" % f for f in after) if after else b"",
            len(body),
            _DATE.get(),
            _SERVER,
            b"Connection: close\r\n" if close or bug else b"",
        )
        + body
    )


def _error_answer(server: KVServer, exc: BaseException, target: bytes, close: bool) -> bytes:
    """The answer the handlers plus :func:`~dsys.observability.error_middleware` give."""
    leader_url = None
    if isinstance(exc, NotLeaderError):
        leader_url = server._redirect_error(exc).leader_hint
    elif not isinstance(exc, DsysError):
        server.log.error("fast_path_request_failed", error=repr(exc))
    return render(error_answer(exc, target, leader_url), close)


def _query(qs: bytes) -> dict[str, str]:
    """``request.query`` for the restricted query syntax of :data:`_TARGET` (first wins)."""
    out: dict[str, str] = {}
    for part in qs.split(b"&"):
        if part:
            name, _, value = part.partition(b"=")
            out.setdefault(name.decode(), value.decode())
    return out


def _session(session: tuple[bytes | None, bytes | None]) -> tuple[str, int]:
    """:func:`~dsys.kv.api.session_fields` of the raw header values."""
    cid, seq = session
    if not cid:
        return "", 0
    return session_fields(cid.decode(), seq.decode() if seq is not None else None)


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
        answer = write_answer(cmd, result)
        self.conn.fast.server._count(self.op, answer.status, self.started)
        self.answer(render(answer, self.close))


class _Conn(asyncio.Protocol):
    """A client connection: serves the hot requests, hands anything else to aiohttp."""

    __slots__ = (
        "active_at",
        "buf",
        "closing",
        "fast",
        "handoff_wanted",
        "head",
        "need",
        "parser",
        "parsing",
        "pending",
        "read_paused",
        "session",
        "taken",
        "target",
        "transport",
        "write_paused",
    )

    def __init__(self, fast: KVFastPath) -> None:
        self.fast = fast
        self.parser = Parser(max_head=MAX_HEAD)
        self.buf = self.parser.buffer  # for len(): what is buffered and not parsed
        self.head: Request | None = None  # parsed, not started yet (body or turn awaited)
        # head's (key, query), None: not served here (hand off)
        self.target: tuple[bytes, bytes | None] | None = None
        self.taken: bytes | None = None  # head's body, when try_request took it whole
        self.session: tuple[bytes | None, bytes | None] = (None, None)  # client id, seq
        self.need = 0  # buffered bytes the head needs (its body) before going on
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
        if self.head is None and not self.buf:
            # The common case, whole requests in one read: the first in one parser call.
            got = self.parser.try_request(data)
            if got is not None:
                req, self.taken = got
                self.head = req
                self.target = self._servable(req)
                if (
                    self.pending
                    or self.parsing
                    or self.write_paused
                    or self.read_paused
                    or self.handoff_wanted
                    or self.fast.draining
                    or self.transport is None
                ):
                    self._next()
                    return
                # Nothing in flight: start it here; _next's loop takes anything else
                # (the rest of a pipeline, a hand-off, a body still to come).
                self.parsing = True
                try:
                    state = self._parse_one()
                finally:
                    self.parsing = False
                if state != _DONE or self.buf or self.head is not None:
                    self._next()
                return
        self.parser.feed(data)
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
            while (self.buf or self.head) and self.transport is not None:
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
        """Parse and start the first buffered request (or say why not)."""
        parser = self.parser
        req = self.head
        if req is None:
            try:
                event = parser.next_event()
            except RemoteProtocolError:
                return _HANDOFF  # still buffered, whole: aiohttp answers it (a 4xx)
            if event is None:
                return _WAIT
            assert isinstance(event, Request)  # a server-role parser starts with one
            req = self.head = event
            self.target = self._servable(req)
            self.taken = None
        target = self.target
        if target is None:
            return _HANDOFF
        method = _METHODS[req.method]
        if method == _GET and self.pending:
            # A read sees every write before it on the connection and none after it,
            # as when aiohttp serves pipelined requests one at a time: wait.
            return _BLOCKED
        close = not req.keep_alive
        body = self.taken
        if body is None:
            length = req.content_length or 0
            buffered = len(self.buf)
            if buffered < length:
                self.need = length
                return _WAIT
            if close and buffered > length:
                return _HANDOFF  # aiohttp: 400 "Data after `Connection: close`"
            body = parser.take_body()
            assert body is not None  # all of it is buffered
        elif close and self.buf:
            return _HANDOFF  # (as above)
        else:
            self.taken = None
        self.need = 0
        self.head = None
        if close:
            self.closing = True
        slot = _Slot(self, req.target, close or self.fast.draining)
        slot.read = method == _GET
        self.pending.append(slot)
        key, qs = target
        try:
            if method == _PUT:
                self._put(slot, key, qs, req, body)
            elif method == _GET:
                self._get(slot, key, qs)
            else:
                self._delete(slot, key, qs, req)
        except Exception as exc:
            slot.fail(exc)
        return _DONE

    def _servable(self, req: Request) -> tuple[bytes, bytes | None] | None:
        """``(key, query)`` if the fast path serves ``req`` byte for byte as aiohttp would."""
        if req.version != b"1.1" or req.method not in _METHODS or not req.raw.isascii():
            return None  # obs-text in a field: aiohttp decides
        m = _TARGET.match(req.target)
        if m is None:
            return None
        key = m.group(1)
        if key.find(b"/.") >= 0 or key.startswith(b"."):
            return None  # dot segments: let yarl normalise them
        if req.connection and not req.connection <= _PLAIN_CONNECTION:
            return None  # names more hop-by-hop headers
        length = req.content_length or 0
        if length > (MAX_VALUE_BYTES if req.method == b"PUT" else 0):
            return None  # aiohttp's 413, or a body on GET/DELETE: the full path
        singles: set[bytes] = set()
        cid = seq = None
        for _, name, value in req.headers:
            if name in _SLOW_HEADERS:
                return None
            if name in _ONCE:
                if name in singles:
                    return None  # aiohttp: "Duplicate ... header found" (400)
                singles.add(name)
                if name == _CLIENT_ID:
                    cid = value
                elif name == _SEQ:
                    seq = value
        self.session = (cid, seq)
        return key, m.group(2)

    # ---- requests -----------------------------------------------------------------

    def _put(self, slot: _Slot, key_b: bytes, qs: bytes | None, req: Request, body: bytes) -> None:
        """``KVServer.handle_put`` (a body over the limit never gets here)."""
        slot.started = time.perf_counter()
        key = validate_key(key_b.decode())
        if_revision = ttl = None
        if qs:
            q = _query(qs)
            if_revision = opt_int(q.get("if_revision"), "if_revision")
            ttl = opt_int(q.get("ttl"), "ttl")
        session = self.session
        client_id, n = _session(session) if session[0] else ("", 0)
        slot.op = "put"
        slot.cmd = Put(
            key=key,
            value=body,
            if_revision=if_revision,
            ttl_ms=(ttl or 0) * 1000,
            now_ms=int(time.time() * 1000),  # (_now_ms inlined: the hot path)
            client_id=client_id,
            seq=n,
        )
        self.fast.server.submit_write(slot.cmd, slot.write_done)

    def _delete(self, slot: _Slot, key_b: bytes, qs: bytes | None, req: Request) -> None:
        """``KVServer.handle_delete``."""
        slot.started = time.perf_counter()
        key = validate_key(key_b.decode())
        if_revision = opt_int(_query(qs).get("if_revision") if qs else None, "if_revision")
        client_id, n = _session(self.session)
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
        answer = read_answer(key, server.fsm.get(key))
        server._count("get", answer.status, slot.started)
        slot.answer(render(answer, slot.close))

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
        elif (self.buf or self.head) and len(self.buf) >= self.need:
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
        head, self.head = self.head, None
        buf = self.parser.unparsed()
        if head is not None and head.target == _RAW_TARGET and _raw_upgrade(head):
            # a Raft peer asking for the raw stream (dsys.raft.peerwire)
            self.fast.server.node.accept_raw_stream(transport, head.headers, buf)
            return
        if head is not None:  # parsed, not served: aiohttp reads it again
            buf = head.raw + (self.taken or b"") + buf
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
