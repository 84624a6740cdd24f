"""Multi-Raft KV: many Raft groups (ranges) in one process, one connection per peer.

A :class:`MultiRaftServer` runs, on one event loop and one aiohttp app:

* the **metadata range** (range 0, a :class:`~dsys.kv.rangefsm.MetaStateMachine`): the
  range map and the range-id allocator, replicated like any range;
* one :class:`~dsys.raft.node.RaftNode` per local replica of a **data range** (a
  :class:`~dsys.kv.rangefsm.RangeStateMachine` holding only the range's keys), each
  with its snapshots in ``<data_dir>/r<range_id>/``; the log entries and hard states of
  all of them go to ONE :class:`~dsys.raft.sharedwal.SharedWAL` in ``<data_dir>/wal/``,
  which writes the batches every group queued in one loop turn with one fsync (group
  commit across groups); ``wal="per-range"`` keeps one WAL per range instead;
* a :class:`SharedTransport`: ONE WebSocket per pair of processes
  (``GET /raft/v1/multi``) carrying the messages of every group, as frames of
  ``[[range_id, [message, ...]], ...]``; one timer ticks every group at the same moment,
  so the heartbeats of idle groups are queued together and leave in one frame per peer.

Client requests (``/v1/kv/{key}``) go to the local replica of the range that owns the
key (answers from :mod:`dsys.kv.api`): a key in no local range is answered 421
``key_not_in_range``, a request whose ``X-Dsys-Range: ID:CONF_VER:VERSION`` header names
a stale epoch 421 ``epoch_not_match`` (both list the node's current descriptors and map
version), and a follower answers 307 to the range's leader. Transactions and CAS stay
within one key, hence one range.

``POST /v1/ranges/{id}/split?at=KEY`` (on the range's leader) allocates a range id in the
metadata range, proposes a :class:`~dsys.kv.rangefsm.Split` in the range's own log, and
reports both halves to the metadata range; every replica starts the new range's group
from the split state when it applies the split. A background loop re-reports the local
descriptors a leader sees the metadata range lag behind (a lost report is repaired).

``POST /v1/ranges/{id}/move {"from": A, "to": B}`` moves a replica (learner, snapshot,
promote, leader transfer, remove: :meth:`MultiRaftServer.move_replica`, steps decided by
:mod:`dsys.kv.placement`); a node that learns it was removed from a range drops the group
and deletes its directory, after it wrote the range's tombstone to
``<data_dir>/tombstones`` (:mod:`dsys.kv.tombstones`: stale replicas of a dropped range
are refused, also after a restart). With ``placement_interval`` the metadata leader runs
a placement loop that replaces the replicas of nodes down for ``down_after`` seconds,
and moves replicas (by bytes) and leaders (by request rate) between nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from dsys.codec import decode, encode
from dsys.errors import (
    BadInputError,
    ConfigError,
    ConflictError,
    DsysError,
    EpochNotMatchError,
    KeyNotInRangeError,
    NotLeaderError,
    ProposalDroppedError,
    RangeError,
    RemoteProtocolError,
    RequestTimeout,
    UnavailableError,
)
from dsys.kv.api import (
    MAX_VALUE_BYTES,
    Answer,
    ScanPage,
    ScanRequest,
    error_answer,
    opt_int,
    read_answer,
    scan_page,
    scan_request,
    session_fields,
    write_answer,
    ws_error_status,
    ws_range_answer,
    ws_write_answer,
    ws_write_command,
)
from dsys.kv.fsm import Delete, KeyValue, Put, Result, Tick, encode_command, validate_key
from dsys.kv.multimerge import RangeUpkeep
from dsys.kv.placement import (
    MoveStep,
    NodeLiveness,
    PlacementRules,
    PlacementState,
    RangeInfo,
    ReplicaMove,
    next_move_step,
    plan_leader_transfer,
    plan_repairs,
    plan_replica_move,
)
from dsys.kv.rangefsm import (
    SPLIT_INIT_INDEX,
    AllocId,
    MetaStateMachine,
    RangeStateMachine,
    Report,
    Split,
    SplitResult,
    encode_meta,
    encode_split,
    snapshot_descriptor,
)
from dsys.kv.rangemetrics import RangeCollector, RangeSizes
from dsys.kv.ranges import (
    FIRST_RANGE_ID,
    META_RANGE_ID,
    Epoch,
    RangeDescriptor,
    check_epoch,
    plan_leader_move,
)
from dsys.kv.rangewatch import QueueOutbox, RangeWatches
from dsys.kv.tombstones import Tombstone, Tombstones
from dsys.observability import Metrics, add_observability_routes, get_logger, start_site
from dsys.raft.messages import (
    AppendRequest,
    ConfChange,
    ConfChangeType,
    ConfState,
    HardState,
    Heartbeat,
    Message,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
)
from dsys.raft.node import (
    FROM_HEADER,
    GC_THRESHOLDS,
    MAX_PEER_BODY,
    TOKEN_HEADER,
    NodeConfig,
    PeerTransport,
    RaftNode,
    check_message,
    from_wire,
    to_wire,
    token_ok,
)
from dsys.raft.sharedwal import GroupLog, SharedWAL
from dsys.raft.timers import wait_future
from dsys.raft.wal import CorruptLogError, FileSnapshotStore, WriteAheadLog, fsync_dir

_FROM_LEADER = (AppendRequest, Heartbeat, SnapshotRequest)

MULTI_PATH = "/raft/v1/multi"
"""Path of the peer WebSocket that carries the messages of every group."""

WAL_KINDS = ("shared", "per-range")
"""The WAL layouts of a multi-Raft node (``MultiConfig.wal``, ``--wal``)."""

RANGE_HEADER = "X-Dsys-Range"
"""Request header ``RANGE_ID:CONF_VER:VERSION``: the range and epoch the client routed by."""

HOPS_HEADER = "X-Dsys-Hops"
"""How many times an admin request (a move, a leader transfer) was forwarded already."""


@dataclass(frozen=True, kw_only=True)
class MultiConfig:
    """Configuration of a :class:`MultiRaftServer`.

    Attributes:
        id: this node's id.
        host: address to listen on.
        port: port to listen on (0 = any free port).
        peers: every other node's id -> ``host:port`` (each serves every range here).
        data_dir: one directory per local range (``r<id>/``) with its WAL and snapshots.
        fsync: fsync every Ready batch (False: UNSAFE, for benchmarks).
        wal: ``"shared"`` (one WAL for every range, group commit across ranges) or
            ``"per-range"`` (one WAL per range, one fsync per busy range). A data
            directory keeps the kind it was created with.
        token: shared cluster token on peer connections and metadata calls.
        tick_interval: seconds per Raft tick.
        election_tick: ticks before an election.
        snapshot_every: applied entries between snapshots, per range.
        request_timeout: seconds a write or linearizable read may wait.
        report_interval: seconds between checks that the metadata range knows the local
            ranges' descriptors.
        split_keys: split a range (on its leader, at its middle key) once it holds this
            many keys (None: splits are manual). TiKV splits by bytes (96 MiB by
            default); a key count is the simpler first measure.
        balance_interval: seconds between leader-balancing checks (None: off). A node
            leading two or more data ranges more than the node with the fewest hands one
            to that node (``RaftNode.transfer_leadership``), one move per interval.
        split_qps: split a range (on its leader, at the median of its sampled request
            keys) once it serves more requests per second than this over
            ``split_qps_window`` seconds (None: off). TiKV's default: 3000 over 10 s.
        split_qps_window: seconds of the load window.
        merge_keys: merge two neighbours (same replicas) holding fewer than this many keys
            together, once both stayed below ``merge_qps`` for ``merge_cold_for`` seconds
            (None: merges are manual only).
        merge_qps: requests (or applied writes) per second below which a range is cold.
        merge_cold_for: seconds a range must stay small and cold before it merges.
        merge_after_split: seconds after a split or merge of a range during which it
            does not merge (manual merges included).
        quiet_ticks: quiet ticks (None: off): a group whose leader appended nothing for
            this many ticks, all replicas caught up, stops heartbeating; its followers
            stop their election timers until a message comes, or the connection to the
            leader's process is lost (then they wake and elect as usual).
        initial_replicas: the nodes holding range 1 in a new cluster (None: every node).
            The metadata range is on every node.
        placement_interval: seconds between rounds of the placement loop, which only
            the metadata leader runs (None: off). It moves replicas and leaders between
            nodes (:mod:`dsys.kv.placement`); with it on, the per-node leader balancer
            is not started.
        placement_rules: rate limit and cool-down of the placement loop's moves, the
            size and load floors, and ``down_after`` (when a silent node is down).
        move_timeout: seconds a replica move may take before it is given up.
    """

    id: str
    host: str = "127.0.0.1"
    port: int = 0
    peers: Mapping[str, str] = field(default_factory=dict)
    data_dir: str
    fsync: bool = True
    wal: str = "shared"
    token: str | None = None
    tick_interval: float = 0.03
    election_tick: int = 10
    snapshot_every: int = 10_000
    request_timeout: float = 5.0
    report_interval: float = 0.2
    balance_interval: float | None = 2.0
    split_keys: int | None = None
    split_qps: float | None = 3000.0
    split_qps_window: float = 10.0
    merge_keys: int | None = 10_000
    merge_qps: float = 10.0
    merge_cold_for: float = 30.0
    merge_after_split: float = 60.0
    quiet_ticks: int | None = None
    initial_replicas: tuple[str, ...] | None = None
    placement_interval: float | None = None
    placement_rules: PlacementRules = field(default_factory=PlacementRules)
    move_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.id or not self.data_dir:
            raise ConfigError("id and data_dir are required")
        if self.id in self.peers:
            raise ConfigError(f"node {self.id!r} must not list itself as a peer")
        if self.request_timeout <= 0 or self.report_interval <= 0:
            raise ConfigError("request_timeout and report_interval must be positive")
        if self.split_keys is not None and self.split_keys < 2:
            raise ConfigError("split_keys must be >= 2 (or None: manual splits only)")
        if self.balance_interval is not None and self.balance_interval <= 0:
            raise ConfigError("balance_interval must be positive (or None: off)")
        if self.wal not in WAL_KINDS:
            raise ConfigError(f"wal must be one of {', '.join(WAL_KINDS)}, not {self.wal!r}")
        if self.split_qps is not None and self.split_qps <= 0:
            raise ConfigError("split_qps must be positive (or None: off)")
        if self.split_qps_window <= 0 or self.merge_qps < 0:
            raise ConfigError("split_qps_window must be positive and merge_qps >= 0")
        if self.merge_keys is not None and self.merge_keys < 1:
            raise ConfigError("merge_keys must be >= 1 (or None: manual merges only)")
        if self.merge_cold_for < 0 or self.merge_after_split < 0:
            raise ConfigError("merge_cold_for and merge_after_split must be >= 0")
        if self.quiet_ticks is not None and self.quiet_ticks < 1:
            raise ConfigError("quiet_ticks must be >= 1 (or None: off)")
        if self.initial_replicas is not None:
            unknown = set(self.initial_replicas) - {self.id, *self.peers}
            if not self.initial_replicas or unknown:
                raise ConfigError(f"initial_replicas must be known nodes, got {unknown or '()'}")
        if self.placement_interval is not None and self.placement_interval <= 0:
            raise ConfigError("placement_interval must be positive (or None: off)")
        if self.move_timeout <= 0:
            raise ConfigError("move_timeout must be positive")


# -- the shared transport ------------------------------------------------------------


class SharedTransport:
    """Sends the messages of every group to each peer over ONE WebSocket per peer.

    Each peer has one bounded queue of ``(range_id, message)`` and one sender task; the
    sender drains everything queued into one frame ``[[range_id, [msg, ...]], ...]``
    (messages grouped by range), so many groups' heartbeats and appends share a frame.
    A failed connect or send drops the batch (Raft resends) and backs off.

    Args:
        node_id: our id (sent in ``X-Dsys-From``).
        peers: peer id -> ``host:port``.
        token: the cluster token to send, if any.
        queue_size: messages queued per peer before new ones are dropped.
        max_batch: messages per frame.
        timeout: seconds to connect; also the WebSocket heartbeat.
    """

    def __init__(
        self,
        node_id: str,
        peers: Mapping[str, str],
        *,
        token: str | None = None,
        queue_size: int = 16384,
        max_batch: int = 2048,
        timeout: float = 5.0,
    ) -> None:
        self.node_id = node_id
        self.peers = dict(peers)
        self._headers = {FROM_HEADER: node_id}
        if token:
            self._headers[TOKEN_HEADER] = token
        self._queues: dict[str, asyncio.Queue[tuple[int, Message]]] = {
            p: asyncio.Queue(queue_size) for p in self.peers
        }
        self._max_batch = max_batch
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0
        self.frames_sent = 0
        """Frames sent (each may carry messages of many groups)."""
        self.messages_sent = 0
        self.log = get_logger("kv.multi.transport", node_id=node_id)

    async def start(self) -> None:
        """Open the HTTP session and start one sender per peer."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        for peer in self.peers:
            self._tasks.append(asyncio.create_task(self._sender(peer)))

    def send(self, range_id: int, msg: Message) -> None:
        """Queue ``msg`` of group ``range_id`` (dropped if the peer is unknown or full)."""
        q = self._queues.get(msg.dst)
        if q is None:
            self.dropped += 1
            return
        try:
            q.put_nowait((range_id, msg))
        except asyncio.QueueFull:
            self.dropped += 1

    async def _sender(self, peer: str) -> None:
        q = self._queues[peer]
        addr = self.peers[peer]
        backoff = 0.0
        ws: aiohttp.ClientWebSocketResponse | None = None
        reader: asyncio.Task[None] | None = None
        try:
            while True:
                batch = [await q.get()]
                if ws is not None and ws.closed:
                    ws = None
                if ws is None:
                    if backoff:
                        await asyncio.sleep(backoff)
                    ws = await self._connect(peer, addr)
                    if ws is None:
                        self.dropped += len(batch)
                        backoff = min(0.2, max(0.01, backoff * 2))
                        continue
                    if reader is not None:
                        reader.cancel()
                    reader = asyncio.create_task(_drain(ws))
                while len(batch) < self._max_batch and not q.empty():
                    batch.append(q.get_nowait())
                groups: dict[int, list[Any]] = {}
                for rid, m in batch:
                    groups.setdefault(rid, []).append(to_wire(m))
                body = encode([[rid, ms] for rid, ms in groups.items()], max_size=MAX_PEER_BODY)
                try:
                    await ws.send_bytes(body)
                    self.frames_sent += 1
                    self.messages_sent += len(batch)
                    backoff = 0.0
                except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                    self.dropped += len(batch)
                    self.log.debug("peer_send_failed", peer=peer, error=str(exc))
                    backoff = min(0.2, max(0.01, backoff * 2))
        finally:
            if reader is not None:
                reader.cancel()
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close()

    async def _connect(self, peer: str, addr: str) -> aiohttp.ClientWebSocketResponse | None:
        assert self._session is not None
        try:
            return await self._session.ws_connect(
                f"http://{addr}{MULTI_PATH}",
                headers=self._headers,
                max_msg_size=MAX_PEER_BODY,
                heartbeat=self._timeout,
                timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
            )
        except aiohttp.WSServerHandshakeError as exc:
            self.log.warning("peer_refused", peer=peer, status=exc.status, reason=exc.message)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.log.debug("peer_unreachable", peer=peer, error=str(exc))
        return None

    async def close(self) -> None:
        """Stop the senders and close the session."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


MAX_WS_FRAME = 8 * 1024 * 1024
"""Largest client WebSocket frame accepted."""

MAX_WS_INFLIGHT = 1024
"""Requests of one client WebSocket in flight before the server stops reading it."""


def _ws_error(rid: int | None, status: str, message: str) -> dict[str, Any]:
    return {"id": rid, "status": status, "message": message}


def _ws_range(v: object) -> str | None:
    """The ``X-Dsys-Range`` form of a WebSocket request's ``range`` field."""
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 3 or not all(type(x) is int for x in v):
        raise BadInputError("range must be [range_id, conf_ver, version]")
    return f"{v[0]}:{v[1]}:{v[2]}"


