"""The KV server: a :class:`~dsys.raft.node.RaftNode` plus the client HTTP API.

One aiohttp application per node serves, on one ``host:port``:

* the client API (JSON metadata, raw byte values)::

    PUT    /v1/kv/{key}[?if_revision=R&ttl=SECONDS]    -> 200 {"revision": N} | 409
    GET    /v1/kv/{key}[?consistency=stale]            -> 200 raw value + X-Dsys-Revision | 404
    DELETE /v1/kv/{key}[?if_revision=R]                -> 200 {"revision": N} | 404 | 409
    GET    /v1/kv?prefix=P&limit=L[&after=K]           -> 200 [{"key": K, "revision": N}, ...]
                                                          (+ Link: <...&after=LAST>; rel="next")
    GET    /v1/status                                  -> 200 {"id", "role", "term", ...}
    GET    /v1/ws                                      -> WebSocket, msgpack frames (KVClient)
    GET    /v1/watch?prefix=P&start_revision=R         -> 200 NDJSON change stream | 410

  A follower answers writes and linearizable reads with ``307`` + ``Location`` of the
  leader, or ``503`` + ``Retry-After`` when no leader is known. A write answered ``503``
  or ``504`` after it was accepted has an *unknown* outcome (leadership changed, or it
  did not commit in time): it may still commit. Send ``X-Dsys-Client-Id`` and
  ``X-Dsys-Seq`` headers to make such retries exactly-once (``KVClient`` always does).
* membership admin (with the cluster token when one is set)::

    GET    /v1/admin/members                        -> {"voters": {...}, "learners": {...}}
    POST   /v1/admin/members {"id": ID, "addr": A}  -> add ID as a learner
    POST   /v1/admin/members/{id}/promote           -> make the learner a voter
    DELETE /v1/admin/members/{id}                   -> remove a voter or learner
* the peer endpoints ``GET /raft/v1/raw`` (the raw peer stream, an upgrade the fast path
  serves: :mod:`dsys.raft.peerwire`), ``GET /raft/v1/stream`` (WebSocket) and
  ``POST /raft/v1/msgs`` (see :mod:`dsys.raft.node`),
* ``/healthz`` and ``/metrics``.

The WebSocket channel carries binary msgpack frames; each frame is a *list* of
requests ``{"id": n, "op": "get"|"put"|"del"|"scan"|"status", ...}`` and the server
answers with frames that are lists of responses ``{"id": n, "status": ..., ...}``, so
many requests are in flight on one connection and frames are batched both ways.
Writes may carry ``cid`` (client id) and ``seq`` for exactly-once retries.
The ops ``"watch"`` and ``"unwatch"`` open and close change streams whose events come
as further answers with the watch request's id (see :mod:`dsys.kv.watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from dsys.codec import decode, encode
from dsys.errors import (
    BadInputError,
    ConfigError,
    ConflictError,
    DsysError,
    NotLeaderError,
    ProposalDroppedError,
    RemoteProtocolError,
    RequestTimeout,
    UnavailableError,
)
from dsys.kv.api import (
    MAX_SCAN_LIMIT,  # noqa: F401 - re-exported (it was defined here)
    MAX_VALUE_BYTES,
    Answer,
    ScanPage,
    ScanRequest,
    opt_int,
    read_answer,
    scan_answer,
    scan_page,
    scan_request,
    session_fields,
    write_answer,
    ws_error_status,
    ws_scan_answer,
    ws_write_answer,
    ws_write_command,
)
from dsys.kv.fastpath import KVFastPath, start_fast_site
from dsys.kv.fsm import (
    HISTORY_EVENTS,
    Delete,
    KVStateMachine,
    Put,
    Result,
    SetMember,
    Tick,
    encode_command,
    validate_key,
)
from dsys.kv.watch import WatchHub
from dsys.observability import (
    Metrics,
    add_observability_routes,
    error_middleware,
    get_logger,
    parse_listen,
    start_site,
)
from dsys.raft.messages import ConfChange, ConfChangeType
from dsys.raft.node import (
    GC_THRESHOLDS,
    MAX_PEER_BODY,
    TOKEN_HEADER,
    NodeConfig,
    RaftNode,
    serve_replica,
    token_ok,
)
from dsys.raft.timers import wait_future
from dsys.raft.wal import FileSnapshotStore, WriteAheadLog

MAX_WS_FRAME = 8 * 1024 * 1024
"""Largest WebSocket frame accepted."""


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Configuration of a :class:`KVServer`.

    Attributes:
        id: this node's id.
        host: address to listen on.
        port: port to listen on (0 = any free port).
        peers: every other node's id -> ``host:port``.
        data_dir: directory of the WAL and snapshots.
        fsync: True (``--fsync always``, group commit) or False (``none``: UNSAFE, a
            crash of the machine can lose acknowledged writes; for benchmarks).
        token: shared cluster token checked on every peer request.
        tick_interval: seconds per Raft tick.
        election_tick: ticks before an election.
        snapshot_every: applied entries between snapshots.
        request_timeout: seconds a write or linearizable read may wait.
        max_inflight_per_ws: requests in flight per WebSocket before it stops reading.
        join: join an existing cluster (after ``POST /v1/admin/members`` added this node)
            instead of bootstrapping a new one from ``peers``.
        fast_path: serve hot ``PUT``/``GET``/``DELETE /v1/kv/{key}`` requests with the
            protocol-level fast path (:mod:`dsys.kv.fastpath`); False = aiohttp only.
        watch_history: change events kept for watchers (older ones are compacted).
        max_watches: open watches allowed on this server (WebSocket and HTTP).
        max_watches_per_ws: open watches allowed on one WebSocket connection.
    """

    id: str
    host: str = "127.0.0.1"
    port: int = 0
    peers: Mapping[str, str] = field(default_factory=dict)
    data_dir: str
    fsync: bool = True
    token: str | None = None
    tick_interval: float = 0.03
    election_tick: int = 10
    snapshot_every: int = 10_000
    request_timeout: float = 5.0
    max_inflight_per_ws: int = 1024
    join: bool = False
    fast_path: bool = True
    watch_history: int = HISTORY_EVENTS
    max_watches: int = 4096
    max_watches_per_ws: int = 64

    def __post_init__(self) -> None:
        if not self.id:
            raise ConfigError("server id must not be empty")
        if not self.data_dir:
            raise ConfigError("data_dir is required")
        if self.request_timeout <= 0 or self.max_inflight_per_ws < 1:
            raise ConfigError("request_timeout and max_inflight_per_ws must be positive")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range")
        if self.id in self.peers:
            raise ConfigError(f"node {self.id!r} must not list itself as a peer")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _web_response(answer: Answer) -> web.Response:
    """An :class:`~dsys.kv.api.Answer` as aiohttp sends it (same header order)."""
    fields = [*answer.before, (b"Content-Type", answer.content_type), *answer.after]
    return web.Response(
        status=answer.status,
        body=answer.body,
        headers=[(k.decode(), v.decode("latin-1")) for k, v in fields],
    )


