"""WebSocket pass-through as a byte splice (as nginx does with ``proxy_pass`` + ``Upgrade``).

The fast path (:mod:`dsys.balance.fastpath`) gives a request here when it asks to switch
to WebSocket (``Connection: upgrade`` and ``Upgrade: websocket``). Then:

1. The handshake fields are checked strictly (RFC 6455 4.1, 4.2.1): ``GET`` over
   HTTP/1.1 to an origin-form target, no body, one ``Upgrade``, one
   ``Sec-WebSocket-Key`` that is the base64 of 16 bytes and one
   ``Sec-WebSocket-Version: 13``. Otherwise the client gets a 400 (a 426 naming
   version 13 for another version) and the connection closes.
2. An endpoint is leased from the :class:`~dsys.balance.pool.Pool` (strategy, health,
   ejection, circuit breakers and the retry budget, as for any request), a plain TCP
   connection is opened to it and the request head is sent rewritten as the fast path
   rewrites heads: hop-by-hop fields dropped, except ``Upgrade: websocket`` and
   ``Connection: Upgrade`` which the handshake needs; ``X-Forwarded-*`` and
   ``Forwarded`` built from validated values (:mod:`dsys.balance.forwarded`).
3. The answer's head is read with a client-role :class:`~dsys.http11.Parser`. A ``101``
   with ``Upgrade: websocket``, ``Connection: upgrade`` and the right
   ``Sec-WebSocket-Accept`` is forwarded and both connections switch to pipe mode. A
   connect error, a dropped connection, a malformed answer or a 5xx is tried on another
   endpoint while tries and the retry budget allow (nothing reached the client yet);
   then 502 (503 when no endpoint is eligible, 504 when the answer takes longer than
   ``timeout``). Any other answer (a 403, say) is forwarded as it is, then both
   connections close.
4. Pipe mode: bytes from either side are written to the other unchanged, frames are
   never looked at. Back-pressure both ways: when one side's write buffer goes above
   :data:`HIGH_WATER`, reading from the other side pauses until it drains below
   :data:`LOW_WATER`. An EOF is forwarded (``write_eof``); both connections close once
   both sides sent EOF, :data:`EOF_GRACE` seconds after the first EOF, or as soon as
   either connection is lost (closed or reset).

A tunnel holds its lease for its whole life, so it counts as outstanding for the
strategies (least-outstanding spreads connections); the latency the pool learns is the
handshake's, not the tunnel's lifetime. Each tunnel is logged when opened and closed
(endpoint, bytes each way, duration) and counted in ``/metrics``
(``dsys_balance_ws_tunnels``, ``dsys_balance_ws_tunnels_opened_total``,
``dsys_balance_ws_tunnel_bytes_total{direction="up"|"down"}``, up being client to
backend). An idle timeout (``ProxyConfig.ws_idle_timeout``) is off by default.

Graceful shutdown gives tunnels up to ``shutdown_timeout`` seconds to end by
themselves, then closes their TCP connections: nothing is written into the streams (a
close frame could land in the middle of a frame the proxy knows nothing about).

What splice mode does not do, and frames mode (``ws_mode="frames"``, aiohttp on both
sides) does: limit message sizes, filter subprotocols and extensions (here they are
negotiated end to end, ``permessage-deflate`` included), send a 1001 close frame on
shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NoReturn, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dsys.balance import forwarded
from dsys.errors import NoHealthyBackendError, RemoteProtocolError
from dsys.http11 import (
    BODY_LENGTH,
    Data,
    EndOfMessage,
    Header,
    InformationalResponse,
    Parser,
    Request,
    Response,
)

if TYPE_CHECKING:
    from dsys.balance.fastpath import FastPath, _ClientConn
    from dsys.balance.pool import Lease

HIGH_WATER = 256 * 1024
"""A side's write buffer above this many bytes pauses reading from the other side."""
LOW_WATER = 64 * 1024
"""...and reading resumes once it drained below this many."""
EOF_GRACE = 5.0
"""Seconds a tunnel stays half-closed (or closing with unsent bytes) before it is cut."""
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""RFC 6455's constant for ``Sec-WebSocket-Accept``."""

