"""The stream server: a :class:`~dsys.raft.node.RaftNode` running the stream state machine.

One aiohttp application per node serves, on one ``host:port`` (default 7501):

* a plain HTTP API for curl (JSON metadata; payloads raw or base64 in JSON)::

    GET    /v1/streams                                  -> [{stream info}, ...]
    POST   /v1/streams            {StreamConfig}        -> 200 info | 409 exists
    GET    /v1/streams/{s}                              -> info | 404
    PUT    /v1/streams/{s}        {StreamConfig}        -> update limits
    DELETE /v1/streams/{s}
    POST   /v1/streams/{s}/purge  {"subject", "upto_seq"}
    POST   /v1/pub/{subject}      body = payload        -> {"stream", "seq", "duplicate"}
           headers: X-Dsys-Msg-Id, X-Dsys-Expected-Last-Seq, X-Dsys-Stream,
                    X-Dsys-Header-<Name>: value (message headers)
    GET    /v1/streams/{s}/msgs/{seq}                   -> raw payload + X-Dsys-Subject, ...
    GET    /v1/streams/{s}/msgs?start_seq=&limit=&subject=&reverse=1 -> [{msg}, ...]
    DELETE /v1/streams/{s}/msgs/{seq}
    GET    /v1/streams/{s}/consumers                    -> [{consumer info}, ...]
    POST   /v1/streams/{s}/consumers {ConsumerConfig}
    GET    /v1/streams/{s}/consumers/{c}                -> info | 404
    DELETE /v1/streams/{s}/consumers/{c}
    GET    /v1/streams/{s}/consumers/{c}/pending        -> [{seq, deliveries, worker, idle_ms}]
    POST   /v1/streams/{s}/consumers/{c}/fetch {"batch", "expires_ms", "worker", "no_wait"}
    POST   /v1/streams/{s}/consumers/{c}/ack   {"acks": [[seq, deliveries]], "kind", ...}
    POST   /v1/streams/{s}/consumers/{c}/claim {"worker", "min_idle_ms", "count"}
    GET    /v1/status                 GET /v1/ws      GET /healthz     GET /metrics

  Writes and linearizable reads are served by the leader; a follower answers ``307`` with
  the leader's address in ``Location`` (or ``503`` while no leader is known).
* the multiplexed WebSocket channel ``/v1/ws`` that :class:`~dsys.streams.client.StreamClient`
  uses: binary msgpack frames, each a list of requests ``{"id": n, "op": ..., ...}``; the
  server answers with frames that are lists of responses ``{"id": n, "status": ...}`` and
  push deliveries ``{"sid": s, "msgs": [[seq, subject, headers, data, ts_ms,
  deliveries], ...]}``. Publishes of one frame are proposed together (one log entry).
* the Raft peer endpoints (see :mod:`dsys.raft.node`), which take ``--token``.

Push subscriptions (``op: "sub"``) run on the leader: a loop per subscription proposes a
:class:`~dsys.streams.fsm.Fetch` whenever the consumer has work and the subscription has
room (``max_inflight`` unacknowledged), and sends the deliveries. A fetch that is waiting
for new messages (a long poll, or an idle push subscription) rides along with the next
publishes to its stream: its ``Fetch`` goes into the same log entry, right after them, so
a new message reaches a waiting consumer in one consensus round, not two. When the WebSocket goes
away its deliveries are released (due at once), so a reconnecting client, or another
member of the group, gets them without waiting for the ack deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import itertools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from dsys.codec import decode, encode
from dsys.errors import (
    BadInputError,
    ClosedError,
    ConfigError,
    ConflictError,
    DsysError,
    NotFoundError,
    NotLeaderError,
    PayloadTooLargeError,
    ProposalDroppedError,
    RemoteProtocolError,
    RequestTimeout,
    StreamFullError,
    UnavailableError,
)
from dsys.observability import (
    Metrics,
    add_observability_routes,
    error_middleware,
    get_logger,
    json_error,
    start_site,
)
from dsys.raft.node import (
    GC_THRESHOLDS,
    MAX_PEER_BODY,
    ManyCallback,
    NodeConfig,
    RaftNode,
    serve_replica,
)
from dsys.raft.timers import wait_future
from dsys.raft.wal import FileSnapshotStore, WriteAheadLog
from dsys.streams.fsm import (
    MAX_BATCH,
    Ack,
    AckResult,
    AddConsumer,
    AddStream,
    Claim,
    Command,
    DeleteConsumer,
    DeleteMessage,
    DeleteStream,
    Done,
    Error,
    Fetch,
    Fetched,
    InvalidCommand,
    Message,
    Outcome,
    PubAck,
    Publish,
    Purge,
    Release,
    StreamStateMachine,
    Tick,
    build_command,
    encode_command,
    validate_name,
)

DEFAULT_PORT = 7501
MAX_WS_FRAME = 16 * 1024 * 1024
"""Largest WebSocket frame accepted."""

MAX_FETCH_WAIT_MS = 60_000
"""Longest a fetch may wait for messages."""

MAX_SUBS_PER_WS = 256
"""Most push subscriptions on one WebSocket."""

_HEADER_PREFIX = "X-Dsys-Header-"


@dataclass(frozen=True, kw_only=True)
class StreamServerConfig:
    """Configuration of a :class:`StreamServer`.

    Attributes:
        id: this node's id.
        host: address to listen on.
        port: port to listen on (0 = any free port).
        peers: every other node's id -> ``host:port``.
        data_dir: directory of the WAL and snapshots.
        fsync: True (group commit, every acknowledged publish is on disk on a quorum) or
            False (UNSAFE: a machine crash can lose acknowledged messages; benchmarks).
        token: shared cluster token checked on every peer request.
        tick_interval: seconds per Raft tick.
        election_tick: ticks before an election.
        snapshot_every: applied entries between snapshots (log compaction).
        request_timeout: seconds a write or linearizable read may wait.
        max_inflight_per_ws: requests in flight per WebSocket before it stops reading.
        max_stream_bytes: the largest ``max_bytes`` a stream may have (bounds memory).
        max_payload: the largest ``max_msg_size`` a stream may have.
        join: join an existing cluster instead of bootstrapping one from ``peers``.
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
    max_inflight_per_ws: int = 4096
    max_stream_bytes: int = 1 << 30
    max_payload: int = 1024 * 1024
    join: bool = False

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
        if self.max_stream_bytes < 1 or self.max_payload < 1:
            raise ConfigError("max_stream_bytes and max_payload must be >= 1")


def _now_ms() -> int:
    return int(time.time() * 1000)


