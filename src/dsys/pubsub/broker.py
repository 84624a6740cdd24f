"""The pub/sub broker: an aiohttp server around :class:`~dsys.pubsub.core.BrokerState`.

Endpoints:

* ``GET /v1/ws``: a WebSocket speaking the pub/sub protocol. Binary frames carry msgpack,
  text frames JSON (for browsers). A frame holds one operation (a map with ``"op"``) or a
  list of them. Replies use the encoding of the client's first frame (or ``?format=json``).
* ``POST /v1/publish/{subject}``: publish the request body (``?reply=`` optional;
  ``Authorization: Bearer TOKEN`` when tokens are configured).
* ``GET /healthz``, ``GET /metrics``.

Protocol, client to broker::

    {"op": "connect", "token": "...", "name": "..."}        -> {"op": "info", ...}
    {"op": "sub", "sid": 1, "subject": "prices.>", "queue": "q", "max_pending": 1000,
     "policy": "drop_oldest" | "drop_newest" | "disconnect"}
    {"op": "unsub", "sid": 1}
    {"op": "pub", "subject": "prices.NSE.INFY", "data": b"...", "reply": "_INBOX.x.1"}
    {"op": "ping", "id": 7}                                   -> {"op": "pong", "id": 7}

broker to client: ``{"op": "msg", "sid", "subject", "data", "reply"?}``, ``pong``,
``info`` and ``{"op": "err", "reason": "...", "re": op, "sid"?, "fatal"?}``. In JSON
frames ``data`` is a UTF-8 string; binary payloads travel as ``data_b64``.

Every malformed, oversized or unauthorized operation is answered with an ``err`` frame
naming the reason, and the connection stays open; only a bad token, a frame larger than
``max_frame`` (WebSocket close 1009) or a slow consumer under the ``disconnect`` policy
ends the connection.

Brokers started with ``--route HOST:PORT`` dial their peers on the same endpoint and
announce themselves with ``{"op": "connect", "route": true, "server_id", "listen"}``. On a
link, the accepting broker sends its aggregated interest (``rsub``/``runsub``) and the
dialling broker forwards matching messages (``rmsg``). A broker that is dialled by a peer
it does not dial yet dials it back, so every pair ends up with one link each way and the
cluster is a full mesh; forwarded messages are never forwarded again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import itertools
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dsys.codec import decode
from dsys.errors import BadInputError, ConfigError, RemoteProtocolError
from dsys.observability import (
    Metrics,
    add_observability_routes,
    error_middleware,
    get_logger,
    parse_listen,
    start_site,
)
from dsys.pubsub.core import (
    BrokerLimits,
    BrokerState,
    ConnKind,
    Effects,
    Frame,
    Message,
    Permissions,
    SlowConsumerPolicy,
)

MAX_OPS_PER_FRAME = 65_536
"""Most operations one WebSocket frame may carry."""

_POLICIES = {p.value: p for p in SlowConsumerPolicy}


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    """Configuration of one broker.

    Attributes:
        host: address to bind (loopback by default).
        port: port to bind; 0 picks a free one.
        routes: peers (``HOST:PORT``) to link with in cluster mode.
        advertise: ``HOST:PORT`` peers should use to dial back; defaults to the bound
            address.
        tokens: token -> permissions; when set, clients must ``connect`` with a token.
        cluster_token: when set, peers must present it to open a route. Required for
            routes when ``tokens`` is set: a route may publish to any subject, so
            without it any client could bypass its permissions by announcing a route.
        limits: per-connection bounds (payload, subscriptions, pending bytes ...).
        max_frame: largest WebSocket frame accepted, in bytes.
        heartbeat: seconds between WebSocket pings that detect dead peers.
        write_batch: most frames sent in one WebSocket message.
        server_id: this broker's id in the cluster; random by default.
        route_backoff_max: longest wait between attempts to dial a peer, in seconds.
    """

    host: str = "127.0.0.1"
    port: int = 7201
    routes: tuple[str, ...] = ()
    advertise: str | None = None
    tokens: Mapping[str, Permissions] | None = None
    cluster_token: str | None = None
    limits: BrokerLimits = field(default_factory=BrokerLimits)
    max_frame: int = 4 * 1024 * 1024
    heartbeat: float = 10.0
    write_batch: int = 512
    server_id: str | None = None
    route_backoff_max: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.max_frame < self.limits.max_payload + 1024:
            raise ConfigError(
                f"max_frame ({self.max_frame}) must exceed max_payload "
                f"({self.limits.max_payload}) by at least 1024 bytes"
            )
        if self.heartbeat <= 0 or self.route_backoff_max <= 0:
            raise ConfigError("heartbeat and route_backoff_max must be positive")
        if self.write_batch <= 0:
            raise ConfigError(f"write_batch must be positive, got {self.write_batch}")
        for route in self.routes:
            parse_listen(route)
        if self.tokens is not None and self.routes and self.cluster_token is None:
            raise ConfigError(
                "a broker with client tokens needs a cluster_token to link with peers "
                "(routes bypass client permissions)"
            )
        if self.tokens is not None:
            for token, perms in self.tokens.items():
                if not isinstance(token, str) or not token:
                    raise ConfigError("tokens must be non-empty strings")
                if not isinstance(perms, Permissions):
                    raise ConfigError(f"permissions of a token must be Permissions, got {perms!r}")


def load_tokens(path: str) -> dict[str, Permissions]:
    """Read a token file: ``{"tokens": {"TOKEN": {"publish": [...], "subscribe": [...]}}}``.

    A missing ``publish``/``subscribe`` key (or ``null``) allows everything.

    Raises:
        ConfigError: the file cannot be read or has the wrong shape.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read token file {path!r}: {exc}") from exc
    tokens = raw.get("tokens") if isinstance(raw, dict) else None
    if not isinstance(tokens, dict):
        raise ConfigError(f"{path}: expected an object with a 'tokens' map")
    out: dict[str, Permissions] = {}
    for token, spec in tokens.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: permissions of a token must be an object")
        kwargs: dict[str, tuple[str, ...] | None] = {}
        for key in ("publish", "subscribe"):
            value = spec.get(key)
            if value is not None and (
                not isinstance(value, list) or not all(isinstance(v, str) for v in value)
            ):
                raise ConfigError(f"{path}: {key} must be a list of patterns")
            kwargs[key] = None if value is None else tuple(value)
        out[token] = Permissions(**kwargs)
    return out


