"""``dsys lb serve``: an HTTP/1.1 reverse proxy balancing over a :class:`Pool`.

What one request goes through::

    client ──> handler ──> pool.acquire() ──> upstream (shared keep-alive ClientSession)
                  │            (strategy, health, ejection, circuit breakers)
                  └── retry on another endpoint: connect errors always, dropped
                      connections for idempotent methods, while the request body has
                      not been streamed yet and the retry budget allows it

* Bodies are streamed both ways in large chunks; only bodies with a known length up
  to ``ProxyConfig.buffer_limit`` bytes are read whole (cheaper, and retryable).
* Hop-by-hop headers (``Connection``, ``Keep-Alive``, ``Transfer-Encoding``, those
  named in ``Connection``...) are stripped; ``X-Forwarded-For``,
  ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and ``Forwarded`` are set.
* ``Upgrade: websocket`` requests are proxied as WebSockets: spliced by default (the
  handshake checked and forwarded, then bytes copied both ways, :mod:`dsys.balance.splice`),
  or message by message through aiohttp with ``ws_mode="frames"``.
* When nobody can serve: 503 (no eligible endpoint), 502 (every try failed), 504
  (the endpoint did not answer in time), each with a JSON body saying why.
* Admin API on ``/_dsys/`` of the same port (and on ``--admin-listen`` if given):
  ``GET /_dsys/endpoints``, ``POST /_dsys/endpoints`` ``{"url": ..., "weight": 1}``,
  ``POST /_dsys/endpoints/drain`` ``{"url": ...}``, ``.../undrain``, ``.../remove``,
  ``GET /_dsys/healthz``, ``GET /_dsys/metrics``.
* Graceful shutdown: stop accepting, let in-flight requests finish up to
  ``shutdown_timeout`` seconds, close WebSockets with 1001 (going away) in frames
  mode; spliced WebSockets get up to ``shutdown_timeout`` too, then their TCP
  connections are closed (no close frame: the proxy does not know where frames end).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from dsys.balance import forwarded
from dsys.balance.health import Ejected
from dsys.balance.pool import Lease, Pool, PoolConfig
from dsys.errors import BadInputError, CircuitOpenError, ConfigError, NoHealthyBackendError
from dsys.http11 import valid_host
from dsys.observability import (
    Metrics,
    add_observability_routes,
    error_middleware,
    get_logger,
    json_error,
)
from dsys.resilience import RetryBudget

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""HTTP methods safe to send twice (RFC 9110 section 9.2.2)."""

HOP_BY_HOP = frozenset(
    istr(h)
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
    )
)
"""Headers that describe one connection and must not be forwarded (RFC 9110 7.6.1)."""