def msg_to_wire(m: Message, deliveries: int = 0) -> list[Any]:
    """A message as the WebSocket channel carries it."""
    return [m.seq, m.subject, m.headers, m.data, m.ts_ms, deliveries]


def msg_to_json(m: Message, deliveries: int = 0) -> dict[str, Any]:
    """A message as the HTTP API shows it (payload in base64)."""
    return {
        "seq": m.seq,
        "subject": m.subject,
        "headers": m.headers,
        "data": base64.b64encode(m.data).decode("ascii"),
        "ts_ms": m.ts_ms,
        "deliveries": deliveries,
    }


def raise_for(out: Outcome) -> None:
    """Raise the typed error an :class:`~dsys.streams.fsm.Error` outcome stands for."""
    if not isinstance(out, Error):
        return
    if out.code == "not_found":
        raise NotFoundError(out.message)
    if out.code in ("conflict", "exists"):
        raise ConflictError(out.message)
    if out.code == "full":
        raise StreamFullError(out.message)
    if out.code == "too_large":
        raise PayloadTooLargeError(out.message)
    raise BadInputError(out.message)


@dataclass(slots=True)
class _Sub:
    """One push subscription on one WebSocket."""

    sid: int
    stream: str
    consumer: str
    worker: str
    max_inflight: int
    resume: bool = False  # a resubscription: release what this worker held first
    outstanding: dict[int, float] = field(default_factory=dict)  # seq -> local expiry
    task: asyncio.Task[None] | None = None
    room: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Waiter:
    """A fetch waiting for messages on one stream.

    ``fut`` gets ``None`` when the stream may have work (look again) or, when a publish
    took the waiter along (``claimed``), the outcome of its ride-along ``Fetch``.
    """

    consumer: str
    batch: int
    worker: str
    fut: asyncio.Future[Outcome | None]
    claimed: bool = False


