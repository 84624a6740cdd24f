"""The reverse proxy against real backend processes (``dsys lb serve`` as a subprocess)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from conftest import Proc, terminate

MiB = 1 << 20


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as resp:
        return resp.status, await resp.text()


PATHS = pytest.mark.parametrize("path_flags", [(), ("--no-fast-path",)], ids=["fast", "aiohttp"])


@PATHS
async def test_round_robin_spreads_requests_and_sets_forwarded_headers(
    backend: Callable[..., Proc], proxy: Callable[..., Proc], path_flags: tuple[str, ...]
) -> None:
    bs = [backend(f"b{i}") for i in range(3)]
    lb = proxy([b.url for b in bs], "--strategy", "round-robin", "--no-health-check", *path_flags)
    async with aiohttp.ClientSession() as s:
        got = Counter()
        for _ in range(30):
            status, text = await _get(s, lb.url + "/")
            assert status == 200
            got[text] += 1
        assert got == {"hello from b0": 10, "hello from b1": 10, "hello from b2": 10}
        async with s.get(
            lb.url + "/headers",
            headers={
                "Connection": "keep-alive, X-Secret",
                "X-Secret": "hop-by-hop, must not pass",
                "X-Forwarded-For": "203.0.113.7",
                "X-Custom": "kept",
            },
        ) as resp:
            assert resp.status == 200
            headers = {k.lower(): v for k, v in (await resp.json())["headers"]}
    assert "x-secret" not in headers
    assert "connection" not in headers or headers["connection"].lower() == "keep-alive"
    assert headers["x-custom"] == "kept"
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{lb.port}"
    assert headers["forwarded"].startswith("for=127.0.0.1;proto=http")


@PATHS
async def test_large_download_is_streamed_not_buffered(
    backend: Callable[..., Proc], proxy: Callable[..., Proc], path_flags: tuple[str, ...]
) -> None:
    b = backend("big")
    lb = proxy([b.url], "--no-health-check", *path_flags)
    before = lb.rss_peak_kib()
    async with aiohttp.ClientSession() as s, s.get(lb.url + "/big?mb=50&hold=k1") as resp:
        assert resp.status == 200
        assert resp.content_length == 50 * MiB
        first = await resp.content.readexactly(MiB)
        # The backend is parked after its first MiB: the proxy passed bytes on
        # before the backend finished, so it cannot be holding the whole body.
        async with s.get(b.url + "/progress?key=k1") as p:
            assert (await p.json())["chunks"] == 1
        async with s.post(b.url + "/release?key=k1") as r:
            assert r.status == 200
        h = hashlib.sha256(first)
        total = len(first)
        async for chunk in resp.content.iter_chunked(MiB):
            h.update(chunk)
            total += len(chunk)
    assert total == 50 * MiB
    chunk = bytes(range(256)) * 4096
    assert h.hexdigest() == hashlib.sha256(chunk * 50).hexdigest()
    # The proxy's peak memory grew by far less than the 50 MiB that went through it.
    assert lb.rss_peak_kib() - before < 30 * 1024


async def test_large_upload_is_streamed_through(
    backend: Callable[..., Proc], proxy: Callable[..., Proc]
) -> None:
    b = backend("up")
    lb = proxy([b.url], "--no-health-check")
    block = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB
    n = 200  # 50 MiB generated on the fly

    async def body() -> AsyncIterator[bytes]:
        for _ in range(n):
            yield block

    async with aiohttp.ClientSession() as s, s.post(lb.url + "/upload", data=body()) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert got["bytes"] == n * len(block)
    assert got["sha256"] == hashlib.sha256(block * n).hexdigest()


async def test_websocket_passthrough_both_ways(
    backend: Callable[..., Proc], proxy: Callable[..., Proc]
) -> None:
    b = backend("ws")
    lb = proxy([b.url], "--no-health-check")
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(lb.url + "/ws", protocols=("chat",)) as ws:
            assert ws.protocol == "chat"
            assert (await ws.receive_str(timeout=10)) == "welcome from ws"
            await ws.send_str("hi")
            assert (await ws.receive_str(timeout=10)) == "echo:hi"
            await ws.send_bytes(b"\x01\x02\x03")
            assert (await ws.receive_bytes(timeout=10)) == b"\x03\x02\x01"
            await ws.send_str("bye")
            msg = await ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 4000


@PATHS
async def test_backend_killed_mid_run_causes_no_5xx(
    backend: Callable[..., Proc], proxy: Callable[..., Proc], path_flags: tuple[str, ...]
) -> None:
    bs = [backend(f"k{i}") for i in range(3)]
    lb = proxy(
        [b.url for b in bs],
        "--strategy",
        "round-robin",
        "--health-interval",
        "0.5",
        "--seed",
        "1",
        *path_flags,
    )
    statuses: Counter[int] = Counter()
    served: Counter[str] = Counter()

    async def client(s: aiohttp.ClientSession, n: int) -> None:
        for _ in range(n):
            status, text = await _get(s, lb.url + "/")
            statuses[status] += 1
            served[text] += 1

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(s, 30) for _ in range(4)))
        bs[1].kill()  # pooled keep-alive connections to it now break
        await asyncio.gather(*(client(s, 60) for _ in range(4)))
        async with s.get(lb.url + "/_dsys/endpoints") as resp:
            states = {e["url"]: e for e in (await resp.json())["endpoints"]}
    assert statuses == {200: 360}
    assert served["hello from k0"] > 100 and served["hello from k2"] > 100
    dead = states[bs[1].url]
    assert dead["state"] in ("ejected", "unhealthy", "circuit_open")
    assert dead["failures"] >= 1


async def test_no_endpoint_answers_503_and_failed_tries_502(
    backend: Callable[..., Proc], proxy: Callable[..., Proc]
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    lb = proxy([f"http://127.0.0.1:{dead_port}"], "--no-health-check", "--max-tries", "2")
    async with aiohttp.ClientSession() as s:
        async with s.get(lb.url + "/x") as resp:
            assert resp.status == 502
            body = await resp.json()
            assert body["error"] == "bad_gateway" and "cannot connect" in body["message"]
        async with s.post(
            lb.url + "/_dsys/endpoints/drain", json={"url": f"http://127.0.0.1:{dead_port}"}
        ) as resp:
            assert resp.status == 200
        async with s.get(lb.url + "/x") as resp:
            assert resp.status == 503
            body = await resp.json()
            assert body["error"] == "no_healthy_backend" and "1 draining" in body["message"]
            assert resp.headers["Retry-After"] == "1"


async def test_admin_api_lists_drains_adds_and_removes(
    backend: Callable[..., Proc], proxy: Callable[..., Proc]
) -> None:
    a, b = backend("a"), backend("b")
    lb = proxy([a.url], "--no-health-check", "--admin-listen", "127.0.0.1:0")
    admin = f"http://127.0.0.1:{lb.info['admin_port']}"
    async with aiohttp.ClientSession() as s:
        async with s.post(admin + "/endpoints", json={"url": b.url, "weight": 2}) as resp:
            assert resp.status == 201
        async with s.post(admin + "/endpoints/drain", json={"url": a.url}) as resp:
            assert resp.status == 200
        texts = {(await _get(s, lb.url + "/"))[1] for _ in range(6)}
        assert texts == {"hello from b"}
        async with s.get(lb.url + "/_dsys/endpoints") as resp:
            eps = {e["url"]: e for e in (await resp.json())["endpoints"]}
        assert eps[a.url]["state"] == "draining" and eps[b.url]["weight"] == 2
        async with s.post(admin + "/endpoints/remove", json={"url": a.url}) as resp:
            assert resp.status == 200
        async with s.post(admin + "/endpoints/remove", json={"url": a.url}) as resp:
            assert resp.status == 404
        for bad in (b"not json", b'{"url": 5}', b"[]"):
            async with s.post(admin + "/endpoints", data=bad) as resp:
                assert resp.status == 400
                assert "url" in (await resp.json())["message"]
        async with s.post(admin + "/endpoints", json={"url": "ftp://nope"}) as resp:
            assert resp.status == 400
        async with s.get(admin + "/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["eligible"] == 1
        async with s.get(admin + "/metrics") as resp:
            text = await resp.text()
    assert f'dsys_balance_requests_total{{code="200",endpoint="{b.url}"}} 6.0' in text
    assert "dsys_balance_request_duration_seconds_bucket" in text
    assert "dsys_balance_ejections_total" in text


async def test_admin_changes_need_the_admin_token_when_one_is_set(
    backend: Callable[..., Proc], proxy: Callable[..., Proc]
) -> None:
    a, b = backend("a"), backend("b")
    lb = proxy([a.url], "--no-health-check", "--admin-token", "s3cret")
    add = lb.url + "/_dsys/endpoints"
    async with aiohttp.ClientSession() as s:
        async with s.post(add, json={"url": b.url}) as resp:
            assert resp.status == 401
            assert "admin token" in (await resp.json())["message"]
        bad = {"Authorization": "Bearer nope"}
        async with s.post(add, json={"url": b.url}, headers=bad) as resp:
            assert resp.status == 401
        good = {"Authorization": "Bearer s3cret"}
        async with s.post(add, json={"url": b.url}, headers=good) as resp:
            assert resp.status == 201
        async with s.get(add) as resp:  # reading needs no token
            urls = {e["url"] for e in (await resp.json())["endpoints"]}
    assert urls == {a.url, b.url}


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("10.0.0.1", False),
     ("192.168.1.5", False), ("::ffff:8.8.8.8", False), ("", False), (None, False),
     ("not-an-ip", False)],
)  # fmt: skip
def test_without_a_token_only_loopback_clients_may_change_endpoints(
    remote: str | None, loopback: bool
) -> None:
    from dsys.balance.proxy import _is_loopback

    assert _is_loopback(remote) is loopback


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                got = sock.recv(65536)
            except TimeoutError:
                break
            if not got:
                break
            chunks.append(got)
        return b"".join(chunks)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
    ],
    ids=["garbage", "bad-length", "no-colon", "huge-header", "length-and-chunked", "tls"],
)
async def test_malformed_requests_get_a_clean_4xx_and_the_proxy_stays_up(
    shared_lb: Proc, request_bytes: bytes
) -> None:
    lb = shared_lb
    answer = await asyncio.to_thread(_raw, lb.port, request_bytes + b"\r\n")
    assert answer[:9] in (b"HTTP/1.0 ", b"HTTP/1.1 ") and answer[9:10] == b"4", answer[:200]
    async with aiohttp.ClientSession() as s:
        assert await _get(s, lb.url + "/") == (200, "hello from m")


async def test_graceful_shutdown_finishes_in_flight_requests(
    backend: Callable[..., Proc], proxy: Callable[..., Proc]
) -> None:
    b = backend("g")
    lb = proxy([b.url], "--no-health-check", "--shutdown-timeout", "20")
    async with aiohttp.ClientSession() as s:
        slow = asyncio.create_task(_get(s, lb.url + "/slow?ms=2500"))
        for _ in range(400):  # until the proxy has the request in flight
            async with s.get(lb.url + "/_dsys/healthz") as resp:
                if (await resp.json())["in_flight"] == 1:
                    break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the slow request never reached the proxy")
        code = asyncio.create_task(asyncio.to_thread(terminate, lb))
        assert await slow == (200, "slow g")
        assert await code == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", lb.port), timeout=2).close()


async def test_server_errors_eject_an_endpoint(
    backend: Callable[..., Proc], proxy: Callable[..., Proc]
) -> None:
    bs = [backend(f"e{i}") for i in range(3)]
    lb = proxy(
        [x.url for x in bs], "--no-health-check", "--eject-after", "3", "--no-circuit-breaker"
    )
    async with aiohttp.ClientSession() as s:
        for _ in range(12):
            status, _ = await _get(s, lb.url + "/fail")
            assert status == 500  # passed through, not retried
        async with s.get(lb.url + "/_dsys/metrics") as resp:
            metrics = await resp.text()
        async with s.get(lb.url + "/_dsys/endpoints") as resp:
            eps = (await resp.json())["endpoints"]
    ejected = [e for e in eps if e["state"] == "ejected"]
    assert len(ejected) == 1  # max 50% of 3: one endpoint, never the pool
    assert ejected[0]["ejections"] == 1
    line = [ln for ln in metrics.splitlines() if ln.startswith("dsys_balance_ejections_total{")]
    assert line and json.loads(line[0].rsplit(" ", 1)[1]) == 1.0


@PATHS
async def test_chunked_head_and_204_answers_keep_the_connection_usable(
    backend: Callable[..., Proc], proxy: Callable[..., Proc], path_flags: tuple[str, ...]
) -> None:
    b = backend("c")
    lb = proxy([b.url], "--no-health-check", *path_flags)
    conn = aiohttp.TCPConnector(limit=1)  # one connection: every answer must end cleanly
    async with aiohttp.ClientSession(connector=conn) as s:
        for _ in range(3):
            async with s.get(lb.url + "/chunked?n=6") as resp:
                assert resp.status == 200
                assert await resp.text() == "".join(f"part{i};" * (i + 1) for i in range(6))
            async with s.head(lb.url + "/") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Length"] == str(len("hello from c"))
            async with s.get(lb.url + "/nocontent") as resp:
                assert resp.status == 204 and resp.headers["X-Backend"] == "c"
            assert await _get(s, lb.url + "/") == (200, "hello from c")


def _exchange(port: int, data: bytes, expect: int) -> bytes:
    """Send raw bytes and read until ``expect`` complete answers or the peer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        got = b""
        while got.count(b"hello from") < expect:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