class _Session:
    """The adapter side of one connection: its socket, writer task and mode."""

    __slots__ = (
        "authed",
        "conn_id",
        "event",
        "json",
        "kicked",
        "mode_known",
        "peer",
        "transport",
        "writer",
        "ws",
    )

    def __init__(
        self, conn_id: int, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse
    ) -> None:
        self.conn_id = conn_id
        self.ws = ws
        self.event = asyncio.Event()
        self.json = False
        self.mode_known = False
        self.authed = False
        self.peer = ""
        self.writer: asyncio.Task[None] | None = None
        self.kicked: str | None = None
        self.transport: asyncio.Transport | None = None


class _RouteLink:
    """An outbound link to one peer broker, redialled with backoff until closed."""

    def __init__(self, broker: Broker, address: str, *, dialback: bool) -> None:
        self.broker = broker
        self.address = address
        self.dialback = dialback
        self.remote_id: str | None = None
        self.conn_id: int | None = None
        self.connected = False
        self.task: asyncio.Task[None] | None = None
        self.stopped = False


class Broker:
    """The pub/sub broker server.

    Use as ``async with Broker(BrokerConfig(port=0)) as broker: ...`` (``broker.port``
    is the bound port) or ``await broker.start()`` / ``await broker.close()``.

    Args:
        config: what to bind, peers, tokens and limits.
        metrics: where to register metrics; a fresh ``Metrics("pubsub")`` by default.
    """

    def __init__(self, config: BrokerConfig | None = None, *, metrics: Metrics | None = None):
        self.config = config or BrokerConfig()
        self.server_id = self.config.server_id or uuid.uuid4().hex[:12]
        self.state = BrokerState(self.config.limits)
        self.metrics = metrics or Metrics("pubsub")
        self.metrics.registry.register(_StatsCollector(self))
        self.log = get_logger("pubsub", server_id=self.server_id)
        self._ids = itertools.count(1)
        self._sessions: dict[int, _Session] = {}
        self._links: dict[str, _RouteLink] = {}
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.protocol_errors = 0
        self.port = 0
        self.app = web.Application(
            client_max_size=self.config.limits.max_payload, middlewares=[error_middleware]
        )
        self.app.router.add_get("/v1/ws", self._ws_handler)
        self.app.router.add_post("/v1/publish/{subject}", self._http_publish)
        add_observability_routes(self.app, self.metrics, self._health)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start serving and dialling peers; returns the bound port."""
        self._runner, self.port = await start_site(
            self.app, self.config.host, self.config.port, shutdown_timeout=1.0
        )
        self._http = aiohttp.ClientSession()
        for address in self.config.routes:
            self._add_link(address, dialback=False)
        self.log.info("listening", host=self.config.host, port=self.port, routes=self.config.routes)
        return self.port

    @property
    def advertise(self) -> str:
        """The ``HOST:PORT`` peers use to reach this broker."""
        return self.config.advertise or f"{self.config.host}:{self.port}"

    async def close(self) -> None:
        """Stop dialling, close every connection and the listener."""
        if self._closing:
            return
        self._closing = True
        for link in self._links.values():
            link.stopped = True
            if link.task is not None:
                link.task.cancel()
        for task in list(self._tasks):
            task.cancel()
        for session in list(self._sessions.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    session.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY), timeout=1.0
                )
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()
        links = [link.task for link in self._links.values() if link.task is not None]
        await asyncio.gather(*links, *self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _health(self) -> Mapping[str, object]:
        kinds = {k.value: 0 for k in ConnKind}
        for conn in self.state.connections():
            kinds[conn.kind.value] += 1
        return {
            "server_id": self.server_id,
            "connections": kinds,
            "subscriptions": self.state.subscription_count(),
            "routes": [
                {
                    "peer": a,
                    "server_id": link.remote_id,
                    "connected": link.connected,
                    "interest": len(self.state.remote_interest(link.conn_id))
                    if link.connected and link.conn_id is not None
                    else 0,
                }
                for a, link in self._links.items()
                if not link.stopped or link.connected
            ],
        }

    # -- effects -----------------------------------------------------------------

    def _apply(self, fx: Effects) -> None:
        sessions = self._sessions
        for conn_id in fx.wake:
            session = sessions.get(conn_id)
            if session is not None:
                session.event.set()
        fx.wake.clear()
        if fx.disconnect:
            for conn_id, reason in fx.disconnect.items():
                session = sessions.get(conn_id)
                if session is not None and session.kicked is None:
                    self.log.warning("disconnecting", conn=conn_id, reason=reason)
                    session.kicked = reason
                    self._spawn(self._kick(session, reason))
            fx.disconnect.clear()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _kick(self, session: _Session, reason: str) -> None:
        frame: Frame = {"op": "err", "reason": reason, "fatal": True}
        if reason.startswith("authentication"):
            frame["re"] = "connect"
        try:
            async with asyncio.timeout(2.0):
                await self._send(session, [frame])
                await session.ws.close(
                    code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=reason[:120].encode()
                )
        except (TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
            pass
        finally:
            if not session.ws.closed and session.transport is not None:
                # The peer is not reading; drop the TCP connection itself.
                session.transport.abort()

    def _error(
        self, session: _Session, reason: str, fx: Effects, *, re: object = None, sid: object = None
    ) -> None:
        self.protocol_errors += 1
        frame: Frame = {"op": "err", "reason": reason}
        if isinstance(re, str):
            frame["re"] = re[:32]
        if isinstance(sid, int) and not isinstance(sid, bool):
            frame["sid"] = sid
        self.state.control(session.conn_id, frame, fx)

    # -- the write path ----------------------------------------------------------

    async def _send(self, session: _Session, frames: list[Frame]) -> None:
        payload: Any = frames[0] if len(frames) == 1 else frames
        if session.json:
            await session.ws.send_str(json.dumps(_to_json(payload), default=_json_default))
        else:
            await session.ws.send_bytes(msgpack.packb(payload, use_bin_type=True))

    async def _writer(self, session: _Session) -> None:
        state = self.state
        conn_id = session.conn_id
        event = session.event
        batch = self.config.write_batch
        try:
            while True:
                await event.wait()
                event.clear()
                while True:
                    if session.json:
                        frames = state.take(conn_id, max_items=batch, max_bytes=1 << 20)
                        if not frames:
                            break
                        await self._send(session, frames)
                    else:
                        packed = state.take_packed(conn_id, max_items=batch, max_bytes=1 << 20)
                        if packed is None:
                            break
                        await session.ws.send_bytes(packed)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            self.log.debug("writer stopped", conn=conn_id, error=str(exc))
        except Exception:
            # A bug, not bad input; never leave a connection without its writer.
            self.log.exception("writer failed", conn=conn_id)
            await session.ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR)

    # -- the WebSocket endpoint ------------------------------------------------------

    async def _ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            max_msg_size=self.config.max_frame,
            heartbeat=self.config.heartbeat,
            compress=False,
        )
        await ws.prepare(request)
        conn_id = next(self._ids)
        auth = self.config.tokens is not None
        self.state.open(
            conn_id, permissions=Permissions(publish=(), subscribe=()) if auth else None
        )
        session = _Session(conn_id, ws)
        session.authed = not auth
        session.peer = str(request.remote)
        if isinstance(request.transport, asyncio.Transport):
            session.transport = request.transport
        if request.query.get("format") == "json":
            session.json = session.mode_known = True
        self._sessions[conn_id] = session
        session.writer = asyncio.get_running_loop().create_task(self._writer(session))
        fx = Effects()
        try:
            async for m in ws:
                if m.type is aiohttp.WSMsgType.BINARY:
                    if not session.mode_known:
                        session.mode_known = True
                    self._on_frame(session, m.data, False, fx)
                elif m.type is aiohttp.WSMsgType.TEXT:
                    if not session.mode_known:
                        session.json = session.mode_known = True
                    self._on_frame(session, m.data, True, fx)
                elif m.type is aiohttp.WSMsgType.ERROR:
                    self.log.info("websocket error", conn=conn_id, error=str(ws.exception()))
                    break
                self._apply(fx)
                if session.kicked is not None:
                    break
        finally:
            self._sessions.pop(conn_id, None)
            conn = self.state.connection(conn_id)
            if conn.kind is ConnKind.ROUTE_IN:
                self.log.info("route closed", peer=conn.name)
            self.state.close(conn_id, fx)
            self._apply(fx)
            session.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.writer
        return ws

    def _on_frame(self, session: _Session, raw: bytes | str, is_json: bool, fx: Effects) -> None:
        try:
            value = _parse(raw, is_json, self.config.max_frame)
        except RemoteProtocolError as exc:
            self._error(session, str(exc), fx)
            return
        ops = value if isinstance(value, list) else [value]
        if len(ops) > MAX_OPS_PER_FRAME:
            self._error(session, f"frame has {len(ops)} operations; limit {MAX_OPS_PER_FRAME}", fx)
            return
        for op in ops:
            if not isinstance(op, dict):
                self._error(session, f"an operation must be a map, got {type(op).__name__}", fx)
                continue
            name = op.get("op")
            try:
                self._on_op(session, name, op, is_json, fx)
            except BadInputError as exc:
                self._error(session, str(exc), fx, re=name, sid=op.get("sid"))
            if session.conn_id in fx.disconnect:
                return

    def _on_op(
        self, session: _Session, name: object, op: dict[Any, Any], is_json: bool, fx: Effects
    ) -> None:
        state = self.state
        conn_id = session.conn_id
        if name == "pub":
            if not session.authed:
                raise BadInputError("authentication required: send connect with a token")
            state.publish(conn_id, op.get("subject"), _data(op, is_json), op.get("reply"), fx)
        elif name == "rmsg":
            state.deliver_from_route(
                conn_id,
                op.get("subject"),
                _data(op, is_json),
                op.get("reply"),
                op.get("queues", ()),
                fx,
            )
        elif name == "sub":
            if not session.authed:
                raise BadInputError("authentication required: send connect with a token")
            policy_name = op.get("policy", "drop_oldest")
            policy = _POLICIES.get(policy_name) if isinstance(policy_name, str) else None
            if policy is None:
                raise BadInputError(
                    f"unknown slow-consumer policy {op.get('policy')!r}; "
                    f"use one of {list(_POLICIES)}"
                )
            state.subscribe(
                conn_id,
                op.get("sid"),
                op.get("subject"),
                fx,
                queue=op.get("queue"),
                policy=policy,
                max_msgs=op.get("max_pending"),
            )
        elif name == "unsub":
            state.unsubscribe(conn_id, op.get("sid"), fx)
        elif name == "ping":
            pong: Frame = {"op": "pong"}
            ping_id = op.get("id")
            # Echo only ids that both encodings carry; anything else is dropped.
            if (
                isinstance(ping_id, int)
                and not isinstance(ping_id, bool)
                and -(2**53) < ping_id < 2**53
            ) or (isinstance(ping_id, str) and len(ping_id) <= 64):
                pong["id"] = ping_id
            state.control(conn_id, pong, fx)
        elif name == "pong":
            pass
        elif name == "connect":
            self._on_connect(session, op, fx)
        else:
            raise BadInputError(f"unknown op {name!r}")

    def _on_connect(self, session: _Session, op: dict[Any, Any], fx: Effects) -> None:
        info: Frame = {
            "op": "info",
            "server_id": self.server_id,
            "max_payload": self.config.limits.max_payload,
            "max_frame": self.config.max_frame,
        }
        if op.get("route") is True:
            token = self.config.cluster_token
            if token is None and self.config.tokens is not None:
                # A route publishes anywhere: with client tokens, routes need a secret too.
                fx.disconnect[session.conn_id] = (
                    "authentication failed: routes need a cluster token on this broker"
                )
                return
            if token is not None and not (
                isinstance(op.get("token"), str)
                and hmac.compare_digest(op["token"].encode(), token.encode())
            ):
                fx.disconnect[session.conn_id] = "authentication failed: bad cluster token"
                return
            peer_id = op.get("server_id")
            listen = op.get("listen")
            if not isinstance(peer_id, str) or not isinstance(listen, str):
                raise BadInputError("route connect needs string server_id and listen")
            if self.state.connection(session.conn_id).subs:
                raise BadInputError("a route must announce itself before subscribing")
            session.authed = False  # routes neither publish nor subscribe
            self.state.control(session.conn_id, info, fx)
            self.state.become_route_in(session.conn_id, fx, name=listen)
            self.log.info("route accepted", peer=peer_id, listen=listen)
            if peer_id != self.server_id:
                self._maybe_dial_back(
                    peer_id, listen, session.peer, trusted=self.config.cluster_token is not None
                )
            return
        tokens = self.config.tokens
        if tokens is not None:
            token = op.get("token")
            perms = tokens.get(token) if isinstance(token, str) else None
            if perms is None:
                fx.disconnect[session.conn_id] = "authentication failed: unknown token"
                return
            self.state.set_permissions(session.conn_id, perms)
            session.authed = True
        self.state.control(session.conn_id, info, fx)

    # -- HTTP publish --------------------------------------------------------------

    async def _http_publish(self, request: web.Request) -> web.Response:
        subject = self.state.check_subject(request.match_info["subject"])
        reply = request.query.get("reply")
        if reply is not None:
            self.state.check_subject(reply, "reply subject")
        tokens = self.config.tokens
        if tokens is not None:
            header = request.headers.get("Authorization", "")
            token = header[7:] if header.startswith("Bearer ") else None
            perms = tokens.get(token) if token else None
            if perms is None:
                return web.json_response(
                    {"error": "unauthorized", "message": "a valid Bearer token is required"},
                    status=401,
                )
            if not perms.may_publish(subject):
                return web.json_response(
                    {"error": "forbidden", "message": f"permission denied: publish to {subject!r}"},
                    status=403,
                )
        data = await request.read()
        fx = Effects()
        queued = self.state.inject(Message(subject, data, reply), fx)
        self._apply(fx)
        return web.json_response({"ok": True, "queued": queued})

    # -- routes ------------------------------------------------------------------

    def _add_link(self, address: str, *, dialback: bool) -> None:
        host, port = parse_listen(address)
        key = f"{host}:{port}"
        if key in self._links or self._closing:
            return
        link = _RouteLink(self, key, dialback=dialback)
        self._links[key] = link
        link.task = asyncio.get_running_loop().create_task(self._run_link(link))

    def _maybe_dial_back(self, peer_id: str, listen: str, remote: str, *, trusted: bool) -> None:
        """Dial a peer that dialled us, so traffic flows both ways.

        Without a cluster token anyone may claim to be a peer, so the broker then only
        dials back the IP address the connection came from (never a name to resolve).
        """
        for link in self._links.values():
            if link.remote_id == peer_id and not link.stopped:
                return
        try:
            host, port = parse_listen(listen)
        except ConfigError:
            self.log.warning("peer sent a bad listen address", peer=peer_id, listen=listen)
            return
        if port == 0 or (not trusted and host != remote):
            self.log.warning(
                "not dialling back: the listen address is not the peer's own IP",
                peer=peer_id,
                listen=listen,
                remote=remote,
            )
            return
        key = f"{host}:{port}"
        existing = self._links.get(key)
        if existing is not None and not existing.stopped:
            return
        # Forget dial-back links that gave up, so the table follows the live cluster.
        for address in [a for a, link in self._links.items() if link.stopped and link.dialback]:
            del self._links[address]
        if existing is not None:
            self._links.pop(key, None)
        self.log.info("dialling back", peer=peer_id, address=key)
        self._add_link(key, dialback=True)

    async def _run_link(self, link: _RouteLink) -> None:
        backoff = 0.05
        failures = 0
        while not link.stopped and not self._closing:
            try:
                if await self._link_once(link):
                    backoff = 0.05
                    failures = 0
                else:
                    failures += 1
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, TimeoutError, RemoteProtocolError) as exc:
                failures += 1
                self.log.debug("route dial failed", peer=link.address, error=str(exc))
            if link.dialback and failures >= 5:
                # The peer dials us again when it comes back; stop knocking.
                link.stopped = True
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.route_backoff_max)

    async def _link_once(self, link: _RouteLink) -> bool:
        """One connection to a peer; returns whether it got as far as the handshake."""
        assert self._http is not None, "broker not started"
        url = f"http://{link.address}/v1/ws"
        connecting = self._http.ws_connect(
            url,
            max_msg_size=self.config.max_frame,
            heartbeat=self.config.heartbeat,
            timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
        )
        async with await asyncio.wait_for(connecting, timeout=5.0) as ws:
            hello: Frame = {
                "op": "connect",
                "route": True,
                "server_id": self.server_id,
                "listen": self.advertise,
            }
            if self.config.cluster_token is not None:
                hello["token"] = self.config.cluster_token
            await ws.send_bytes(msgpack.packb(hello, use_bin_type=True))
            first = await asyncio.wait_for(ws.receive(), timeout=5.0)
            if first.type is not aiohttp.WSMsgType.BINARY:
                return False
            value = decode(first.data, max_size=self.config.max_frame)
            # The peer may batch its interest right behind the info frame.
            ops = value if isinstance(value, list) else [value]
            info = ops[0] if ops else None
            if not isinstance(info, dict) or info.get("op") != "info":
                self.log.warning("route refused", peer=link.address, reply=str(info)[:200])
                return False
            remote_id = info.get("server_id")
            if remote_id == self.server_id:
                self.log.info("route points at this broker itself; ignoring", peer=link.address)
                link.stopped = True
                return False
            for other in self._links.values():
                if other is not link and other.remote_id == remote_id and other.connected:
                    # Two addresses led to one peer: keep the link that is up. If this one
                    # was configured, the survivor inherits that role (it never gives up).
                    self.log.info("duplicate route; keeping the first", peer=link.address)
                    if not link.dialback:
                        other.dialback = False
                    link.stopped = True
                    return False
            link.remote_id = remote_id if isinstance(remote_id, str) else None
            conn_id = next(self._ids)
            self.state.open(conn_id, kind=ConnKind.ROUTE_OUT, name=link.address)
            session = _Session(conn_id, ws)
            self._sessions[conn_id] = session
            session.writer = asyncio.get_running_loop().create_task(self._writer(session))
            link.conn_id = conn_id
            link.connected = True
            self.log.info("route up", peer=link.address, remote=remote_id)
            fx = Effects()
            try:
                self._on_route_ops(conn_id, ops[1:], fx)
                self._apply(fx)
                async for m in ws:
                    if m.type is not aiohttp.WSMsgType.BINARY:
                        break
                    try:
                        value = decode(m.data, max_size=self.config.max_frame)
                    except RemoteProtocolError as exc:
                        self.log.warning("bad frame from peer", conn=conn_id, error=str(exc))
                        continue
                    self._on_route_ops(conn_id, value if isinstance(value, list) else [value], fx)
                    self._apply(fx)
            finally:
                link.connected = False
                self._sessions.pop(conn_id, None)
                self.state.close(conn_id, fx)
                self._apply(fx)
                session.writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await session.writer
                self.log.info("route down", peer=link.address)
            return True

    def _on_route_ops(self, conn_id: int, ops: list[Any], fx: Effects) -> None:
        for op in ops:
            if not isinstance(op, dict):
                continue
            name = op.get("op")
            try:
                if name in ("rsub", "runsub"):
                    self.state.route_interest(
                        conn_id,
                        op.get("subject"),
                        op.get("queue"),
                        add=name == "rsub",
                    )
                elif name == "ping":
                    self.state.control(conn_id, {"op": "pong", "id": op.get("id")}, fx)
                elif name == "err":
                    self.log.warning(
                        "peer reported an error", conn=conn_id, reason=op.get("reason")
                    )
            except BadInputError as exc:
                self.log.warning("bad op from peer", conn=conn_id, error=str(exc))

    def routes(self) -> Iterator[tuple[str, bool]]:
        """Each configured or dialled-back peer and whether its link is up."""
        for address, link in self._links.items():
            yield address, link.connected


class _StatsCollector(Collector):
    """Exports the core's counters at scrape time (no cost on the message path)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def collect(self) -> Iterable[Any]:
        b = self.broker
        s = b.state.stats
        kinds = {k.value: 0 for k in ConnKind}
        pending = 0
        routes_out = CounterMetricFamily(
            "dsys_pubsub_route_msgs_out", "Messages forwarded to each peer", labels=["peer"]
        )
        routes_in = CounterMetricFamily(
            "dsys_pubsub_route_msgs_in", "Messages received from each peer", labels=["peer"]
        )
        route_bytes_out = CounterMetricFamily(
            "dsys_pubsub_route_bytes_out", "Payload bytes forwarded to each peer", labels=["peer"]
        )
        route_bytes_in = CounterMetricFamily(
            "dsys_pubsub_route_bytes_in", "Payload bytes received from each peer", labels=["peer"]
        )
        for conn in b.state.connections():
            kinds[conn.kind.value] += 1
            pending += conn.pending_bytes
            if conn.kind is ConnKind.ROUTE_OUT:
                routes_out.add_metric([conn.name], conn.msgs_out)
                route_bytes_out.add_metric([conn.name], conn.bytes_out)
            elif conn.kind is ConnKind.ROUTE_IN:
                routes_in.add_metric([conn.name], conn.msgs_in)
                route_bytes_in.add_metric([conn.name], conn.bytes_in)
        conns = GaugeMetricFamily("dsys_pubsub_connections", "Open connections", labels=["kind"])
        for kind, n in kinds.items():
            conns.add_metric([kind], n)
        yield conns
        yield GaugeMetricFamily(
            "dsys_pubsub_subscriptions", "Client subscriptions", value=b.state.subscription_count()
        )
        yield GaugeMetricFamily(
            "dsys_pubsub_pending_bytes", "Bytes queued towards connections", value=pending
        )
        yield CounterMetricFamily("dsys_pubsub_msgs_in", "Messages published", value=s.msgs_in)
        yield CounterMetricFamily(
            "dsys_pubsub_bytes_in", "Payload bytes published", value=s.bytes_in
        )
        yield CounterMetricFamily(
            "dsys_pubsub_msgs_out", "Messages written to connections", value=s.msgs_out
        )
        yield CounterMetricFamily(
            "dsys_pubsub_bytes_out", "Payload bytes written to connections", value=s.bytes_out
        )
        drops = CounterMetricFamily(
            "dsys_pubsub_slow_consumer_drops",
            "Messages dropped because a subscriber's queue was full",
            labels=["policy"],
        )
        for policy, n in s.drops.items():
            drops.add_metric([policy], n)
        yield drops
        yield CounterMetricFamily(
            "dsys_pubsub_slow_consumer_disconnects",
            "Connections closed as slow consumers",
            value=s.slow_consumer_disconnects,
        )
        yield CounterMetricFamily(
            "dsys_pubsub_route_drops", "Messages not forwarded: a peer's queue was full",
            value=s.route_drops,
        )  # fmt: skip
        yield CounterMetricFamily(
            "dsys_pubsub_protocol_errors", "Error frames sent to clients", value=b.protocol_errors
        )
        yield routes_out
        yield routes_in
        yield route_bytes_out
        yield route_bytes_in


def _parse(raw: bytes | str, is_json: bool, max_size: int) -> Any:
    if not is_json:
        assert isinstance(raw, bytes | bytearray)
        return decode(raw, max_size=max_size)
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise RemoteProtocolError(f"malformed JSON frame: {exc}") from None
    except RecursionError:
        raise RemoteProtocolError("JSON frame is nested too deeply") from None


def _data(op: dict[Any, Any], is_json: bool) -> object:
    if not is_json:
        return op.get("data", b"")
    if "data_b64" in op:
        value = op["data_b64"]
        if not isinstance(value, str):
            raise BadInputError("data_b64 must be a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadInputError("data_b64 is not valid base64") from None
    value = op.get("data", "")
    if not isinstance(value, str):
        raise BadInputError("in JSON frames data must be a string (or use data_b64)")
    return value.encode("utf-8")


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _to_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict) and isinstance(value.get("data"), bytes):
        out = dict(value)
        data = out.pop("data")
        try:
            out["data"] = data.decode("utf-8")
        except UnicodeDecodeError:
            out["data_b64"] = base64.b64encode(data).decode("ascii")
        return out
    return value


__all__ = ["MAX_OPS_PER_FRAME", "Broker", "BrokerConfig", "load_tokens"]
