"""The HTTP fast path answers exactly like the aiohttp handlers, and survives bad input.

Servers run on an event loop in a background thread; the tests talk to them with plain
blocking sockets, so every byte on the wire is under the test's control (pipelining,
heads split across packets, garbage). Equivalence tests send the same bytes to a server
with the fast path and one without it and compare the answers (``Date`` aside).
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsys.errors import (
    BadInputError,
    ClosedError,
    ConflictError,
    DsysError,
    RequestTimeout,
    UnavailableError,
)
from dsys.kv.fastpath import MAX_PIPELINE, _error_answer
from dsys.kv.fsm import MAX_KEY_BYTES
from dsys.kv.server import MAX_VALUE_BYTES, KVServer, ServerConfig
from dsys.observability import error_middleware

from .helpers import cluster_configs

T = TypeVar("T")


class LoopThread:
    """An event loop in a daemon thread, hosting servers for blocking-socket tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def stop(self) -> None:
        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:  # e.g. aiohttp handlers of connections it gave up on
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.run(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def _start(configs: Sequence[ServerConfig]) -> list[KVServer]:
    servers = [KVServer(c) for c in configs]
    for s in servers:
        await s.start()
    return servers


async def _close(servers: Sequence[KVServer]) -> None:
    for s in servers:
        await s.close()


async def _leader(servers: Sequence[KVServer]) -> KVServer:
    for _ in range(500):
        leaders = [s for s in servers if s.node.is_leader]
        if len(leaders) == 1 and leaders[0].node.applied_index >= 1:
            return leaders[0]
        await asyncio.sleep(0.02)
    raise AssertionError("no leader elected in time")


@pytest.fixture(scope="module")
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    try:
        yield loop_thread
    finally:
        loop_thread.stop()


@pytest.fixture(scope="module")
def pair(lt: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[KVServer]]:
    """Two single-node servers: [fast path, aiohttp only]."""
    tmp = tmp_path_factory.mktemp("pair")
    configs = [
        ServerConfig(id="n1", data_dir=str(tmp / "f"), fsync=False),
        ServerConfig(id="n1", data_dir=str(tmp / "s"), fsync=False, fast_path=False),
    ]
    servers = lt.run(_start(configs))
    try:
        for s in servers:
            lt.run(_leader([s]))
        yield servers
    finally:
        lt.run(_close(servers))


# ---- raw HTTP over blocking sockets ---------------------------------------------------

_CL = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class Conn:
    """A blocking client connection that reads whole responses."""

    def __init__(self, port: int, timeout: float = 3.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, timeout: float = 3.0, *, head: bool = False) -> bytes | None:
        """The next whole response; None at EOF or timeout before one is complete.

        ``head``: the answer to a HEAD request (no body whatever its Content-Length).
        """
        deadline = time.monotonic() + timeout
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                m = _CL.search(self.buf[: end + 2])
                total = end + 4 + (int(m.group(1)) if m and not head else 0)
                if len(self.buf) >= total:
                    out, self.buf = self.buf[:total], self.buf[total:]
                    return out
            left = deadline - time.monotonic()
            if self.eof or left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except ConnectionError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk

    def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """True once the server closed the connection (no further bytes)."""
        if self.eof:
            return not self.buf
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def norm(resp: bytes | None) -> bytes | None:
    """A response with its ``Date`` value blanked."""
    return None if resp is None else re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", resp)


def exchange(port: int, data: bytes, n: int = 1, timeout: float = 3.0) -> list[bytes | None]:
    """Send ``data`` on a new connection and read ``n`` responses (normalised)."""
    c = Conn(port)
    try:
        c.send(data)
        return [norm(c.response(timeout, head=data.startswith(b"HEAD "))) for _ in range(n)]
    finally:
        c.close()


def both(pair: Sequence[KVServer], data: bytes, n: int = 1) -> list[bytes | None]:
    """Send ``data`` to the aiohttp-only server, then the fast one; assert the same answers."""
    slow = exchange(pair[1].port, data, n)
    fast = exchange(pair[0].port, data, n)
    assert fast == slow, f"request {data[:300]!r}"
    return fast


def req(method: str, target: str, body: bytes = b"", headers: Sequence[str] = ()) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: t", *headers]
    if method == "PUT" or body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def status(resp: bytes | None) -> int:
    assert resp is not None
    return int(resp[9:12])


def samples(server: KVServer) -> dict[str, float]:
    """``dsys_kv_requests_total`` samples (HTTP ops only) of ``server``."""
    out = {}
    for line in server.metrics.render().decode().splitlines():
        if line.startswith("dsys_kv_requests_total{") and 'op="ws_' not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---- equivalence ----------------------------------------------------------------------

SCRIPT: list[tuple[bytes, int | None]] = [
    (req("PUT", "/v1/kv/eq/a", b"hello"), 200),
    (req("PUT", "/v1/kv/eq/a?if_revision=0", b"x"), 409),
    (req("PUT", "/v1/kv/eq/a?if_revision=1", b"x"), None),
    (req("PUT", "/v1/kv/eq/a?if_revision=-1", b"x"), 400),
    (req("PUT", "/v1/kv/eq/a?if_revision=abc", b"x"), 400),
    (req("PUT", "/v1/kv/eq/a?if_revision=", b"x"), 200),
    (req("PUT", "/v1/kv/eq/t?ttl=3600&if_revision=0", b"t"), 200),
    (req("PUT", "/v1/kv/eq/t?ttl=x", b"t"), 400),
    (req("PUT", "/v1/kv/eq/e", b""), 200),
    (b"PUT /v1/kv/eq/nolen HTTP/1.1\r\nHost: t\r\n\r\n", 200),
    (req("PUT", "/v1/kv/eq/q?a=1=2&&=5&b&if_revision=0&if_revision=9", b"q"), 200),
    (req("GET", "/v1/kv/eq/a"), 200),
    (req("GET", "/v1/kv/eq/e"), 200),
    (req("GET", "/v1/kv/eq/a?consistency=stale"), 200),
    (req("GET", "/v1/kv/eq/a?consistency=linearizable"), 200),
    (req("GET", "/v1/kv/eq/a?consistency=weird"), 400),
    (req("GET", "/v1/kv/eq/missing"), 404),
    (req("GET", "/v1/kv/eq/missing?consistency=stale"), 404),
    (req("DELETE", "/v1/kv/eq/missing"), 404),
    (req("DELETE", "/v1/kv/eq/a?if_revision=1"), 409),
    (req("DELETE", "/v1/kv/eq/a?if_revision=zz"), 400),
    (req("DELETE", "/v1/kv/eq/e"), 200),
    (req("PUT", "/v1/kv/eq/s", b"1", ["X-Dsys-Client-Id: c1", "X-Dsys-Seq: 1"]), 200),
    (req("PUT", "/v1/kv/eq/s", b"1", ["X-Dsys-Client-Id: c1", "X-Dsys-Seq: 1"]), 200),
    (req("PUT", "/v1/kv/eq/s", b"2", ["x-dsys-client-id:  c1 ", "X-DSYS-SEQ:2"]), 200),
    (req("PUT", "/v1/kv/eq/s", b"1", ["X-Dsys-Client-Id: c1"]), 400),
    (req("PUT", "/v1/kv/eq/s", b"1", ["X-Dsys-Client-Id: c1", "X-Dsys-Seq: 0"]), 400),
    (req("PUT", "/v1/kv/eq/s", b"1", ["X-Dsys-Client-Id: " + "c" * 129, "X-Dsys-Seq: 3"]), 400),
    (req("PUT", "/v1/kv/eq/s", b"1", ["X-Dsys-Client-Id:", "X-Dsys-Seq: x"]), 200),
    (req("DELETE", "/v1/kv/eq/s", b"", ["X-Dsys-Client-Id: c1", "X-Dsys-Seq: 4"]), 200),
    (req("DELETE", "/v1/kv/eq/s", b"", ["X-Dsys-Client-Id: c1", "X-Dsys-Seq: 4"]), 200),
    (req("PUT", "/v1/kv/" + "k" * (MAX_KEY_BYTES + 1), b"x"), 400),
    (req("PUT", "/v1/kv/eq/ch:@!$&'()*,;=~-_.x", b"odd"), 200),
    (req("GET", "/v1/kv/eq/ch:@!$&'()*,;=~-_.x"), 200),
    (req("PUT", "/v1/kv//eq/slash//x", b"s"), 200),
    (req("GET", "/v1/kv//eq/slash//x"), 200),
    # handed to aiohttp: the answers must still agree
    (req("PUT", "/v1/kv/eq/pct%2Fkey", b"p"), 200),
    (req("GET", "/v1/kv/eq/pct/key"), 200),
    (req("PUT", "/v1/kv/eq/a/../dot", b"d"), 200),
    (req("PUT", "/v1/kv/eq/plus?if_revision=+0", b"p"), None),
    (b"PUT /v1/kv/eq/big HTTP/1.1\r\nHost: t\r\nContent-Length: 2000000\r\n\r\nxyz", 413),
    (req("HEAD", "/v1/kv/eq/a"), 200),
    (req("POST", "/v1/kv/eq/a", b"x"), 405),
    (req("GET", "/v1/kv"), 200),
    (req("GET", "/v1/kv/"), None),
    (req("GET", "/v1/kv/eq/a", b"body"), None),
    (req("GET", "/v1/status"), 200),
    (req("GET", "/nope"), 404),
    (
        b"PUT /v1/kv/eq/te HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        200,
    ),
    (b"GET /v1/kv/eq/a HTTP/1.0\r\n\r\n", 200),
    # a scan (aiohttp's path on both) lists the keys the fast path wrote: same names
    (req("GET", "/v1/kv?limit=10000"), 200),
    (b"GET /v1/kv/eq/a HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n", 400),
    (b"GET /v1/kv/eq/a HTTP/1.1\r\nHost: t\r\nX-Dsys-Cluster-Token: t\r\n\r\n", 200),
    (b"GET /v1/kv/eq/a HTTP/1.1\r\n\r\n", 400),
    (req("GET", "/v1/kv/eq/a", b"", ["Connection: close"]) + req("GET", "/v1/kv/eq/a"), 400),
    (b"GET /v1/kv/eq/a HTTP/1.1\r\nHost: t\r\nhost: u\r\n\r\n", 400),
    (req("PUT", "/v1/kv/eq/gz", b"x", ["Content-Encoding: identity"]), 200),
    (req("PUT", "/v1/kv/eq/gz", b"not gzip", ["Content-Encoding: gzip"]), 400),
    (b"PUT /v1/kv/eq/z HTTP/1.1\r\nHost: t\r\nContent-Length: 003\r\n\r\nabc", 200),
    (b"PUT /v1/kv/eq/z HTTP/1.1\r\nHost: t\r\nContent-Length: \t3 \r\n\r\nabc", 200),
    (b"PUT /v1/kv/eq/z HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc", 400),
    (b"Put /v1/kv/eq/z HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc", None),
    (req("PUT", "/v1/kv/eq/a", b"x", ["Connection: keep-alive", "Connection: close"]), 200),
]


def test_answers_equal_the_aiohttp_handlers(pair: list[KVServer], lt: LoopThread) -> None:
    before = pair[0].port
    for data, want in SCRIPT:
        (got,) = both(pair, data)
        if want is not None:
            assert status(got) == want, got
    assert samples(pair[0]) == samples(pair[1])
    assert pair[0].port == before
    fast = pair[0]._fast
    assert fast is not None and fast.handoffs >= 10


def test_pipelined_requests_answer_in_order(pair: list[KVServer]) -> None:
    batch = b"".join(
        req("PUT", f"/v1/kv/pipe/{i % 7}", b"v%d" % i)
        + req("GET", f"/v1/kv/pipe/{i % 5}")
        + req("DELETE", f"/v1/kv/pipe/{i % 3}?if_revision={'x' if i % 4 else i}")
        for i in range(60)
    )
    answers = both(pair, batch, n=180)
    assert all(a is not None for a in answers)
    # and more than MAX_PIPELINE at once on one connection
    many = b"".join(req("PUT", f"/v1/kv/many/{i}", b"v") for i in range(MAX_PIPELINE * 3))
    answers = both(pair, many, n=MAX_PIPELINE * 3)
    revs = [int(a.rsplit(b'"revision": ', 1)[1].rstrip(b"}")) for a in answers if a]
    assert revs == list(range(revs[0], revs[0] + MAX_PIPELINE * 3))


def test_hand_off_after_pipelined_fast_requests(pair: list[KVServer]) -> None:
    data = (
        req("PUT", "/v1/kv/ho/1", b"a")
        + req("PUT", "/v1/kv/ho/2", b"b")
        + req("GET", "/v1/kv?prefix=ho/")
        + req("GET", "/v1/kv/ho/1")
    )
    answers = both(pair, data, n=4)
    assert [status(a) for a in answers] == [200, 200, 200, 200]
    assert b'"key": "ho/1"' in (answers[2] or b"")
    assert (answers[3] or b"").endswith(b"\r\n\r\na")


@pytest.mark.parametrize("which", [0, 1], ids=["fast", "aiohttp"])
def test_keep_alive_and_split_packets(pair: list[KVServer], which: int) -> None:
    c = Conn(pair[which].port)
    try:
        for i in range(5):  # keep-alive: several requests on one connection
            c.send(req("PUT", "/v1/kv/ka", b"v%d" % i))
            assert status(c.response()) == 200
        data = req("PUT", "/v1/kv/split", b"0123456789", ["X-Dsys-Client-Id: s", "X-Dsys-Seq: 1"])
        for i in range(len(data)):  # one byte per packet, head and body
            c.send(data[i : i + 1])
            if i % 16 == 0:
                time.sleep(0.001)
        assert status(c.response()) == 200
        c.send(req("GET", "/v1/kv/split"))
        got = c.response()
        assert got is not None and got.endswith(b"\r\n\r\n0123456789")
        # a big body in many packets
        value = bytes(range(256)) * 1024
        data = req("PUT", "/v1/kv/bigsplit", value)
        for i in range(0, len(data), 7000):
            c.send(data[i : i + 7000])
        assert status(c.response()) == 200
        c.send(req("GET", "/v1/kv/bigsplit"))
        got = c.response()
        assert got is not None and got.endswith(value)
    finally:
        c.close()


@pytest.mark.parametrize("which", [0, 1], ids=["fast", "aiohttp"])
def test_connection_close_is_honoured(pair: list[KVServer], which: int) -> None:
    c = Conn(pair[which].port)
    try:
        c.send(req("PUT", "/v1/kv/cc", b"1"))
        assert status(c.response()) == 200
        c.send(req("PUT", "/v1/kv/cc", b"1", ["Connection: close"]))
        got = c.response()
        assert got is not None and status(got) == 200 and b"\r\nConnection: close\r\n" in got
        assert c.closed_by_peer()
    finally:
        c.close()


def test_oversized_body_gets_413(pair: list[KVServer]) -> None:
    head = f"PUT /v1/kv/huge HTTP/1.1\r\nHost: t\r\nContent-Length: {MAX_VALUE_BYTES + 1}\r\n\r\n"
    for port in (pair[0].port, pair[1].port):
        c = Conn(port)
        try:
            c.send(head.encode())
            got = c.response()
            assert got is not None and status(got) == 413
        finally:
            c.close()


def test_garbage_gets_a_clean_4xx_or_a_close(pair: list[KVServer]) -> None:
    for junk in (
        b"\x00\x01\x02garbage\r\n\r\n",
        b"PUT /v1/kv/x HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"PUT /v1/kv/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /v1/kv/x HTTP/1.1\nHost: t\n\n",
        b"GET /v1/kv/x HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n",
        b"GET /v1/kv/\xff\xfe HTTP/1.1\r\n\r\n",
        b"PUT /v1/kv/x HTTP/1.1\r\n Folded: x\r\n\r\n",
    ):
        fast, slow = (exchange(s.port, junk)[0] for s in pair)
        assert fast == slow, junk[:80]
        assert fast is None or 400 <= status(fast) < 500, fast
    (got,) = exchange(pair[0].port, req("GET", "/v1/kv/eq/a?consistency=stale"))
    assert status(got) == 200  # still up


def test_slow_reader_pauses_the_connection(pair: list[KVServer]) -> None:
    """A client that sends many requests without reading is paused, then fully answered."""
    value = b"v" * 60_000
    (got,) = both(pair, req("PUT", "/v1/kv/fat", value))
    assert status(got) == 200
    n = 200  # 12 MB of answers: far more than the socket buffers hold
    c = Conn(pair[0].port, timeout=10)
    try:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        c.send(req("GET", "/v1/kv/fat?consistency=stale") * n)
        time.sleep(0.3)
        for _ in range(n):
            got = c.response(timeout=10)
            assert got is not None and got.endswith(value)
    finally:
        c.close()


def test_error_answers_equal_the_error_middleware(pair: list[KVServer], lt: LoopThread) -> None:
    errors: list[DsysError] = [
        BadInputError("bad"),
        ConflictError("conflict"),
        UnavailableError("busy"),
        UnavailableError("busy", retry_after=2.6),
        RequestTimeout("write not committed in time"),
        ClosedError("raft node closed"),
    ]

    async def serve() -> tuple[web.AppRunner, int]:
        from dsys.observability import start_site

        app = web.Application(middlewares=[error_middleware])

        async def fail(request: web.Request) -> web.Response:
            raise errors[int(request.match_info["i"])]

        app.router.add_get("/e/{i}", fail)
        return await start_site(app)

    runner, port = lt.run(serve())
    try:
        for i, exc in enumerate(errors):
            target = f"/e/{i}"
            (want,) = exchange(port, req("GET", target))
            assert norm(_error_answer(pair[0], exc, target.encode(), False)) == want
    finally:
        lt.run(runner.cleanup())


def test_redirects_and_no_leader_equal_the_aiohttp_handlers(lt: LoopThread, tmp_path: Path) -> None:
    clusters = [
        cluster_configs(tmp_path / "fast", fsync=False),
        cluster_configs(tmp_path / "slow", fsync=False, fast_path=False),
    ]
    lonely = [
        cluster_configs(tmp_path / "lf", fsync=False)[0],
        cluster_configs(tmp_path / "ls", fsync=False, fast_path=False)[0],
    ]
    started: list[list[KVServer]] = []
    try:
        for configs in [*clusters, lonely]:
            started.append(lt.run(_start(configs)))
        leaders = [lt.run(_leader(servers)) for servers in started[:2]]
        requests = [
            req("PUT", "/v1/kv/r?if_revision=0", b"v"),
            req("DELETE", "/v1/kv/r"),
            req("GET", "/v1/kv/r"),
            req("GET", "/v1/kv/r?consistency=stale"),
        ]
        answers = []
        for servers, leader in zip(started[:2], leaders, strict=True):
            follower = next(s for s in servers if s is not leader)
            got = [exchange(follower.port, r)[0] for r in requests]
            addr = f"127.0.0.1:{leader.port}".encode()
            answers.append(
                [
                    re.sub(rb"node n\d is not", b"node N is not", (a or b"").replace(addr, b"L"))
                    for a in got
                ]
            )
        assert answers[0] == answers[1]
        assert [status(a) for a in answers[0]] == [307, 307, 307, 404]
        assert b"\r\nLocation: http://L/v1/kv/r?if_revision=0\r\n" in answers[0][0]
        for r in requests[:3]:  # no leader known: 503 + Retry-After
            fast, slow = (exchange(s.port, r)[0] for s in started[2])
            assert fast == slow and status(fast) == 503 and b"\r\nRetry-After: " in (fast or b"")
    finally:
        for servers in started:
            lt.run(_close(servers))


def test_close_lets_requests_in_flight_finish(lt: LoopThread, tmp_path: Path) -> None:
    (server,) = lt.run(_start([ServerConfig(id="c", data_dir=str(tmp_path), fsync=False)]))
    closed = False
    try:
        lt.run(_leader([server]))
        conns = [Conn(server.port) for _ in range(4)]
        idle = Conn(server.port)
        for c in conns:
            c.send(b"".join(req("PUT", f"/v1/kv/cl/{i}", b"x") for i in range(50)))
        time.sleep(0.05)
        lt.run(server.close())
        closed = True
        for c in conns:
            n = 0
            while (got := c.response(timeout=3)) is not None:
                assert status(got) == 200  # whole answers only, then a clean close
                n += 1
            assert c.eof and not c.buf, (n, c.buf[:100])
            c.close()
        assert idle.closed_by_peer()
        idle.close()
    finally:
        if not closed:
            lt.run(server.close())


# ---- random input -----------------------------------------------------------------------

# Mostly well-formed requests (so most take the fast path), with odd pieces mixed in.
_ODD_KEY_CHARS = "abcXYZ019-._~!$&'()*+,;=:@/%?#é \t"
_methods = st.sampled_from(["GET"] * 3 + ["PUT"] * 4 + ["DELETE"] * 2 + ["HEAD", "POST", "put"])
_keys = st.one_of(
    st.text(alphabet="abc", min_size=1, max_size=2),
    st.text(alphabet="abcXYZ019-_~:@/", min_size=1, max_size=8),
    st.text(alphabet=_ODD_KEY_CHARS, min_size=0, max_size=12),
)
_qvalues = st.one_of(
    st.integers(-3, 40).map(str), st.sampled_from(["", "x", "+1", "1_0", "stale", "linearizable"])
)
# (no small TTLs: a key expiring between the two servers' answers would differ)
_ttls = st.sampled_from(["-1", "x", "", "3600", "+99999", "1e3"])
_query = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["if_revision", "consistency", "other", ""]), _qvalues),
        st.tuples(st.just("ttl"), _ttls),
    ).flatmap(lambda kv: st.sampled_from([f"{kv[0]}={kv[1]}", kv[0], f"{kv[0]}=={kv[1]}"])),
    max_size=3,
).map("&".join)
_GOOD_HEADERS = [
    "X-Dsys-Client-Id: cli",
    "X-Dsys-Client-Id: ",
    "X-Dsys-Seq: 5",
    "X-Dsys-Seq: 6",
    "X-Dsys-Seq: -1",
    "X-Dsys-Seq: abc",
    "Connection: keep-alive",
    "Accept: */*",
    "User-Agent: t",
]
_ODD_HEADERS = [
    "Connection: upgrade",
    "Expect: 100-continue",
    "Content-Length: 0",
    "Content-Length: x",
    "Bad Name: 1",
    "NoColon",
    ": empty",
    "X-Dsys-Cluster-Token: t",
    "Content-Encoding: gzip",
    "Transfer-Encoding: chunked",
]
_headers = st.one_of(
    st.lists(st.sampled_from(_GOOD_HEADERS), max_size=3),
    st.lists(st.sampled_from(_GOOD_HEADERS), max_size=3),
    st.lists(st.sampled_from(_GOOD_HEADERS + _ODD_HEADERS), max_size=4),
)
_bodies = st.binary(max_size=40)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    method=_methods,
    key=_keys,
    query=st.one_of(st.none(), _query),
    headers=_headers,
    body=_bodies,
    version=st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2", "http/1.1"]),
    body_on_any=st.sampled_from([False] * 4 + [True]),
)
def test_random_requests_answer_like_aiohttp(
    pair: list[KVServer],
    method: str,
    key: str,
    query: str | None,
    headers: list[str],
    body: bytes,
    version: str,
    body_on_any: bool,
) -> None:
    if method != "PUT" and not body_on_any:
        body = b""
    target = "/v1/kv/" + key + ("" if query is None else "?" + query)
    head = f"{method} {target} {version}\r\nHost: t\r\n" + "".join(h + "\r\n" for h in headers)
    length = f"Content-Length: {len(body)}\r\n" if body or method == "PUT" else ""
    data = head.encode() + f"{length}\r\n".encode() + body
    if "Content-Length: " in "".join(headers) or "Transfer-Encoding" in "".join(headers):
        data = head.encode() + b"\r\n"  # its own (maybe bad) framing, no body
    (got,) = both(pair, data)
    assert got is None or status(got) < 500, got


@settings(max_examples=60, deadline=None)
@given(junk=st.binary(min_size=1, max_size=200), prefix=st.sampled_from([b"", b"PUT /v1/kv/"]))
def test_random_bytes_never_get_a_5xx(pair: list[KVServer], junk: bytes, prefix: bytes) -> None:
    c = Conn(pair[0].port)
    try:
        c.send(prefix + junk + b"\r\n\r\n")
        got = c.response(timeout=0.3)
        assert got is None or status(got) < 500, got
    finally:
        c.close()
    (got,) = exchange(pair[0].port, req("GET", "/v1/kv/eq/a?consistency=stale"))
    assert status(got) == 200


def test_cli_switch() -> None:
    from dsys.cli import build_parser

    base = ["kv", "serve", "--id", "n1", "--data-dir", "d"]
    assert build_parser().parse_args(base).fast_path is True
    assert build_parser().parse_args([*base, "--no-fast-path"]).fast_path is False