async def _ws_writer(ws: web.WebSocketResponse, out: asyncio.Queue[dict[str, Any]]) -> None:
    """Send the answers ready at each wake-up as one frame."""
    while True:
        batch = [await out.get()]
        while not out.empty() and len(batch) < 4096:
            batch.append(out.get_nowait())
        try:
            await ws.send_bytes(encode(batch, max_size=4 * MAX_WS_FRAME))
        except (ConnectionError, RuntimeError):
            return


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    # nothing comes back on this connection, but control frames need a reader
    with contextlib.suppress(Exception):
        async for _ in ws:
            pass


class _GroupTransport(PeerTransport):
    """What one group's :class:`RaftNode` sends through: the shared transport."""

    def __init__(
        self, shared: SharedTransport, range_id: int, node_id: str, peers: Mapping[str, str]
    ) -> None:
        super().__init__(node_id, peers, queue_size=1)
        self._shared = shared
        self._range_id = range_id

    async def start(self) -> None:
        """Nothing to start: the host starts the shared transport."""

    async def close(self) -> None:
        """Nothing to close: the host closes the shared transport."""

    def send(self, msg: Message) -> None:
        """Queue ``msg`` on the shared connection to its destination."""
        self._shared.send(self._range_id, msg)

    def set_peer(self, node_id: str, addr: str | None) -> None:
        """Peers are the range's replicas (fixed in this version)."""
        if addr is None:
            self.peers.pop(node_id, None)
        elif node_id != self.node_id:
            self.peers[node_id] = addr


# -- the server ----------------------------------------------------------------------


@dataclass(slots=True)
class Group:
    """One local replica: a range id, its Raft node and its state machine."""

    range_id: int
    node: RaftNode
    fsm: RangeStateMachine | MetaStateMachine

    @property
    def initialized(self) -> bool:
        """A data range whose replica holds its state (not the metadata range, not an
        empty replica waiting for its first snapshot)."""
        return isinstance(self.fsm, RangeStateMachine) and self.fsm.initialized

    @property
    def desc(self) -> RangeDescriptor:
        """The range's descriptor as this replica applied it (data ranges only)."""
        assert isinstance(self.fsm, RangeStateMachine), "the metadata range has no bounds"
        return self.fsm.desc


def _range_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadInputError(f"range id must be an integer, got {text!r}") from None


def _ignore(result: object, exc: BaseException | None) -> None:
    """A proposal callback for a Tick: its outcome does not matter."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _respond(answer: Answer) -> web.Response:
    fields = [*answer.before, (b"Content-Type", answer.content_type), *answer.after]
    return web.Response(
        status=answer.status,
        body=answer.body,
        headers=[(k.decode(), v.decode("latin-1")) for k, v in fields],
    )


def _moves_of(view: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The moves a node's status lists (``{"range_id": ..., ...}`` each)."""
    moves = view.get("moves", [])
    if isinstance(moves, dict):  # our own, not yet rendered as a list
        return [{"range_id": rid, **mv} for rid, mv in moves.items()]
    return [m for m in moves if isinstance(m, dict) and "range_id" in m]


def parse_range_header(value: str | None) -> tuple[int, Epoch] | None:
    """``(range_id, epoch)`` of an ``X-Dsys-Range: ID:CONF_VER:VERSION`` value (None if absent).

    Raises:
        BadInputError: not three non-negative integers separated by ``:``.
    """
    if not value:
        return None
    parts = value.split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) != 3 or min(nums) < 0:
        raise BadInputError(f"{RANGE_HEADER} must be RANGE_ID:CONF_VER:VERSION, got {value!r}")
    return nums[0], Epoch(nums[1], nums[2])


