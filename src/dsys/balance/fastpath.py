"""The proxy's fast path: plain HTTP/1.1 requests forwarded by protocol callbacks.

Most requests through a load balancer are simple: ``GET``/``HEAD``/``OPTIONS``/
``DELETE`` without a body, over HTTP/1.1 keep-alive. For those, going through
aiohttp's server *and* client (two parsers, two header dicts, a task and a dozen
awaits per request) costs several times what forwarding the bytes costs. This
module serves them with two small ``asyncio.Protocol`` classes:

* :class:`_ClientConn` reads a request head, checks it is one it can handle, rewrites
  the headers (hop-by-hop removed, ``X-Forwarded-*``/``Forwarded`` added) and writes
  it to a pooled keep-alive upstream connection chosen by the :class:`Pool`;
* :class:`_UpstreamConn` parses the response head, rewrites it, and forwards the
  body as it arrives (``Content-Length``, ``chunked`` or until-close framing), with
  back-pressure both ways (the upstream is paused while the client cannot take more).

WebSocket handshakes go to :mod:`dsys.balance.splice` (unless ``ws_mode="frames"``).
Anything else — a request body, other ``Upgrade`` s, ``Expect``, HTTP/1.0, the admin
prefix, or anything unusual or malformed — is handed, connection and buffered
bytes included, to aiohttp's request handler, which runs the full proxy path in
:mod:`dsys.balance.proxy` (or answers a clean 4xx). A connection stays with aiohttp
once handed over.

Failures before the response head was forwarded are retried on another endpoint
(all fast-path methods are idempotent and bodiless) while tries and the retry
budget allow; then the client gets a 502/503/504 with a JSON body. Outcomes feed
the pool (peak-EWMA latencies, outlier ejection) and each endpoint's circuit breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from dsys.aiotools import hand_over
from dsys.balance import forwarded
from dsys.balance.splice import Splicer
from dsys.errors import NoHealthyBackendError, RemoteProtocolError
from dsys.http11 import (
    BODY_CHUNKED,
    BODY_UNTIL_CLOSE,
    Data,
    EndOfMessage,
    Header,
    InformationalResponse,
    Parser,
    Request,
    Response,
)

if TYPE_CHECKING:
    from dsys.balance.pool import Lease
    from dsys.balance.proxy import LoadBalancer

_FAST_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE"})
# Request headers never forwarded (hop-by-hop, or replaced by ours).
_DROP_REQUEST = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"forwarded",
    }
)
# Request headers that send the request down the full (aiohttp) path.
_SLOW_REQUEST = frozenset({b"upgrade", b"expect"})
_PLAIN_CONNECTION = frozenset({b"close", b"keep-alive"})
_DROP_RESPONSE = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
MAX_HEAD = 32 * 1024
UPSTREAM_IDLE = 30.0  # seconds an idle upstream connection is kept
MAX_LINE = 8190  # aiohttp's own limit: longer lines go to it for a clean 4xx
HIGH_WATER = 256 * 1024


# A response field that must not be forwarded (the names of _DROP_RESPONSE).
_HOP_BY_HOP_RESPONSE = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-authenticate|proxy-connection|te|trailer|upgrade):",
    re.IGNORECASE,
)
_REASONS = {400: "Bad Request", 413: "Content Too Large", 414: "URI Too Long"}
_REASONS |= {431: "Request Header Fields Too Large", 501: "Not Implemented"}


def _error_response(status: int, reason: str, kind: str, message: str, close: bool) -> bytes:
    body = json.dumps({"error": kind, "message": message}).encode()
    extra = b"Retry-After: 1\r\n" if status == 503 else b""
    conn = b"Connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n"
        % (status, reason.encode(), len(body), extra, conn)
        + body
    )


def _tries_failed(req: _Request) -> str:
    return f"{req.tries} tries failed (last: {req.last_error}); tried {', '.join(req.tried)}"


def _last_chunk(trailers: tuple[Header, ...]) -> bytes:
    """The end of a chunked body: the last chunk and the (validated) trailer fields."""
    return (
        b"0\r\n" + b"".join(raw + b": " + value + b"\r\n" for raw, _, value in trailers) + (b"\r\n")
    )


class FastPath:
    """Accepts client connections and runs the fast path for one :class:`LoadBalancer`.

    Args:
        lb: the load balancer (pool, metrics, config).
        fallback: aiohttp's protocol factory (``AppRunner.server``) for the full path.
    """

    def __init__(self, lb: LoadBalancer, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.lb = lb
        self.pool = lb.pool
        self.fallback = fallback
        self.idle: dict[str, list[_UpstreamConn]] = {}
        self.clients: set[_ClientConn] = set()
        self.draining = False
        self.loop = asyncio.get_running_loop()
        self.max_tries = lb.config.max_tries
        self.timeout = lb.config.timeout
        self.connect_timeout = lb.config.connect_timeout
        self.admin_prefix = (
            (lb.config.admin_prefix + "/").encode() if lb.config.admin_prefix else b""
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._emptied = asyncio.Event()
        lb.fast_in_flight = self.in_flight
        # WebSocket handshakes are spliced (dsys.balance.splice) unless ws_mode is "frames"
        self.splicer = Splicer(self) if lb.config.ws_mode == "splice" else None

    def in_flight(self) -> int:
        """Requests on the fast path right now (O(connections); for metrics scrapes)."""
        return sum(1 for c in self.clients if c.request is not None)

    def forget(self, client: _ClientConn) -> None:
        """A client connection closed or went to aiohttp."""
        self.clients.discard(client)
        if self.draining and not self.clients:
            self._emptied.set()

    def protocol(self) -> _ClientConn:
        """Protocol factory for ``loop.create_server``."""
        return _ClientConn(self)

    def start(self) -> None:
        """Start the once-a-second sweeper (response timeouts, idle keep-alives)."""
        self._sweeper = self.loop.create_task(self._sweep(), name="dsys-balance-sweeper")
        if self.splicer is not None:
            self.splicer.start()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = self.loop.time()
            for c in list(self.clients):
                c.check_timeouts(now)
            for ep, conns in list(self.idle.items()):
                # Close upstream connections idle for long, before servers do (racing).
                keep = [u for u in conns if not u.closed and now - u.idle_since < UPSTREAM_IDLE]
                for u in conns:
                    if not u.closed and now - u.idle_since >= UPSTREAM_IDLE:
                        u.close()
                if keep:
                    self.idle[ep] = keep
                else:
                    del self.idle[ep]

    async def drain(self, deadline: float) -> None:
        """Graceful stop: close idle clients, let in-flight requests finish until ``deadline``."""
        self.draining = True
        tunnels = self.splicer.drain(deadline) if self.splicer is not None else None
        for c in list(self.clients):
            if c.request is None:
                c.close()
        if self.clients:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), max(deadline - self.loop.time(), 0))
        for c in list(self.clients):
            c.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conns in self.idle.values():
            for u in conns:
                u.close()
        self.idle.clear()
        if tunnels is not None:
            await tunnels

    def checkout(self, ep: str) -> _UpstreamConn | None:
        """An idle keep-alive connection to ``ep`` (most recently used first), if any."""
        conns = self.idle.get(ep)
        while conns:
            u = conns.pop()
            if not u.closed:
                return u
        return None

    def checkin(self, u: _UpstreamConn) -> None:
        """Keep ``u`` for reuse (at most 512 idle per endpoint), or close it."""
        if self.draining or u.closed:
            u.close()
            return
        conns = self.idle.setdefault(u.endpoint, [])
        if len(conns) >= 512:
            u.close()
        else:
            u.reused = True
            u.idle_since = self.loop.time()
            conns.append(u)


class _Request:
    """One request on the fast path."""

    __slots__ = (
        "close_after",
        "head",
        "is_head",
        "last_error",
        "lease",
        "method",
        "recorded",
        "sent_head",
        "started",
        "tried",
        "tries",
        "upstream",
    )

    def __init__(self, method: bytes, head: bytes, close_after: bool) -> None:
        self.method = method
        self.head = head
        self.is_head = method == b"HEAD"
        self.close_after = close_after
        self.lease: Lease | None = None
        self.upstream: _UpstreamConn | None = None
        self.sent_head = False
        self.started = 0.0
        self.tried: list[str] = []
        self.tries = 0
        self.last_error = ""
        self.recorded = False  # counted in the retry budget's requests


class _ClientConn(asyncio.Protocol):
    """A client connection: parses request heads, forwards simple ones, hands off the rest."""

    __slots__ = (
        "buf",
        "fast",
        "fwd",
        "idle_since",
        "last_host",
        "parser",
        "paused",
        "peer",
        "request",
        "transport",
        "xff",
    )

    def __init__(self, fast: FastPath) -> None:
        self.fast = fast
        self.parser = Parser(max_head=MAX_HEAD)
        self.buf = self.parser.buffer  # for len(): what is buffered and not parsed
        # the X-Forwarded-*/Forwarded lines for the last Host (when the request had none)
        self.last_host: tuple[bytes | None, bytes] = (None, b"")
        self.request: _Request | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.peer = "unknown"
        self.xff = b"unknown"  # the peer as X-Forwarded-For lists it
        self.fwd = b"for=unknown;proto=http"  # the start of our Forwarded element
        self.idle_since = fast.loop.time()

    # ---- asyncio callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0])
        self.xff = forwarded.x_forwarded_for(None, self.peer)
        self.fwd = forwarded.prefix(self.peer, "http")
        self.fast.clients.add(self)

    def data_received(self, data: bytes) -> None:
        if self.request is None and not self.buf:
            # The common case, a whole request in one read, in one parser call.
            got = self.parser.try_request(data)
            if got is not None:
                self._start(*got)
                return
        self.parser.feed(data)
        if self.request is None:
            self._next()
        elif len(self.buf) > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()  # pipelined bytes pile up: wait

    def connection_lost(self, exc: Exception | None) -> None:
        self.fast.forget(self)
        req, self.request = self.request, None
        self.transport = None
        if req is not None:
            u = req.upstream
            if u is not None:
                u.client = None
                u.close()  # the answer has nowhere to go: do not reuse
            if req.lease is not None:
                self.fast.pool.release_neutral(req.lease)

    def pause_writing(self) -> None:
        self.paused = True
        req = self.request
        if req is not None and req.upstream is not None and req.upstream.transport is not None:
            req.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        req = self.request
        if req is not None and req.upstream is not None and req.upstream.transport is not None:
            req.upstream.transport.resume_reading()

    # ---- request handling ---------------------------------------------------------

    def _next(self) -> None:
        """Start the next buffered request, if a complete head is there.

        Parse, then forward, hand off or refuse: a request the strict parser rejects
        gets a 4xx here and the connection closes (its framing cannot be trusted); a
        valid one the fast path does not serve (a body, ``Upgrade``, HTTP/1.0, the
        admin prefix...) goes whole to aiohttp.
        """
        parser = self.parser
        try:
            event = parser.next_event()
        except RemoteProtocolError as exc:
            self._reject(exc)
            return
        if event is None:
            return
        assert isinstance(event, Request)  # a server-role parser starts with one
        self._start(event, None)

    def _start(self, event: Request, body: bytes | None) -> None:
        """Forward, splice or hand off a parsed request; ``body``: what
        :meth:`~dsys.http11.Parser.try_request` took of its body (``None``: not taken)."""
        splicer = self.fast.splicer
        if b"upgrade" in event.connection and splicer is not None and splicer.take(self, event):
            return  # a WebSocket handshake: spliced (dsys.balance.splice)
        head = self._upstream_head(event)
        if head is None:
            if body:  # taken from the parser already: aiohttp reads it again
                self._handoff(event, body)
            else:
                self._handoff(event)
            return
        if body is None:
            end = self.parser.next_event()  # a bodiless request: its end is already known
            assert isinstance(end, EndOfMessage)
        req = _Request(event.method, head, not event.keep_alive)
        self.request = req
        self._dispatch(req)

    def _upstream_head(self, r: Request) -> bytes | None:
        """The head to send upstream, or ``None`` if the full path must serve ``r``.

        Rendered from the parsed fields: hop-by-hop fields dropped, ``X-Forwarded-*``
        and ``Forwarded`` built from validated values only (:mod:`dsys.balance.forwarded`).
        """
        fast = self.fast
        if (
            r.version != b"1.1"
            or r.method not in _FAST_METHODS
            or r.content_length is not None
            or r.chunked
            or not r.target.startswith(b"/")
            or (fast.admin_prefix and r.target.startswith(fast.admin_prefix))
            or (r.connection and not r.connection <= _PLAIN_CONNECTION)
            or fast.draining
        ):
            return None
        out = [b"%s %s HTTP/1.1" % (r.method, r.target)]
        xff: bytes | None = None
        fwd: bytes | None = None
        has_xfh = False
        for raw_name, name, value in r.headers:
            if name in _DROP_REQUEST:
                if name == b"x-forwarded-for":
                    xff = value if xff is None else xff + b", " + value
                elif name == b"forwarded":
                    fwd = value if fwd is None else fwd + b", " + value
                continue
            if name in _SLOW_REQUEST:
                return None
            if name == b"x-forwarded-host":
                has_xfh = True
            out.append(raw_name + b": " + value)
        host = r.host or b""  # the parser checked it is one valid uri-host[:port]
        if xff is None and fwd is None and not has_xfh:  # the common case: ours alone
            last, tail = self.last_host
            if last != host:  # (a connection usually sends one Host)
                tail = (
                    b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\n%sForwarded: %s\r\n\r\n"
                    % (
                        self.xff,
                        b"X-Forwarded-Host: %s\r\n" % host if host else b"",
                        forwarded.element_of(self.fwd, host),
                    )
                )
                self.last_host = (host, tail)
            out.append(tail)
            return b"\r\n".join(out)
        out.append(
            b"X-Forwarded-For: "
            + (forwarded.x_forwarded_for(xff, self.peer) if xff is not None else self.xff)
        )
        out.append(b"X-Forwarded-Proto: http")
        if not has_xfh and host:
            out.append(b"X-Forwarded-Host: " + host)
        mine = forwarded.element_of(self.fwd, host)
        out.append(b"Forwarded: " + forwarded.forwarded(fwd, mine))
        out.append(b"\r\n")
        return b"\r\n".join(out)

    def _reject(self, exc: RemoteProtocolError) -> None:
        """Answer a request the parser refused, then close: its framing is unknowable."""
        status = exc.status_hint
        reason = _REASONS.get(status, "Bad Request")
        self.fast.lb._errors.labels(str(status)).inc()
        if self.transport is not None:
            self.transport.write(_error_response(status, reason, "bad_request", str(exc), True))
        self.close()

    def _handoff(self, head: Request | None = None, body: bytes = b"") -> None:
        """Give the connection (the parsed ``head``, its ``body`` when taken from the
        parser, and the rest) to aiohttp's full path."""
        transport = self.transport
        if transport is None:
            return
        self.fast.forget(self)
        self.transport = None
        buf = self.parser.unparsed()
        if head is not None:
            buf = head.raw + body + buf
        hand_over(transport, self.fast.fallback(), buf)

    def _dispatch(self, req: _Request) -> None:
        fast = self.fast
        while True:
            if req.tries >= fast.max_tries or (
                req.tries and not fast.lb.budget.try_spend(fast.pool.clock.now())
            ):
                self._fail(502, "Bad Gateway", "bad_gateway", _tries_failed(req))
                return
            if req.tries:
                fast.lb._retries.inc()
            elif not req.recorded:
                req.recorded = True
                fast.lb.budget.record_request(fast.pool.clock.now())
            try:
                lease = fast.pool.acquire(exclude=req.tried)
            except NoHealthyBackendError as exc:
                if req.tries:
                    self._fail(502, "Bad Gateway", "bad_gateway", _tries_failed(req))
                else:
                    self._fail(503, "Service Unavailable", "no_healthy_backend", str(exc))
                return
            req.tries += 1
            req.lease = lease
            req.tried.append(lease.endpoint)
            req.started = fast.loop.time()
            u = fast.checkout(lease.endpoint)
            if u is None:
                fast.loop.create_task(self._connect(req, lease.endpoint))
                return
            u.send(self, req)
            return

    async def _connect(self, req: _Request, ep: str) -> None:
        fast = self.fast
        host, _, port = ep.rpartition("//")[2].rpartition(":")
        host = host.strip("[]")
        try:
            async with asyncio.timeout(fast.connect_timeout):
                _, u = await fast.loop.create_connection(
                    lambda: _UpstreamConn(fast, ep), host, int(port)
                )
        except (OSError, TimeoutError) as exc:
            self.upstream_failed(req, f"{ep}: cannot connect: {exc}")
            return
        if self.request is not req:  # the client left meanwhile
            fast.checkin(u)
            return
        u.send(self, req)

    def upstream_failed(self, req: _Request, error: str, *, stale: bool = False) -> None:
        """A try failed before the response head was forwarded: maybe retry.

        ``stale``: a reused keep-alive connection was closed by the server before it
        answered (a race every HTTP client meets); retried without blaming the endpoint.
        """
        fast = self.fast
        lease, req.lease, req.upstream = req.lease, None, None
        req.last_error = error
        if lease is not None:
            if stale:
                fast.pool.release_neutral(lease)
                req.tries -= 1  # a free retry, bounded by the idle connections
                req.tried.remove(lease.endpoint)
            else:
                fast.pool.release(lease, ok=False, error=error, feed_breaker=True)
                fast.lb._count(lease.endpoint, 0, 0.0)
        if self.request is not req or self.transport is None:
            return
        self._dispatch(req)

    def _fail(self, status: int, reason: str, kind: str, message: str) -> None:
        self.fast.lb._errors.labels(str(status)).inc()
        req = self.request
        close = req is None or req.close_after or self.fast.draining
        if self.transport is not None:
            self.transport.write(_error_response(status, reason, kind, message, close))
        self.finish(close)

    def finish(self, close: bool) -> None:
        """The current request is done; go on with the next or close."""
        self.request = None
        self.idle_since = self.fast.loop.time()
        if self.transport is None:
            return
        if close or self.fast.draining:
            self.close()
            return
        if self.buf:
            self.transport.resume_reading()
            self._next()

    def check_timeouts(self, now: float) -> None:
        req = self.request
        if req is None:
            if now - self.idle_since > 75.0:
                self.close()
            return
        if req.upstream is not None and not req.sent_head and now - req.started > self.fast.timeout:
            u, req.upstream = req.upstream, None
            u.client = None
            u.close()
            lease, req.lease = req.lease, None
            if lease is not None:
                self.fast.pool.release(lease, ok=False, error="timeout", feed_breaker=True)
                self.fast.lb._count(lease.endpoint, 0, 0.0)
            self._fail(
                504,
                "Gateway Timeout",
                "upstream_timeout",
                f"no response within {self.fast.timeout} s",
            )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _UpstreamConn(asyncio.Protocol):
    """A keep-alive connection to one endpoint, carrying one request at a time.

    Its bytes go through a client-role :class:`~dsys.http11.Parser`: interim 1xx
    answers are skipped, the final head is rendered again (hop-by-hop fields dropped),
    and the body is forwarded as parsed: as it came for ``Content-Length`` framing,
    re-chunked from the decoded data (extensions dropped) for ``chunked``.
    """

    __slots__ = (
        "buf",
        "chunked",
        "client",
        "closed",
        "endpoint",
        "fast",
        "got_bytes",
        "idle_since",
        "keep_alive",
        "parser",
        "req",
        "reused",
        "status",
        "transport",
        "until_close",
    )

    def __init__(self, fast: FastPath, endpoint: str) -> None:
        self.fast = fast
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.client: _ClientConn | None = None
        self.req: _Request | None = None
        self.closed = False
        self.parser = Parser(client=True, max_head=MAX_HEAD)
        self.buf = self.parser.buffer  # for len(): what is buffered and not parsed
        self.chunked = False  # the body being forwarded is re-chunked
        self.until_close = False  # the body being forwarded ends with the connection
        self.keep_alive = True
        self.status = 0
        self.reused = False  # it served a request before this one
        self.got_bytes = False  # bytes arrived for the current request
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, client: _ClientConn, req: _Request) -> None:
        self.client = client
        self.req = req
        req.upstream = self
        self.parser.expect_response(req.method)
        self.chunked = self.until_close = False
        self.keep_alive = True
        self.got_bytes = False
        assert self.transport is not None
        self.transport.write(req.head)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        client, req = self.client, self.req
        if client is None or req is None or client.request is not req:
            self.client = self.req = None
            return
        if self.until_close:  # the end of the body is the end of the connection
            self.parser.feed_eof()
            self._events(client, req)
            return
        self.client = self.req = None
        if req.sent_head:
            self._broken(client, req, "upstream broke off its response")
            return
        stale = self.reused and not self.got_bytes
        client.upstream_failed(req, f"{self.endpoint}: connection dropped", stale=stale)

    def data_received(self, data: bytes) -> None:
        client, req = self.client, self.req
        if client is None or req is None:
            self.close()  # bytes nobody asked for
            return
        self.got_bytes = True
        if not req.sent_head and not self.buf:
            # The common answer, head and body in one read, in one parser call.
            got = self.parser.try_response(data)
            if got is not None:
                resp, body = got
                head = self._head(req, resp, True)
                if body is not None:
                    self._finish(client, req, [head, body])
                    return
                if client.transport is not None:
                    client.transport.write(head)
                self._events(client, req)
                return
        self.parser.feed(data)
        self._events(client, req)

    def _events(self, client: _ClientConn, req: _Request) -> None:
        """Forward what the parser makes of the bytes received so far."""
        parser = self.parser
        out: list[bytes] = []
        try:
            while True:
                if not req.sent_head:
                    event = parser.next_event()
                    if event is None:
                        break
                    if type(event) is InformationalResponse:
                        continue  # 100 Continue, 103 Early Hints: not the answer, not a failure
                    assert type(event) is Response
                    out.append(self._head(req, event))
                if not self.chunked and not self.until_close:
                    body = parser.take_body()  # the whole Content-Length body at once
                    if body is not None:
                        out.append(body)
                        self._finish(client, req, out)
                        return
                event = parser.next_event()
                if event is None:
                    break
                if type(event) is Data:
                    if self.chunked:
                        out.append(b"%x\r\n%s\r\n" % (len(event.data), event.data))
                    else:
                        out.append(event.data)
                    continue
                assert type(event) is EndOfMessage
                if self.chunked:
                    out.append(_last_chunk(event.trailers))
                self._finish(client, req, out)
                return
        except RemoteProtocolError as exc:
            if out and client.transport is not None:
                client.transport.write(b"".join(out))
            if req.sent_head:
                self.client = self.req = None
                self.close()
                self._broken(client, req, f"malformed response body: {exc}")
            else:
                self._bad(client, req, f"malformed response: {exc}")
            return
        if out and client.transport is not None:
            client.transport.write(b"".join(out))

    def _finish(self, client: _ClientConn, req: _Request, out: list[bytes]) -> None:
        """The whole response is parsed: send what is left of it, then go on."""
        if self.buf:
            self.keep_alive = False  # bytes past the answer: do not trust the connection
        if client.transport is not None:
            client.transport.write(b"".join(out))
        self._done(client, req)

    def _broken(self, client: _ClientConn, req: _Request, why: str) -> None:
        """The answer broke off after its head went out: cut the client (it sees a
        truncated response) and blame the endpoint."""
        lease, req.lease = req.lease, None
        if lease is not None:
            self.fast.pool.release(lease, ok=False, error=why, feed_breaker=True)
        client.request = None
        client.abort()

    def _bad(self, client: _ClientConn, req: _Request, why: str) -> None:
        self.client = self.req = None
        self.close()
        client.upstream_failed(req, f"{self.endpoint}: {why}")

    def _head(self, req: _Request, resp: Response, plain: bool = False) -> bytes:
        """Set up the body's forwarding; return the head to send, blank line included.

        ``plain``: ``resp`` is known to have no hop-by-hop field (from ``try_response``).
        """
        status = resp.status
        self.status = status
        self.chunked = resp.body == BODY_CHUNKED
        if resp.body == BODY_UNTIL_CLOSE:
            self.until_close = True
            req.close_after = True
        if not resp.keep_alive:
            self.keep_alive = False
        req.sent_head = True
        fast = self.fast
        lease = req.lease
        if lease is not None:
            fast.lb._count(lease.endpoint, status, fast.loop.time() - req.started)
        close = req.close_after or fast.draining
        if resp.version == b"1.1" and (
            plain or (not resp.connection and _HOP_BY_HOP_RESPONSE.search(resp.raw) is None)
        ):
            # The common answer (HTTP/1.1, nothing hop-by-hop): its head as it came,
            # which the parser validated field by field.
            head = resp.raw[:-2]
        else:
            drop = _DROP_RESPONSE | resp.connection
            lines = [b"HTTP/1.1 %d %s" % (status, resp.reason)]
            lines += [raw + b": " + value for raw, name, value in resp.headers if name not in drop]
            head = b"\r\n".join(lines) + b"\r\n"
        if close:
            return head + b"Connection: close\r\n\r\n"
        return head + b"\r\n"

    def _done(self, client: _ClientConn, req: _Request) -> None:
        fast = self.fast
        self.client = self.req = None
        req.upstream = None
        lease, req.lease = req.lease, None
        if lease is not None:
            status = self.status
            fast.pool.release(
                lease,
                ok=status < 500,
                error="" if status < 500 else f"status {status}",
                feed_breaker=True,
            )
        if self.keep_alive and not self.closed:
            if self.transport is not None:
                self.transport.resume_reading()
            fast.checkin(self)
        else:
            self.close()
        if client.request is req:
            client.finish(req.close_after)


__all__ = ["FastPath"]
