"""WebSockets spliced by the proxy (``ws_mode="splice"``), in-process over real sockets.

The backends are aiohttp WebSocket servers; the proxy is a real :class:`FastPath` on a
loopback port; clients are aiohttp's WebSocket client or a raw socket speaking
RFC 6455 by hand (fragments, a client that stops reading).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from dsys.balance.fastpath import FastPath
from dsys.balance.pool import PoolConfig
from dsys.balance.proxy import LoadBalancer, ProxyConfig
from dsys.balance.splice import HIGH_WATER, accept_value, handshake_error
from dsys.balance.strategies import PeakEwma
from dsys.clock import ManualClock
from dsys.errors import RemoteProtocolError
from dsys.http11 import InformationalResponse, Parser, Request

FLOOD = 16 * 1024 * 1024  # what /flood sends (more than socket buffers can hold)


@dataclass
class Echo:
    """An aiohttp WebSocket backend (see :func:`_echo_app`) and what it saw."""

    name: str
    handshakes: int = 0
    closes: list[int | None] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    headers: list[dict[str, str]] = field(default_factory=list)
    flood_sent: int = 0
    unavailable: bool = False  # answer every handshake with 503
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _echo_app(echo: Echo) -> web.Application:
    async def ws(request: web.Request) -> web.StreamResponse:
        echo.handshakes += 1
        echo.headers.append(dict(request.headers))
        if echo.unavailable:
            return web.Response(status=503, text="busy")
        if request.query.get("refuse"):
            return web.Response(status=403, text="no websockets for you")
        sock = web.WebSocketResponse(protocols=("chat", "superchat"), max_msg_size=0)
        await sock.prepare(request)
        try:
            if request.query.get("flood"):
                chunk = b"\xab" * 65536
                while echo.flood_sent < FLOOD:
                    await sock.send_bytes(chunk)
                    echo.flood_sent += len(chunk)
            async for msg in sock:
                if msg.type is WSMsgType.TEXT:
                    if msg.data.startswith("close:"):
                        await sock.close(code=int(msg.data[6:]), message=b"as asked")
                        break
                    if msg.data == "die" and request.transport is not None:
                        request.transport.abort()
                        break
                    if msg.data == "ping-me":
                        await sock.ping(b"from-backend")
                        continue
                    await sock.send_str(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await sock.send_bytes(msg.data)
        finally:
            echo.closes.append(sock.close_code)
            echo.ended.set()
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws)
    return app


@dataclass
class Lb:
    lb: LoadBalancer
    fast: FastPath
    port: int
    backends: list[Echo]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        for line in self.lb.metrics.render().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name}")


Factory = Callable[..., Awaitable[Lb]]


@pytest.fixture
async def splice_lb() -> AsyncIterator[Factory]:
    started: list[tuple[FastPath, asyncio.Server, list[Echo]]] = []

    async def start(
        n: int = 1, *, dead_first: bool = False, idle: float | None = None, tries: int = 3
    ) -> Lb:
        echoes = [Echo(f"e{i}") for i in range(n)]
        urls: list[str] = []
        if dead_first:
            probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            urls.append(f"http://127.0.0.1:{probe.sockets[0].getsockname()[1]}")
            probe.close()
            await probe.wait_closed()  # nothing listens on that port any more
        for e in echoes:
            e.runner = web.AppRunner(_echo_app(e), access_log=None)
            await e.runner.setup()
            site = web.TCPSite(e.runner, "127.0.0.1", 0)
            await site.start()
            e.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            urls.append(e.url)
        config = ProxyConfig(
            backends=tuple(urls),
            pool=PoolConfig(strategy="round-robin", health_check=None),
            max_tries=tries,
            retry_ratio=1.0,
            ws_idle_timeout=idle,
            shutdown_timeout=0.5,
        )
        lb = LoadBalancer(config)

        async def full_path(request: web.BaseRequest) -> web.Response:
            return web.Response(status=299, text="full path")

        fast = FastPath(lb, web.Server(full_path))
        fast.start()
        listener = await asyncio.get_running_loop().create_server(fast.protocol, "127.0.0.1", 0)
        started.append((fast, listener, echoes))
        return Lb(lb, fast, listener.sockets[0].getsockname()[1], echoes)

    yield start
    for fast, listener, echoes in started:
        listener.close()
        await fast.drain(asyncio.get_running_loop().time() + 0.2)
        for e in echoes:
            assert e.runner is not None
            await e.runner.cleanup()


# ---- a raw RFC 6455 client ------------------------------------------------------------

KEY = base64.b64encode(b"0123456789abcdef")


def handshake(path: str = "/ws", extra: bytes = b"", key: bytes = KEY) -> bytes:
    return (
        b"GET %s HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n"
        b"Connection: keep-alive, Upgrade, X-Secret\r\nX-Secret: hop\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
    ) % (path.encode(), key, extra)


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """An unmasked server frame: (opcode, payload)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