class MultiRaftServer:
    """A node of the multi-Raft KV: every local range replica, one app, one transport.

    Example::

        async with MultiRaftServer(MultiConfig(id="n1", peers={...}, data_dir="d1")) as s:
            ...
    """

    def __init__(self, config: MultiConfig) -> None:
        self.config = config
        self.log = get_logger("kv.multi", node_id=config.id)
        self.metrics = Metrics("kv")
        self.data = Path(config.data_dir)
        self.data.mkdir(parents=True, exist_ok=True)
        self.nodes = {config.id: f"{config.host}:{config.port}", **dict(config.peers)}
        self.replicas = tuple(sorted(self.nodes))
        self.initial_replicas = tuple(sorted(config.initial_replicas or self.replicas))
        """The replicas of range 1 when the cluster was bootstrapped."""
        self.transport = SharedTransport(config.id, config.peers, token=config.token)
        self.groups: dict[int, Group] = {}
        self.wal: SharedWAL | None = self._open_wal()
        self._ticked: dict[int, float] = {}
        self._heard: dict[str, float] = {}  # peer -> monotonic time of its last frame
        self.leader_moves_to: dict[str, int] = {}
        """Leader transfers started, per target node."""
        self.leader_moves = 0
        """Leader transfers this node started to balance leaders."""
        self.unknown_group_msgs = 0
        """Inbound messages for a group this node does not run (yet): dropped."""
        self.moves: dict[int, dict[str, Any]] = {}
        """Replica moves this node drives now, per range: step and learner progress."""
        self.replica_moves = 0
        """Replica moves this node completed (as the leader that removed the source)."""
        self.removed_ranges = 0
        """Local replicas dropped after this node learned it was removed from them."""
        self.placement = PlacementState()
        """The placement loop's memory (used on the metadata leader)."""
        self.liveness = NodeLiveness()
        """When each node last answered the placement loop (on the metadata leader)."""
        self.down_nodes: list[str] = []
        """Nodes the placement loop found down (silent for ``down_after`` seconds)."""
        self.repairs = 0
        """Replicas on down nodes this node (as the metadata leader) had replaced."""
        self.sizes = RangeSizes()
        """Bytes per local range (cached: the sum is O(keys))."""
        self._tombstones: dict[int, float] = {}  # range -> monotonic time it was dropped
        self.tombs = self._load_tombstones()
        """Ranges dropped here, with their epoch then (persisted; see dsys.kv.tombstones)."""
        self.stale_replicas_refused = 0
        """Stale replicas of dropped ranges refused (snapshots, splits, restarts)."""
        self._orphans: dict[int, float] = {}  # range -> when we first led it with a learner
        self._streams: set[web.WebSocketResponse] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        self.upkeep = RangeUpkeep(self)
        """Merges, splits by load and the removal of merged-away replicas."""
        self.metrics.registry.register(RangeCollector(self))
        self.watches = RangeWatches(self)
        """Range watches served here (:mod:`dsys.kv.rangewatch`)."""
        self._open_groups()
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self.port = config.port

    # -- groups -----------------------------------------------------------------------

    @property
    def meta(self) -> MetaStateMachine:
        """This node's replica of the metadata range's state."""
        fsm = self.groups[META_RANGE_ID].fsm
        assert isinstance(fsm, MetaStateMachine)
        return fsm

    def data_groups(self) -> list[Group]:
        """The local data ranges that hold their state, in key order."""
        gs = [g for g in self.groups.values() if g.initialized]
        return sorted(gs, key=lambda g: g.desc.start)

    def _open_wal(self) -> SharedWAL | None:
        """The shared WAL (None with per-range WALs); refuses a data dir of the other kind."""
        shared_dir = self.data / "wal"
        per_range = any(self.data.glob("r*/wal/raft.wal"))
        if self.config.wal == "per-range":
            if any(shared_dir.glob("wal-*.log")):
                raise ConfigError(f"{self.data} holds a shared WAL: start it with wal=shared")
            return None
        if per_range:
            raise ConfigError(f"{self.data} holds per-range WALs: start it with wal=per-range")
        wal = SharedWAL(shared_dir, fsync=self.config.fsync)
        if wal.repaired_bytes:
            self.log.warning("wal_torn_tail_repaired", bytes=wal.repaired_bytes)
        return wal

    def _open_log(self, rid: int, d: Path) -> WriteAheadLog | GroupLog:
        """Range ``rid``'s log and hard-state store (its share of the shared WAL)."""
        if self.wal is not None:
            return self.wal.group(rid)
        wal = WriteAheadLog(d / "wal", fsync=self.config.fsync)
        if wal.repaired_bytes:
            self.log.warning("wal_torn_tail_repaired", range_id=rid, bytes=wal.repaired_bytes)
        return wal

    def _drop_log(self, rid: int) -> None:
        """Forget range ``rid``'s records in the shared WAL (its directory is gone)."""
        if self.wal is not None:
            self.wal.remove(rid)

    def _open_groups(self) -> None:
        """Open every range found in the data dir; bootstrap ranges 0 and 1 if new."""
        # a node that ran before never bootstraps range 1 again (it may have moved away)
        bootstrap = not (self.data / f"r{META_RANGE_ID}").exists()
        found = sorted(
            int(p.name[1:]) for p in self.data.glob("r*") if p.is_dir() and p.name[1:].isdigit()
        )
        for rid in found:
            d = self.data / f"r{rid}"
            # a range made by a split, or moved here, starts from a snapshot; only the
            # initial replicas of range 1 start without one
            from_snapshot = rid > FIRST_RANGE_ID or (
                rid == FIRST_RANGE_ID and self.config.id not in self.initial_replicas
            )
            if from_snapshot and not any((d / "snap").glob("*")):
                # a split range whose initialization was cut short: the parent's log still
                # holds the split and creates it again when the entry is applied
                self.log.warning("incomplete_range_removed", range_id=rid)
                shutil.rmtree(d)
                continue
        for rid in sorted({META_RANGE_ID, FIRST_RANGE_ID, *found}):
            if rid > FIRST_RANGE_ID and not (self.data / f"r{rid}").exists():
                continue
            if (
                rid == FIRST_RANGE_ID
                and not (self.data / f"r{rid}").exists()
                and (not bootstrap or self.config.id not in self.initial_replicas)
            ):
                continue
            self._add_group(rid, self._new_fsm(rid))
        for g in list(self.groups.values()):
            if g.initialized and self.tombs.refuses(g.desc):
                # dropped, then a crash before its directory was gone: the tombstone
                # was written first, so the replica is stale
                self.log.warning("stale_replica_removed_at_start", range_id=g.range_id)
                self.stale_replicas_refused += 1
                del self.groups[g.range_id]
                g.node._log_store.close()
                self._drop_log(g.range_id)
                shutil.rmtree(self.data / f"r{g.range_id}", ignore_errors=True)
        if self.wal is not None:
            for rid in self.wal.range_ids():
                if rid not in self.groups:  # its directory was removed: stop pinning
                    self.wal.remove(rid)

    def _new_fsm(self, rid: int) -> RangeStateMachine | MetaStateMachine:
        if rid == META_RANGE_ID:
            return MetaStateMachine(self.initial_replicas)
        # range 1 starts as the whole key space; a split range's snapshot says its bounds
        whole = RangeDescriptor(range_id=rid, start="", end=None, replicas=self.initial_replicas)
        return RangeStateMachine(whole)

    def _add_group(
        self, rid: int, fsm: RangeStateMachine | MetaStateMachine, *, join: bool = False
    ) -> Group:
        d = self.data / f"r{rid}"
        d.mkdir(parents=True, exist_ok=True)
        wal = self._open_log(rid, d)
        replicas = fsm.desc.replicas if isinstance(fsm, RangeStateMachine) else self.replicas
        peers = {p: self.nodes[p] for p in replicas if p != self.config.id and p in self.nodes}
        cfg = self.config
        node = RaftNode(
            NodeConfig(
                id=cfg.id,
                peers=peers,
                tick_interval=cfg.tick_interval,
                election_tick=cfg.election_tick,
                snapshot_every=cfg.snapshot_every,
                proposal_timeout=cfg.request_timeout,
                token=cfg.token,
                join=join,
                rng_seed=zlib.crc32(f"{cfg.id}/{rid}".encode()),
                external_ticks=True,
                quiet_ticks=cfg.quiet_ticks or 0,
            ),
            log=wal,
            stable=wal,
            snapshots=FileSnapshotStore(d / "snap", fsync=cfg.fsync),
            fsm=fsm,
            transport=_GroupTransport(self.transport, rid, cfg.id, peers),
        )
        if isinstance(fsm, RangeStateMachine):
            fsm.on_split = self._on_split
            fsm.on_merge = self.upkeep.on_merge
            fsm.on_conf = self._on_conf
        g = Group(rid, node, fsm)
        self.groups[rid] = g
        if self._started:
            self._tasks.append(asyncio.create_task(self._start_node(node)))
        return g

    @staticmethod
    async def _start_node(node: RaftNode) -> None:
        await node.start()

    def _on_split(self, left: RangeDescriptor, right: RangeDescriptor, state: bytes) -> None:
        """A local replica applied a split: start the new range's group from ``state``.

        Runs in the parent's Raft loop, so the new range is on disk before the parent can
        snapshot past the split (a crash in between re-applies the split at restart).
        """
        rid = right.range_id
        if rid in self.groups or self._closed:
            return  # already running (restarted from its own WAL)
        if self.tombs.refuses(right):
            # the new range left this node later (moved or merged away): the split is
            # re-applied from an old log after a restart; do not resurrect it
            self.stale_replicas_refused += 1
            self.log.info("stale_split_range_refused", range_id=rid)
            return
        d = self.data / f"r{rid}"
        if d.exists():
            shutil.rmtree(d)
        self._drop_log(rid)
        d.mkdir(parents=True)
        wal = self._open_log(rid, d)
        init = SPLIT_INIT_INDEX
        wal.compact(init, init, keep_tail=False)
        wal.save_hard_state(HardState(term=init, vote=None, commit=init))
        wal.sync()
        wal.close()
        snap = Snapshot(SnapshotMeta(init, init, ConfState(voters=tuple(right.replicas))), state)
        FileSnapshotStore(d / "snap", fsync=self.config.fsync).save(snap)  # last: complete
        fsm = RangeStateMachine(right)
        self._add_group(rid, fsm)
        self.upkeep.on_split(left, right)
        self.log.info(
            "range_split",
            left=left.range_id,
            right=rid,
            at=right.start,
            version=right.epoch.version,
        )

    def _add_empty_replica(self, rid: int) -> Group:
        """A replica of range ``rid`` that a leader contacted before this node applied
        the split that made the range (it caught its parent up from a snapshot, past the
        split entry). It starts empty, votes for nobody until it knows the membership
        (``join``), serves nothing, and becomes a real replica with the first snapshot
        the leader sends (as TiKV creates an uninitialized peer)."""
        d = self.data / f"r{rid}"
        if d.exists():
            shutil.rmtree(d)
        self._drop_log(rid)
        placeholder = RangeDescriptor(range_id=rid, start="", end=None, replicas=self.replicas)
        self.log.info("empty_replica_created", range_id=rid)
        return self._add_group(rid, RangeStateMachine(placeholder, initialized=False), join=True)

    # -- lifecycle --------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=max(MAX_VALUE_BYTES, MAX_PEER_BODY), middlewares=[self._errors]
        )
        r = app.router
        r.add_put("/v1/kv/{key:.+}", self.handle_put)
        r.add_get("/v1/kv/{key:.+}", self.handle_get)
        r.add_delete("/v1/kv/{key:.+}", self.handle_delete)
        r.add_get("/v1/ranges", self.handle_ranges)
        r.add_post("/v1/ranges/meta", self.handle_meta)
        r.add_post("/v1/ranges/{id}/split", self.handle_split)
        r.add_post("/v1/ranges/{id}/move", self.handle_move)
        r.add_post("/v1/ranges/{id}/leader", self.handle_transfer)
        r.add_get("/v1/ranges/{id}/kv", self.handle_range_scan)
        r.add_get("/v1/ranges/{id}/watch", self.watches.handle_http)
        r.add_get("/v1/watch", self.watches.handle_prefix_http)
        r.add_get("/v1/status", self.handle_status)
        r.add_get("/v1/ws", self.handle_ws)
        r.add_get(MULTI_PATH, self.handle_peer_stream)
        self.upkeep.add_routes(app)
        app.on_shutdown.append(self._close_streams)
        add_observability_routes(app, self.metrics, self.health)
        return app

    async def start(self) -> MultiRaftServer:
        """Start the transport, every group and the HTTP server."""
        await self.transport.start()
        for g in list(self.groups.values()):
            await g.node.start()
        self._started = True
        self._runner, self.port = await start_site(
            self.app, self.config.host, self.config.port, shutdown_timeout=1.0
        )
        self._tasks.append(asyncio.create_task(self._ticker()))
        self._tasks.append(asyncio.create_task(self._reporter()))
        if self.config.placement_interval is not None:
            self._tasks.append(asyncio.create_task(self._placer(self.config.placement_interval)))
        elif self.config.balance_interval is not None:
            self._tasks.append(asyncio.create_task(self._balancer(self.config.balance_interval)))
        self.log.info(
            "multi_kv_started",
            listen=f"{self.config.host}:{self.port}",
            ranges=sorted(self.groups),
            fsync="always" if self.config.fsync else "none (UNSAFE)",
            wal=self.config.wal,
        )
        return self

    async def close(self) -> None:
        """Stop serving, close every group (WALs synced) and the transport."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.watches.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for g in list(self.groups.values()):
            await g.node.close()
        if self.wal is not None:
            await self.wal.aclose()
        await self.transport.close()

    async def __aenter__(self) -> MultiRaftServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def health(self) -> Mapping[str, object]:
        """Health details (raises when a group's Raft loop has died)."""
        for g in self.groups.values():
            if g.node.failed is not None:
                raise RuntimeError(f"range {g.range_id}: raft loop stopped: {g.node.failed!r}")
        return {"id": self.config.id, "ranges": len(self.groups)}

    # -- routing ----------------------------------------------------------------------

    def local_descriptors(self) -> list[RangeDescriptor]:
        """The descriptors of the local data ranges, in key order."""
        return [g.desc for g in self.data_groups()]

    def _owner(self, key: str) -> Group | None:
        for g in self.groups.values():
            if g.initialized and g.desc.contains(key):
                return g
        return None

    def _not_here(self, key: str) -> KeyNotInRangeError:
        return KeyNotInRangeError(
            key, ranges=self.local_descriptors(), map_version=self.meta.map.version
        )

    def route(self, key: str, header: str | None) -> Group:
        """The local replica of the range owning ``key``, checked against the client's
        ``X-Dsys-Range`` (if any).

        Raises:
            KeyNotInRangeError: no local range owns the key, or the header names another.
            EpochNotMatchError: the header's epoch of the owner is stale.
        """
        g = self._owner(key)
        if g is None:
            raise self._not_here(key)
        routed = parse_range_header(header)
        if routed is not None:
            rid, epoch = routed
            if rid != g.range_id:
                raise KeyNotInRangeError(
                    key,
                    ranges=self.local_descriptors(),
                    map_version=self.meta.map.version,
                    message=f"key {key!r} is in range {g.range_id}, not {rid}",
                )
            try:
                check_epoch(g.desc, epoch)
            except EpochNotMatchError as exc:
                raise EpochNotMatchError(
                    rid,
                    exc.epoch,
                    ranges=self.local_descriptors(),
                    map_version=self.meta.map.version,
                ) from None
        return g

    def _leader_url(self, exc: NotLeaderError) -> str | None:
        hint = exc.leader_hint
        if hint is None or hint == self.config.id:
            return None
        addr = self.nodes.get(hint)
        return f"http://{addr}" if addr else None

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:
            leader = self._leader_url(exc) if isinstance(exc, NotLeaderError) else None
            if not isinstance(exc, DsysError):
                self.log.exception("request_failed", path=request.path)
            return _respond(error_answer(exc, request.path_qs.encode(), leader))

    # -- KV operations ----------------------------------------------------------------

    async def _propose(self, g: Group, data: bytes) -> object:
        try:
            return await wait_future(g.node.propose_future(data), self.config.request_timeout)
        except TimeoutError:
            raise RequestTimeout("write not committed in time; it may still commit") from None
        except ProposalDroppedError as exc:
            raise UnavailableError(str(exc), retry_after=0.1) from exc

    async def write(self, cmd: Put | Delete, header: str | None = None) -> Result:
        """Propose a put or delete in the range owning its key; its result once applied.

        Raises:
            KeyNotInRangeError, EpochNotMatchError: routed to the wrong range (also when
                a split moved the key between the proposal and its commit).
            NotLeaderError: this node is not the range's leader.
            RequestTimeout, UnavailableError: the outcome is unknown.
        """
        g = self.route(cmd.key, header)
        self.upkeep.record(g, cmd.key)
        result = await self._propose(g, encode_command(cmd))
        assert isinstance(result, Result)
        if result.status == "key_not_in_range":
            raise self._not_here(cmd.key)
        return result

    async def read(self, key: str, header: str | None = None) -> KeyValue | None:
        """A linearizable read of ``key`` from the leader of its range (None: absent).

        Raises:
            KeyNotInRangeError, EpochNotMatchError: routed to the wrong range.
            NotLeaderError: this node is not the range's leader.
        """
        g = self.route(key, header)
        self.upkeep.record(g, key)
        await g.node.read_barrier(self.config.request_timeout)
        if not g.desc.contains(key) or self.upkeep.frozen(g):  # a split or merge applied
            raise self._not_here(key)
        assert isinstance(g.fsm, RangeStateMachine)
        return g.fsm.get(key)

    async def handle_put(self, request: web.Request) -> web.Response:
        """``PUT /v1/kv/{key}``: body = value (``?if_revision=R``, ``?ttl=S``)."""
        key = validate_key(request.match_info["key"])
        q = request.query
        if_revision = opt_int(q.get("if_revision"), "if_revision")
        ttl = opt_int(q.get("ttl"), "ttl")
        value = await request.read()
        if len(value) > MAX_VALUE_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_VALUE_BYTES, actual_size=len(value))
        cid, seq = session_fields(
            request.headers.get("X-Dsys-Client-Id"), request.headers.get("X-Dsys-Seq")
        )
        cmd = Put(
            key=key,
            value=value,
            if_revision=if_revision,
            ttl_ms=(ttl or 0) * 1000,
            now_ms=_now_ms(),
            client_id=cid,
            seq=seq,
        )
        result = await self.write(cmd, request.headers.get(RANGE_HEADER))
        return _respond(write_answer(cmd, result))

    async def handle_delete(self, request: web.Request) -> web.Response:
        """``DELETE /v1/kv/{key}`` (``?if_revision=R``)."""
        key = validate_key(request.match_info["key"])
        cid, seq = session_fields(
            request.headers.get("X-Dsys-Client-Id"), request.headers.get("X-Dsys-Seq")
        )
        cmd = Delete(
            key=key,
            if_revision=opt_int(request.query.get("if_revision"), "if_revision"),
            now_ms=_now_ms(),
            client_id=cid,
            seq=seq,
        )
        result = await self.write(cmd, request.headers.get(RANGE_HEADER))
        return _respond(write_answer(cmd, result))

    async def handle_get(self, request: web.Request) -> web.Response:
        """``GET /v1/kv/{key}``: raw value with ``X-Dsys-Revision``, or 404."""
        key = validate_key(request.match_info["key"])
        return _respond(read_answer(key, await self.read(key, request.headers.get(RANGE_HEADER))))

    # -- the WebSocket channel --------------------------------------------------------

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /v1/ws``: msgpack frames of requests, answered in frames of answers.

        A request is ``{"id": N, "op": "put"|"get"|"del", "key": K, ...}`` as on the
        single-group server (``value``, ``if_revision``, ``cid``/``seq``), plus an
        optional ``"range": [range_id, conf_ver, version]`` the client routed by. Each is
        routed to the local replica of its key's range; answers are those of
        :mod:`dsys.kv.api` (``ws_write_answer``, ``not_leader`` with the leader's
        address, ``wrong_range`` with the node's descriptors, ``bad_request``).
        At most ``MAX_WS_INFLIGHT`` requests of one connection are in flight.
        ``watch``/``unwatch`` open and close range watches (:mod:`dsys.kv.rangewatch`).
        """
        ws = web.WebSocketResponse(max_msg_size=MAX_WS_FRAME, heartbeat=30.0)
        await ws.prepare(request)
        out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        watches = self.watches.ws_session(QueueOutbox(out))
        room = asyncio.Semaphore(MAX_WS_INFLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        writer = asyncio.create_task(_ws_writer(ws, out))

        async def run(req: object) -> None:
            try:
                out.put_nowait(await self.ws_call(req))
            finally:
                room.release()

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
                for req in reqs:
                    if isinstance(req, dict) and req.get("op") in ("watch", "unwatch"):
                        watches.handle(req)
                        continue
                    await room.acquire()
                    t = asyncio.create_task(run(req))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
        finally:
            watches.close()
            for t in list(tasks):
                t.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return ws

    async def ws_call(self, req: object) -> dict[str, Any]:
        """The answer to one WebSocket request (never raises for a client's mistake)."""
        rid = req.get("id") if isinstance(req, dict) else None
        if type(rid) is not int or not isinstance(req, dict):
            return _ws_error(None, "bad_request", "request needs an integer 'id'")
        try:
            header = _ws_range(req.get("range"))
            op = req.get("op")
            if op == "get":
                key = validate_key(req.get("key"))
                kv = await self.read(key, header)
                if kv is None:
                    return {"id": rid, "status": "not_found"}
                return {"id": rid, "status": "ok", "value": kv.value, "revision": kv.mod_revision}
            if op not in ("put", "del"):
                raise BadInputError(f"unknown op {op!r}")
            cmd = ws_write_command(op, req, _now_ms())
            return ws_write_answer(rid, await self.write(cmd, header))
        except NotLeaderError as exc:
            url = self._leader_url(exc)
            return {
                "id": rid,
                "status": "not_leader",
                "leader": exc.leader_hint,
                "leader_addr": url.removeprefix("http://") if url else None,
                "message": str(exc),
            }
        except RangeError as exc:
            return ws_range_answer(rid, exc)
        except DsysError as exc:
            return _ws_error(rid, ws_error_status(exc), str(exc))
        except Exception as exc:  # a bug: answer, log, keep serving
            self.log.exception("ws_request_failed")
            return _ws_error(rid, "unavailable", f"request failed: {type(exc).__name__}")

    # -- ranges -----------------------------------------------------------------------

    def ranges_view(self) -> dict[str, Any]:
        """The range map of this node's metadata replica, the nodes, and local groups."""
        m = self.meta.map
        now = time.monotonic()
        local = []
        for rid in sorted(self.groups):
            g = self.groups[rid]
            st = g.node.status()
            row: dict[str, Any] = {
                "range_id": rid,
                "role": st["role"],
                "leader": st["leader"],
                "term": st["term"],
                "applied_index": st["applied_index"],
            }
            if isinstance(g.fsm, RangeStateMachine):
                row["initialized"] = g.fsm.initialized
                row["keys"] = len(g.fsm)
                row["bytes"] = self.sizes.get(g, now)
                row["qps"] = round(self.upkeep.qps(rid, now), 3)
                row["descriptor"] = g.fsm.desc.to_plain()
                row["learners"] = list(g.fsm.learners)
            local.append(row)
        return {
            "version": m.version,
            "ranges": [r.to_plain() for r in m],
            "nodes": self.nodes | {self.config.id: f"{self.config.host}:{self.port}"},
            "local": local,
            "moves": [{"range_id": rid, **mv} for rid, mv in sorted(self.moves.items())],
        }

    async def handle_ranges(self, request: web.Request) -> web.Response:
        """``GET /v1/ranges``: the range map (as this node's metadata replica has it)."""
        return web.json_response(self.ranges_view())

    async def handle_status(self, request: web.Request) -> web.Response:
        """``GET /v1/status``: this node's groups and transport counters."""
        t = self.transport
        view = self.ranges_view()
        return web.json_response(
            {
                "id": self.config.id,
                "ranges": view["local"],
                "frames_sent": t.frames_sent,
                "messages_sent": t.messages_sent,
                "dropped": t.dropped,
                "unknown_group_msgs": self.unknown_group_msgs,
                "leader_moves": self.leader_moves,
                "wal": self.wal_stats(),
                "replica_moves": self.replica_moves,
                "removed_ranges": self.removed_ranges,
                "stale_replicas_refused": self.stale_replicas_refused,
                "moves": view["moves"],
                "placement": self.placement_view(),
            }
        )

    def wal_stats(self) -> dict[str, Any]:
        """The WAL kind with its writes and fsyncs so far (shared WAL only)."""
        w = self.wal
        if w is None:
            return {"kind": "per-range"}
        return {
            "kind": "shared",
            "writes": w.write_count,
            "fsyncs": w.fsync_count,
            "groups_per_write_max": w.batch_groups_max,
            "groups_per_write_mean": round(w.batch_groups_total / max(1, w.write_count), 2),
            "size_bytes": w.size_bytes,
        }

    async def split(self, range_id: int, at_key: str) -> SplitResult:
        """Split local range ``range_id`` at ``at_key`` (this node must lead it).

        Raises:
            BadInputError: no such local range, or the key is not strictly inside it.
            NotLeaderError: this node does not lead the range.
            EpochNotMatchError: the range changed while the split was proposed.
        """
        g = self.groups.get(range_id)
        if g is None or not g.initialized:
            if META_RANGE_ID < range_id < self.meta.next_id:  # allocated: not applied here yet
                raise UnavailableError(
                    f"range {range_id} is not on node {self.config.id} yet", retry_after=0.1
                )
            raise BadInputError(f"no data range {range_id}")
        if not g.node.is_leader:
            raise g.node.not_leader_error()
        desc = g.desc
        if not (desc.start < at_key and (desc.end is None or at_key < desc.end)):
            raise BadInputError(
                f"split key {at_key!r} is not strictly inside range {range_id} {desc.describe()}"
            )
        new_id = await self.meta_call({"op": "alloc"})
        if type(new_id) is not int:
            raise UnavailableError("the metadata range did not allocate a range id")
        res = await self._propose(g, encode_split(Split(at_key, new_id, desc.epoch.version)))
        assert isinstance(res, SplitResult)
        if not res.ok:
            if res.status == "epoch_not_match":
                raise EpochNotMatchError(
                    range_id,
                    (desc.epoch.conf_ver, desc.epoch.version),
                    ranges=self.local_descriptors(),
                )
            if res.status == "conf_change_in_progress":
                raise UnavailableError(
                    f"range {range_id} is changing its replicas; split it afterwards",
                    retry_after=0.5,
                )
            raise BadInputError(f"split of range {range_id} at {at_key!r} refused: {res.status}")
        assert res.left is not None and res.right is not None
        with contextlib.suppress(DsysError):  # the reporter repairs a lost report
            await self.meta_call(
                {"op": "report", "ranges": [res.left.to_plain(), res.right.to_plain()]}
            )
        return res

    async def scan_range(
        self, range_id: int, req: ScanRequest, header: str | None = None
    ) -> tuple[ScanPage, RangeDescriptor]:
        """One page of the keys of local range ``range_id`` (linearizable, on its leader).

        ``more``/``next`` of the page speak of this range only; the range's descriptor
        says where the next range starts.

        Raises:
            KeyNotInRangeError: no such local range (it may be elsewhere, or gone).
            EpochNotMatchError: ``header`` names a stale epoch.
            NotLeaderError: this node does not lead the range.
        """
        g = self.groups.get(range_id)
        if g is None or not g.initialized:
            raise KeyNotInRangeError(
                req.after or req.prefix,
                ranges=self.local_descriptors(),
                map_version=self.meta.map.version,
                message=f"range {range_id} is not on node {self.config.id}",
            )
        routed = parse_range_header(header)
        if routed is not None:
            if routed[0] != range_id:
                raise BadInputError(f"{RANGE_HEADER} names range {routed[0]}, not {range_id}")
            check_epoch(g.desc, routed[1], others=self.local_descriptors())
        await g.node.read_barrier(self.config.request_timeout)
        assert isinstance(g.fsm, RangeStateMachine)
        check_epoch(g.desc, routed[1] if routed else None, others=self.local_descriptors())
        if self.upkeep.frozen(g):  # being merged: the merged range will answer
            raise self._not_here(req.after or req.prefix)
        return scan_page(req, g.fsm.scan(req.prefix, req.limit + 1, req.after)), g.desc

    async def handle_range_scan(self, request: web.Request) -> web.Response:
        """``GET /v1/ranges/{id}/kv?prefix=P&limit=L&after=K``: a page of range ``id``'s
        keys ``{"items": [[key, revision], ...], "more", "next", "range": descriptor}``."""
        rid = _range_id(request.match_info["id"])
        q = request.query
        limit = opt_int(q.get("limit"), "limit", minimum=1) or 1000
        req = scan_request(q.get("prefix", ""), limit, q.get("after") or None)
        page, desc = await self.scan_range(rid, req, request.headers.get(RANGE_HEADER))
        return web.json_response(
            {
                "items": [[kv.key, kv.mod_revision] for kv in page.items],
                "more": page.more,
                "next": page.next,
                "range": desc.to_plain(),
            }
        )

    async def handle_split(self, request: web.Request) -> web.Response:
        """``POST /v1/ranges/{id}/split?at=KEY`` on the range's leader: both halves."""
        token = self.config.token
        if not token_ok(request.headers.get(TOKEN_HEADER), token):
            raise web.HTTPForbidden(text="admin endpoints need the cluster token")
        rid = _range_id(request.match_info["id"])
        at = validate_key(request.query.get("at", ""))
        res = await self.split(rid, at)
        assert res.left is not None and res.right is not None
        return web.json_response({"left": res.left.to_plain(), "right": res.right.to_plain()})

    async def meta_call(self, body: dict[str, Any]) -> object:
        """Run a metadata operation (``alloc`` or ``report``) on the metadata leader.

        Raises:
            UnavailableError: no metadata leader is known or reachable.
            BadInputError: malformed ``body``.
        """
        meta = self.groups[META_RANGE_ID].node
        if meta.is_leader:
            return await self._meta_local(body)
        leader = meta.leader_id
        addr = self.nodes.get(leader) if leader else None
        if addr is None:
            raise UnavailableError("no leader of the metadata range is known", retry_after=0.2)
        headers = {TOKEN_HEADER: self.config.token} if self.config.token else {}
        try:
            async with (
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.config.request_timeout)
                ) as s,
                s.post(f"http://{addr}/v1/ranges/meta", json=body, headers=headers) as r,
            ):
                data = await r.json(content_type=None)
                if r.status != 200:
                    raise UnavailableError(f"metadata call failed: {r.status} {data}")
                return data.get("result")
        except (aiohttp.ClientError, OSError, TimeoutError, json.JSONDecodeError) as exc:
            raise UnavailableError(f"metadata leader {leader} unreachable: {exc}") from None

    async def _meta_local(self, body: dict[str, Any]) -> object:
        g = self.groups[META_RANGE_ID]
        op = body.get("op")
        if op == "alloc":
            return await self._propose(g, encode_meta(AllocId()))
        if op == "report":
            raw = body.get("ranges")
            if not isinstance(raw, list):
                raise BadInputError("report needs a list of ranges")
            descs = tuple(RangeDescriptor.from_plain(r) for r in raw)
            return await self._propose(g, encode_meta(Report(descs)))
        raise BadInputError(f"unknown metadata op {op!r}")

    async def handle_meta(self, request: web.Request) -> web.Response:
        """``POST /v1/ranges/meta`` (between nodes): run a metadata op on its leader."""
        token = self.config.token
        if not token_ok(request.headers.get(TOKEN_HEADER), token):
            raise web.HTTPForbidden(text="missing or wrong cluster token")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadInputError("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise BadInputError("the body must be a JSON object")
        meta = self.groups[META_RANGE_ID].node
        if not meta.is_leader:
            raise meta.not_leader_error()
        return web.json_response({"result": await self._meta_local(body)})

    async def _reporter(self) -> None:
        """Background upkeep: split ranges grown past ``split_keys``, and re-report local
        descriptors the metadata range does not know yet."""
        while True:
            await asyncio.sleep(self.config.report_interval)
            try:
                await self._tick_ttl()
                await self.upkeep.upkeep()
                self._drop_removed()
                await self._drop_orphan_learners()
                await self._maybe_split_by_size()
                await self._report_stale()
            except DsysError as exc:
                self.log.debug("upkeep_deferred", error=str(exc))
            except Exception:  # a bug: log it, keep the loop
                self.log.exception("upkeep_failed")

    async def _ticker(self) -> None:
        """Tick every group at the same moment: one timer for the process, and the
        heartbeats of all groups queued together, so they leave in one frame per peer."""
        interval = self.config.tick_interval
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if loop.time() - next_at > 5 * interval:
                next_at = loop.time()  # we were starved; do not burst ticks
            for g in list(self.groups.values()):
                g.node.tick()

    async def _tick_ttl(self) -> None:
        """On the leader of a range holding TTL keys, propose a Tick every second (the
        replicated clock expires keys, as on the single-group server)."""
        now = time.monotonic()
        for g in self.data_groups():
            assert isinstance(g.fsm, RangeStateMachine)
            if not g.node.is_leader or not g.fsm.has_ttl_keys:
                continue
            if now - self._ticked.get(g.range_id, 0.0) < 1.0:
                continue
            self._ticked[g.range_id] = now
            g.node.propose_callback(encode_command(Tick(now_ms=_now_ms())), _ignore)

    async def _report_stale(self) -> None:
        known = self.meta.map
        if any(g.node.is_leader and known.get(g.range_id) != g.desc for g in self.data_groups()):
            await self.meta_call(
                {"op": "report", "ranges": [d.to_plain() for d in self.local_descriptors()]}
            )

    async def _maybe_split_by_size(self) -> None:
        """Split one range this node leads that holds ``split_keys`` keys or more."""
        limit = self.config.split_keys
        if limit is None:
            return
        for g in self.data_groups():
            assert isinstance(g.fsm, RangeStateMachine)
            if not g.node.is_leader or len(g.fsm) < limit:
                continue
            at = g.fsm.split_key()
            if at is None:
                continue
            self.log.info("split_by_size", range_id=g.range_id, keys=len(g.fsm), at=at)
            await self.split(g.range_id, at)
            return

    async def _balancer(self, interval: float) -> None:
        """Even out data-range leaders across the nodes (see :func:`plan_leader_move`)."""
        while True:
            await asyncio.sleep(interval)
            leaders = {g.range_id: g.node.leader_id for g in self.data_groups()}
            # only nodes heard from within two election timeouts (a live peer answers our
            # heartbeats every heartbeat interval): never hand a range to a node that is down
            now = time.monotonic()
            window = 2 * self.config.tick_interval * self.config.election_tick
            alive = [
                n
                for n in self.replicas
                if n == self.config.id or now - self._heard.get(n, -window) < window
            ]
            move = plan_leader_move(leaders, alive, self.config.id)
            if move is None:
                continue
            rid, target = move
            if target not in self.groups[rid].node.core.conf.voters:
                continue  # ranges are not on every node (after replica moves)
            self.log.info("leader_transfer", range_id=rid, to=target)
            self.leader_moves += 1
            self.leader_moves_to[target] = self.leader_moves_to.get(target, 0) + 1
            try:
                await self.groups[rid].node.transfer_leadership(target)
            except DsysError as exc:
                self.log.info("leader_transfer_failed", range_id=rid, error=str(exc))
            except Exception:  # a bug: log it, keep balancing
                self.log.exception("leader_transfer_crashed")

    # -- replica moves and placement (see dsys.kv.placement) ---------------------------

    async def move_replica(
        self, range_id: int, src: str, dst: str, *, hops: int = 0
    ) -> RangeDescriptor:
        """Move range ``range_id``'s replica from node ``src`` to node ``dst``; returns
        the range's descriptor once ``src`` was removed.

        Runs on the range's leader (add ``dst`` as learner after a snapshot, wait for it
        to catch up, promote it, hand leadership over if ``src`` leads, remove ``src``);
        elsewhere, or after this node handed the leadership to ``dst``, it is forwarded
        to the leader, which continues from the range's current configuration.

        Raises:
            BadInputError: unknown nodes, ``src == dst``, or ``src`` holds no replica.
            ConflictError: another move of the range is in flight on its leader.
            UnavailableError, RequestTimeout: no leader, or not done in time (asking
                again resumes the move).
        """
        for n in (src, dst):
            if n not in self.nodes:
                raise BadInputError(f"unknown node {n!r}")
        if src == dst:
            raise BadInputError(f"cannot move a replica from {src!r} to itself")
        g = self.groups.get(range_id)
        if g is None or not g.initialized or not g.node.is_leader:
            return await self._forward_move(range_id, src, dst, hops)
        current = self.moves.get(range_id)
        if current is not None:
            raise ConflictError(
                f"range {range_id}: a move {current['from']} -> {current['to']} is in flight"
            )
        progress: dict[str, Any] = {"from": src, "to": dst, "step": "start"}
        self.moves[range_id] = progress
        deadline = time.monotonic() + self.config.move_timeout
        pause = self.config.tick_interval
        try:
            while g.node.is_leader and self.groups.get(range_id) is g and not self._closed:
                core = g.node.core
                conf = core.conf
                match = core.progress().get(dst)
                step = next_move_step(
                    voters=conf.voters,
                    learners=conf.learners,
                    leader=self.config.id,
                    src=src,
                    dst=dst,
                    dst_match=match,
                    last_index=core.last_index,
                    min_match=max(core.conf_index, 1),
                )
                if step is not MoveStep.DONE:
                    progress["step"] = step.value
                progress.update(
                    learner_match=match,
                    last_index=core.last_index,
                    conf_ver=g.desc.epoch.conf_ver,
                )
                if step is MoveStep.DONE:  # also when asked again after it was done
                    if progress["step"] != "start":
                        self.replica_moves += 1
                        self.log.info("replica_moved", range_id=range_id, src=src, dst=dst)
                    await self._report_range(g)
                    return g.desc
                if time.monotonic() > deadline:
                    undone = ""
                    if dst in conf.learners:
                        # give up cleanly: a learner left behind would block splits
                        with contextlib.suppress(DsysError):
                            await self._conf_change(g, ConfChangeType.REMOVE_NODE, dst)
                            undone = f"; learner {dst} removed again"
                            await self._report_range(g)
                    raise RequestTimeout(
                        f"move of range {range_id} {src} -> {dst} stuck at {step.value}{undone}"
                    )
                try:
                    if step is MoveStep.ADD_LEARNER:
                        # compact first: the learner's empty log then needs the snapshot,
                        # which carries the range's bounds and epoch
                        await g.node.request_snapshot(self.config.request_timeout)
                        await self._conf_change(g, ConfChangeType.ADD_LEARNER, dst)
                    elif step is MoveStep.CATCH_UP:
                        await asyncio.sleep(pause)
                    elif step is MoveStep.PROMOTE:
                        await self._conf_change(g, ConfChangeType.ADD_VOTER, dst)
                    elif step is MoveStep.TRANSFER_LEADER:
                        await g.node.transfer_leadership(dst, self.config.request_timeout)
                    elif step is MoveStep.REMOVE:
                        await self._conf_change(g, ConfChangeType.REMOVE_NODE, src)
                except (ProposalDroppedError, UnavailableError, RequestTimeout) as exc:
                    # a pending change, a leader change: look at the configuration again
                    self.log.info(
                        "move_step_retry", range_id=range_id, step=step.value, error=str(exc)
                    )
                    await asyncio.sleep(5 * pause)
                    continue
                if step in (MoveStep.ADD_LEARNER, MoveStep.PROMOTE, MoveStep.REMOVE):
                    self.log.info(
                        "move_step_done",
                        range_id=range_id,
                        step=step.value,
                        conf_ver=g.desc.epoch.conf_ver,
                    )
                    await self._report_range(g)
        finally:
            if self.moves.get(range_id) is progress:
                del self.moves[range_id]
        if self._closed:
            raise UnavailableError("node shutting down", retry_after=0.5)
        return await self._forward_move(range_id, src, dst, hops)

    async def _conf_change(self, g: Group, kind: ConfChangeType, node: str) -> None:
        fut = g.node.propose_conf_change(ConfChange(type=int(kind), node_id=node))
        try:
            await asyncio.wait_for(fut, self.config.request_timeout)
        except TimeoutError:
            raise RequestTimeout("configuration change not applied in time") from None

    async def _report_range(self, g: Group) -> None:
        with contextlib.suppress(DsysError):  # the reporter repairs a lost report
            await self.meta_call({"op": "report", "ranges": [g.desc.to_plain()]})

    async def _range_leader_addr(self, range_id: int, hops: int) -> str:
        """The address to forward a range's admin request to (its leader if known)."""
        if hops >= 4:
            raise UnavailableError(f"no leader of range {range_id} found", retry_after=0.5)
        g = self.groups.get(range_id)
        if g is not None and g.initialized:
            loop = asyncio.get_running_loop()
            until = loop.time() + 2 * self.config.tick_interval * self.config.election_tick
            while g.node.leader_id in (None, self.config.id) and loop.time() < until:
                if g.node.is_leader:
                    raise UnavailableError("this node leads the range now", retry_after=0.0)
                await asyncio.sleep(self.config.tick_interval)
            leader = g.node.leader_id
            if leader is not None and leader != self.config.id:
                return self.nodes[leader]
        desc = self.meta.map.get(range_id)
        others = [r for r in desc.replicas if r != self.config.id] if desc else []
        if not others:
            raise BadInputError(f"no data range {range_id}")
        return self.nodes[others[hops % len(others)]]

    async def _admin_post(
        self,
        addr: str,
        path: str,
        body: dict[str, Any],
        hops: int,
        timeout: float,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        headers = {HOPS_HEADER: str(hops + 1)}
        if self.config.token:
            headers[TOKEN_HEADER] = self.config.token
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
                s.post(f"http://{addr}{path}", json=body, headers=headers) as r,
            ):
                data = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, OSError, TimeoutError, json.JSONDecodeError) as exc:
            raise UnavailableError(f"{addr} unreachable: {exc}", retry_after=0.2) from None
        if status == 200 and isinstance(data, dict):
            return data
        message = f"{addr}: {data.get('message') if isinstance(data, dict) else data}"
        if status == 400:
            raise BadInputError(message)
        if status == 409:
            raise ConflictError(message)
        if status == 504:
            raise RequestTimeout(message)
        raise UnavailableError(message, retry_after=0.2)

    async def _forward_move(self, range_id: int, src: str, dst: str, hops: int) -> RangeDescriptor:
        for attempt in range(3):
            try:
                addr = await self._range_leader_addr(range_id, hops + attempt)
            except UnavailableError as exc:
                if exc.retry_after == 0.0:  # we lead it now: drive the move here
                    return await self.move_replica(range_id, src, dst, hops=hops + 1)
                raise
            try:
                data = await self._admin_post(
                    addr,
                    f"/v1/ranges/{range_id}/move",
                    {"from": src, "to": dst},
                    hops,
                    self.config.move_timeout + 5.0,
                )
            except UnavailableError:
                await asyncio.sleep(self.config.tick_interval * self.config.election_tick)
                continue
            return RangeDescriptor.from_plain(data.get("range"))
        raise UnavailableError(f"move of range {range_id}: no leader answered", retry_after=0.5)

    async def transfer_range_leader(self, range_id: int, to: str, *, hops: int = 0) -> None:
        """Hand range ``range_id``'s leadership to its voter ``to`` (forwarded to the
        range's leader when this node does not lead it).

        Raises:
            BadInputError: ``to`` is not a voter of the range, or no such range.
            UnavailableError, RequestTimeout: no leader, or ``to`` did not take over.
        """
        g = self.groups.get(range_id)
        if g is not None and g.initialized and g.node.is_leader:
            await g.node.transfer_leadership(to, self.config.request_timeout)
            self.leader_moves += 1
            self.leader_moves_to[to] = self.leader_moves_to.get(to, 0) + 1
            return
        addr = await self._range_leader_addr(range_id, hops)
        await self._admin_post(
            addr, f"/v1/ranges/{range_id}/leader", {"to": to}, hops, self.config.request_timeout + 1
        )

    async def _admin_body(self, request: web.Request) -> tuple[int, dict[str, Any], int]:
        if not token_ok(request.headers.get(TOKEN_HEADER), self.config.token):
            raise web.HTTPForbidden(text="admin endpoints need the cluster token")
        rid = _range_id(request.match_info["id"])
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadInputError("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise BadInputError("the body must be a JSON object")
        hops = opt_int(request.headers.get(HOPS_HEADER), HOPS_HEADER) or 0
        return rid, body, hops

    async def handle_move(self, request: web.Request) -> web.Response:
        """``POST /v1/ranges/{id}/move`` ``{"from": A, "to": B}``: move a replica; answers
        ``{"range": descriptor}`` once done (409 if another move of the range runs)."""
        rid, body, hops = await self._admin_body(request)
        src, dst = body.get("from"), body.get("to")
        if type(src) is not str or type(dst) is not str:
            raise BadInputError('the body must be {"from": NODE, "to": NODE}')
        desc = await self.move_replica(rid, src, dst, hops=hops)
        return web.json_response({"range": desc.to_plain()})

    async def handle_transfer(self, request: web.Request) -> web.Response:
        """``POST /v1/ranges/{id}/leader`` ``{"to": B}``: hand the range's leadership to B."""
        rid, body, hops = await self._admin_body(request)
        to = body.get("to")
        if type(to) is not str or to not in self.nodes:
            raise BadInputError('the body must be {"to": NODE} naming a known node')
        await self.transfer_range_leader(rid, to, hops=hops)
        return web.json_response({"range_id": rid, "leader": to})

    def _on_conf(self, desc: RangeDescriptor, conf: ConfState) -> None:
        """A local replica applied a configuration entry: drop it if it was removed."""
        if self.config.id not in (*conf.voters, *conf.learners) and not self._closed:
            self._tasks.append(asyncio.create_task(self._drop_group(desc.range_id)))

    def _drop_removed(self) -> None:
        """Drop local replicas the metadata range says were removed: a removed replica
        may never learn that its removal committed (the leader stops talking to it), as
        TiKV's stale-peer check asks PD."""
        for g in self.data_groups():
            known = self.meta.map.get(g.range_id)
            # only a replica that knows itself a member: a learner restored from a
            # snapshot taken before its addition does not see itself yet
            if (
                known is not None
                and self.config.id in g.desc.replicas
                and self.config.id not in known.replicas
                and known.epoch.conf_ver > g.desc.epoch.conf_ver
                and not g.node.is_leader
            ):
                drop = self._drop_group(g.range_id, known.epoch)
                self._tasks.append(asyncio.create_task(drop))

    async def _drop_orphan_learners(self) -> None:
        """On a leader: remove a learner no move drives any more (its leader changed
        and nobody asked again) once ``move_timeout`` passed, as PD times out an
        operator; a learner left behind would block the range's splits forever."""
        now = time.monotonic()
        for g in self.data_groups():
            learners = g.node.core.conf.learners if g.node.is_leader else ()
            if not learners or g.range_id in self.moves:
                self._orphans.pop(g.range_id, None)
                continue
            since = self._orphans.setdefault(g.range_id, now)
            if now - since < self.config.move_timeout:
                continue
            self._orphans.pop(g.range_id, None)
            self.log.warning("orphan_learner_removed", range_id=g.range_id, node=learners[0])
            await self._conf_change(g, ConfChangeType.REMOVE_NODE, learners[0])
            await self._report_range(g)
            return

    async def _drop_group(self, range_id: int, known: Epoch | None = None) -> None:
        """Stop the local replica of ``range_id`` and delete its data directory, after
        its tombstone is on disk (with ``known``, the map's epoch, if newer)."""
        g = self.groups.pop(range_id, None)
        if g is None:
            return
        if g.initialized:
            self.bury(range_id, max(g.desc.epoch, known or g.desc.epoch))
        now = time.monotonic()
        window = self._tombstone_window()
        # only recent drops matter (see _tombstoned): forget the older ones
        self._tombstones = {r: t for r, t in self._tombstones.items() if now - t < window}
        self._tombstones[range_id] = now
        await g.node.close()
        self._drop_log(range_id)  # it stops pinning the shared WAL's segments
        await asyncio.to_thread(shutil.rmtree, self.data / f"r{range_id}", True)
        self.removed_ranges += 1
        self.log.info("replica_removed", range_id=range_id)

    def _tombstoned(self, range_id: int) -> bool:
        """Whether ``range_id`` was dropped here moments ago (late messages of its old
        leader must not create an empty replica again)."""
        at = self._tombstones.get(range_id)
        return at is not None and time.monotonic() - at < self._tombstone_window()

    def _tombstone_window(self) -> float:
        """Seconds a dropped range's late messages are ignored."""
        return max(3.0, 10 * self.config.tick_interval * self.config.election_tick)

    def _tombstone_path(self) -> Path:
        return self.data / "tombstones"

    def _load_tombstones(self) -> Tombstones:
        path = self._tombstone_path()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return Tombstones()
        try:
            return Tombstones.decode(data)
        except BadInputError as exc:
            raise CorruptLogError(f"{path}: {exc}") from None

    def bury(self, range_id: int, epoch: Epoch, *, merged: bool = False) -> None:
        """Record that the local replica of ``range_id`` (at ``epoch``) is dropped, on
        disk (write, fsync, rename, fsync the directory) before its data goes."""
        if not self.tombs.add(Tombstone(range_id, epoch, merged)):
            return
        path = self._tombstone_path()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(self.tombs.encode())
            f.flush()
            if self.config.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.config.fsync:
            fsync_dir(self.data)

    def _may_create(self, range_id: int) -> bool:
        """Whether a leader's message may create an empty replica of ``range_id``: not
        merged away, not dropped moments ago, and if dropped before, only once our
        metadata replica shows this node among its replicas at a newer epoch (moved
        back here)."""
        if range_id == META_RANGE_ID or self._closed or self._tombstoned(range_id):
            return False
        t = self.tombs.get(range_id)
        if t is None:
            return True
        known = self.meta.map.get(range_id)
        return known is not None and self.config.id in known.replicas and not t.refuses(known)

    def _refuse_stale(self, range_id: int, g: Group | None, msgs: list[Message]) -> list[Message]:
        """``msgs`` without the snapshots that would make an empty replica of a dropped
        range stale (their descriptor is older than its tombstone)."""
        if (g is not None and g.initialized) or range_id not in self.tombs:
            return msgs
        out = []
        for m in msgs:
            if isinstance(m, SnapshotRequest):
                desc = snapshot_descriptor(m.snapshot.data)
                if desc is None or self.tombs.refuses(desc):
                    self.stale_replicas_refused += 1
                    self.log.info("stale_snapshot_refused", range_id=range_id, src=m.src)
                    continue
            out.append(m)
        return out

    async def _placer(self, interval: float) -> None:
        """The placement loop: on the metadata leader only, the repairs of replicas on
        down nodes, else one replica move (or else one leader transfer) per round,
        decided by :mod:`dsys.kv.placement`."""
        while True:
            await asyncio.sleep(interval)
            if not self.groups[META_RANGE_ID].node.is_leader:
                self.liveness.reset()  # a later term of leadership starts over
                self.down_nodes = []
                continue
            try:
                await self._place_once()
            except DsysError as exc:
                self.log.info("placement_deferred", error=str(exc))
            except Exception:  # a bug: log it, keep placing
                self.log.exception("placement_failed")

    async def _gather_status(self) -> dict[str, dict[str, Any]]:
        """``/v1/status`` of every node that answers (ours without a request)."""
        out: dict[str, dict[str, Any]] = {
            self.config.id: {"ranges": self.ranges_view()["local"], "moves": self.moves}
        }
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as s:

            async def one(node: str, addr: str) -> None:
                try:
                    async with s.get(f"http://{addr}/v1/status") as r:
                        data = await r.json()
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                    return
                if isinstance(data, dict):
                    out[node] = data

            await asyncio.gather(*(one(n, a) for n, a in self.nodes.items() if n != self.config.id))
        return out

    def range_infos(self, views: Mapping[str, Mapping[str, Any]]) -> list[RangeInfo]:
        """What placement knows of each data range, from the map and the nodes' status."""
        rows: dict[int, list[tuple[str, Mapping[str, Any]]]] = {}
        for node, view in views.items():
            for row in view.get("ranges", []):
                if isinstance(row, dict) and row.get("initialized"):
                    rows.setdefault(int(row["range_id"]), []).append((node, row))
        busy = {int(m["range_id"]) for v in views.values() for m in _moves_of(v)}
        out = []
        for desc in self.meta.map:
            mine = rows.get(desc.range_id, [])
            lead = next(((n, r) for n, r in mine if r.get("role") == "leader"), None)
            replicas: tuple[str, ...] = desc.replicas
            learners: tuple[str, ...] = ()
            if lead is not None:
                d = RangeDescriptor.from_plain(lead[1]["descriptor"])
                replicas, learners = d.replicas, tuple(lead[1].get("learners", ()))
            if desc.range_id in busy and not learners:
                learners = replicas  # a move is under way: not a candidate
            size = max((int(r.get("bytes", 0)) for _, r in mine), default=0)
            qps = float(lead[1].get("qps", 0.0)) if lead else 0.0
            out.append(
                RangeInfo(desc.range_id, replicas, size, lead[0] if lead else None, learners, qps)
            )
        return out

    def placement_view(self) -> dict[str, Any]:
        """What the placement loop knows (meaningful on the metadata leader only): the
        down nodes, the seconds since each node last answered, the repairs in flight."""
        now = time.monotonic()
        live = self.liveness
        silent = {
            n: round(now - live.seen.get(n, live.since), 1)
            for n in sorted(self.nodes)
            if live.since is not None
        }
        return {
            "metadata_leader": self.groups[META_RANGE_ID].node.is_leader,
            "down": list(self.down_nodes),
            "silent_for": silent,
            "repairing": sorted(self.placement.repairing),
            "repairs": self.repairs,
        }

    async def _place_once(self) -> None:
        views = await self._gather_status()
        now = time.monotonic()
        rules = self.config.placement_rules
        self.liveness.observe(views, now)
        down = self.liveness.down(self.nodes, now, rules.down_after)
        if down != self.down_nodes:
            self.log.warning("placement_nodes_down", down=down, was=self.down_nodes)
            self.down_nodes = down
        infos = self.range_infos(views)
        alive = sorted(views)
        st = self.placement
        st.forget_before(now - max(rules.interval, rules.cooldown))
        for m in plan_repairs(infos, alive, down, state=st, rules=rules):
            st.record(now, m, repair=True)
            self.log.info("placement_repair", range_id=m.range_id, dead=m.src, dst=m.dst)
            self._tasks.append(asyncio.create_task(self._run_placement_move(m, repair=True)))
        # balancing waits while a node is down (its replicas are being replaced)
        move = None if down else plan_replica_move(infos, alive, now=now, state=st, rules=rules)
        if move is not None:
            st.record(now, move)
            self.log.info("placement_move", range_id=move.range_id, src=move.src, dst=move.dst)
            self._tasks.append(asyncio.create_task(self._run_placement_move(move)))
            return
        transfer = plan_leader_transfer(
            [i for i in infos if not i.learners], alive, rules=rules, now=now, state=st
        )
        if transfer is not None:
            rid, to = transfer
            st.transferred(now, rid, next(i.qps for i in infos if i.range_id == rid))
            self.log.info("placement_leader_transfer", range_id=rid, to=to)
            await self.transfer_range_leader(rid, to)

    async def _run_placement_move(self, move: ReplicaMove, *, repair: bool = False) -> None:
        try:
            await self.move_replica(move.range_id, move.src, move.dst)
            if repair:
                self.repairs += 1
                self.log.info("placement_repaired", range_id=move.range_id, dead=move.src)
        except DsysError as exc:
            self.log.info("placement_move_failed", range_id=move.range_id, error=str(exc))
        except Exception:  # a bug: log it
            self.log.exception("placement_move_crashed")
        finally:
            self.placement.finished(move.range_id)

    # -- the peer endpoint --------------------------------------------------------------

    async def handle_peer_stream(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /raft/v1/multi``: frames ``[[range_id, [msg, ...]], ...]`` from one peer.

        The token and peer id are checked before the upgrade (403). A malformed frame
        closes the connection with code 1003 (the peer reconnects); messages for a range
        this node does not run (yet) are dropped (Raft resends).
        """
        token = self.config.token
        if not token_ok(request.headers.get(TOKEN_HEADER), token):
            raise web.HTTPForbidden(text="missing or wrong cluster token")
        src = request.headers.get(FROM_HEADER, "")
        if src not in self.config.peers:
            raise web.HTTPForbidden(text=f"unknown peer {src!r}")
        ws = web.WebSocketResponse(max_msg_size=MAX_PEER_BODY, heartbeat=5.0)
        await ws.prepare(request)
        self._streams.add(ws)
        try:
            async for frame in ws:
                if frame.type != WSMsgType.BINARY:
                    if frame.type == WSMsgType.TEXT:
                        await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"binary only")
                        break
                    continue
                try:
                    self._deliver_frame(frame.data, src)
                except RemoteProtocolError as exc:
                    self.log.warning("peer_frame_refused", src=src, error=str(exc))
                    reason = str(exc).encode("utf-8", "replace")[:120]
                    await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=reason)
                    break
        finally:
            self._streams.discard(ws)
            self._lost_peer(src)
        return ws

    def _lost_peer(self, peer: str) -> None:
        """The connection from ``peer``'s process ended: wake the quiet groups it leads
        here, so they elect a new leader if it is gone (quiet ticks)."""
        for g in list(self.groups.values()):
            if g.node.leader_id == peer and g.node.quiet:
                g.node.wake()

    def _deliver_frame(self, body: bytes, src: str) -> None:
        self._heard[src] = time.monotonic()
        raw = decode(body, max_size=MAX_PEER_BODY)
        if not isinstance(raw, list):
            raise RemoteProtocolError("a frame must be a list of [range_id, [messages]]")
        me = self.config.id
        checked: list[tuple[Group | None, list[Message]]] = []
        for item in raw:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or type(item[0]) is not int
                or not isinstance(item[1], list)
            ):
                raise RemoteProtocolError("a frame entry must be [range_id, [messages]]")
            msgs = [check_message(from_wire(m)) for m in item[1]]
            for m in msgs:
                if m.src != src or m.dst != me:
                    raise RemoteProtocolError("message src/dst do not match the connection")
            g = self.groups.get(item[0])
            msgs = self._refuse_stale(item[0], g, msgs)
            if (
                g is None
                and any(isinstance(m, _FROM_LEADER) for m in msgs)
                and self._may_create(item[0])
            ):
                g = self._add_empty_replica(item[0])
            checked.append((g, msgs))
        for g, msgs in checked:  # only once the whole frame checked out
            if g is None:
                self.unknown_group_msgs += len(msgs)
            else:
                g.node.deliver(msgs)

    async def _close_streams(self, app: web.Application | None = None) -> None:
        streams = list(self._streams)
        self._streams.clear()
        for ws in streams:
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"node shutting down")


async def serve_multi(
    config: MultiConfig, *, on_started: Callable[[MultiRaftServer], None] | None = None
) -> int:
    """Run a :class:`MultiRaftServer` until SIGINT/SIGTERM; returns the exit code.

    Returns 1 when a group's Raft loop dies (a storage failure or a bug), so a supervisor
    restarts the process from its WALs.
    """
    gc.set_threshold(*GC_THRESHOLDS)
    server = MultiRaftServer(config)
    await server.start()
    if on_started is not None:
        on_started(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    failed: BaseException | None = None
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            failed = next(
                (g.node.failed for g in server.groups.values() if g.node.failed is not None),
                None,
            )
            if failed is not None:
                server.log.error("multi_kv_stopped_on_failure", error=repr(failed))
                break
    finally:
        await server.close()
    return 1 if failed is not None else 0


__all__ = [
    "MAX_WS_FRAME",
    "MAX_WS_INFLIGHT",
    "MULTI_PATH",
    "RANGE_HEADER",
    "Group",
    "MultiConfig",
    "MultiRaftServer",
    "SharedTransport",
    "parse_range_header",
    "serve_multi",
]