# Request fields not forwarded (hop-by-hop, or replaced by ours); Upgrade and Connection
# are sent again as "Upgrade: websocket" and "Connection: Upgrade".
_DROP_REQUEST = frozenset(
    {
        b"connection",
        b"content-length",
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
_DROP_RESPONSE = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REASONS = {400: "Bad Request", 426: "Upgrade Required", 502: "Bad Gateway"}
_REASONS |= {503: "Service Unavailable", 504: "Gateway Timeout"}


# ---- the handshake (pure) --------------------------------------------------------------


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def _values(headers: tuple[Header, ...], name: bytes) -> list[bytes]:
    return [v for _, n, v in headers if n == name]


def is_websocket_upgrade(r: Request) -> bool:
    """Whether ``r`` asks to switch to WebSocket (``Connection: upgrade``, ``Upgrade:
    websocket``)."""
    if b"upgrade" not in r.connection:
        return False
    return any(b"websocket" in _tokens(v) for v in _values(r.headers, b"upgrade"))


def handshake_error(r: Request) -> tuple[int, str] | None:
    """Why ``r`` is not a valid WebSocket opening handshake: ``(status, message)``, or
    ``None`` when it is one (RFC 6455 section 4.2.1, checked strictly)."""
    if r.method != b"GET" or r.version != b"1.1":
        return 400, "a WebSocket handshake is a GET over HTTP/1.1"
    if not r.target.startswith(b"/"):
        return 400, "a WebSocket handshake needs an origin-form target (/path)"
    if r.chunked or r.content_length:
        return 400, "a WebSocket handshake has no body"
    if len(_values(r.headers, b"upgrade")) != 1:
        return 400, "a WebSocket handshake has exactly one Upgrade field"
    keys = _values(r.headers, b"sec-websocket-key")
    if len(keys) != 1:
        return 400, "a WebSocket handshake has exactly one Sec-WebSocket-Key"
    try:
        nonce = base64.b64decode(keys[0], validate=True)
    except binascii.Error:
        nonce = b""
    if len(nonce) != 16:
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64"
    versions = _values(r.headers, b"sec-websocket-version")
    if len(versions) != 1:
        return 400, "a WebSocket handshake has exactly one Sec-WebSocket-Version"
    if versions[0] != b"13":
        return 426, "only WebSocket version 13 is supported"
    return None


def accept_value(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value that answers ``Sec-WebSocket-Key: key``."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def upstream_head(r: Request, peer: str, xff: bytes, fwd: bytes) -> bytes:
    """The handshake head to send upstream, blank line included.

    Args:
        r: the client's (checked) handshake.
        peer: the client's address.
        xff: ``X-Forwarded-For`` for ``peer`` alone (the fast path's, per connection).
        fwd: the ``for=...;proto=...`` start of our ``Forwarded`` element.
    """
    drop = _DROP_REQUEST | r.connection
    out = [b"GET %s HTTP/1.1" % r.target]
    prior_xff: bytes | None = None
    prior_fwd: bytes | None = None
    has_xfh = False
    for raw_name, name, value in r.headers:
        if name == b"x-forwarded-for":
            prior_xff = value if prior_xff is None else prior_xff + b", " + value
        elif name == b"forwarded":
            prior_fwd = value if prior_fwd is None else prior_fwd + b", " + value
        elif name not in drop:
            if name == b"x-forwarded-host":
                has_xfh = True
            out.append(raw_name + b": " + value)
    host = r.host or b""
    out.append(b"Upgrade: websocket")
    out.append(b"Connection: Upgrade")
    out.append(
        b"X-Forwarded-For: "
        + (forwarded.x_forwarded_for(prior_xff, peer) if prior_xff is not None else xff)
    )
    out.append(b"X-Forwarded-Proto: http")
    if not has_xfh and host:
        out.append(b"X-Forwarded-Host: " + host)
    out.append(b"Forwarded: " + forwarded.forwarded(prior_fwd, forwarded.element_of(fwd, host)))
    return b"\r\n".join(out) + b"\r\n\r\n"


def _connection_tokens(headers: tuple[Header, ...]) -> set[bytes]:
    tokens: set[bytes] = set()
    for v in _values(headers, b"connection"):
        tokens |= _tokens(v)
    return tokens


def switch_error(resp: InformationalResponse, key: bytes) -> str | None:
    """Why a ``101`` does not complete the handshake of ``key``, or ``None`` if it does."""
    headers = resp.headers
    upgrade = _values(headers, b"upgrade")
    if len(upgrade) != 1 or upgrade[0].lower() != b"websocket":
        return "101 without Upgrade: websocket"
    if b"upgrade" not in _connection_tokens(headers):
        return "101 without Connection: upgrade"
    if _values(headers, b"sec-websocket-accept") != [accept_value(key)]:
        return "101 with a wrong Sec-WebSocket-Accept"
    return None


def client_head(resp: InformationalResponse | Response, *, switch: bool) -> bytes:
    """The answer's head for the client, hop-by-hop fields dropped, blank line included.

    ``switch``: a 101 (``Upgrade: websocket`` and ``Connection: Upgrade`` added); else
    the connection closes after the answer (``Connection: close``; a chunked body is
    sent decoded, delimited by the close).
    """
    drop = _DROP_RESPONSE | _connection_tokens(resp.headers)
    if not switch and isinstance(resp, Response) and resp.body != BODY_LENGTH:
        drop = drop | {b"content-length"}
    reason = resp.reason or (b"Switching Protocols" if switch else b"")
    lines = [b"HTTP/1.1 %d %s" % (resp.status, reason)]
    lines += [raw + b": " + value for raw, name, value in resp.headers if name not in drop]
    lines.append(b"Upgrade: websocket\r\nConnection: Upgrade" if switch else b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def error_response(status: int, kind: str, message: str) -> bytes:
    """A JSON error answer from the proxy itself, closing the connection."""
    body = json.dumps({"error": kind, "message": message}).encode()
    extra = b""
    if status == 426:
        extra = b"Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n"
    elif status == 503:
        extra = b"Retry-After: 1\r\n"
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"%sConnection: close\r\n\r\n"
        % (status, _REASONS[status].encode(), len(body), extra)
        + body
    )


# ---- the adapter -------------------------------------------------------------------


class Splicer:
    """The WebSocket tunnels of one :class:`~dsys.balance.fastpath.FastPath`: handshakes,
    pipes, metrics, idle timeout and shutdown."""

    def __init__(self, fast: FastPath) -> None:
        self.fast = fast
        self.loop = fast.loop
        self.tunnels: set[Tunnel] = set()
        self.opened = 0  # tunnels that reached pipe mode
        self.closed_up = 0  # bytes of finished tunnels, client to backend
        self.closed_down = 0
        self.idle_timeout = fast.lb.config.ws_idle_timeout
        self.draining = False
        self._emptied = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._log = fast.lb._log
        fast.lb.metrics.registry.register(_TunnelMetrics(self))

    def start(self) -> None:
        """Start the idle-timeout sweeper, if an idle timeout is set."""
        if self.idle_timeout is not None and self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep(), name="dsys-balance-ws-idle")

    async def _sweep(self) -> None:
        idle = self.idle_timeout
        assert idle is not None
        while True:
            await asyncio.sleep(min(1.0, idle / 4))
            now = self.loop.time()
            for t in list(self.tunnels):
                t.check_idle(now, idle)

    def take(self, conn: _ClientConn, r: Request) -> bool:
        """Serve the upgrade request ``r`` of ``conn``; ``False``: not a WebSocket
        handshake for us (the caller hands it to the full path)."""
        fast = self.fast
        if not is_websocket_upgrade(r) or (
            fast.admin_prefix and r.target.startswith(fast.admin_prefix)
        ):
            return False
        transport = conn.transport
        if transport is None:
            return True
        err = handshake_error(r)
        if err is None and (self.draining or fast.draining):
            err = (503, "the proxy is shutting down")
        if err is not None:
            status, message = err
            fast.lb._errors.labels(str(status)).inc()
            kind = "unavailable" if status == 503 else "bad_websocket_handshake"
            transport.write(error_response(status, kind, message))
            conn.close()
            return True
        fast.forget(conn)
        conn.transport = None
        transport.pause_reading()
        key = _values(r.headers, b"sec-websocket-key")[0]
        head = upstream_head(r, conn.peer, conn.xff, conn.fwd)
        t = Tunnel(self, transport, conn.parser.unparsed(), key, conn.peer)
        self.tunnels.add(t)
        t.task = self.loop.create_task(t.handshake(head))
        return True

    def forget(self, t: Tunnel) -> None:
        """``t`` ended: count its bytes as closed."""
        self.tunnels.discard(t)
        self.closed_up += t.client.count
        if t.upstream is not None and t.piping:
            self.closed_down += t.upstream.count
        if self.draining and not self.tunnels:
            self._emptied.set()

    async def drain(self, deadline: float) -> None:
        """Graceful stop: let tunnels end by themselves until ``deadline``, then close
        their TCP connections (no close frame: see the module notes)."""
        self.draining = True
        if self.tunnels:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), max(deadline - self.loop.time(), 0))
        if self._sweeper is not None:
            self._sweeper.cancel()
        for t in list(self.tunnels):
            t.close("shutdown")
        await asyncio.sleep(0)  # let the transports act on close()