class KVServer:
    """A KV replica: durable Raft node, state machine and HTTP + WebSocket API.

    Example::

        server = KVServer(ServerConfig(id="n1", port=7101, peers={...}, data_dir="d1"))
        await server.start()
        ...
        await server.close()
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.log = get_logger("kv.server", node_id=config.id)
        self.metrics = Metrics("kv")
        self.raft_metrics = Metrics("raft", registry=self.metrics.registry)
        data = Path(config.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.wal = WriteAheadLog(data / "wal", fsync=config.fsync)
        if self.wal.repaired_bytes:
            self.log.warning("wal_torn_tail_repaired", bytes=self.wal.repaired_bytes)
        self.fsm = KVStateMachine(history_events=config.watch_history)
        self.node = RaftNode(
            NodeConfig(
                id=config.id,
                peers=config.peers,
                tick_interval=config.tick_interval,
                election_tick=config.election_tick,
                snapshot_every=config.snapshot_every,
                token=config.token,
                join=config.join,
                proposal_timeout=config.request_timeout,
            ),
            log=self.wal,
            stable=self.wal,
            snapshots=FileSnapshotStore(data / "snap", fsync=config.fsync),
            fsm=self.fsm,
            metrics=self.raft_metrics,
        )
        self._sync_members(self.fsm.members)
        self.fsm.on_members_changed = self._sync_members
        self.watches = WatchHub(
            self.node,
            self.fsm,
            node_id=config.id,
            max_watches=config.max_watches,
            max_per_ws=config.max_watches_per_ws,
        )
        self._m_requests = self.metrics.request_stats(
            "requests_total", "Client requests", "request_seconds", "Client request latency"
        )
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self._fast: KVFastPath | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.port = config.port

    def _sync_members(self, members: Mapping[str, str]) -> None:
        """Point the peer transport at the replicated address book (plus static peers)."""
        transport = self.node.transport
        for node_id, addr in members.items():
            if node_id != self.config.id and transport.peers.get(node_id) != addr:
                transport.set_peer(node_id, addr)
        for node_id in list(transport.peers):
            if node_id not in members and node_id not in self.config.peers:
                transport.set_peer(node_id, None)

    # -- lifecycle --------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=max(MAX_VALUE_BYTES, MAX_PEER_BODY),
            middlewares=[error_middleware],
        )
        r = app.router
        r.add_put("/v1/kv/{key:.+}", self.handle_put)
        r.add_get("/v1/kv/{key:.+}", self.handle_get)
        r.add_delete("/v1/kv/{key:.+}", self.handle_delete)
        r.add_get("/v1/kv", self.handle_scan)
        r.add_get("/v1/status", self.handle_status)
        r.add_get("/v1/ws", self.handle_ws)
        r.add_get("/v1/watch", self.handle_watch)
        r.add_get("/v1/admin/members", self.handle_members)
        r.add_post("/v1/admin/members", self.handle_add_member)
        r.add_post("/v1/admin/members/{id}/promote", self.handle_promote)
        r.add_delete("/v1/admin/members/{id}", self.handle_remove_member)
        self.node.add_routes(app)
        add_observability_routes(app, self.metrics, self.node.health)
        return app

    async def start(self) -> KVServer:
        """Start the Raft node and listen; ``self.port`` is the bound port afterwards."""
        await self.node.start()
        if self.config.fast_path:
            self._runner, self._fast, self.port = await start_fast_site(self)
        else:
            self._runner, self.port = await start_site(
                self.app, self.config.host, self.config.port, shutdown_timeout=1.0
            )
        self._ticker = asyncio.create_task(self._ttl_ticker())
        self.log.info(
            "kv_server_started",
            listen=f"{self.config.host}:{self.port}",
            peers=dict(self.config.peers),
            fsync="always" if self.config.fsync else "none (UNSAFE)",
        )
        return self

    async def close(self) -> None:
        """Stop serving and close the node (the WAL is synced and closed)."""
        await self.watches.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._fast is not None:
            await self._fast.close(timeout=1.0)  # requests in flight finish, then cut
            self._fast = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.node.close()

    async def __aenter__(self) -> KVServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _ttl_ticker(self) -> None:
        """On the leader, propose a Tick every second while TTL keys exist."""
        while True:
            await asyncio.sleep(1.0)
            if self.node.is_leader and self.fsm.has_ttl_keys:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.node.propose(encode_command(Tick(now_ms=_now_ms()))), 2.0
                    )

    # -- core operations (shared by HTTP and WebSocket) -------------------------------

    def _leader_addr(self, leader: str | None) -> str | None:
        if leader is None or leader == self.config.id:
            return None
        return self.config.peers.get(leader)

    def _redirect_error(self, exc: NotLeaderError) -> NotLeaderError:
        addr = self._leader_addr(exc.leader_hint)
        return NotLeaderError(
            str(exc),
            leader_hint=f"http://{addr}" if addr else None,
            retry_after=exc.retry_after,
        )

    async def write(self, cmd: Put | Delete | SetMember) -> Result:
        """Propose a write and wait for its result.

        Raises:
            NotLeaderError: this node is not the leader (hint = leader's node id).
            RequestTimeout: not committed within ``request_timeout``.
            UnavailableError: leadership changed before the outcome was known.
        """
        try:
            result = await wait_future(
                self.node.propose_future(encode_command(cmd)), self.config.request_timeout
            )
        except TimeoutError:
            raise RequestTimeout(_WRITE_TIMEOUT) from None
        except ProposalDroppedError as exc:
            raise UnavailableError(str(exc), retry_after=0.1) from exc
        assert isinstance(result, Result)
        return result

    def submit_write(
        self,
        cmd: Put | Delete | SetMember,
        done: Callable[[Result | None, BaseException | None], None],
    ) -> None:
        """Start a write without a task or an await: the callback form of :meth:`write`.

        ``done(result, None)`` or ``done(None, exc)`` is called exactly once, later, from
        the event loop; ``exc`` is one of the errors :meth:`write` raises. Errors known
        before the proposal is queued (:class:`NotLeaderError`, :class:`ClosedError`) are
        raised by this call instead.
        """

        def finished(result: object, exc: BaseException | None) -> None:
            if exc is None:
                assert isinstance(result, Result)
                done(result, None)
            elif isinstance(exc, TimeoutError):
                done(None, RequestTimeout(_WRITE_TIMEOUT))
            elif isinstance(exc, ProposalDroppedError):
                done(None, UnavailableError(str(exc), retry_after=0.1))
            else:
                done(None, exc)

        self.node.propose_callback(encode_command(cmd), finished, cmd)

    async def read_barrier(self, stale: bool) -> None:
        """Wait until a linearizable read may be served here (no-op when ``stale``)."""
        if stale:
            return
        await self.node.read_barrier(self.config.request_timeout)

    # -- HTTP handlers ----------------------------------------------------------------

    def _count(self, op: str, status: int | str, started: float) -> None:
        self._m_requests.observe(op, status, time.perf_counter() - started)

    async def handle_put(self, request: web.Request) -> web.Response:
        """``PUT /v1/kv/{key}``: body = value."""
        started = time.perf_counter()
        key = validate_key(request.match_info["key"])
        if_revision = ttl = None
        if request.query_string:  # parsing an empty query string still costs
            if_revision = opt_int(request.query.get("if_revision"), "if_revision")
            ttl = opt_int(request.query.get("ttl"), "ttl")
        if request.content_length is not None and request.content_length > MAX_VALUE_BYTES:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_VALUE_BYTES, actual_size=request.content_length
            )
        try:
            value = await request.read()
        except web.RequestPayloadError as exc:  # e.g. a Content-Encoding it cannot inflate
            raise BadInputError(f"unreadable request body: {exc}") from None
        if len(value) > MAX_VALUE_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_VALUE_BYTES, actual_size=len(value))
        cmd = Put(
            key=key,
            value=value,
            if_revision=if_revision,
            ttl_ms=(ttl or 0) * 1000,
            now_ms=_now_ms(),
            **self._http_session(request),
        )
        resp = await self._http_write(cmd)
        self._count("put", resp.status, started)
        return resp

    async def handle_delete(self, request: web.Request) -> web.Response:
        """``DELETE /v1/kv/{key}``."""
        started = time.perf_counter()
        key = validate_key(request.match_info["key"])
        if_revision = opt_int(request.query.get("if_revision"), "if_revision")
        cmd = Delete(
            key=key, if_revision=if_revision, now_ms=_now_ms(), **self._http_session(request)
        )
        resp = await self._http_write(cmd)
        self._count("delete", resp.status, started)
        return resp

    def _http_session(self, request: web.Request) -> dict[str, Any]:
        headers = request.headers
        cid, seq = session_fields(headers.get("X-Dsys-Client-Id"), headers.get("X-Dsys-Seq"))
        return {"client_id": cid, "seq": seq} if cid else {}

    async def _http_write(self, cmd: Put | Delete) -> web.Response:
        try:
            result = await self.write(cmd)
        except NotLeaderError as exc:
            raise self._redirect_error(exc) from None
        return _web_response(write_answer(cmd, result))

    async def handle_get(self, request: web.Request) -> web.Response:
        """``GET /v1/kv/{key}``: raw value with ``X-Dsys-Revision``, or 404."""
        started = time.perf_counter()
        key = validate_key(request.match_info["key"])
        stale = self._stale(request)
        try:
            await self.read_barrier(stale)
        except NotLeaderError as exc:
            raise self._redirect_error(exc) from None
        answer = read_answer(key, self.fsm.get(key))
        self._count("get", answer.status, started)
        return _web_response(answer)

    def _stale(self, request: web.Request) -> bool:
        consistency = request.query.get("consistency", "linearizable")
        if consistency not in ("linearizable", "stale"):
            raise BadInputError(
                f"consistency must be 'linearizable' or 'stale', not {consistency!r}"
            )
        return consistency == "stale"

    async def handle_scan(self, request: web.Request) -> web.Response:
        """``GET /v1/kv?prefix=P&limit=L&after=K``: keys with their revisions, one page
        (a ``Link: <...>; rel="next"`` header continues it)."""
        started = time.perf_counter()
        q = request.query
        limit = opt_int(q.get("limit"), "limit", minimum=1) or 1000
        req = scan_request(q.get("prefix", ""), limit, q.get("after") or None)
        try:
            await self.read_barrier(self._stale(request))
        except NotLeaderError as exc:
            raise self._redirect_error(exc) from None
        answer = scan_answer(req, self._scan(req), request.path)
        self._count("scan", 200, started)
        return _web_response(answer)

    def _scan(self, req: ScanRequest) -> ScanPage:
        return scan_page(req, self.fsm.scan(req.prefix, req.limit + 1, req.after))

    async def handle_status(self, request: web.Request) -> web.Response:
        """``GET /v1/status``."""
        return web.json_response(self.status())

    def status(self) -> dict[str, Any]:
        """Node status plus store revision and key count."""
        st = self.node.status()
        st["revision"] = self.fsm.revision
        st["keys"] = len(self.fsm)
        st["leader_addr"] = self._leader_addr(st["leader"])
        st["fsync"] = "always" if self.config.fsync else "none"
        st["compacted_revision"] = self.fsm.compacted_revision
        st["watches"] = self.watches.count
        return st

    async def handle_watch(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/watch?prefix=P&start_revision=R``: NDJSON change stream (any node)."""
        return await self.watches.handle_http(request)

    # -- membership admin -------------------------------------------------------------

    def _check_admin(self, request: web.Request) -> None:
        token = self.config.token
        if not token_ok(request.headers.get(TOKEN_HEADER), token):
            raise web.HTTPForbidden(text="admin endpoints need the cluster token")

    def _members_view(self) -> dict[str, Any]:
        conf = self.node.core.conf
        addrs = {self.config.id: f"{self.config.host}:{self.port}", **self.node.transport.peers}
        return {
            "voters": {v: addrs.get(v) for v in conf.voters},
            "learners": {v: addrs.get(v) for v in conf.learners},
        }

    async def handle_members(self, request: web.Request) -> web.Response:
        """``GET /v1/admin/members``: voters and learners with their addresses."""
        return web.json_response(self._members_view())

    async def _conf_change(self, change_type: int, node_id: str) -> None:
        try:
            await asyncio.wait_for(
                self.node.propose_conf_change(ConfChange(type=change_type, node_id=node_id)),
                self.config.request_timeout,
            )
        except NotLeaderError as exc:
            raise self._redirect_error(exc) from None
        except TimeoutError:
            raise RequestTimeout("membership change not committed in time") from None
        except ProposalDroppedError as exc:
            raise UnavailableError(str(exc), retry_after=1.0) from exc

    async def handle_add_member(self, request: web.Request) -> web.Response:
        """``POST /v1/admin/members`` ``{"id": "n4", "addr": "host:port"}``: add a learner."""
        self._check_admin(request)
        try:
            body = await request.json()
        except ValueError:
            raise BadInputError('body must be JSON {"id": ..., "addr": ...}') from None
        node_id, addr = (body.get("id"), body.get("addr")) if isinstance(body, dict) else (0, 0)
        if not isinstance(node_id, str) or not node_id or len(node_id) > 64:
            raise BadInputError("'id' must be a non-empty string of at most 64 characters")
        if not isinstance(addr, str) or parse_listen(addr)[1] == 0:
            raise BadInputError("'addr' must be HOST:PORT")
        if node_id in self.node.core.conf.voters or node_id in self.node.core.conf.learners:
            raise ConflictError(f"{node_id!r} is already a member")
        try:
            await self.write(SetMember(id=node_id, addr=addr))
        except NotLeaderError as exc:
            raise self._redirect_error(exc) from None
        await self._conf_change(ConfChangeType.ADD_LEARNER, node_id)
        return web.json_response(self._members_view())

    async def handle_promote(self, request: web.Request) -> web.Response:
        """``POST /v1/admin/members/{id}/promote``: make a learner a voter."""
        self._check_admin(request)
        node_id = request.match_info["id"]
        if node_id not in self.node.core.conf.learners:
            raise BadInputError(f"{node_id!r} is not a learner")
        await self._conf_change(ConfChangeType.ADD_VOTER, node_id)
        return web.json_response(self._members_view())

    async def handle_remove_member(self, request: web.Request) -> web.Response:
        """``DELETE /v1/admin/members/{id}``: remove a voter or learner."""
        self._check_admin(request)
        node_id = request.match_info["id"]
        conf = self.node.core.conf
        if node_id not in conf.voters and node_id not in conf.learners:
            raise BadInputError(f"{node_id!r} is not a member")
        await self._conf_change(ConfChangeType.REMOVE_NODE, node_id)
        if node_id in self.fsm.members:
            with contextlib.suppress(DsysError):
                await self.write(SetMember(id=node_id, addr=""))
        return web.json_response(self._members_view())

    # -- WebSocket channel ------------------------------------------------------------

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /v1/ws``: multiplexed msgpack request/response channel."""
        ws = web.WebSocketResponse(max_msg_size=MAX_WS_FRAME, heartbeat=30.0)
        await ws.prepare(request)
        out = _Outbox()
        sem = _Window(self.config.max_inflight_per_ws)
        tasks: set[asyncio.Task[None]] = set()
        writer = asyncio.create_task(self._ws_writer(ws, out))
        watches = self.watches.ws_session(out)

        async def run(req: Any) -> None:
            try:
                out.put_nowait(await self._ws_call(req))
            finally:
                sem.release()

        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    if msg.type == WSMsgType.TEXT:
                        out.put_nowait(_ws_error(None, "bad_request", "frames must be binary"))
                    continue
                try:
                    reqs = decode(msg.data, max_size=MAX_WS_FRAME)
                    if not isinstance(reqs, list):
                        raise RemoteProtocolError("a frame must be a msgpack list of requests")
                except RemoteProtocolError as exc:
                    out.put_nowait(_ws_error(None, "bad_request", str(exc)))
                    continue
                # The hot path: the frame's puts and deletes become one proposal (one
                # queue slot, one callback) without a task; other requests get a task.
                writes = _Writes()
                for req in reqs:
                    if sem.used >= sem.limit:
                        if writes.cmds:
                            self._ws_write_many(writes, out, sem)
                            writes = _Writes()
                        await sem.wait_room()
                    sem.used += 1
                    if type(req) is dict and req.get("op") in _WS_WRITE_OPS:
                        self._ws_add_write(req, writes, out, sem)
                        if len(writes.cmds) >= _WRITES_PER_PROPOSAL or writes.size > _WRITE_BYTES:
                            self._ws_write_many(writes, out, sem)
                            writes = _Writes()
                        continue
                    if type(req) is dict and req.get("op") in _WS_WATCH_OPS:
                        watches.handle(req)  # answers at once; events follow on `out`
                        sem.release()
                        continue
                    t = asyncio.create_task(run(req))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                if writes.cmds:
                    self._ws_write_many(writes, out, sem)
        finally:
            watches.close()
            for t in list(tasks):
                t.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return ws

    async def _ws_writer(self, ws: web.WebSocketResponse, out: _Outbox) -> None:
        while True:
            ready = await out.take()
            # one frame for everything ready, split to stay well under the client's limit
            start, size = 0, 0
            for i, resp in enumerate(ready):
                size += _resp_size(resp)
                if i + 1 - start >= 4096 or size >= 4 * 1024 * 1024:
                    if not await self._ws_send(ws, ready[start : i + 1]):
                        return
                    start, size = i + 1, 0
            if start < len(ready) and not await self._ws_send(ws, ready[start:]):
                return

    @staticmethod
    async def _ws_send(ws: web.WebSocketResponse, batch: list[dict[str, Any]]) -> bool:
        try:
            await ws.send_bytes(encode(batch, max_size=MAX_WS_FRAME * 4))
        except (ConnectionError, RuntimeError):
            return False
        return True

    def _ws_add_write(
        self, req: dict[str, Any], writes: _Writes, out: _Outbox, sem: _Window
    ) -> None:
        """Check one put/del request and add it to ``writes`` (or answer its error now)."""
        rid = req.get("id")
        op = req["op"]
        try:
            if type(rid) is not int:
                raise BadInputError(_NO_ID)
            cmd = self._ws_write_cmd(op, req)
            data = encode_command(cmd)
        except DsysError as exc:
            sem.release()
            answer = _ws_error(rid if type(rid) is int else None, "bad_request", str(exc))
            out.put_nowait(self._ws_finish(op, answer, writes.started))
            return
        writes.ids.append(rid)
        writes.ops.append(op)
        writes.cmds.append(cmd)
        writes.datas.append(data)
        writes.size += len(data)

    def _ws_write_many(self, writes: _Writes, out: _Outbox, sem: _Window) -> None:
        """Propose a frame's writes together; their answers are queued on ``out``."""
        node_id, stats = self.config.id, self._m_requests

        def done(results: list[object] | None, exc: BaseException | None) -> None:
            sem.release(len(writes.ids))
            elapsed = time.perf_counter() - writes.started
            answers = []
            if results is not None:
                for rid, op, r in zip(writes.ids, writes.ops, results, strict=True):
                    assert isinstance(r, Result)
                    answer = ws_write_answer(rid, r)
                    answer["node"] = node_id
                    answers.append(answer)
                    stats.observe(_WS_OP_NAMES[op], r.status, elapsed)
            else:
                for rid, op in zip(writes.ids, writes.ops, strict=True):
                    answer = self._ws_write_answer(rid, None, exc)
                    answer["node"] = node_id
                    answers.append(answer)
                    stats.observe(_WS_OP_NAMES[op], answer["status"], elapsed)
            out.extend(answers)

        try:
            self.node.propose_many(writes.datas, done, writes.cmds)  # type: ignore[arg-type]
        except Exception as exc:
            done(None, exc)

    def _ws_write_answer(
        self, rid: int, result: object, exc: BaseException | None
    ) -> dict[str, Any]:
        if exc is None:
            assert isinstance(result, Result)
            return ws_write_answer(rid, result)
        if isinstance(exc, NotLeaderError):
            return self._not_leader_answer(rid, exc)
        if isinstance(exc, TimeoutError):
            return _ws_error(rid, "unavailable", _WRITE_TIMEOUT)
        if not isinstance(exc, DsysError):
            self.log.error("ws_write_failed", error=repr(exc))
            return _ws_error(rid, "unavailable", f"write failed: {exc}")
        return _ws_error(rid, ws_error_status(exc), str(exc))

    def _ws_finish(self, op: str, resp: dict[str, Any], started: float) -> dict[str, Any]:
        resp["node"] = self.config.id
        self._count(f"ws_{op}", resp["status"], started)
        return resp

    def _not_leader_answer(self, rid: int, exc: NotLeaderError) -> dict[str, Any]:
        return {
            "id": rid,
            "status": "not_leader",
            "leader": exc.leader_hint,
            "leader_addr": self._leader_addr(exc.leader_hint),
            "message": str(exc),
        }

    async def _ws_call(self, req: Any) -> dict[str, Any]:
        rid = req.get("id") if isinstance(req, dict) else None
        if not isinstance(rid, int):
            return _ws_error(None, "bad_request", _NO_ID)
        started = time.perf_counter()
        op = req.get("op")
        try:
            resp = await self._ws_dispatch(rid, op, req)
        except NotLeaderError as exc:
            resp = self._not_leader_answer(rid, exc)
        except DsysError as exc:  # the table, not a guess: a server bug is not bad input
            resp = _ws_error(rid, ws_error_status(exc), str(exc))
        resp["node"] = self.config.id
        self._count(f"ws_{op}" if op in _WS_OPS else "ws_bad", resp["status"], started)
        return resp

    async def _ws_dispatch(self, rid: int, op: object, req: dict[str, Any]) -> dict[str, Any]:
        if op == "status":
            return {"id": rid, "status": "ok", "info": self.status()}
        if op == "scan":
            scan = scan_request(req.get("prefix", ""), req.get("limit", 1000), req.get("after"))
            await self.read_barrier(bool(req.get("stale", False)))
            return ws_scan_answer(rid, self._scan(scan), self.fsm.revision)
        key = validate_key(req.get("key"))
        if op == "get":
            await self.read_barrier(bool(req.get("stale", False)))
            kv = self.fsm.get(key)
            if kv is None:
                return {"id": rid, "status": "not_found"}
            return {"id": rid, "status": "ok", "value": kv.value, "revision": kv.mod_revision}
        if op not in _WS_WRITE_OPS:
            raise BadInputError(f"unknown op {op!r}")
        result = await self.write(self._ws_write_cmd(op, req))
        return self._ws_write_answer(rid, result, None)

    @staticmethod
    def _ws_write_cmd(op: object, req: dict[str, Any]) -> Put | Delete:
        """The command of a WebSocket put/del request (BadInputError if malformed)."""
        return ws_write_command(op, req, _now_ms())


@dataclass(slots=True)
class _Writes:
    """The put/del requests of one WebSocket frame, proposed together."""

    ids: list[int] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    cmds: list[Put | Delete] = field(default_factory=list)
    datas: list[bytes] = field(default_factory=list)
    size: int = 0
    started: float = field(default_factory=time.perf_counter)


class _Window:
    """Bounds the requests in flight on one WebSocket (one acquirer: its reader).

    A counter and an event: cheaper per request than ``asyncio.Semaphore``.
    """

    __slots__ = ("_room", "limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._room = asyncio.Event()

    async def wait_room(self) -> None:
        """Wait until fewer than ``limit`` requests are in flight."""
        while self.used >= self.limit:
            self._room.clear()
            await self._room.wait()

    def release(self, n: int = 1) -> None:
        """``n`` requests finished."""
        self.used -= n
        self._room.set()


class _Outbox:
    """Answers waiting for the WebSocket writer (a list and an event, no queue)."""

    __slots__ = ("_items", "_ready")

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._ready = asyncio.Event()

    def put_nowait(self, resp: dict[str, Any]) -> None:
        """Queue one answer."""
        self._items.append(resp)
        self._ready.set()

    def extend(self, resps: list[dict[str, Any]]) -> None:
        """Queue several answers."""
        self._items.extend(resps)
        self._ready.set()

    def __len__(self) -> int:
        return len(self._items)

    async def take(self) -> list[dict[str, Any]]:
        """Wait for answers and take all of them."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        items, self._items = self._items, []
        return items


_WS_OPS = frozenset({"get", "put", "del", "scan", "status"})
_WS_WRITE_OPS = frozenset({"put", "del"})
_WS_WATCH_OPS = frozenset({"watch", "unwatch"})
_WS_OP_NAMES = {"put": "ws_put", "del": "ws_del"}
_WRITES_PER_PROPOSAL = 256
_WRITE_BYTES = 1024 * 1024
_NO_ID = "request needs an integer 'id'"
_WRITE_TIMEOUT = "write not committed in time; retry with the same seq"


def _resp_size(resp: dict[str, Any]) -> int:
    value = resp.get("value")
    size = 64 + (len(value) if isinstance(value, bytes) else 0)
    if "events" in resp:  # a watch's batch (up to about 1 MiB of values)
        size += sum(48 + len(e[2]) + (len(e[3]) if e[3] else 0) for e in resp["events"])
    return size


def _ws_error(rid: int | None, status: str, message: str) -> dict[str, Any]:
    return {"id": rid, "status": status, "message": message}


async def serve(
    config: ServerConfig, *, on_started: Callable[[KVServer], None] | None = None
) -> int:
    """Run a :class:`KVServer` until SIGINT/SIGTERM; returns the process exit code.

    If the Raft loop dies (a storage failure such as a full disk, or a bug), the server
    stops and returns 1 instead of limping on, so a supervisor restarts it from its WAL.

    Args:
        config: the server configuration.
        on_started: called with the running server once it listens.
    """
    gc.set_threshold(*GC_THRESHOLDS)
    server = KVServer(config)
    return await serve_replica(
        server, on_started=on_started, failure_event="kv_server_stopped_on_failure"
    )


__all__ = ["MAX_VALUE_BYTES", "KVServer", "ServerConfig", "serve"]