async def raw_open(
    lb: Lb, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


# ---- tests -----------------------------------------------------------------------------


def test_handshake_checks_are_strict() -> None:
    def parse(raw: bytes) -> Request:
        p = Parser()
        p.feed(raw)
        event = p.next_event()
        assert isinstance(event, Request)
        return event

    assert handshake_error(parse(handshake())) is None
    assert accept_value(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455
    bad_key = handshake(key=base64.b64encode(b"short"))
    assert handshake_error(parse(bad_key)) == (400, "Sec-WebSocket-Key must be 16 bytes in base64")
    assert handshake_error(parse(handshake(key=b"not base64!!"))) is not None
    v8 = handshake().replace(b"Version: 13", b"Version: 8")
    assert handshake_error(parse(v8)) == (426, "only WebSocket version 13 is supported")
    assert handshake_error(parse(handshake().replace(b"GET", b"PUT"))) is not None


async def test_messages_ping_pong_and_close_codes_pass_unchanged(splice_lb: Factory) -> None:
    lb = await splice_lb()
    big = os.urandom(1 << 20)
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(
            lb.url + "/ws", protocols=("superchat", "other"), autoping=False, max_msg_size=0
        ) as ws,
    ):
        assert ws.protocol == "superchat"  # negotiated end to end
        await ws.send_str("héllo")
        assert await ws.receive_str(timeout=5) == "héllo"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01\x02"
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=5) == big
        await ws.ping(b"from-client")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"from-client")
        await ws.send_str("ping-me")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.PING, b"from-backend")
        assert lb.metric("dsys_balance_ws_tunnels") == 1
        await ws.send_str("close:4002")  # the backend closes with 4002
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == 4002
    async with aiohttp.ClientSession() as s, s.ws_connect(lb.url + "/ws") as ws:
        await ws.close(code=4001)  # the client closes with 4001
    await asyncio.wait_for(lb.backends[0].ended.wait(), 5)
    assert lb.backends[0].closes[-1] == 4001
    assert lb.metric('dsys_balance_ws_tunnel_bytes_total{direction="up"}') > len(big)
    assert lb.metric('dsys_balance_ws_tunnel_bytes_total{direction="down"}') > len(big)
    assert lb.metric("dsys_balance_ws_tunnels_opened_total") == 2


async def test_raw_handshake_headers_and_fragments(splice_lb: Factory) -> None:
    lb = await splice_lb()
    reader, writer, head = await raw_open(lb, handshake(extra=b"X-Forwarded-For: 10.0.0.9\r\n"))
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nSec-WebSocket-Accept: " + accept_value(KEY) + b"\r\n" in head
    assert b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" in head
    seen = lb.backends[0].headers[-1]
    assert seen["Upgrade"] == "websocket" and seen["Connection"] == "Upgrade"
    assert seen["X-Forwarded-For"] == "10.0.0.9, 127.0.0.1"
    assert seen["Forwarded"] == 'for=127.0.0.1;proto=http;host="example.com"'
    assert "X-Secret" not in seen  # named in Connection: hop-by-hop
    # A text message in three fragments, a ping between them (allowed by RFC 6455 5.4).
    writer.write(frame(0x1, b"frag", fin=False) + frame(0x9, b"p") + frame(0x0, b"men", fin=False))
    writer.write(frame(0x0, b"ted"))
    assert await read_frame(reader) == (0xA, b"p")  # aiohttp's pong
    assert await read_frame(reader) == (0x1, b"fragmented")
    writer.write(frame(0x8, struct.pack("!H", 4003)))
    assert (await read_frame(reader))[0] == 0x8  # aiohttp answers a close with 1000
    assert await reader.read() == b""  # the backend closed, so did the proxy
    writer.close()
    await asyncio.wait_for(lb.backends[0].ended.wait(), 5)
    assert lb.backends[0].closes[-1] == 4003


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (handshake(key=base64.b64encode(b"short")), b"400"),
        (handshake().replace(b"Sec-WebSocket-Key", b"X-Nothing"), b"400"),
        (handshake(extra=b"Sec-WebSocket-Key: %s\r\n" % KEY), b"400"),
        (handshake().replace(b"Version: 13", b"Version: 8"), b"426"),
        (handshake(extra=b"Content-Length: 3\r\n") + b"abc", b"400"),
        (handshake().replace(b"GET", b"POST"), b"400"),
    ],
)
async def test_bad_handshakes_get_4xx_and_never_reach_a_backend(
    splice_lb: Factory, request_bytes: bytes, status: bytes
) -> None:
    lb = await splice_lb()
    reader, writer, head = await raw_open(lb, request_bytes)
    assert head.split(b" ")[1] == status
    assert b"Connection: close" in head
    await reader.read()
    writer.close()
    assert lb.backends[0].handshakes == 0