class _TunnelMetrics(Collector):
    def __init__(self, splicer: Splicer) -> None:
        self.splicer = splicer

    def collect(self) -> Iterator[Metric]:
        sp = self.splicer
        live = [t for t in sp.tunnels if t.piping]
        gauge = GaugeMetricFamily(
            "dsys_balance_ws_tunnels", "WebSocket tunnels open now (splice mode)"
        )
        gauge.add_metric([], len(live))
        yield gauge
        opened = CounterMetricFamily(
            "dsys_balance_ws_tunnels_opened", "WebSocket tunnels opened (splice mode)"
        )
        opened.add_metric([], sp.opened)
        yield opened
        moved = CounterMetricFamily(
            "dsys_balance_ws_tunnel_bytes",
            "Bytes spliced by direction (up: client to backend, down: backend to client)",
            labels=["direction"],
        )
        up = sp.closed_up + sum(t.client.count for t in live)
        down = sp.closed_down + sum(t.upstream.count for t in live if t.upstream is not None)
        moved.add_metric(["up"], up)
        moved.add_metric(["down"], down)
        yield moved


_HANDSHAKE = 0  # client: reading paused; upstream: parsing the answer's head
_ANSWER = 1  # upstream: forwarding a non-101 answer's body, then closing
_PIPE = 2  # bytes go to the other side unchanged