_WS_HEADERS = frozenset(
    istr(h)
    for h in (
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Accept",
    )
)
_CONTENT_LENGTH = istr("Content-Length")
_X_FORWARDED_FOR = istr("X-Forwarded-For")
_FORWARDED = istr("Forwarded")
_HOST = istr("Host")
_NO_BODY_STATUS = frozenset({204, 304})


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """Settings of the reverse proxy.

    Attributes:
        backends: initial endpoint URLs (``http://host:port``); more can be added later.
        pool: strategy, health checks and ejection.
        max_tries: attempts per request, the first included (retries only when safe).
        retry_ratio: retries allowed as a fraction of requests (the retry budget).
        connect_timeout: seconds to open an upstream connection.
        timeout: seconds to get the upstream's response headers, per try.
        buffer_limit: request/response bodies with a known length up to this many
            bytes are read whole; anything larger or of unknown length is streamed.
        chunk_size: read size when streaming bodies.
        max_connections: upstream connection pool size (across endpoints).
        client_max_size: largest request body accepted, in bytes (413 beyond).
        shutdown_timeout: seconds in-flight requests get to finish on shutdown.
        admin_prefix: path prefix of the admin API on the proxy port ("" disables).
        admin_token: when set, admin changes (add, drain, undrain, remove) need
            ``Authorization: Bearer <token>``; when unset, they are accepted only from
            loopback clients. Reading (list, ``/healthz``, ``/metrics``) is always open.
        fast_path: serve plain bodiless HTTP/1.1 requests with the callback-based
            fast path (:mod:`dsys.balance.fastpath`); everything else uses aiohttp.
        ws_mode: how WebSockets are proxied: ``"splice"`` (the handshake is checked and
            forwarded, then bytes are copied both ways without looking at frames; needs
            the fast path, :mod:`dsys.balance.splice`) or ``"frames"`` (aiohttp on both
            sides: every message parsed and re-framed; per-message size limit).
        ws_idle_timeout: splice mode: close a tunnel after this many seconds without
            a byte either way (``None``: never, the default).
    """

    backends: tuple[str, ...] = ()
    pool: PoolConfig = field(default_factory=PoolConfig)
    max_tries: int = 3
    retry_ratio: float = 0.2
    connect_timeout: float = 2.0
    timeout: float = 30.0
    buffer_limit: int = 64 * 1024
    chunk_size: int = 256 * 1024
    max_connections: int = 512
    client_max_size: int = 1 << 30
    shutdown_timeout: float = 10.0
    admin_prefix: str = "/_dsys"
    admin_token: str | None = None
    fast_path: bool = True
    ws_mode: str = "splice"
    ws_idle_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.ws_mode not in ("splice", "frames"):
            raise ConfigError("ws_mode must be 'splice' or 'frames'")
        if self.ws_idle_timeout is not None and self.ws_idle_timeout <= 0:
            raise ConfigError("ws_idle_timeout must be > 0 (None: no idle timeout)")
        if self.max_tries < 1:
            raise ConfigError("max_tries must be >= 1")
        if self.connect_timeout <= 0 or self.timeout <= 0 or self.shutdown_timeout < 0:
            raise ConfigError("timeouts must be > 0")
        if self.buffer_limit < 0 or self.chunk_size < 1024 or self.max_connections < 1:
            raise ConfigError("need buffer_limit >= 0, chunk_size >= 1024, max_connections >= 1")
        if self.admin_prefix and (
            not self.admin_prefix.startswith("/") or self.admin_prefix.endswith("/")
        ):
            raise ConfigError("admin_prefix must start with '/' and not end with '/'")


def _is_loopback(remote: str | None) -> bool:
    """Whether a peer address (as aiohttp reports it) is on the loopback interface."""
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


class _UpstreamFailed(Exception):
    """One try failed; ``retry_safe`` says whether another endpoint may be tried."""

    def __init__(self, message: str, *, retry_safe: bool, timeout: bool = False) -> None:
        super().__init__(message)
        self.retry_safe = retry_safe
        self.timeout = timeout