async def test_a_refused_upgrade_reaches_the_client(splice_lb: Factory) -> None:
    lb = await splice_lb()
    reader, writer, head = await raw_open(lb, handshake("/ws?refuse=1"))
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"Connection: close" in head
    assert await reader.read() == b"no websockets for you"
    writer.close()


async def test_a_dead_first_endpoint_sends_the_handshake_to_the_next(splice_lb: Factory) -> None:
    lb = await splice_lb(dead_first=True)
    async with aiohttp.ClientSession() as s:
        for i in range(2):  # round-robin: one of the two starts with the dead endpoint
            async with s.ws_connect(lb.url + "/ws") as ws:
                await ws.send_str(f"m{i}")
                assert await ws.receive_str(timeout=5) == f"m{i}"
    assert lb.backends[0].handshakes == 2
    assert lb.metric("dsys_balance_retries_total") >= 1


async def test_a_5xx_answer_sends_the_handshake_to_another_endpoint(splice_lb: Factory) -> None:
    lb = await splice_lb(2)
    lb.backends[0].unavailable = True
    async with aiohttp.ClientSession() as s:
        for i in range(2):
            async with s.ws_connect(lb.url + "/ws") as ws:
                await ws.send_str(f"m{i}")
                assert await ws.receive_str(timeout=5) == f"m{i}"
    assert lb.backends[0].handshakes >= 1 and lb.backends[1].handshakes == 2
    lb.backends[1].unavailable = True  # every try answers 503: the last answer is passed on
    _, writer, head = await raw_open(lb, handshake())
    assert head.startswith(b"HTTP/1.1 503 ")
    writer.close()


def test_the_parser_lets_a_101_through_only_when_an_upgrade_was_asked() -> None:
    answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x01a"
    p = Parser(client=True)
    p.expect_response(b"GET")
    p.feed(answer)
    with pytest.raises(RemoteProtocolError):
        p.next_event()
    p = Parser(client=True)
    p.expect_response(b"GET", upgrade=True)
    p.feed(answer)
    event = p.next_event()
    assert isinstance(event, InformationalResponse) and event.status == 101
    assert p.unparsed() == b"\x81\x01a"  # the first frame: no longer HTTP


async def test_a_backend_dying_mid_tunnel_closes_the_client(splice_lb: Factory) -> None:
    lb = await splice_lb()
    async with aiohttp.ClientSession() as s, s.ws_connect(lb.url + "/ws") as ws:
        await ws.send_str("die")
        msg = await ws.receive(timeout=5)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
    assert lb.fast.splicer is not None
    for _ in range(100):  # the proxy's side of the tunnel ends too
        if not lb.fast.splicer.tunnels:
            break
        await asyncio.sleep(0.01)
    assert not lb.fast.splicer.tunnels


async def test_a_client_leaving_closes_the_backend(splice_lb: Factory) -> None:
    lb = await splice_lb()
    reader, writer, head = await raw_open(lb, handshake())
    assert head.startswith(b"HTTP/1.1 101 ")
    writer.write(frame(0x1, b"x"))
    assert await read_frame(reader) == (0x1, b"x")
    writer.transport.abort()  # no close frame: the TCP connection just goes
    await asyncio.wait_for(lb.backends[0].ended.wait(), 5)
    assert lb.backends[0].closes[-1] is not None