class _Side(asyncio.Protocol):
    """One connection of a tunnel (the client's or the backend's)."""

    __slots__ = (
        "count",
        "eof",
        "forward",
        "lost",
        "mode",
        "other",
        "parser",
        "transport",
        "tunnel",
        "waiter",
    )

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.forward: Callable[[bytes], object] = _discard  # pipe mode: the other's write
        self.mode = _HANDSHAKE
        self.count = 0  # bytes received and forwarded in pipe mode
        self.eof = False
        self.lost = False
        self.parser: Parser | None = None
        self.waiter: asyncio.Future[InformationalResponse | Response] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.mode == _PIPE:
            self.count += len(data)
            self.forward(data)
            return
        parser = self.parser
        if parser is None:  # the client's side while the handshake runs
            self.tunnel.pending += data
            return
        parser.feed(data)
        if self.mode == _HANDSHAKE:
            self._head()
        else:
            self.tunnel.answer_events(self)

    def _head(self) -> None:
        """Handshake: look for the answer's head among the bytes received so far."""
        parser, waiter = self.parser, self.waiter
        if parser is None or waiter is None or waiter.done():
            return
        try:
            while True:
                event = parser.next_event()
                if event is None:
                    return
                if type(event) is InformationalResponse and event.status != 101:
                    continue  # 100 Continue, 103 Early Hints: not the answer
                if type(event) is InformationalResponse and self.transport is not None:
                    self.transport.pause_reading()  # what follows is the backend's frames
                assert type(event) is InformationalResponse or type(event) is Response
                waiter.set_result(event)
                return
        except RemoteProtocolError as exc:
            waiter.set_exception(exc)

    def eof_received(self) -> bool:
        self.eof = True
        if self.mode != _PIPE:
            parser = self.parser
            if parser is not None:
                parser.feed_eof()
                if self.mode == _HANDSHAKE:
                    self._head()
                    if self.waiter is not None and not self.waiter.done():
                        self.waiter.set_exception(ConnectionResetError("closed before answering"))
                else:
                    self.tunnel.answer_events(self)
            return False
        self.tunnel.half_closed(self)
        return True  # keep the transport: the other direction may still carry bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("connection lost"))
        self.tunnel.side_lost(self)

    def pause_writing(self) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None and other.transport is not None and not other.eof:
            other.transport.resume_reading()


