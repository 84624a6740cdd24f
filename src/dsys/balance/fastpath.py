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

Anything else — a request body, ``Upgrade``, ``Expect``, HTTP/1.0, the admin
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
from dsys.errors import NoHealthyBackendError

if TYPE_CHECKING:
    from dsys.balance.pool import Lease
    from dsys.balance.proxy import LoadBalancer

_FAST_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE"})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_GOOD_NAMES: set[bytes] = set()  # lower-cased header names already checked by _TOKEN
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
_SLOW_REQUEST = frozenset({b"transfer-encoding", b"upgrade", b"expect", b"content-length"})
_DROP_RESPONSE = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-connection", b"te", b"upgrade"}
)
MAX_HEAD = 32 * 1024
UPSTREAM_IDLE = 30.0  # seconds an idle upstream connection is kept
MAX_LINE = 8190  # aiohttp's own limit: longer lines go to it for a clean 4xx
HIGH_WATER = 256 * 1024


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
        "paused",
        "peer",
        "request",
        "transport",
        "xff",
    )

    def __init__(self, fast: FastPath) -> None:
        self.fast = fast
        self.buf = b""
        self.request: _Request | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.peer = b"unknown"
        self.xff = b""
        self.fwd = b""
        self.idle_since = fast.loop.time()

    # ---- asyncio callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0]).encode()
        node = b'"[' + self.peer + b']"' if b":" in self.peer else self.peer
        self.fwd = b"for=" + node + b";proto=http"
        self.fast.clients.add(self)

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
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
        """Start the next buffered request, if a complete head is there."""
        buf = self.buf
        if not buf:
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            # Not a whole head yet. Let aiohttp judge (and answer) anything that does
            # not start like a request line, so garbage gets its 400 at once.
            if len(buf) > MAX_HEAD or not 65 <= buf[0] <= 90:
                self._handoff()
            return
        head = buf[:end]
        n_lines = head.count(b"\r\n")
        if head.count(b"\n") != n_lines or head.count(b"\r") != n_lines or b"\0" in head:
            self._handoff()  # bare CR/LF or NUL: aiohttp answers 400 with the reason
            return
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if (
            len(parts) != 3
            or len(lines[0]) > MAX_LINE
            or parts[2] != b"HTTP/1.1"
            or parts[0] not in _FAST_METHODS
            or not parts[1].startswith(b"/")
            or (self.fast.admin_prefix and parts[1].startswith(self.fast.admin_prefix))
            or self.fast.draining
        ):
            self._handoff()
            return
        out = [lines[0]]
        host = b""
        xff = b""
        fwd = b""
        close_after = False
        has_xfh = False
        for line in lines[1:]:
            colon = line.find(b":")
            if colon <= 0 or len(line) > MAX_LINE:
                self._handoff()  # aiohttp answers 400/431 with the reason
                return
            name = line[:colon]
            lname = name.lower()
            if lname in _DROP_REQUEST or lname in _SLOW_REQUEST:
                if lname in _SLOW_REQUEST:
                    self._handoff()
                    return
                value = line[colon + 1 :].strip()
                if lname == b"connection":
                    tokens = {t.strip().lower() for t in value.split(b",")}
                    if b"close" in tokens:
                        close_after = True
                    if tokens - {b"close", b"keep-alive", b""}:
                        self._handoff()  # names further hop-by-hop headers: full path
                        return
                elif lname == b"x-forwarded-for":
                    xff = value
                elif lname == b"forwarded":
                    fwd = value
                continue
            if lname not in _GOOD_NAMES:
                if not _TOKEN.match(name):
                    self._handoff()
                    return
                if len(_GOOD_NAMES) < 4096:
                    _GOOD_NAMES.add(lname)
            if lname == b"host":
                host = line[colon + 1 :].strip()
            elif lname == b"x-forwarded-host":
                has_xfh = True
            out.append(line)
        if not host:
            self._handoff()
            return
        self.buf = buf[end + 4 :]
        peer = self.peer
        out.append(b"X-Forwarded-For: " + (xff + b", " + peer if xff else peer))
        out.append(b"X-Forwarded-Proto: http")
        if not has_xfh:
            out.append(b"X-Forwarded-Host: " + host)
        f = self.fwd + b';host="' + host + b'"'
        out.append(b"Forwarded: " + (fwd + b", " + f if fwd else f))
        out.append(b"\r\n")
        req = _Request(parts[0], b"\r\n".join(out), close_after)
        self.request = req
        self._dispatch(req)

    def _handoff(self) -> None:
        """Give the connection (and its unparsed bytes) to aiohttp's full path."""
        transport = self.transport
        if transport is None:
            return
        self.fast.forget(self)
        self.transport = None
        buf, self.buf = self.buf, b""
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
    """A keep-alive connection to one endpoint, carrying one request at a time."""

    __slots__ = (
        "buf",
        "chunk_left",
        "chunk_state",
        "client",
        "closed",
        "endpoint",
        "fast",
        "got_bytes",
        "idle_since",
        "keep_alive",
        "left",
        "mode",
        "req",
        "reused",
        "status",
        "transport",
    )

    def __init__(self, fast: FastPath, endpoint: str) -> None:
        self.fast = fast
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.client: _ClientConn | None = None
        self.req: _Request | None = None
        self.closed = False
        self.buf = b""
        self.mode = 0  # 0 head, 1 length, 2 chunked, 3 until close
        self.left = 0
        self.chunk_state = 0  # 0 size line, 1 data, 2 data CRLF, 3 trailer lines
        self.chunk_left = 0
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
        self.mode = 0
        self.buf = b""
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
        self.client = self.req = None
        if client is None or req is None or client.request is not req:
            return
        if self.mode == 3:  # until-close framing: this is the end of the body
            self._done(client, req)
            return
        if req.sent_head:
            # Broken off mid-body: cut the client so it sees a truncated answer.
            lease, req.lease = req.lease, None
            if lease is not None:
                self.fast.pool.release(
                    lease, ok=False, error="upstream broke off its response", feed_breaker=True
                )
            client.request = None
            client.abort()
            return
        stale = self.reused and not self.got_bytes
        client.upstream_failed(req, f"{self.endpoint}: connection dropped", stale=stale)

    def data_received(self, data: bytes) -> None:
        client, req = self.client, self.req
        if client is None or req is None:
            self.close()  # bytes nobody asked for
            return
        self.got_bytes = True
        if self.mode == 0:
            buf = self.buf + data if self.buf else data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._bad(client, req, "response head too large")
                else:
                    self.buf = buf
                return
            self.buf = b""
            head = self._head(client, req, buf[:end])
            if head is None:
                return
            data = buf[end + 4 :]
            if self.mode == 0 or not data:  # no body, or none arrived yet
                if client.transport is not None:
                    client.transport.write(head)
                if self.mode == 0:
                    self._done(client, req)
                return
            self._body(client, req, data, head)  # head and body in one write
            return
        self._body(client, req, data, b"")

    def _bad(self, client: _ClientConn, req: _Request, why: str) -> None:
        self.client = self.req = None
        self.close()
        client.upstream_failed(req, f"{self.endpoint}: {why}")

    def _head(self, client: _ClientConn, req: _Request, head: bytes) -> bytes | None:
        """Parse and rewrite the response head; ``None`` if it was bad (already handled)."""
        low = head.lower()
        if (
            b"\r\nconnection:" not in low
            and b"\r\nkeep-alive:" not in low
            and b"\r\ntransfer-encoding:" not in low
            and b"\r\nupgrade:" not in low
            and b"\r\nproxy-" not in low
            and b"\r\nte:" not in low
            and low.count(b"\r\ncontent-length:") == 1
            and low.count(b"\n") == low.count(b"\r\n")
            and low.startswith(b"http/1.1 ")
        ):
            # The common answer (HTTP/1.1, one Content-Length, nothing hop-by-hop):
            # forwarded as it is, without splitting it into lines.
            i = low.find(b"\r\ncontent-length:") + 17
            j = low.find(b"\r\n", i)
            try:
                status = int(head[9:12])
                length = int(head[i:] if j < 0 else head[i:j])
            except ValueError:
                status = length = -1
            if status >= 200 and length >= 0:
                return self._framed(client, req, status, length, False, head)
        lines = head.split(b"\r\n")
        status_line = lines[0]
        try:
            status = int(status_line[9:12])
        except ValueError:
            self._bad(client, req, "malformed status line")
            return None
        if not status_line.startswith(b"HTTP/1.") or status < 200:
            self._bad(client, req, f"unexpected status line {status_line[:40]!r}")
            return None
        out = [status_line]
        length = -1
        chunked = False
        for line in lines[1:]:
            colon = line.find(b":")
            if colon <= 0:
                self._bad(client, req, "malformed response header")
                return None
            lname = line[:colon].lower()
            if lname in _DROP_RESPONSE:
                if lname == b"connection" and b"close" in line[colon + 1 :].lower():
                    self.keep_alive = False
                continue
            if lname == b"content-length":
                try:
                    length = int(line[colon + 1 :])
                except ValueError:
                    self._bad(client, req, "malformed Content-Length")
                    return None
            elif lname == b"transfer-encoding":
                chunked = b"chunked" in line[colon + 1 :].lower()
            out.append(line)
        if status_line.startswith(b"HTTP/1.0"):
            self.keep_alive = False
        return self._framed(client, req, status, length, chunked, b"\r\n".join(out))

    def _framed(
        self,
        client: _ClientConn,
        req: _Request,
        status: int,
        length: int,
        chunked: bool,
        head: bytes,
    ) -> bytes:
        """Set up body framing; return the head to send, blank line included."""
        self.status = status
        if req.is_head or status in (204, 304):
            self.mode = 0
        elif chunked:
            self.mode, self.chunk_state, self.chunk_left = 2, 0, 0
        elif length >= 0:
            self.mode, self.left = 1, length
            if length == 0:
                self.mode = 0
        else:
            self.mode = 3
            self.keep_alive = False
            req.close_after = True
        req.sent_head = True
        fast = self.fast
        lease = req.lease
        if lease is not None:
            fast.lb._count(lease.endpoint, status, fast.loop.time() - req.started)
        if req.close_after or fast.draining:
            return head + b"\r\nConnection: close\r\n\r\n"
        return head + b"\r\n\r\n"

    def _body(self, client: _ClientConn, req: _Request, data: bytes, head: bytes) -> None:
        """Forward body bytes (after ``head``, when it is still unsent) to the client."""
        transport = client.transport
        if self.mode == 1:
            n = len(data)
            if n >= self.left:
                extra = n > self.left
                piece = data[: self.left] if extra else data
                if transport is not None:
                    transport.write(head + piece if head else piece)
                self.left = 0
                if extra:
                    self.keep_alive = False  # bytes past the body: do not trust it
                self._done(client, req)
                return
            self.left -= n
            if transport is not None:
                transport.write(head + data if head else data)
            return
        if self.mode == 3:
            if transport is not None:
                transport.write(head + data if head else data)
            return
        # chunked: forward bytes as they are, tracking where the message ends
        end = self._scan_chunked(data)
        if end == -2:
            self.keep_alive = False
            if transport is not None:
                transport.write(head + data if head else data)
            self.close()
            client.request = None
            client.abort()
            return
        piece = data if end < 0 else data[:end]
        if transport is not None:
            transport.write(head + piece if head else piece)
        if end >= 0:
            if end < len(data):
                self.keep_alive = False
            self._done(client, req)

    def _scan_chunked(self, data: bytes) -> int:
        """Advance the chunked-framing state over ``data``.

        Returns:
            the offset just past the end of the message, -1 if it continues, -2 if
            the framing is broken.
        """
        i = 0
        n = len(data)
        buf = self.buf
        while i < n:
            st = self.chunk_state
            if st == 1:
                take = min(self.chunk_left, n - i)
                self.chunk_left -= take
                i += take
                if self.chunk_left == 0:
                    self.chunk_state = 2
                    self.chunk_left = 2
                continue
            if st == 2:
                take = min(self.chunk_left, n - i)
                self.chunk_left -= take
                i += take
                if self.chunk_left == 0:
                    self.chunk_state = 0
                continue
            # size line (0) or trailer lines (3): accumulate up to CRLF
            j = data.find(b"\n", i)
            if j < 0:
                buf += data[i:]
                if len(buf) > 4096:
                    return -2
                self.buf = buf
                return -1
            line = (buf + data[i:j]).rstrip(b"\r")
            buf = b""
            i = j + 1
            if st == 0:
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    return -2
                if size == 0:
                    self.chunk_state = 3
                else:
                    self.chunk_state, self.chunk_left = 1, size
            elif not line:  # empty line after the trailers: the end
                self.buf = b""
                return i
        self.buf = buf
        return -1

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