class StreamServer:
    """A stream replica: durable Raft node, stream state machine, HTTP + WebSocket API.

    Example::

        async with StreamServer(StreamServerConfig(id="n1", data_dir="d1")) as server:
            ...
    """

    def __init__(self, config: StreamServerConfig) -> None:
        self.config = config
        self.log = get_logger("streams.server", node_id=config.id)
        self.metrics = Metrics("streams")
        self.raft_metrics = Metrics("raft", registry=self.metrics.registry)
        data = Path(config.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.wal = WriteAheadLog(data / "wal", fsync=config.fsync)
        if self.wal.repaired_bytes:
            self.log.warning("wal_torn_tail_repaired", bytes=self.wal.repaired_bytes)
        self.fsm = StreamStateMachine()
        self.fsm.on_publish = self._on_publish
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
        self._waiters: dict[str, list[_Waiter]] = {}
        self._m_requests = self.metrics.request_stats(
            "requests_total", "Client requests", "request_seconds", "Client request latency"
        )
        self._m_published = self.metrics.counter("published_total", "Messages appended")
        self._m_delivered = self.metrics.counter("delivered_total", "Deliveries handed out")
        self._m_subs = self.metrics.gauge("subscriptions", "Push subscriptions open here")
        self.metrics.gauge("streams", "Streams").set_function(lambda: len(self.fsm.streams()))
        self._conn_ids = itertools.count(1)
        self._ws: set[web.WebSocketResponse] = set()
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.port = config.port

    # -- lifecycle --------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=max(self.config.max_payload + 65536, MAX_PEER_BODY),
            middlewares=[error_middleware],
        )
        r = app.router
        r.add_get("/v1/streams", self.handle_streams)
        r.add_post("/v1/streams", self.handle_add_stream)
        r.add_get("/v1/streams/{s}", self.handle_stream_info)
        r.add_put("/v1/streams/{s}", self.handle_update_stream)
        r.add_delete("/v1/streams/{s}", self.handle_delete_stream)
        r.add_post("/v1/streams/{s}/purge", self.handle_purge)
        r.add_post("/v1/pub/{subject}", self.handle_publish)
        r.add_get("/v1/streams/{s}/msgs", self.handle_read)
        r.add_get("/v1/streams/{s}/msgs/{seq}", self.handle_get_msg)
        r.add_delete("/v1/streams/{s}/msgs/{seq}", self.handle_delete_msg)
        r.add_get("/v1/streams/{s}/consumers", self.handle_consumers)
        r.add_post("/v1/streams/{s}/consumers", self.handle_add_consumer)
        r.add_get("/v1/streams/{s}/consumers/{c}", self.handle_consumer_info)
        r.add_delete("/v1/streams/{s}/consumers/{c}", self.handle_delete_consumer)
        r.add_get("/v1/streams/{s}/consumers/{c}/pending", self.handle_pending)
        r.add_post("/v1/streams/{s}/consumers/{c}/fetch", self.handle_fetch)
        r.add_post("/v1/streams/{s}/consumers/{c}/ack", self.handle_ack)
        r.add_post("/v1/streams/{s}/consumers/{c}/claim", self.handle_claim)
        r.add_get("/v1/status", self.handle_status)
        r.add_get("/v1/ws", self.handle_ws)
        self.node.add_routes(app)
        add_observability_routes(app, self.metrics, self.node.health)
        return app

    async def start(self) -> StreamServer:
        """Start the Raft node and listen; ``self.port`` is the bound port afterwards."""
        await self.node.start()
        self._runner, self.port = await start_site(
            self.app, self.config.host, self.config.port, shutdown_timeout=1.0
        )
        self._ticker = asyncio.create_task(self._tick_loop())
        self.log.info(
            "streams_server_started",
            listen=f"{self.config.host}:{self.port}",
            peers=dict(self.config.peers),
            fsync="always" if self.config.fsync else "none (UNSAFE)",
        )
        return self

    async def close(self) -> None:
        """Stop serving and close the node (the WAL is synced and closed)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for ws in list(self._ws):
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.node.close()

    async def __aenter__(self) -> StreamServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _tick_loop(self) -> None:
        """On the leader, advance the replicated clock every second (ages, idle consumers)."""
        while True:
            await asyncio.sleep(1.0)
            if self.node.is_leader and self.fsm.streams():
                with contextlib.suppress(Exception):
                    await self.write(Tick(now_ms=_now_ms()))

    # -- core operations ----------------------------------------------------------------------

    def _on_publish(self, stream: str, seq: int) -> None:
        self._m_published.inc()
        self._wake(stream)

    def _wake(self, stream: str) -> None:
        """Tell the fetches waiting on ``stream`` to look again."""
        waiters = self._waiters.pop(stream, None)
        if waiters:
            for w in waiters:
                if not w.fut.done():
                    w.fut.set_result(None)

    def propose_publishes(self, cmds: list[Publish], done: ManyCallback) -> None:
        """Propose publishes as one log entry; fetches waiting on their streams ride along.

        ``done(results, None)`` gets one outcome per publish (or ``(None, exc)``). Each
        waiting fetch of a stream these publishes go to gets a ``Fetch`` after them in the
        same entry, so it sees them the moment they commit.

        Raises:
            NotLeaderError: this node is not the leader.
        """
        datas = [encode_command(c) for c in cmds]
        decoded: list[object] = list(cmds)
        riders: list[_Waiter] = []
        if self._waiters:
            now = _now_ms()
            for name in {c.stream or self.fsm.stream_for(c.subject) for c in cmds}:
                if name is None:
                    continue
                for w in self._waiters.pop(name, None) or ():
                    if w.fut.done():
                        continue
                    f = Fetch(
                        stream=name, consumer=w.consumer, batch=w.batch, worker=w.worker, now_ms=now
                    )
                    w.claimed = True
                    riders.append(w)
                    datas.append(encode_command(f))
                    decoded.append(f)
        n = len(cmds)

        def finished(results: list[object] | None, exc: BaseException | None) -> None:
            for i, w in enumerate(riders):
                if w.fut.done():
                    continue
                if results is None:
                    assert exc is not None
                    w.fut.set_exception(exc)
                else:
                    out = results[n + i]
                    assert isinstance(out, (Fetched, Error)), out
                    if isinstance(out, Fetched):
                        self._m_delivered.inc(len(out.deliveries))
                    w.fut.set_result(out)
            done(results if results is None or not riders else results[:n], exc)

        try:
            self.node.propose_many(datas, finished, decoded)
        except Exception as exc:
            for w in riders:
                if not w.fut.done():
                    w.fut.set_exception(exc)
                    w.fut.exception()  # retrieved: the fetch loop sees it or is gone
            raise

    def _leader_addr(self, leader: str | None) -> str | None:
        if leader is None or leader == self.config.id:
            return None
        return self.node.transport.peers.get(leader) or self.config.peers.get(leader)

    def _redirect(self, exc: NotLeaderError) -> NotLeaderError:
        addr = self._leader_addr(exc.leader_hint)
        return NotLeaderError(
            str(exc), leader_hint=f"http://{addr}" if addr else None, retry_after=exc.retry_after
        )

    def command(self, cls: type[Any], **kwargs: Any) -> Command:
        """Build a command from a client's fields, stamped with this node's clock.

        Raises:
            BadInputError: a field is missing, of the wrong type, or beyond this server's
                limits.
        """
        return self.command_from(cls, kwargs)

    def command_from(self, cls: type[Any], kwargs: dict[str, Any]) -> Command:
        """:meth:`command` with the fields in a dict it may change (no copy)."""
        kwargs["now_ms"] = _now_ms()
        try:
            cmd = build_command(cls, kwargs)
        except InvalidCommand as exc:
            raise BadInputError(str(exc)) from None
        if type(cmd) is AddStream:
            cfg = cmd.config
            if cfg.max_bytes > self.config.max_stream_bytes:
                raise BadInputError(
                    f"max_bytes {cfg.max_bytes} is above this server's limit "
                    f"{self.config.max_stream_bytes}"
                )
            if cfg.max_msg_size > self.config.max_payload:
                raise BadInputError(
                    f"max_msg_size {cfg.max_msg_size} is above this server's limit "
                    f"{self.config.max_payload}"
                )
        elif type(cmd) is Publish and len(cmd.data) > self.config.max_payload:
            raise PayloadTooLargeError(
                f"payload is {len(cmd.data)} bytes; the limit is {self.config.max_payload}"
            )
        return cmd

    async def write(self, cmd: Command) -> Outcome:
        """Propose a command and wait for its outcome.

        Raises:
            NotLeaderError: this node is not the leader (hint = leader's node id).
            RequestTimeout: not committed within ``request_timeout``.
            UnavailableError: leadership changed before the outcome was known.
        """
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()

        def done(result: object, exc: BaseException | None) -> None:
            if not fut.done():
                if exc is None:
                    fut.set_result(result)
                else:
                    fut.set_exception(exc)

        try:
            if type(cmd) is Publish:
                self.propose_publishes(
                    [cmd], lambda rs, exc: done(rs[0] if rs is not None else None, exc)
                )
            else:
                # the leader applies ``cmd`` itself, without decoding its bytes again
                self.node.propose_callback(encode_command(cmd), done, cmd)
            result = await wait_future(fut, self.config.request_timeout + 1.0)
        except TimeoutError:
            raise RequestTimeout("not committed in time; retry (publish with a msg_id)") from None
        except ProposalDroppedError as exc:
            raise UnavailableError(str(exc), retry_after=0.1) from exc
        assert isinstance(result, (PubAck, Fetched, AckResult, Done, Error)), result
        if isinstance(cmd, (Ack, Release, DeleteConsumer)):
            self._wake(cmd.stream)  # room under max_ack_pending, or due deliveries
        if isinstance(result, Fetched):
            self._m_delivered.inc(len(result.deliveries))
        return result

    async def read_barrier(self, stale: bool = False) -> None:
        """Wait until a linearizable read may be served here (no-op when ``stale``)."""
        if not stale:
            await self.node.read_barrier(self.config.request_timeout)

    async def fetch(
        self,
        stream: str,
        consumer: str,
        *,
        batch: int,
        worker: str = "",
        expires_ms: int = 0,
        no_wait: bool = False,
    ) -> Fetched:
        """Deliver up to ``batch`` messages, waiting up to ``expires_ms`` for the first.

        A fetch is a replicated command, so it is only proposed when the consumer has
        work (new messages, or deliveries due again); an idle long poll costs no log
        entries.

        Raises:
            NotFoundError: no such stream or consumer.
            NotLeaderError: this node is not the leader.
        """
        if not 0 <= expires_ms <= MAX_FETCH_WAIT_MS:
            raise BadInputError(f"expires_ms must be between 0 and {MAX_FETCH_WAIT_MS}")
        deadline = time.monotonic() + expires_ms / 1000
        cmd = self.command(Fetch, stream=stream, consumer=consumer, batch=batch, worker=worker)
        loop = asyncio.get_running_loop()
        while True:
            if not self.node.is_leader:
                raise self.node.not_leader_error()
            if self.fsm.has_work(stream, consumer, _now_ms()):
                cmd = self.command(
                    Fetch, stream=stream, consumer=consumer, batch=batch, worker=worker
                )
                out = await self.write(cmd)
                raise_for(out)
                assert isinstance(out, Fetched)
                if out.deliveries or no_wait:
                    return out
            elif no_wait:
                return Fetched([], 0)
            left = deadline - time.monotonic()
            if left <= 0:
                return Fetched([], 0)
            due = self.fsm.next_due_ms(stream, consumer)
            if due is not None:
                left = min(left, max(0.001, (due - _now_ms()) / 1000))
            # wait for a publish to this stream: it wakes us, or takes us along
            waiter = _Waiter(consumer, batch, worker, loop.create_future())
            self._waiters.setdefault(stream, []).append(waiter)
            try:
                await asyncio.wait((waiter.fut,), timeout=min(left, 1.0))
                if waiter.claimed and not waiter.fut.done():
                    # our Fetch is in a proposed entry: its deliveries are ours to hand out
                    await asyncio.wait((waiter.fut,), timeout=self.config.request_timeout + 1.0)
            finally:
                if not waiter.fut.done():
                    waiter.fut.cancel()
                    rest = self._waiters.get(stream)
                    if rest is not None and waiter in rest:
                        rest.remove(waiter)
                        if not rest:
                            del self._waiters[stream]
            if waiter.fut.cancelled() or waiter.fut.exception() is not None:
                continue  # a ride-along that failed: look again (leadership is checked)
            got = waiter.fut.result()
            if got is not None:
                raise_for(got)
                assert isinstance(got, Fetched)
                if got.deliveries:
                    return got

    # -- HTTP -------------------------------------------------------------------------------

    async def _http(self, op: str, started: float, coro: Any) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await coro
        except NotLeaderError as exc:
            self._m_requests.observe(op, 307, time.perf_counter() - started)
            raise self._redirect(exc) from None
        except NotFoundError as exc:
            self._m_requests.observe(op, 404, time.perf_counter() - started)
            return json_error(404, "not_found", str(exc))
        except StreamFullError as exc:
            self._m_requests.observe(op, 507, time.perf_counter() - started)
            return json_error(507, "full", str(exc))
        except PayloadTooLargeError as exc:
            self._m_requests.observe(op, 413, time.perf_counter() - started)
            return json_error(413, "too_large", str(exc))
        self._m_requests.observe(op, resp.status, time.perf_counter() - started)
        return resp

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise BadInputError("body must be a JSON object") from None
        if not isinstance(body, dict):
            raise BadInputError("body must be a JSON object")
        return body

    def _stale(self, request: web.Request) -> bool:
        consistency = request.query.get("consistency", "linearizable")
        if consistency not in ("linearizable", "stale"):
            raise BadInputError(
                f"consistency must be 'linearizable' or 'stale', not {consistency!r}"
            )
        return consistency == "stale"

    @staticmethod
    def _name(request: web.Request, key: str = "s", what: str = "stream name") -> str:
        try:
            return validate_name(request.match_info[key], what)
        except InvalidCommand as exc:
            raise BadInputError(str(exc)) from None

    async def handle_streams(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/streams``: every stream's info."""

        async def run() -> web.Response:
            await self.read_barrier(self._stale(request))
            return web.json_response([self.fsm.stream_info(n) for n in self.fsm.streams()])

        return await self._http("streams", time.perf_counter(), run())

    async def _add_stream(self, request: web.Request, update: bool) -> web.Response:
        body = await self._json_body(request)
        if update:
            body.setdefault("name", request.match_info["s"])
            if body["name"] != request.match_info["s"]:
                raise BadInputError("the body's name differs from the path's")
        if isinstance(body.get("subjects"), list):
            body["subjects"] = tuple(body["subjects"])
        cmd = self.command(AddStream, config=body, update=update)
        out = await self.write(cmd)
        raise_for(out)
        assert isinstance(out, Done)
        return web.json_response(out.info)

    async def handle_add_stream(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/streams``: create a stream (the same config again is fine)."""
        return await self._http("add_stream", time.perf_counter(), self._add_stream(request, False))

    async def handle_update_stream(self, request: web.Request) -> web.StreamResponse:
        """``PUT /v1/streams/{s}``: change a stream's limits or subjects."""
        return await self._http(
            "update_stream", time.perf_counter(), self._add_stream(request, True)
        )

    async def handle_stream_info(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/streams/{s}``."""

        async def run() -> web.Response:
            name = self._name(request)
            await self.read_barrier(self._stale(request))
            info = self.fsm.stream_info(name)
            if info is None:
                raise NotFoundError(f"no stream {name!r}")
            return web.json_response(info)

        return await self._http("stream_info", time.perf_counter(), run())

    async def _simple(self, cls: type[Any], **kw: Any) -> web.Response:
        out = await self.write(self.command(cls, **kw))
        raise_for(out)
        assert isinstance(out, Done)
        return web.json_response({"ok": True, **out.info})

    async def handle_delete_stream(self, request: web.Request) -> web.StreamResponse:
        """``DELETE /v1/streams/{s}``."""
        return await self._http(
            "delete_stream",
            time.perf_counter(),
            self._simple(DeleteStream, stream=self._name(request)),
        )

    async def handle_purge(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/streams/{s}/purge`` ``{"subject": P, "upto_seq": N}`` (both optional)."""

        async def run() -> web.Response:
            body = await self._json_body(request) if request.can_read_body else {}
            unknown = set(body) - {"subject", "upto_seq"}
            if unknown:
                raise BadInputError(f"unknown field(s): {', '.join(sorted(unknown))}")
            return await self._simple(Purge, stream=self._name(request), **body)

        return await self._http("purge", time.perf_counter(), run())

    async def handle_publish(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/pub/{subject}``: body = payload; answers the committed sequence."""

        async def run() -> web.Response:
            limit = self.config.max_payload
            if request.content_length is not None and request.content_length > limit:
                raise PayloadTooLargeError(f"payload is larger than {limit} bytes")
            try:
                data = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise PayloadTooLargeError(f"payload is larger than {limit} bytes") from None
            headers = {
                k[len(_HEADER_PREFIX) :].lower(): v
                for k, v in request.headers.items()
                if k.lower().startswith(_HEADER_PREFIX.lower())
            }
            els = request.headers.get("X-Dsys-Expected-Last-Seq")
            if els is not None and not els.isdigit():
                raise BadInputError("X-Dsys-Expected-Last-Seq must be a non-negative integer")
            cmd = self.command(
                Publish,
                subject=request.match_info["subject"],
                data=data,
                headers=headers,
                stream=request.headers.get("X-Dsys-Stream", ""),
                msg_id=request.headers.get("X-Dsys-Msg-Id", ""),
                expected_last_seq=int(els) if els is not None else None,
            )
            out = await self.write(cmd)
            raise_for(out)
            assert isinstance(out, PubAck)
            return web.json_response(
                {"stream": out.stream, "seq": out.seq, "duplicate": out.duplicate}
            )

        return await self._http("publish", time.perf_counter(), run())

    def _seq(self, request: web.Request) -> int:
        text = request.match_info["seq"]
        if not text.isdigit() or len(text) > 18 or int(text) < 1:
            raise BadInputError(f"sequence must be a positive integer, got {text!r}")
        return int(text)

    async def handle_get_msg(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/streams/{s}/msgs/{seq}``: the raw payload with its metadata headers."""

        async def run() -> web.Response:
            name, seq = self._name(request), self._seq(request)
            await self.read_barrier(self._stale(request))
            m = self.fsm.get(name, seq)
            if m is None:
                raise NotFoundError(f"stream {name!r} has no message {seq}")
            if request.query.get("format") == "json":
                return web.json_response(msg_to_json(m))
            headers = {
                "X-Dsys-Subject": m.subject,
                "X-Dsys-Seq": str(m.seq),
                "X-Dsys-Ts-Ms": str(m.ts_ms),
            }
            for k, v in m.headers.items():
                if v.isprintable() and k.replace("-", "").isalnum():
                    headers[_HEADER_PREFIX + k] = v
            return web.Response(
                body=m.data, content_type="application/octet-stream", headers=headers
            )

        return await self._http("get", time.perf_counter(), run())

    async def handle_read(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/streams/{s}/msgs?start_seq=&limit=&subject=&reverse=1``."""

        async def run() -> web.Response:
            name = self._name(request)
            q = request.query
            start = _query_int(q.get("start_seq"), "start_seq", 0)
            limit = _query_int(q.get("limit"), "limit", 100)
            if not 1 <= limit <= MAX_BATCH:
                raise BadInputError(f"limit must be between 1 and {MAX_BATCH}")
            subject = q.get("subject", "")
            reverse = q.get("reverse", "") in ("1", "true")
            return web.json_response(
                [
                    msg_to_json(m)
                    for m in await self.read(
                        name, start, limit, subject, reverse, self._stale(request)
                    )
                ]
            )

        return await self._http("read", time.perf_counter(), run())

    async def read(
        self, stream: str, start_seq: int, limit: int, subject: str, reverse: bool, stale: bool
    ) -> list[Message]:
        """Stored messages of a stream (see :meth:`StreamStateMachine.read`).

        Raises:
            NotFoundError: no such stream.
        """
        if subject:
            try:
                build_command(Purge, {"stream": stream, "subject": subject})
            except InvalidCommand as exc:
                raise BadInputError(str(exc)) from None
        await self.read_barrier(stale)
        msgs = self.fsm.read(
            stream, start_seq=start_seq, limit=limit, subject=subject, reverse=reverse
        )
        if msgs is None:
            raise NotFoundError(f"no stream {stream!r}")
        return msgs

    async def handle_delete_msg(self, request: web.Request) -> web.StreamResponse:
        """``DELETE /v1/streams/{s}/msgs/{seq}``."""

        async def run() -> web.Response:
            return await self._simple(
                DeleteMessage, stream=self._name(request), seq=self._seq(request)
            )

        return await self._http("delete_msg", time.perf_counter(), run())

    async def handle_consumers(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/streams/{s}/consumers``: every consumer's info."""

        async def run() -> web.Response:
            name = self._name(request)
            await self.read_barrier(self._stale(request))
            names = self.fsm.consumers(name)
            if names is None:
                raise NotFoundError(f"no stream {name!r}")
            return web.json_response([self.fsm.consumer_info(name, c) for c in names])

        return await self._http("consumers", time.perf_counter(), run())

    async def handle_add_consumer(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/streams/{s}/consumers`` ``{ConsumerConfig}``."""

        async def run() -> web.Response:
            body = await self._json_body(request)
            out = await self.write(
                self.command(AddConsumer, stream=self._name(request), config=body)
            )
            raise_for(out)
            assert isinstance(out, Done)
            return web.json_response(out.info)

        return await self._http("add_consumer", time.perf_counter(), run())

    async def handle_consumer_info(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/streams/{s}/consumers/{c}``."""

        async def run() -> web.Response:
            s, c = self._name(request), self._name(request, "c", "consumer name")
            await self.read_barrier(self._stale(request))
            info = self.fsm.consumer_info(s, c)
            if info is None:
                raise NotFoundError(f"no consumer {c!r} on stream {s!r}")
            return web.json_response(info)

        return await self._http("consumer_info", time.perf_counter(), run())

    async def handle_delete_consumer(self, request: web.Request) -> web.StreamResponse:
        """``DELETE /v1/streams/{s}/consumers/{c}``."""

        async def run() -> web.Response:
            return await self._simple(
                DeleteConsumer,
                stream=self._name(request),
                consumer=self._name(request, "c", "consumer name"),
            )

        return await self._http("delete_consumer", time.perf_counter(), run())

    async def handle_pending(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/streams/{s}/consumers/{c}/pending``: unacknowledged deliveries."""

        async def run() -> web.Response:
            s, c = self._name(request), self._name(request, "c", "consumer name")
            limit = _query_int(request.query.get("limit"), "limit", 1000)
            await self.read_barrier(self._stale(request))
            pending = self.fsm.pending(s, c, limit)
            if pending is None:
                raise NotFoundError(f"no consumer {c!r} on stream {s!r}")
            return web.json_response(pending)

        return await self._http("pending", time.perf_counter(), run())

    async def handle_fetch(self, request: web.Request) -> web.StreamResponse:
        """``POST .../consumers/{c}/fetch`` ``{"batch": 10, "expires_ms": 1000, ...}``."""

        async def run() -> web.Response:
            body = await self._json_body(request)
            unknown = set(body) - {"batch", "expires_ms", "worker", "no_wait"}
            if unknown:
                raise BadInputError(f"unknown field(s): {', '.join(sorted(unknown))}")
            expires = body.get("expires_ms", 0)
            no_wait = body.get("no_wait", False)
            if type(expires) is not int or type(no_wait) is not bool:
                raise BadInputError("expires_ms must be an integer and no_wait a boolean")
            out = await self.fetch(
                self._name(request),
                self._name(request, "c", "consumer name"),
                batch=body.get("batch", 1),
                worker=body.get("worker", "http"),
                expires_ms=expires,
                no_wait=no_wait,
            )
            return web.json_response([msg_to_json(d.message, d.deliveries) for d in out.deliveries])

        return await self._http("fetch", time.perf_counter(), run())

    async def handle_ack(self, request: web.Request) -> web.StreamResponse:
        """``POST .../consumers/{c}/ack`` ``{"acks": [[seq, deliveries]], "kind": "ack"}``."""

        async def run() -> web.Response:
            body = await self._json_body(request)
            unknown = set(body) - {"acks", "kind", "delay_ms", "reason"}
            if unknown:
                raise BadInputError(f"unknown field(s): {', '.join(sorted(unknown))}")
            out = await self.write(
                self.command(
                    Ack,
                    stream=self._name(request),
                    consumer=self._name(request, "c", "consumer name"),
                    **body,
                )
            )
            raise_for(out)
            assert isinstance(out, AckResult)
            return web.json_response({"statuses": out.statuses})

        return await self._http("ack", time.perf_counter(), run())

    async def handle_claim(self, request: web.Request) -> web.StreamResponse:
        """``POST .../consumers/{c}/claim`` ``{"worker", "min_idle_ms", "count"}``."""

        async def run() -> web.Response:
            body = await self._json_body(request)
            unknown = set(body) - {"worker", "min_idle_ms", "count"}
            if unknown:
                raise BadInputError(f"unknown field(s): {', '.join(sorted(unknown))}")
            out = await self.write(
                self.command(
                    Claim,
                    stream=self._name(request),
                    consumer=self._name(request, "c", "consumer name"),
                    **body,
                )
            )
            raise_for(out)
            assert isinstance(out, Fetched)
            return web.json_response([msg_to_json(d.message, d.deliveries) for d in out.deliveries])

        return await self._http("claim", time.perf_counter(), run())

    async def handle_status(self, request: web.Request) -> web.Response:
        """``GET /v1/status``."""
        return web.json_response(self.status())

    def status(self) -> dict[str, Any]:
        """Node status plus the streams' names."""
        st = self.node.status()
        st["leader_addr"] = self._leader_addr(st["leader"])
        st["streams"] = self.fsm.streams()
        st["fsync"] = "always" if self.config.fsync else "none"
        return st

    # -- WebSocket channel -------------------------------------------------------------------

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /v1/ws``: multiplexed msgpack channel with push subscriptions."""
        ws = web.WebSocketResponse(max_msg_size=MAX_WS_FRAME, heartbeat=30.0)
        await ws.prepare(request)
        conn = _WsConn(self, ws, next(self._conn_ids))
        self._ws.add(ws)
        try:
            await conn.run()
        finally:
            self._ws.discard(ws)
        return ws


class _WsConn:
    """One client WebSocket: requests, answers and push subscriptions."""

    def __init__(self, server: StreamServer, ws: web.WebSocketResponse, conn_id: int) -> None:
        self.server = server
        self.ws = ws
        self.id = f"{server.config.id}-{os.getpid()}-{conn_id}"
        self.out: list[dict[str, Any]] = []
        self.ready = asyncio.Event()
        self.inflight = 0
        self.room = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.subs: dict[int, _Sub] = {}

    def send(self, resp: dict[str, Any]) -> None:
        self.out.append(resp)
        self.ready.set()

    def done(self, n: int = 1) -> None:
        self.inflight -= n
        self.room.set()

    async def run(self) -> None:
        writer = asyncio.create_task(self._writer())
        try:
            async for msg in self.ws:
                if msg.type != WSMsgType.BINARY:
                    if msg.type == WSMsgType.TEXT:
                        self.send(_err(None, "bad_request", "frames must be binary msgpack"))
                    continue
                try:
                    reqs = decode(msg.data, max_size=MAX_WS_FRAME)
                    if not isinstance(reqs, list):
                        raise RemoteProtocolError("a frame must be a msgpack list of requests")
                except RemoteProtocolError as exc:
                    self.send(_err(None, "bad_request", str(exc)))
                    continue
                pubs: list[tuple[int, Publish]] = []
                for req in reqs:
                    while self.inflight >= self.server.config.max_inflight_per_ws:
                        if pubs:
                            self._publish_many(pubs)
                            pubs = []
                        self.room.clear()
                        await self.room.wait()
                    self.inflight += 1
                    if type(req) is dict and req.get("op") == "pub":
                        try:
                            pubs.append((_rid(req), self._pub_cmd(req)))
                        except DsysError as exc:
                            self.done()
                            self.send(self._error_answer(req.get("id"), exc))
                        if len(pubs) >= 256:
                            self._publish_many(pubs)
                            pubs = []
                        continue
                    t = asyncio.create_task(self._call(req))
                    self.tasks.add(t)
                    t.add_done_callback(self.tasks.discard)
                if pubs:
                    self._publish_many(pubs)
        finally:
            for t in list(self.tasks):
                t.cancel()
            for sub in list(self.subs.values()):
                await self._end_sub(sub, release=True)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _writer(self) -> None:
        while True:
            while not self.out:
                self.ready.clear()
                await self.ready.wait()
            batch, self.out = self.out, []
            for i in range(0, len(batch), 1024):
                try:
                    await self.ws.send_bytes(encode(batch[i : i + 1024], max_size=MAX_WS_FRAME * 8))
                except (ConnectionError, RuntimeError):
                    return

    def _pub_cmd(self, req: dict[str, Any]) -> Publish:
        _rid(req)
        kw = dict(req)
        del kw["op"], kw["id"]
        if "now_ms" in kw:
            raise BadInputError("pub: unknown field(s) now_ms")
        cmd = self.server.command_from(Publish, kw)  # unknown fields are refused there
        assert type(cmd) is Publish
        return cmd

    def _publish_many(self, pubs: list[tuple[int, Publish]]) -> None:
        server = self.server
        started = time.perf_counter()

        def finished(results: list[object] | None, exc: BaseException | None) -> None:
            self.done(len(pubs))
            elapsed = time.perf_counter() - started
            ok = 0
            out = self.out
            for i, (rid, _) in enumerate(pubs):
                if results is None:
                    assert exc is not None
                    answer = self._error_answer(rid, exc)
                else:
                    answer = _outcome_answer(rid, results[i])  # type: ignore[arg-type]
                if answer["status"] == "ok":
                    ok += 1
                else:
                    server._m_requests.observe("ws_pub", answer["status"], elapsed)
                out.append(answer)
            if ok:
                server._m_requests.observe("ws_pub", "ok", elapsed, ok)
            self.ready.set()

        try:
            server.propose_publishes([c for _, c in pubs], finished)
        except Exception as exc:
            finished(None, exc)

    def _error_answer(self, rid: object, exc: BaseException) -> dict[str, Any]:
        rid = rid if type(rid) is int else None
        if isinstance(exc, NotLeaderError):
            return {
                "id": rid,
                "status": "not_leader",
                "leader": exc.leader_hint,
                "leader_addr": self.server._leader_addr(exc.leader_hint),
                "message": str(exc),
            }
        if isinstance(exc, NotFoundError):
            return _err(rid, "not_found", str(exc))
        if isinstance(exc, StreamFullError):
            return _err(rid, "full", str(exc))
        if isinstance(exc, ConflictError):
            return _err(rid, "conflict", str(exc))
        if isinstance(exc, PayloadTooLargeError):
            return _err(rid, "too_large", str(exc))
        if isinstance(exc, BadInputError):
            return _err(rid, "bad_request", str(exc))
        if isinstance(exc, TimeoutError):
            return _err(rid, "unavailable", "not committed in time; retry")
        if isinstance(exc, (ProposalDroppedError, UnavailableError, RequestTimeout, ClosedError)):
            return _err(rid, "unavailable", str(exc))
        self.server.log.error("ws_request_failed", error=repr(exc))
        return _err(rid, "error", f"request failed: {exc!r}")

    async def _call(self, req: Any) -> None:
        started = time.perf_counter()
        rid = req.get("id") if isinstance(req, dict) else None
        op = req.get("op") if isinstance(req, dict) else None
        try:
            resp = await self._dispatch(_rid(req), op, req)
        except Exception as exc:  # every error becomes an answer; the connection stays
            resp = self._error_answer(rid, exc)
        finally:
            self.done()
        self.server._m_requests.observe(
            f"ws_{op}" if op in _OPS else "ws_bad", resp["status"], time.perf_counter() - started
        )
        self.send(resp)

    async def _dispatch(self, rid: int, op: object, req: dict[str, Any]) -> dict[str, Any]:
        s = self.server
        if op not in _OPS:
            raise BadInputError(f"unknown op {op!r}")
        unknown = set(req) - _OPS[op] - {"id", "op"}
        if unknown:
            raise BadInputError(f"{op}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        args = {k: v for k, v in req.items() if k not in ("id", "op")}
        if op == "status":
            return {"id": rid, "status": "ok", "info": s.status()}
        if op == "fetch":
            out = await s.fetch(
                args.get("stream", ""),
                args.get("consumer", ""),
                batch=args.get("batch", 1),
                worker=args.get("worker", self.id),
                expires_ms=args.get("expires_ms", 0),
                no_wait=bool(args.get("no_wait", False)),
            )
            return _outcome_answer(rid, out)
        if op == "ack":
            sid = args.pop("sid", None)
            acked = await s.write(s.command(Ack, **args))
            sub = self.subs.get(sid) if type(sid) is int else None
            if sub is not None:
                for seq, _ in args.get("acks", ()):
                    sub.outstanding.pop(seq, None)
                sub.room.set()
            return _outcome_answer(rid, acked)
        if op in _WRITES:
            if op == "add_stream" and isinstance(args.get("config"), dict):
                cfg = dict(args["config"])
                if isinstance(cfg.get("subjects"), list):
                    cfg["subjects"] = tuple(cfg["subjects"])
                args["config"] = cfg
            return _outcome_answer(rid, await s.write(s.command(_WRITES[op], **args)))
        if op == "sub":
            return self._subscribe(rid, args)
        if op == "unsub":
            sid = args.get("sid")
            sub = self.subs.get(sid) if type(sid) is int else None
            if sub is None:
                raise BadInputError(f"no subscription {sid!r}")
            await self._end_sub(sub, release=True)
            return {"id": rid, "status": "ok"}
        # reads
        stale = bool(args.pop("stale", False))
        stream = args.get("stream", "")
        try:
            if op != "streams":
                validate_name(stream)
            if "consumer" in args:
                validate_name(args["consumer"], "consumer name")
        except InvalidCommand as exc:
            raise BadInputError(str(exc)) from None
        if op == "read":
            msgs = await s.read(
                stream,
                _int_arg(args, "start_seq", 0),
                _int_arg(args, "limit", 100),
                args.get("subject", ""),
                bool(args.get("reverse", False)),
                stale,
            )
            return {"id": rid, "status": "ok", "msgs": [msg_to_wire(m) for m in msgs]}
        await s.read_barrier(stale)
        if op == "streams":
            return {"id": rid, "status": "ok", "streams": s.fsm.streams()}
        if op == "stream_info":
            info = s.fsm.stream_info(stream)
        elif op == "get":
            m = s.fsm.get(stream, _int_arg(args, "seq", 0))
            return {"id": rid, "status": "ok", "msg": None if m is None else msg_to_wire(m)}
        elif op == "consumer_info":
            info = s.fsm.consumer_info(stream, args.get("consumer", ""))
        elif op == "consumers":
            names = s.fsm.consumers(stream)
            info = None if names is None else {"consumers": names}
        else:  # pending
            p = s.fsm.pending(stream, args.get("consumer", ""), _int_arg(args, "limit", 1000))
            info = None if p is None else {"pending": p}
        if info is None:
            raise NotFoundError(f"no such stream or consumer: {stream!r} {args.get('consumer')!r}")
        return {"id": rid, "status": "ok", "info": info}

    # -- push subscriptions -----------------------------------------------------------------

    def _subscribe(self, rid: int, args: dict[str, Any]) -> dict[str, Any]:
        sid, max_inflight = args.get("sid"), args.get("max_inflight", 256)
        if type(sid) is not int:
            raise BadInputError("sub needs an integer 'sid'")
        old = self.subs.get(sid)
        if old is not None:
            if (old.stream, old.consumer) != (args.get("stream"), args.get("consumer")):
                raise BadInputError(f"subscription {sid} exists for another consumer")
            return {"id": rid, "status": "ok", "sid": sid}  # a resubscribe: same as before
        if type(max_inflight) is not int or not 1 <= max_inflight <= MAX_BATCH:
            raise BadInputError(f"max_inflight must be between 1 and {MAX_BATCH}")
        if len(self.subs) >= MAX_SUBS_PER_WS:
            raise BadInputError(f"at most {MAX_SUBS_PER_WS} subscriptions per connection")
        try:
            stream = validate_name(args.get("stream"))
            consumer = validate_name(args.get("consumer"), "consumer name")
        except InvalidCommand as exc:
            raise BadInputError(str(exc)) from None
        if not self.server.node.is_leader:
            raise self.server.node.not_leader_error()
        if self.server.fsm.consumer_info(stream, consumer) is None:
            raise NotFoundError(f"no consumer {consumer!r} on stream {stream!r}")
        worker = args.get("worker") or f"{self.id}/{sid}"
        if type(worker) is not str or len(worker) > 128:
            raise BadInputError("worker must be a string of at most 128")
        sub = _Sub(sid, stream, consumer, worker, max_inflight, resume=args.get("resume") is True)
        self.subs[sid] = sub
        sub.task = asyncio.create_task(self._push(sub))
        self.server._m_subs.inc()
        return {"id": rid, "status": "ok", "sid": sid}

    async def _end_sub(self, sub: _Sub, *, release: bool) -> None:
        if self.subs.pop(sub.sid, None) is None:
            return
        self.server._m_subs.dec()
        if sub.task is not None and sub.task is not asyncio.current_task():
            sub.task.cancel()
        if release and self.server.node.is_leader:
            with contextlib.suppress(Exception):
                await self.server.write(
                    self.server.command(
                        Release, stream=sub.stream, consumer=sub.consumer, worker=sub.worker
                    )
                )

    async def _push(self, sub: _Sub) -> None:
        s = self.server
        info = s.fsm.consumer_info(sub.stream, sub.consumer)
        ack_wait = (info or {}).get("config", {}).get("ack_wait_ms", 30_000) / 1000
        try:
            if sub.resume:  # its deliveries on the lost connection may never have arrived
                await s.write(
                    s.command(Release, stream=sub.stream, consumer=sub.consumer, worker=sub.worker)
                )
            while sub.sid in self.subs:
                now = time.monotonic()
                for seq in [q for q, exp in sub.outstanding.items() if exp <= now]:
                    del sub.outstanding[seq]  # its ack deadline passed: redelivered elsewhere
                room = sub.max_inflight - len(sub.outstanding)
                if room <= 0:
                    sub.room.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(sub.room.wait(), 1.0)
                    continue
                out = await s.fetch(
                    sub.stream,
                    sub.consumer,
                    batch=min(room, 1000),
                    worker=sub.worker,
                    expires_ms=1000,
                )
                if not out.deliveries:
                    continue
                expiry = time.monotonic() + ack_wait
                for d in out.deliveries:
                    sub.outstanding[d.message.seq] = expiry
                self.send(
                    {
                        "sid": sub.sid,
                        "msgs": [msg_to_wire(d.message, d.deliveries) for d in out.deliveries],
                    }
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            answer = self._error_answer(None, exc)
            answer.pop("id", None)
            answer["sid"] = sub.sid
            answer["end"] = True
            self.send(answer)
            await self._end_sub(sub, release=False)


_OPS: dict[object, frozenset[str]] = {
    "pub": frozenset({"subject", "data", "headers", "stream", "msg_id", "expected_last_seq"}),
    "fetch": frozenset({"stream", "consumer", "batch", "expires_ms", "worker", "no_wait"}),
    "ack": frozenset({"stream", "consumer", "acks", "kind", "delay_ms", "reason", "sid"}),
    "add_stream": frozenset({"config", "update"}),
    "del_stream": frozenset({"stream"}),
    "purge": frozenset({"stream", "subject", "upto_seq"}),
    "del_msg": frozenset({"stream", "seq"}),
    "add_consumer": frozenset({"stream", "config"}),
    "del_consumer": frozenset({"stream", "consumer"}),
    "claim": frozenset({"stream", "consumer", "worker", "min_idle_ms", "count"}),
    "sub": frozenset({"sid", "stream", "consumer", "max_inflight", "worker", "resume"}),
    "unsub": frozenset({"sid"}),
    "status": frozenset(),
    "streams": frozenset({"stale"}),
    "stream_info": frozenset({"stream", "stale"}),
    "consumers": frozenset({"stream", "stale"}),
    "consumer_info": frozenset({"stream", "consumer", "stale"}),
    "pending": frozenset({"stream", "consumer", "limit", "stale"}),
    "get": frozenset({"stream", "seq", "stale"}),
    "read": frozenset({"stream", "start_seq", "limit", "subject", "reverse", "stale"}),
}
_WRITES: dict[object, type[Any]] = {
    "add_stream": AddStream,
    "del_stream": DeleteStream,
    "purge": Purge,
    "del_msg": DeleteMessage,
    "add_consumer": AddConsumer,
    "del_consumer": DeleteConsumer,
    "claim": Claim,
}


def _rid(req: Any) -> int:
    rid = req.get("id") if isinstance(req, dict) else None
    if type(rid) is not int:
        raise BadInputError("request needs an integer 'id'")
    return rid


def _int_arg(args: Mapping[str, Any], name: str, default: int) -> int:
    v = args.get(name, default)
    if type(v) is not int or v < 0:
        raise BadInputError(f"{name} must be a non-negative integer")
    return v


def _query_int(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or len(value) > 18:
        raise BadInputError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _err(rid: int | None, status: str, message: str) -> dict[str, Any]:
    return {"id": rid, "status": status, "message": message}


def _outcome_answer(rid: int, out: Outcome) -> dict[str, Any]:
    if isinstance(out, PubAck):
        return {
            "id": rid,
            "status": "ok",
            "stream": out.stream,
            "seq": out.seq,
            "dup": out.duplicate,
        }
    if isinstance(out, Fetched):
        return {
            "id": rid,
            "status": "ok",
            "msgs": [msg_to_wire(d.message, d.deliveries) for d in out.deliveries],
            "pending": out.pending,
        }
    if isinstance(out, AckResult):
        return {"id": rid, "status": "ok", "statuses": out.statuses}
    if isinstance(out, Done):
        return {"id": rid, "status": "ok", "info": out.info}
    code = {"exists": "conflict", "invalid": "bad_request"}.get(out.code, out.code)
    return {"id": rid, "status": code, "message": out.message, **out.info}


async def serve(
    config: StreamServerConfig, *, on_started: Callable[[StreamServer], None] | None = None
) -> int:
    """Run a :class:`StreamServer` until SIGINT/SIGTERM; returns the process exit code.

    If the Raft loop dies (a storage failure such as a full disk, or a bug), the server
    stops and returns 1, so a supervisor restarts it from its WAL.
    """
    gc.set_threshold(*GC_THRESHOLDS)
    server = StreamServer(config)
    return await serve_replica(
        server, on_started=on_started, failure_event="streams_server_stopped_on_failure"
    )


__all__ = [
    "DEFAULT_PORT",
    "StreamServer",
    "StreamServerConfig",
    "msg_to_json",
    "msg_to_wire",
    "raise_for",
    "serve",
]