class _Retry(Exception):
    """One try failed before anything reached the client; another endpoint may serve."""


class Tunnel:
    """One spliced WebSocket: the client's connection, the backend's, and their lease."""

    __slots__ = (
        "_grace",
        "_idle",
        "client",
        "closing",
        "endpoint",
        "key",
        "lease",
        "opened_at",
        "peer",
        "pending",
        "piping",
        "shake",
        "splicer",
        "task",
        "upstream",
    )

    def __init__(
        self, splicer: Splicer, transport: asyncio.Transport, pending: bytes, key: bytes, peer: str
    ) -> None:
        self.splicer = splicer
        self.client = _Side(self)
        self.client.transport = transport
        transport.set_protocol(self.client)
        self.upstream: _Side | None = None
        self.pending = pending  # client bytes that came after the handshake request
        self.key = key
        self.peer = peer
        self.lease: Lease | None = None
        self.endpoint = ""
        self.task: asyncio.Task[None] | None = None
        self.piping = False
        self.closing = False
        self.shake = 0.0  # seconds the handshake took on the endpoint that took it
        self.opened_at = 0.0
        self._grace: asyncio.TimerHandle | None = None
        self._idle = (0, 0.0)  # (bytes moved, when that count was first seen)

    # ---- the handshake --------------------------------------------------------------

    async def handshake(self, head: bytes) -> None:
        """Find an endpoint that accepts the handshake; switch to pipe mode or answer."""
        fast = self.splicer.fast
        lb, pool = fast.lb, fast.pool
        tried: list[str] = []
        last = ""
        tries = 0
        lb.budget.record_request(pool.clock.now())
        try:
            while True:
                if tries >= fast.max_tries or (tries and not lb.budget.try_spend(pool.clock.now())):
                    self._refuse(502, "bad_gateway", _tries_failed(tries, last, tried))
                    return
                if tries:
                    lb._retries.inc()
                try:
                    lease = pool.acquire(exclude=tried)
                except NoHealthyBackendError as exc:
                    if tries:
                        self._refuse(502, "bad_gateway", _tries_failed(tries, last, tried))
                    else:
                        self._refuse(503, "no_healthy_backend", str(exc))
                    return
                tries += 1
                tried.append(lease.endpoint)
                try:
                    last_try = tries >= fast.max_tries or not set(pool.eligible()) - set(tried)
                    await self._try(lease, head, last_try=last_try)
                    return
                except _Retry as exc:
                    last = str(exc)
        except asyncio.CancelledError:  # the client went away
            held, self.lease = self.lease, None
            if held is not None:
                pool.release_neutral(held)
            self._drop_upstream()
        finally:
            self.task = None
            self._maybe_finish()

    async def _try(self, lease: Lease, head: bytes, *, last_try: bool) -> None:
        fast = self.splicer.fast
        loop = fast.loop
        ep = lease.endpoint
        self.lease = lease
        self.endpoint = ep
        host, _, port = ep.rpartition("//")[2].rpartition(":")
        try:
            async with asyncio.timeout(fast.connect_timeout):
                _, side = await loop.create_connection(
                    lambda: _Side(self), host.strip("[]"), int(port)
                )
        except (OSError, TimeoutError) as exc:
            self._failed(f"{ep}: cannot connect: {exc}")
        self.upstream = side
        parser = side.parser = Parser(client=True)
        parser.expect_response(b"GET", upgrade=True)
        waiter = side.waiter = loop.create_future()
        assert side.transport is not None
        side.transport.write(head)
        try:
            async with asyncio.timeout(fast.timeout):
                event = await waiter
        except TimeoutError:
            self._drop_upstream()
            self._release(ok=False, error="timeout", status=0)
            self._refuse(504, "upstream_timeout", f"no answer within {fast.timeout} s")
            return
        except (OSError, RemoteProtocolError) as exc:
            self._failed(f"{ep}: {exc}")
        side.waiter = None
        status = event.status
        self.shake = loop.time() - lease.started
        fast.lb._count(ep, status, self.shake)
        if type(event) is InformationalResponse:  # a 101
            why = switch_error(event, self.key)
            if why is not None:
                self._failed(f"{ep}: {why}", counted=True)
            self._switch(event)
            return
        assert type(event) is Response
        if status >= 500 and not last_try:
            self._failed(f"{ep}: status {status}", counted=True)
        self._release(ok=status < 500, error=f"status {status}", status=status)
        self._answer(event)

    def _failed(self, error: str, *, counted: bool = False) -> NoReturn:
        """This try failed: drop its connection, blame the endpoint, try another."""
        self._drop_upstream()
        self._release(ok=False, error=error, status=None if counted else 0)
        raise _Retry(error)

    def _release(self, *, ok: bool, error: str, status: int | None) -> None:
        lease, self.lease = self.lease, None
        if lease is None:
            return
        fast = self.splicer.fast
        fast.pool.release(lease, ok=ok, error="" if ok else error, feed_breaker=True)
        if status is not None and status == 0:
            fast.lb._count(lease.endpoint, 0, 0.0)

    def _drop_upstream(self) -> None:
        side, self.upstream = self.upstream, None
        if side is not None and side.transport is not None:
            side.transport.abort()

    def _refuse(self, status: int, kind: str, message: str) -> None:
        """Answer the client from the proxy itself, then close."""
        self.splicer.fast.lb._errors.labels(str(status)).inc()
        t = self.client.transport
        if t is not None:
            t.write(error_response(status, kind, message))
            t.close()

    def _answer(self, resp: Response) -> None:
        """Forward a non-101 answer (head, then body as it comes) and close after it."""
        side = self.upstream
        ct = self.client.transport
        if side is None or ct is None:
            self.close("client gone")
            return
        ct.write(client_head(resp, switch=False))
        side.mode = _ANSWER
        self.answer_events(side)

    def answer_events(self, side: _Side) -> None:
        """Forward the body events of a non-101 answer; close both at its end."""
        parser = side.parser
        ct = self.client.transport
        if parser is None or ct is None:
            self.close("client gone")
            return
        try:
            while True:
                event = parser.next_event()
                if event is None:
                    return
                if type(event) is Data:
                    ct.write(event.data)
                    continue
                assert type(event) is EndOfMessage
                self.close("answered")
                return
        except RemoteProtocolError:
            self.client.transport = None
            ct.abort()  # a truncated answer: the client sees the connection cut
            self.close("malformed answer")

    def _switch(self, resp: InformationalResponse) -> None:
        """101: forward it and whatever followed it, then pipe both ways."""
        up, cl = self.upstream, self.client
        assert up is not None and up.parser is not None
        ut, ct = up.transport, cl.transport
        if ut is None or ct is None:
            self._release(ok=True, error="", status=None)
            self.close("lost during handshake")
            return
        rest = up.parser.unparsed()
        up.parser = None
        ct.write(client_head(resp, switch=True))
        if rest:
            up.count += len(rest)
            ct.write(rest)
        pending, self.pending = self.pending, b""
        if pending:
            cl.count += len(pending)
            ut.write(pending)
        cl.other, up.other = up, cl
        cl.forward, up.forward = ut.write, ct.write
        ut.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        ct.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        cl.mode = up.mode = _PIPE
        self.piping = True
        sp = self.splicer
        sp.opened += 1
        self.opened_at = sp.loop.time()
        sp._log.info("ws_tunnel_opened", endpoint=self.endpoint, peer=self.peer)
        if ut.get_write_buffer_size() <= HIGH_WATER:
            ct.resume_reading()
        if ct.get_write_buffer_size() <= HIGH_WATER:
            ut.resume_reading()

    # ---- pipe mode ------------------------------------------------------------------

    def half_closed(self, side: _Side) -> None:
        """``side`` sent EOF: pass it on; close when both did, or after the grace."""
        other = side.other
        if other is None or other.transport is None:
            self.close("eof")
            return
        if other.transport.can_write_eof():
            other.transport.write_eof()
        else:
            self.close("eof")
            return
        if other.eof:
            self.close("eof")
        elif self._grace is None:
            self._grace = self.splicer.loop.call_later(EOF_GRACE, self.close, "eof")

    def check_idle(self, now: float, idle: float) -> None:
        """Close the tunnel when no byte moved either way for ``idle`` seconds."""
        if not self.piping or self.upstream is None:
            return
        moved = self.client.count + self.upstream.count
        if moved != self._idle[0] or not self._idle[1]:
            self._idle = (moved, now)
        elif now - self._idle[1] >= idle:
            self.close("idle")

    def close(self, why: str) -> None:
        """Close both connections (unsent bytes are flushed for up to :data:`EOF_GRACE` s)."""
        if self.task is not None and not self.piping and why == "shutdown":
            self.task.cancel()
        if self.closing:
            return
        self.closing = True
        self._close_transports()
        loop = self.splicer.loop
        if self._grace is not None:
            self._grace.cancel()
        self._grace = loop.call_later(EOF_GRACE, self._abort)
        self._log_close(why)

    def _close_transports(self) -> None:
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.close()

    def _abort(self) -> None:
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.abort()

    def side_lost(self, side: _Side) -> None:
        """A connection of the tunnel is gone: end the tunnel."""
        if side is self.client:
            if self.task is not None and not self.piping:
                self.task.cancel()
            if self.piping or (self.upstream is not None and self.upstream.mode == _ANSWER):
                self.close("client closed")
        elif side is self.upstream and self.piping:
            self.close("backend closed")
        elif side is self.upstream and side.mode == _ANSWER:
            self.close("answered")
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.task is not None or not self.client.lost:
            return
        if self.upstream is not None and not self.upstream.lost:
            return
        if self not in self.splicer.tunnels:
            return
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        lease, self.lease = self.lease, None
        if lease is not None:  # the tunnel's: the pool learns the handshake's latency
            pool = self.splicer.fast.pool
            lease.started = pool.clock.now() - self.shake
            pool.release(lease, ok=True, feed_breaker=True)
        self.splicer.forget(self)

    def _log_close(self, why: str) -> None:
        if not self.piping:
            return
        sp = self.splicer
        up = self.upstream.count if self.upstream is not None else 0
        sp._log.info(
            "ws_tunnel_closed",
            endpoint=self.endpoint,
            peer=self.peer,
            reason=why,
            bytes_up=self.client.count,
            bytes_down=up,
            seconds=round(sp.loop.time() - self.opened_at, 3),
        )

    def __repr__(self) -> str:
        return f"<Tunnel {self.peer} -> {self.endpoint or '?'} piping={self.piping}>"


def _discard(data: bytes) -> None:
    pass


def _tries_failed(tries: int, last: str, tried: list[str]) -> str:
    return f"{tries} tries failed (last: {last}); tried {', '.join(tried)}"


__all__ = [
    "EOF_GRACE",
    "HIGH_WATER",
    "LOW_WATER",
    "Splicer",
    "Tunnel",
    "accept_value",
    "client_head",
    "handshake_error",
    "is_websocket_upgrade",
    "switch_error",
    "upstream_head",
]