class LoadBalancer:
    """The reverse proxy: a pool, a shared upstream session, metrics and the admin API.

    Use :meth:`app` to get the aiohttp application (the session is created on
    startup and closed on cleanup), or :func:`serve` to run it.

    Args:
        config: proxy settings.
    """

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.metrics = Metrics("balance")
        # one lock-free collector for both series (prometheus-client locks on every update)
        self._requests = self.metrics.request_stats(
            "requests_total",
            "Proxied requests by endpoint and status (code 0: no answer, e.g. connect error)",
            "request_duration_seconds",
            "Upstream latency to response headers",
            labels=("endpoint", "code"),
        )
        self._ejections = self.metrics.counter(
            "ejections_total", "Outlier ejections by endpoint", ["endpoint"]
        )
        self._retries = self.metrics.counter("retries_total", "Requests retried elsewhere")
        self._errors = self.metrics.counter(
            "errors_total", "Requests answered by the proxy itself", ["code"]
        )
        self._in_flight = self.metrics.gauge("in_flight", "Requests being proxied now")
        self._in_flight.set_function(self.in_flight)
        self._aio_in_flight = 0
        self.fast_in_flight: Callable[[], int] | None = None  # set by the fast path
        self.pool = Pool(config.backends, config=config.pool, on_event=self._on_event)
        self.budget = RetryBudget(ratio=config.retry_ratio)
        self._clock = self.pool.clock
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout, sock_read=config.timeout
        )
        self._websockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self._log = get_logger("balance")

    # ---- lifecycle ------------------------------------------------------------

    def app(self) -> web.Application:
        """The proxy's aiohttp application (catch-all route plus the admin prefix)."""
        app = web.Application(client_max_size=self.config.client_max_size)
        if self.config.admin_prefix:
            app.add_subapp(self.config.admin_prefix + "/", self.admin_app())
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        app.on_cleanup.append(self._cleanup)
        return app

    def admin_app(self) -> web.Application:
        """The admin API alone (endpoints, drain, add, ``/healthz``, ``/metrics``)."""
        admin = web.Application(
            middlewares=[error_middleware, self._admin_guard], client_max_size=1 << 20
        )
        admin.router.add_get("/endpoints", self._admin_list)
        admin.router.add_post("/endpoints", self._admin_add)
        admin.router.add_post("/endpoints/drain", self._admin_drain)
        admin.router.add_post("/endpoints/undrain", self._admin_undrain)
        admin.router.add_post("/endpoints/remove", self._admin_remove)
        add_observability_routes(admin, self.metrics, self._health)
        return admin

    async def _startup(self, app: web.Application) -> None:
        await self.start()

    async def start(self) -> None:
        """Open the upstream session and start health checks (idempotent)."""
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections,
            limit_per_host=0,
            keepalive_timeout=30.0,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            read_bufsize=self.config.chunk_size,
        )
        self.pool.start_health_checks(self._session)

    async def _shutdown(self, app: web.Application) -> None:
        for ws in list(self._websockets):
            with contextlib.suppress(Exception):
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"proxy shutting down")

    async def _cleanup(self, app: web.Application) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop health checks and close the upstream session."""
        await self.pool.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def in_flight(self) -> int:
        """Requests being proxied right now (both paths)."""
        fast = self.fast_in_flight
        return self._aio_in_flight + (fast() if fast is not None else 0)

    async def _health(self) -> dict[str, object]:
        eligible = self.pool.eligible()
        return {
            "ok": bool(eligible),
            "endpoints": len(self.pool),
            "eligible": len(eligible),
            "in_flight": self.in_flight(),
        }

    def _on_event(self, ev: object) -> None:
        if isinstance(ev, Ejected):
            self._ejections.labels(ev.endpoint).inc()

    # ---- metrics fast path ----------------------------------------------------

    def _count(self, endpoint: str, status: int, latency: float) -> None:
        self._requests.observe(endpoint, status, latency)

    # ---- the proxy path ---------------------------------------------------------

    def _upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        src = request.headers
        drop: set[str] | frozenset[istr] = HOP_BY_HOP
        conn = src.get("Connection")
        if conn:
            drop = set(HOP_BY_HOP) | {istr(t.strip()) for t in conn.split(",") if t.strip()}
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in src.items() if k not in drop and k != _X_FORWARDED_FOR
        )
        # Built from validated values only (dsys.balance.forwarded): a crafted Host or
        # prior Forwarded cannot forge or swallow the element a backend trusts.
        peer = request.remote or "unknown"
        prior = _header_bytes(src, _X_FORWARDED_FOR)
        headers[_X_FORWARDED_FOR] = _text(forwarded.x_forwarded_for(prior, peer))
        proto = request.scheme
        headers["X-Forwarded-Proto"] = proto
        host = _header_bytes(src, _HOST)
        if host and valid_host(host):
            headers.setdefault("X-Forwarded-Host", _text(host))
        else:
            headers.popall("X-Forwarded-Host", None)  # not one we can vouch for
            host = None
        mine = forwarded.element(peer, proto, host)
        headers[_FORWARDED] = _text(forwarded.forwarded(_header_bytes(src, _FORWARDED), mine))
        return headers

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        self._aio_in_flight += 1
        try:
            return await self._proxy(request)
        finally:
            self._aio_in_flight -= 1

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        session = self._session
        if session is None:
            return self._error(503, "unavailable", "the proxy is starting or stopping")
        method = request.method
        headers = self._upstream_headers(request)
        cfg = self.config

        body: bytes | None = None
        stream = False  # the body is streamed: a fresh reader per try, none once read
        streamed = [False]  # set once any body byte was read from the client
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= cfg.buffer_limit:
                try:
                    body = await request.read()
                except web.HTTPRequestEntityTooLarge:
                    raise
                except (aiohttp.ClientPayloadError, ConnectionError) as exc:
                    return self._error(400, "bad_request", f"could not read request body: {exc}")
            else:
                stream = True

        url_tail = request.raw_path
        tried: list[str] = []
        self.budget.record_request(self._clock.now())
        last: _UpstreamFailed | None = None
        for attempt in range(cfg.max_tries):
            if attempt:
                if not self.budget.try_spend(self._clock.now()):
                    break
                self._retries.inc()
            try:
                lease = self.pool.acquire(exclude=tried)
            except NoHealthyBackendError as exc:
                if last is not None:
                    break
                return self._error(503, "no_healthy_backend", str(exc), retry_after=1)
            tried.append(lease.endpoint)
            data = _stream_body(request, cfg.chunk_size, streamed) if stream else body
            try:
                return await self._try(request, session, lease, method, url_tail, headers, data)
            except _UpstreamFailed as exc:
                last = exc
                if not exc.retry_safe or streamed[0]:
                    break
        assert last is not None
        if last.timeout:
            return self._error(504, "upstream_timeout", str(last), tried=tried)
        return self._error(502, "bad_gateway", str(last), tried=tried)

    async def _try(
        self,
        request: web.Request,
        session: aiohttp.ClientSession,
        lease: Lease,
        method: str,
        path: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> web.StreamResponse:
        ep = lease.endpoint
        pool = self.pool
        try:
            upstream = await pool.call(
                lease,
                lambda: session._request(
                    method,
                    ep + path,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=self._timeout,
                ),
            )
        except CircuitOpenError:
            pool.release_neutral(lease)
            raise _UpstreamFailed(f"{ep}: circuit breaker open", retry_safe=True) from None
        except aiohttp.ClientConnectorError as exc:
            pool.release(lease, ok=False, error=f"connect: {exc}")
            self._count(ep, 0, 0.0)
            raise _UpstreamFailed(f"{ep}: cannot connect: {exc}", retry_safe=True) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            pool.release(lease, ok=False, error=f"disconnected: {exc}")
            self._count(ep, 0, 0.0)
            raise _UpstreamFailed(
                f"{ep}: connection dropped: {exc!r}", retry_safe=method in IDEMPOTENT
            ) from None
        except aiohttp.ConnectionTimeoutError:
            pool.release(lease, ok=False, error="connect timeout")
            self._count(ep, 0, 0.0)
            raise _UpstreamFailed(
                f"{ep}: cannot connect within {self.config.connect_timeout} s",
                retry_safe=True,
            ) from None
        except TimeoutError:
            pool.release(lease, ok=False, error="timeout")
            self._count(ep, 0, 0.0)
            raise _UpstreamFailed(
                f"{ep}: no response within {self.config.timeout} s",
                retry_safe=False,
                timeout=True,
            ) from None
        except aiohttp.ClientError as exc:
            pool.release(lease, ok=False, error=repr(exc))
            self._count(ep, 0, 0.0)
            raise _UpstreamFailed(f"{ep}: {exc!r}", retry_safe=False) from None
        status = upstream.status
        ok = status < 500
        now = pool.clock.now()
        self._count(ep, status, now - lease.started)
        try:
            resp_headers = _response_headers(upstream)
            length = upstream.content_length
            if method == "HEAD" or status in _NO_BODY_STATUS:
                resp = web.StreamResponse(status=status, reason=upstream.reason)
                resp.headers.extend(resp_headers)
                await resp.prepare(request)
                await resp.write_eof()
                return resp
            if length is not None and length <= self.config.buffer_limit:
                try:
                    data = await upstream.read()
                except TimeoutError:
                    ok = False
                    raise _UpstreamFailed(
                        f"{ep}: answer not complete within {self.config.timeout} s",
                        retry_safe=False,
                        timeout=True,
                    ) from None
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                    ok = False  # nothing went to the client yet: another try or a 502
                    raise _UpstreamFailed(
                        f"{ep}: broke off its answer: {exc!r}", retry_safe=method in IDEMPOTENT
                    ) from None
                resp_headers.popall(_CONTENT_LENGTH, None)
                return web.Response(
                    status=status, reason=upstream.reason, body=data, headers=resp_headers
                )
            resp = web.StreamResponse(status=status, reason=upstream.reason)
            resp.headers.extend(resp_headers)
            if length is None:
                resp.enable_chunked_encoding()
            await resp.prepare(request)
            content = upstream.content  # read_bufsize is chunk_size: large reads
            while True:
                data = await content.readany()
                if not data:
                    break
                await resp.write(data)
            await resp.write_eof()
            return resp
        except (ConnectionError, asyncio.CancelledError):
            # The client went away: not the endpoint's fault.
            ok = True
            upstream.close()
            raise
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            # The endpoint broke off its answer after the headers went out: all we can
            # do is cut the client's connection so it sees a truncated response.
            ok = False
            upstream.close()
            self._log.warning("upstream_broke_response", endpoint=ep, error=repr(exc))
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError(f"upstream {ep} broke off its response") from None
        finally:
            upstream.release()
            pool.release(lease, ok=ok, error="" if ok else f"status {status}")

    def _error(
        self, status: int, kind: str, message: str, *, retry_after: int | None = None, **extra: Any
    ) -> web.Response:
        self._errors.labels(str(status)).inc()
        resp = json_error(status, kind, message, **extra)
        if retry_after is not None:
            resp.headers["Retry-After"] = str(retry_after)
        return resp

    # ---- WebSocket ----------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        session = self._session
        if session is None:
            return self._error(503, "unavailable", "the proxy is starting or stopping")
        headers = self._upstream_headers(request)
        for h in _WS_HEADERS:
            headers.popall(h, None)
        protocols = tuple(
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        )
        tried: list[str] = []
        upstream: aiohttp.ClientWebSocketResponse | None = None
        lease: Lease | None = None
        last_error = ""
        for _ in range(self.config.max_tries):
            try:
                lease = self.pool.acquire(exclude=tried)
            except NoHealthyBackendError as exc:
                if not tried:
                    return self._error(503, "no_healthy_backend", str(exc), retry_after=1)
                break
            tried.append(lease.endpoint)
            try:
                upstream = await session.ws_connect(
                    lease.endpoint + request.raw_path,
                    headers=headers,
                    protocols=protocols,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                    autoping=True,
                    max_msg_size=16 * 1024 * 1024,
                )
                break
            except aiohttp.WSServerHandshakeError as exc:
                self.pool.release(lease, ok=exc.status < 500, error=f"ws handshake {exc.status}")
                return self._error(
                    exc.status if 400 <= exc.status < 600 else 502,
                    "websocket_refused",
                    f"{lease.endpoint} refused the WebSocket: {exc.status} {exc.message}",
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.pool.release(lease, ok=False, error=f"ws connect: {exc!r}")
                last_error = f"{lease.endpoint}: {exc!r}"
                lease = None
        if upstream is None or lease is None:
            return self._error(502, "bad_gateway", f"WebSocket: {last_error}", tried=tried)
        # The pool learns the handshake's latency, not the tunnel's lifetime (which would
        # make a backend holding long WebSockets look slow to p2c-ewma), as splice does.
        shake = self.pool.clock.now() - lease.started
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoping=True,
            max_msg_size=16 * 1024 * 1024,
        )
        self._websockets.add(client)
        ok = True
        try:
            await client.prepare(request)
            a = asyncio.create_task(_pump(client, upstream))
            b = asyncio.create_task(_pump(upstream, client))
            try:
                await asyncio.wait((a, b), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (a, b):
                    t.cancel()
                await asyncio.gather(a, b, return_exceptions=True)
        finally:
            await upstream.close()
            await client.close()
            lease.started = self.pool.clock.now() - shake
            self.pool.release(lease, ok=ok)
        return client

    # ---- admin API ----------------------------------------------------------------

    @web.middleware
    async def _admin_guard(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Admin changes need the admin token, or a loopback client when none is set."""
        if request.method in ("GET", "HEAD"):
            return await handler(request)
        token = self.config.admin_token
        if token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return json_error(401, "unauthorized", "admin changes need the admin token")
        elif not _is_loopback(request.remote):
            return json_error(
                403,
                "forbidden",
                "admin changes are accepted from loopback clients only; "
                "start the proxy with --admin-token to allow others",
            )
        return await handler(request)

    async def _admin_list(self, request: web.Request) -> web.Response:
        return web.json_response({"endpoints": self.pool.snapshot()})

    async def _admin_body(self, request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise BadInputError('body must be a JSON object like {"url": "http://..."}') from None
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            raise BadInputError('body must be a JSON object with a string "url"')
        return data

    async def _admin_add(self, request: web.Request) -> web.Response:
        data = await self._admin_body(request)
        weight = data.get("weight", 1)
        if not isinstance(weight, int) or isinstance(weight, bool):
            return json_error(400, "bad_request", "weight must be an integer")
        try:
            ep = self.pool.add(data["url"], weight)
        except ConfigError as exc:
            return json_error(400, "bad_request", str(exc))
        return web.json_response({"added": ep}, status=201)

    async def _admin_change(
        self, request: web.Request, action: Callable[[str], None], verb: str
    ) -> web.Response:
        data = await self._admin_body(request)
        try:
            action(data["url"])
        except ConfigError as exc:
            return json_error(404, "not_found", str(exc))
        return web.json_response({verb: data["url"]})

    async def _admin_drain(self, request: web.Request) -> web.Response:
        return await self._admin_change(request, self.pool.drain, "draining")

    async def _admin_undrain(self, request: web.Request) -> web.Response:
        return await self._admin_change(
            request, lambda url: self.pool.drain(url, False), "undrained"
        )

    async def _admin_remove(self, request: web.Request) -> web.Response:
        return await self._admin_change(request, self.pool.remove, "removed")


def _header_bytes(headers: CIMultiDictProxy[str], name: istr) -> bytes | None:
    """All of a request's ``name`` fields as one list value, in bytes (``None``: absent)."""
    values = headers.getall(name, None)
    if not values:
        return None
    return ", ".join(values).encode("utf-8", "surrogateescape")


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


async def _stream_body(
    request: web.Request, chunk_size: int, streamed: list[bool]
) -> AsyncIterator[bytes]:
    content = request.content
    while True:
        data = await content.read(chunk_size)
        if not data:
            return
        streamed[0] = True
        yield data


def _response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    src = upstream.headers
    drop: set[str] | frozenset[istr] = HOP_BY_HOP
    conn = src.get("Connection")
    if conn:
        drop = set(HOP_BY_HOP) | {istr(t.strip()) for t in conn.split(",") if t.strip()}
    return CIMultiDict((k, v) for k, v in src.items() if k not in drop)


async def _pump(
    src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for msg in src:
        if msg.type is WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type is WSMsgType.PONG:
            await dst.pong(msg.data)
        else:
            break
    code = src.close_code or aiohttp.WSCloseCode.OK
    await dst.close(code=code)


async def serve(
    config: ProxyConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    admin: tuple[str, int] | None = None,
    on_started: Callable[[int, int | None], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the proxy until SIGINT/SIGTERM (or ``stop`` is set), then shut down gracefully.

    Shutdown stops accepting connections at once, lets in-flight requests finish for
    up to ``config.shutdown_timeout`` seconds, then closes what is left.

    Args:
        config: proxy settings.
        host: address to listen on.
        port: port to listen on (0 picks a free one).
        admin: optional separate ``(host, port)`` for the admin API.
        on_started: called with the bound proxy port and admin port.
        stop: an event that stops the proxy when set (signals are used as well).
    """
    import signal

    from dsys.balance.fastpath import FastPath
    from dsys.observability import start_site

    lb = LoadBalancer(config)
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(
        lb.app(),
        access_log=None,
        shutdown_timeout=config.shutdown_timeout,
        handler_cancellation=True,
    )
    await runner.setup()
    fallback = runner.server
    assert fallback is not None
    fast: FastPath | None = None
    if config.fast_path:
        fast = FastPath(lb, fallback)
        fast.start()
        factory: Callable[[], asyncio.Protocol] = fast.protocol
    else:
        factory = fallback
    server = await loop.create_server(factory, host, port, backlog=1024, reuse_address=True)
    bound = int(server.sockets[0].getsockname()[1])
    admin_runner: web.AppRunner | None = None
    admin_port: int | None = None
    try:
        if admin is not None:
            admin_runner, admin_port = await start_site(lb.admin_app(), admin[0], admin[1])
        if on_started is not None:
            on_started(bound, admin_port)
        stop = stop or asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        lb._log.info("shutting_down", deadline=config.shutdown_timeout)
    finally:
        server.close()
        deadline = loop.time() + config.shutdown_timeout
        waits = [runner.cleanup()]
        if fast is not None:
            waits.append(fast.drain(deadline))
        await asyncio.gather(*waits)
        if admin_runner is not None:
            await admin_runner.cleanup()


__all__ = ["HOP_BY_HOP", "IDEMPOTENT", "LoadBalancer", "ProxyConfig", "serve"]
