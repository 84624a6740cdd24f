"""The proxy's fast path in-process, against scripted raw backends.

Each backend is a tiny asyncio server that records the request heads it gets and
answers with bytes the test chooses, so framing tricks (duplicate lengths, 1xx,
broken chunking) and forged headers can be tried exactly.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h11
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.balance import forwarded
from dsys.balance.fastpath import FastPath, _ClientConn
from dsys.balance.pool import PoolConfig
from dsys.balance.proxy import LoadBalancer, ProxyConfig
from dsys.http11 import valid_host


@dataclass
class Backend:
    """A raw backend: records request heads, answers each with ``answer(head)``."""

    answer: Callable[[bytes], bytes]
    heads: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                writer.write(self.answer(head))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test is over
        finally:
            writer.close()


@dataclass
class Harness:
    lb: LoadBalancer
    fast: FastPath
    port: int
    backends: list[Backend]

    async def exchange(self, data: bytes, *, until_close: bool = False) -> bytes:
        """Send ``data``; read one response (or everything until the proxy closes)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(data)
            await writer.drain()
            if until_close:
                return await asyncio.wait_for(reader.read(), 10)
            return await asyncio.wait_for(_read_response(reader), 10)
        finally:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    """One whole response, read with h11 (an independent parser) to check its framing."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    raw = b""
    status, body = 0, b""
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            data = await reader.read(65536)
            raw += data
            conn.receive_data(data)
            continue
        if isinstance(ev, h11.Response):
            status = ev.status_code
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
            return b"%d %s" % (status, body)


Factory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def harness() -> AsyncIterator[Factory]:
    started: list[tuple[FastPath, asyncio.Server, list[Backend]]] = []

    async def start(*answers: Callable[[bytes], bytes], max_tries: int = 2) -> Harness:
        backends = [Backend(a) for a in answers]
        for b in backends:
            b.server = await asyncio.start_server(b.handle, "127.0.0.1", 0)
        config = ProxyConfig(
            backends=tuple(b.url for b in backends),
            pool=PoolConfig(strategy="round-robin"),
            max_tries=max_tries,
            retry_ratio=1.0,
        )
        lb = LoadBalancer(config)

        async def full_path(request: web.BaseRequest) -> web.Response:
            return web.Response(status=299, text="full path")

        fast = FastPath(lb, web.Server(full_path))
        fast.start()
        listener = await asyncio.get_running_loop().create_server(fast.protocol, "127.0.0.1", 0)
        started.append((fast, listener, backends))
        return Harness(lb, fast, listener.sockets[0].getsockname()[1], backends)

    yield start
    for fast, listener, backends in started:
        listener.close()
        await fast.drain(asyncio.get_running_loop().time() + 1)
        for b in backends:
            assert b.server is not None
            b.server.close()


def ok(body: bytes = b"ok") -> Callable[[bytes], bytes]:
    return lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def fixed(answer: bytes) -> Callable[[bytes], bytes]:
    return lambda head: answer


GET = b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n"


def _failures(lb: LoadBalancer) -> float:
    """Requests counted with code 0 (no usable answer) over all endpoints."""
    total = 0.0
    for line in lb.metrics.render().decode().splitlines():
        if line.startswith("dsys_balance_requests_total{") and 'code="0"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- the backend's side -------------------------------------------------------------


async def test_interim_responses_are_skipped_not_counted_as_failures(harness: Factory) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    h = await harness(fixed(early + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"))
    assert await h.exchange(GET) == b"200 final"
    assert len(h.backends[0].heads) == 1  # answered, not retried
    assert _failures(h.lb) == 0


BAD_ANSWERS = {
    "duplicate Content-Length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\nok"
    ),
    "Content-Length and chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "chunked not last": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nok",
    "Content-Length +2": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "101 unasked": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
}


@pytest.mark.parametrize("answer", BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
async def test_a_malformed_answer_is_a_bad_gateway_and_never_passed_on(
    harness: Factory, answer: bytes
) -> None:
    h = await harness(fixed(answer), max_tries=1)
    got = await h.exchange(GET)
    assert got.startswith(b'502 {"error": "bad_gateway"'), got
    assert len(h.backends[0].heads) == 1 and _failures(h.lb) == 1


@pytest.mark.parametrize("size", [b"0x2", b"-1", b"+2", b"2 ", b"zz"])
async def test_a_broken_chunk_size_cuts_the_client_off(harness: Factory, size: bytes) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nok\r\n0\r\n\r\n"
    )
    h = await harness(fixed(answer))
    got = await h.exchange(GET, until_close=True)
    # the head went out before the body broke: the client sees a truncated answer
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and b"ok" not in got.split(b"\r\n\r\n", 1)[1]


async def test_chunked_answers_are_re_chunked_with_their_trailers(harness: Factory) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b'3;ext="quoted"\r\nabc\r\n2;x=y\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n'
    )
    h = await harness(fixed(answer))
    raw = await h.exchange(GET + GET, until_close=False)
    assert raw == b"200 abcde"
    got = await h.exchange(
        GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), until_close=True
    )
    assert b"ext=" not in got and b"X-Sum: 5\r\n" in got and b"\r\nTrailer:" not in got


async def test_an_answer_with_unknown_coding_is_read_until_close(harness: Factory) -> None:
    # "xchunked" is not chunked (a token, not a substring): the body ends at close.
    h = await harness(fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    writer.write(GET)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert b"Connection: close" in head and b"Transfer-Encoding: xchunked" in head
    writer.close()


# ---- the client's side ----------------------------------------------------------------

REFUSED = {
    "duplicate Host": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "NUL in a field": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "escape in a field": b"GET / HTTP/1.1\r\nHost: a\r\nX: \x1b[31m\r\n\r\n",
    "bare CR": b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
    "invalid Host": b'GET / HTTP/1.1\r\nHost: a";for=6.6.6.6\r\n\r\n',
    "space before colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "CL.TE": (
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    ),
}


@pytest.mark.parametrize("data", REFUSED.values(), ids=REFUSED.keys())
async def test_malformed_requests_get_400_and_never_reach_a_backend(
    harness: Factory, data: bytes
) -> None:
    h = await harness(ok())
    got = await h.exchange(data + GET, until_close=True)  # nothing after it is served
    assert got.startswith(b"HTTP/1.1 400 Bad Request\r\n") and got.count(b"HTTP/1.1") == 1
    assert not h.backends[0].heads


async def test_valid_requests_it_does_not_serve_go_to_the_full_path(harness: Factory) -> None:
    h = await harness(ok())
    for data in (
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: upgrade, close\r\n\r\n",
    ):  # (WebSocket handshakes are spliced: tests/balance/test_splice.py)
        got = await h.exchange(data, until_close=True)
        assert got.split(b"\r\n", 1)[0] in (b"HTTP/1.1 299 ", b"HTTP/1.0 299 "), got
    assert not h.backends[0].heads


def _elements(value: str) -> list[dict[str, str]]:
    """Parse an RFC 7239 ``Forwarded`` value (quoted-strings unescaped)."""
    pair = re.compile(r'\s*([^=;,\s]+)=(?:"((?:[^"\\]|\\.)*)"|([^;,\s"]*))\s*')
    out: list[dict[str, str]] = [{}]
    i = 0
    while i < len(value):
        m = pair.match(value, i)
        assert m is not None, (value, i)
        name, quoted, token = m.groups()
        out[-1][name.lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else token
        i = m.end()
        if i < len(value):
            assert value[i] in ";,", (value, i)
            if value[i] == ",":
                out.append({})
            i += 1
    return out


_HOSTS = st.one_of(
    st.sampled_from(
        [
            "example.com",
            "example.com:8080",
            "[::1]:80",
            "a;for=6.6.6.6",  # valid reg-name characters: must end up quoted
            'a";for=6.6.6.6;x="',
            "a, for=6.6.6.6",
            'a\\"b',
        ]
    ),
    st.text(alphabet='ab:;=,"\\[] .', max_size=12),
)
_PRIOR = st.one_of(
    st.none(),
    st.sampled_from(['for=1.2.3.4;host="h"', 'for=x;host="', "for=6.6.6.6,", 'by="a'])
    | st.text(alphabet='fo=r;,"\\ 1.', max_size=15),
)


@settings(max_examples=200, deadline=None)
@given(host=_HOSTS, prior=_PRIOR, ipv6=st.booleans())
def test_forwarded_element_is_built_from_validated_values_only(
    host: str, prior: str | None, ipv6: bool
) -> None:
    peer = "2001:db8::7" if ipv6 else "127.0.0.1"
    mine = forwarded.element(peer, "http", host.encode())
    value = forwarded.forwarded(prior.encode() if prior is not None else None, mine).decode()
    last = _elements(value)[-1]
    want = {"for": f"[{peer}]" if ipv6 else peer, "proto": "http"}
    if host and valid_host(host.encode()):
        want["host"] = host
    assert last == want, value


async def test_the_fast_path_forwards_only_validated_values(harness: Factory) -> None:
    h = await harness(ok())
    forged = (
        b'GET / HTTP/1.1\r\nHost: a;for=6.6.6.6\r\nForwarded: for=x;host="\r\n'
        b"X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\r\n"
    )
    assert await h.exchange(forged) == b"200 ok"
    fields = dict(
        line.split(": ", 1) for line in h.backends[0].heads[0].decode().split("\r\n")[1:] if line
    )
    assert _elements(fields["Forwarded"]) == [
        {"for": "127.0.0.1", "proto": "http", "host": "a;for=6.6.6.6"}
    ]  # the malformed prior value was dropped, not joined to ours
    assert fields["X-Forwarded-For"] == "1.1.1.1, 2.2.2.2, 127.0.0.1"
    assert fields["X-Forwarded-Host"] == "a;for=6.6.6.6"


def test_the_aiohttp_path_forwards_only_validated_values() -> None:
    lb = LoadBalancer(ProxyConfig(backends=("http://127.0.0.1:1",)))
    request = make_mocked_request(
        "GET",
        "/",
        headers={"Host": 'a";for=6.6.6.6;x="', "Forwarded": 'for=x;host="'},
    )
    headers = lb._upstream_headers(request)
    assert _elements(headers["Forwarded"]) == [{"for": "unknown", "proto": "http"}]
    assert "X-Forwarded-Host" not in headers


async def test_a_byte_at_a_time_client_costs_linear_parser_work(harness: Factory) -> None:
    h = await harness(ok())
    conn = _ClientConn(h.fast)
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"p" * 16000 + b"\r\n\r\n"
    for i in range(len(head) - 1):  # all but the last byte: the head is never complete
        conn.data_received(head[i : i + 1])
    assert conn.parser.steps <= 10 * len(head), conn.parser.steps