async def test_pipelined_requests_and_connection_close(shared_lb: Proc) -> None:
    lb = shared_lb
    req = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    got = await asyncio.to_thread(_exchange, lb.port, req * 3, 3)
    assert got.count(b"HTTP/1.1 200 OK") == 3 and got.count(b"hello from m") == 3
    closing = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    got = await asyncio.to_thread(_raw, lb.port, closing)  # returns once the proxy closes
    assert got.startswith(b"HTTP/1.1 200") and b"Connection: close" in got
    assert got.endswith(b"hello from m")


def _fuzz_once(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # EOF: the proxy must answer or close now
        got = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk


async def test_mutated_requests_never_get_a_5xx_or_kill_the_proxy(shared_lb: Proc) -> None:
    lb = shared_lb
    rng = random.Random(20261125)
    seed = (
        b"GET /headers?x=1 HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n"
        b"Connection: keep-alive\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
    )
    alphabet = b' :\r\n\t\x00/%;,"=GETHTP1.0123456789abcxyz\x7f\xff'
    for case in range(120):
        data = bytearray(seed * rng.randint(1, 2))
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(3)
            i = rng.randrange(len(data))
            if op == 0:
                data[i] = rng.choice(alphabet)
            elif op == 1:
                data.insert(i, rng.choice(alphabet))
            else:
                del data[i]
        got = await asyncio.to_thread(_fuzz_once, lb.port, bytes(data))
        for status in re.findall(rb"HTTP/1\.[01] (\d{3})", got):
            assert int(status) < 500, (case, bytes(data), got[:300])
    async with aiohttp.ClientSession() as s:
        assert await _get(s, lb.url + "/") == (200, "hello from m")


@PATHS
async def test_circuit_breaker_opens_when_an_endpoint_keeps_failing(
    backend: Callable[..., Proc], proxy: Callable[..., Proc], path_flags: tuple[str, ...]
) -> None:
    b = backend("cb")
    lb = proxy([b.url], "--no-health-check", "--eject-after", "1000", *path_flags)
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            assert (await _get(s, lb.url + "/fail"))[0] == 500
        async with s.get(lb.url + "/") as resp:
            assert resp.status == 503
            assert "circuit open" in (await resp.json())["message"]


async def test_shutdown_closes_websockets_with_going_away(
    backend: Callable[..., Proc], proxy: Callable[..., Proc]
) -> None:
    b = backend("wsg")
    lb = proxy([b.url], "--no-health-check", "--shutdown-timeout", "20", "--ws-mode", "frames")
    async with aiohttp.ClientSession() as s, s.ws_connect(lb.url + "/ws") as ws:
        assert (await ws.receive_str(timeout=10)) == "welcome from wsg"
        code = asyncio.create_task(asyncio.to_thread(terminate, lb))
        msg = await ws.receive(timeout=20)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
        assert await code == 0


@pytest.mark.slow
async def test_shutdown_closes_spliced_websockets_after_the_timeout(
    backend: Callable[..., Proc], proxy: Callable[..., Proc]
) -> None:
    b = backend("wss")
    lb = proxy([b.url], "--no-health-check", "--shutdown-timeout", "1")
    async with aiohttp.ClientSession() as s, s.ws_connect(lb.url + "/ws") as ws:
        assert (await ws.receive_str(timeout=10)) == "welcome from wss"
        code = asyncio.create_task(asyncio.to_thread(terminate, lb))
        msg = await ws.receive(timeout=20)  # no close frame: the TCP connection closes
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert await code == 0


async def test_streamed_upload_is_retried_elsewhere_after_a_connect_error(
    backend: Callable[..., Proc], proxy: Callable[..., Proc]
) -> None:
    b = backend("u")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    lb = proxy(
        [dead, b.url], "--strategy", "round-robin", "--no-health-check", "--no-circuit-breaker"
    )
    block = b"z" * (256 * 1024)  # above the buffering limit: streamed

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield block

    async with aiohttp.ClientSession() as s:
        for _ in range(4):  # round robin: some of these try the dead endpoint first
            async with s.post(lb.url + "/upload", data=body()) as resp:
                assert resp.status == 200
                got = await resp.json()
                assert got["bytes"] == 8 * len(block)
                assert got["sha256"] == hashlib.sha256(block * 8).hexdigest()
        async with s.get(lb.url + "/_dsys/metrics") as resp:
            metrics = await resp.text()
    retries = re.search(r"^dsys_balance_retries_total (\S+)$", metrics, re.M)
    assert retries is not None and float(retries.group(1)) >= 2


async def test_upstream_connections_closed_by_the_backend_are_not_held_against_it(
    backend: Callable[..., Proc], proxy: Callable[..., Proc]
) -> None:
    b = backend("ka", keepalive=0.2)  # the backend drops idle connections quickly
    lb = proxy([b.url], "--no-health-check", "--eject-after", "1")
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            got = await asyncio.gather(*(_get(s, lb.url + "/") for _ in range(8)))
            assert got == [(200, "hello from ka")] * 8
            await asyncio.sleep(0.5)  # every pooled upstream connection gets closed
        async with s.get(lb.url + "/_dsys/endpoints") as resp:
            (ep,) = (await resp.json())["endpoints"]
    assert ep["failures"] == 0 and ep["state"] == "up"


@PATHS
async def test_an_endpoint_that_does_not_answer_in_time_gets_a_504(
    backend: Callable[..., Proc], proxy: Callable[..., Proc], path_flags: tuple[str, ...]
) -> None:
    b = backend("t")
    lb = proxy([b.url], "--no-health-check", "--timeout", "0.5", *path_flags)
    async with aiohttp.ClientSession() as s:
        async with s.get(lb.url + "/slow?ms=4000") as resp:
            assert resp.status == 504
            body = await resp.json()
        assert body["error"] == "upstream_timeout" and "0.5" in body["message"]
        assert await _get(s, lb.url + "/") == (200, "hello from t")  # still serving