async def test_a_slow_reader_holds_the_backend_back(splice_lb: Factory) -> None:
    """The proxy buffers at most its high-water mark plus one read for a reader that
    stops reading; the backend waits instead."""
    lb = await splice_lb()
    reader, writer, head = await raw_open(lb, handshake("/ws?flood=1"))
    assert head.startswith(b"HTTP/1.1 101 ")
    assert lb.fast.splicer is not None
    (tunnel,) = lb.fast.splicer.tunnels
    assert tunnel.upstream is not None
    seen = -1
    while tunnel.upstream.count != seen:  # until the backend's bytes stop moving
        seen = tunnel.upstream.count
        await asyncio.sleep(0.1)
    assert lb.backends[0].flood_sent < FLOOD  # held back, not sent into the proxy's memory
    assert tunnel.client.transport is not None
    assert tunnel.client.transport.get_write_buffer_size() <= HIGH_WATER + 256 * 1024
    got = 0  # read everything now: it all arrives, in order
    while got < FLOOD:
        opcode, data = await read_frame(reader)
        assert opcode == 0x2 and data == b"\xab" * 65536
        got += len(data)
    writer.close()


async def test_shutdown_closes_tunnels(splice_lb: Factory) -> None:
    lb = await splice_lb()
    async with aiohttp.ClientSession() as s, s.ws_connect(lb.url + "/ws") as ws:
        await ws.send_str("a")
        assert await ws.receive_str(timeout=5) == "a"
        drained = asyncio.create_task(lb.fast.drain(asyncio.get_running_loop().time() + 0.2))
        msg = await ws.receive(timeout=5)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
        await drained
    await asyncio.wait_for(lb.backends[0].ended.wait(), 5)


async def test_idle_tunnels_are_closed_when_an_idle_timeout_is_set(splice_lb: Factory) -> None:
    lb = await splice_lb(idle=0.3)
    reader, writer, head = await raw_open(lb, handshake())
    assert head.startswith(b"HTTP/1.1 101 ")
    assert await reader.read() == b""  # nothing moved: the proxy closed it
    writer.close()
    await asyncio.wait_for(lb.backends[0].ended.wait(), 5)


async def test_frames_mode_leaves_websockets_to_aiohttp() -> None:
    config = ProxyConfig(backends=("http://127.0.0.1:9",), ws_mode="frames")
    lb = LoadBalancer(config)

    async def full_path(request: web.BaseRequest) -> web.Response:
        return web.Response(status=299, text=json.dumps(request.headers.get("Upgrade")))

    fast = FastPath(lb, web.Server(full_path))
    assert fast.splicer is None
    listener = await asyncio.get_running_loop().create_server(fast.protocol, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", listener.sockets[0].getsockname()[1]
        )
        writer.write(handshake())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 299 ")
        writer.close()
    finally:
        listener.close()
        await fast.drain(asyncio.get_running_loop().time() + 0.2)


async def test_frames_mode_reports_the_handshake_latency_not_the_tunnel_lifetime() -> None:
    """A WebSocket held open for a minute must not make its backend look a minute slow."""
    echo = Echo("e0")
    echo.runner = web.AppRunner(_echo_app(echo), access_log=None)
    await echo.runner.setup()
    site = web.TCPSite(echo.runner, "127.0.0.1", 0)
    await site.start()
    echo.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config = ProxyConfig(
        backends=(echo.url,),
        pool=PoolConfig(strategy="p2c-ewma", health_check=None),
        ws_mode="frames",
    )
    lb = LoadBalancer(config)
    clock = ManualClock()
    lb.pool.clock = clock
    runner = web.AppRunner(lb.app(), access_log=None)
    await runner.setup()
    lb_site = web.TCPSite(runner, "127.0.0.1", 0)
    await lb_site.start()
    port = lb_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                await ws.send_str("hi")
                assert (await ws.receive_str(timeout=5)) == "hi"
                clock.advance(60.0)  # the tunnel lives a minute
            for _ in range(100):
                if lb.pool.outstanding(echo.url) == 0:
                    break
                await asyncio.sleep(0.01)
        picker = lb.pool._picker
        assert isinstance(picker, PeakEwma)
        estimate = picker.latency_estimate(echo.url, clock.now())
        assert estimate is not None and estimate < 1.0, estimate
    finally:
        await runner.cleanup()
        await echo.runner.cleanup()
