"""``RaftNode``: the asyncio adapter that drives a pure :class:`~dsys.raft.core.RaftCore`.

The node owns one loop task that is the only code touching the core::

    wake up (tick timer, inbound messages, proposals, read requests)
    step queued inputs into the core
    while core.has_ready():
        rd = core.ready()
        persist snapshot, hard state and entries        (a thread; ONE fsync per batch)
            a leader meanwhile steps its inbox and applies and answers what its
            followers' acks commit (core.apply_ready: async storage writes)
        send rd.messages                                  (per-peer queues)
        install snapshot, apply rd.committed              (resolve proposal futures)
        serve rd.read_states once applied >= index
        core.advance(rd)
    maybe take a snapshot and compact the log

Group commit falls out of this shape: while one batch is being fsynced, new proposals
and messages queue up, and the next ``Ready`` carries all of them to the next fsync.

Peers talk over one persistent connection each: :class:`PeerTransport` sends what one
batch of sends queued for a peer as one msgpack list of messages, so many AppendEntries
share one frame, and it never waits for an answer (the peer answers over its own
connection to us), so AppendEntries are pipelined up to the core's
``max_inflight_msgs``. Where the peer serves it (a KV server's fast path) the
connection is the raw peer stream of :mod:`dsys.raft.peerwire` (an HTTP/1.1 upgrade,
then length-prefixed frames written by the loop itself; received by
:meth:`RaftNode.accept_raw_stream`); otherwise a WebSocket (``GET /raft/v1/stream``,
one queue and one sender task per peer; received by
:meth:`RaftNode.handle_peer_stream`). Both check the optional shared cluster token and
the peer id before switching (403 otherwise); a malformed or insane frame is logged,
counted and closes that connection with the reason while the server stays up.
``POST /raft/v1/msgs`` (:meth:`RaftNode.handle_peer_request`: one batch per request,
answers in the response body, 403/400 on bad input) is still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, TypeVar

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from dsys.aiotools import hand_over
from dsys.codec import decode, encode
from dsys.errors import (
    ClosedError,
    ConfigError,
    NotLeaderError,
    ProposalDroppedError,
    RemoteProtocolError,
    RequestTimeout,
)
from dsys.observability import Metrics, get_logger
from dsys.raft import trace as _trace
from dsys.raft.core import RaftConfig, RaftCore
from dsys.raft.messages import (
    CODEC,
    MESSAGE_TYPES,
    AppendRequest,
    AppendResponse,
    BecameCandidate,
    BecameFollower,
    BecameLeader,
    ConfChange,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    Message,
    NodeId,
    ReadIndexDropped,
    Ready,
    Role,
    Snapshot,
    SnapshotRequest,
    decode_batch,
    decode_conf,
)
from dsys.raft.peerwire import (
    SWITCHED,
    RawPeerLink,
    RawPeerStream,
    frame,
    handshake,
    refusal,
)
from dsys.raft.storage import LogStore, SnapshotStore, StableStore
from dsys.raft.timers import wait_future

PEER_PATH = "/raft/v1/msgs"
"""Path of the request/response peer endpoint (one POST per batch; still served)."""

STREAM_PATH = "/raft/v1/stream"
"""Path of the peer WebSocket every node serves (what :class:`PeerTransport` uses)."""

TOKEN_HEADER = "X-Dsys-Cluster-Token"
FROM_HEADER = "X-Dsys-From"
_TOKEN_LOWER = TOKEN_HEADER.lower().encode()
_FROM_LOWER = FROM_HEADER.lower().encode()


def token_ok(given: str | None, token: str | None) -> bool:
    """Whether a request's cluster token is acceptable: no token configured, or an equal
    one (compared in constant time, so timing does not leak how much of it matched)."""
    if not token:
        return True
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


REPLY_WAIT = 1.0
"""Seconds a peer request waits for our answers to ride back on its response."""

MAX_PEER_BODY = 64 * 1024 * 1024
"""Largest peer request accepted (a snapshot travels in one message)."""

_TRACE = _trace.ENABLED  # per-stage timestamps of the write path (DSYS_RAFT_TRACE)


def _i(v: Any) -> int:
    if type(v) is not int:
        raise RemoteProtocolError(f"expected an integer, got {type(v).__name__}")
    return v


def _s(v: Any) -> str:
    if type(v) is not str:
        raise RemoteProtocolError(f"expected a string, got {type(v).__name__}")
    return v


def _b(v: Any) -> bool:
    if type(v) is not bool:
        raise RemoteProtocolError(f"expected a bool, got {type(v).__name__}")
    return v


def to_wire(msg: Message) -> Any:
    """Plain form of one message for a peer request body.

    The hot messages (appends, heartbeats and their answers) travel as compact lists;
    the rest as :data:`~dsys.raft.messages.CODEC` envelopes.
    """
    if isinstance(msg, AppendRequest):
        ents = [[e.term, e.index, e.kind, e.data] for e in msg.entries]
        return ["A", msg.src, msg.dst, msg.term, msg.prev_index, msg.prev_term, msg.commit, ents]
    if isinstance(msg, AppendResponse):
        return [
            "a",
            msg.src,
            msg.dst,
            msg.term,
            msg.success,
            msg.match_index,
            msg.reject_index,
            msg.conflict_index,
            msg.conflict_term,
        ]
    if isinstance(msg, Heartbeat):
        if msg.quiet:
            return ["H", msg.src, msg.dst, msg.term, msg.commit, msg.ctx, True]
        return ["H", msg.src, msg.dst, msg.term, msg.commit, msg.ctx]
    if isinstance(msg, HeartbeatResponse):
        return ["h", msg.src, msg.dst, msg.term, msg.ctx]
    return CODEC.to_plain(msg)


def check_message(msg: Message) -> Message:
    """Refuse a message whose fields cannot be right, before the core sees it.

    Integers must be non-negative; an AppendRequest's entries must follow ``prev_index``
    contiguously, with terms between ``prev_term`` and the message term, known kinds, and
    decodable configurations.

    Raises:
        RemoteProtocolError: the message is not sane.
    """
    names = _FIELD_NAMES.get(type(msg))
    if names is None:
        names = _FIELD_NAMES[type(msg)] = tuple(f.name for f in dataclasses.fields(msg))
    for name in names:
        v = getattr(msg, name)
        if type(v) is int and v < 0:
            raise RemoteProtocolError(f"{type(msg).__name__}.{name} is negative")
    if isinstance(msg, AppendRequest):
        last_term = msg.prev_term
        for i, e in enumerate(msg.entries):
            if e.index != msg.prev_index + 1 + i:
                raise RemoteProtocolError("append entries are not contiguous after prev_index")
            if e.term < last_term or e.term > msg.term:
                raise RemoteProtocolError("append entry terms go backwards or beyond the term")
            if e.kind not in _ENTRY_KINDS:
                raise RemoteProtocolError(f"unknown entry kind {e.kind}")
            if e.kind == EntryKind.CONFIG:
                decode_conf(e.data)
            last_term = e.term
    elif isinstance(msg, SnapshotRequest):
        meta = msg.snapshot.meta
        if meta.index < 0 or meta.term < 0 or meta.term > msg.term:
            raise RemoteProtocolError("snapshot metadata out of range")
    return msg


_ENTRY_KINDS = frozenset(int(k) for k in EntryKind)
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def from_wire(v: Any) -> Message:
    """Inverse of :func:`to_wire`, checking every field.

    Raises:
        RemoteProtocolError: malformed message.
    """
    if isinstance(v, dict):
        m = CODEC.from_plain(v)
        if not isinstance(m, MESSAGE_TYPES):
            raise RemoteProtocolError(f"{type(m).__name__} is not a Raft message")
        return m  # type: ignore[return-value]
    if not isinstance(v, list) or not v:
        raise RemoteProtocolError("a message must be a map or a non-empty list")
    tag, n = v[0], len(v)
    try:
        if tag == "A" and n == 8:
            if not isinstance(v[7], list):
                raise RemoteProtocolError("entries must be a list")
            ents = []
            for e in v[7]:
                if not isinstance(e, list) or len(e) != 4 or type(e[3]) is not bytes:
                    raise RemoteProtocolError("an entry must be [term, index, kind, data]")
                ents.append(Entry(term=_i(e[0]), index=_i(e[1]), kind=_i(e[2]), data=e[3]))
            return AppendRequest(
                src=_s(v[1]),
                dst=_s(v[2]),
                term=_i(v[3]),
                prev_index=_i(v[4]),
                prev_term=_i(v[5]),
                commit=_i(v[6]),
                entries=tuple(ents),
            )
        if tag == "a" and n == 9:
            return AppendResponse(
                src=_s(v[1]),
                dst=_s(v[2]),
                term=_i(v[3]),
                success=_b(v[4]),
                match_index=_i(v[5]),
                reject_index=_i(v[6]),
                conflict_index=_i(v[7]),
                conflict_term=_i(v[8]),
            )
        if tag == "H" and n in (6, 7):
            return Heartbeat(
                src=_s(v[1]),
                dst=_s(v[2]),
                term=_i(v[3]),
                commit=_i(v[4]),
                ctx=_i(v[5]),
                quiet=n == 7 and _b(v[6]),
            )
        if tag == "h" and n == 5:
            return HeartbeatResponse(src=_s(v[1]), dst=_s(v[2]), term=_i(v[3]), ctx=_i(v[4]))
    except (TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"invalid message: {exc}") from exc
    raise RemoteProtocolError(f"unknown message tag {tag!r} with {n} fields")


class StateMachine(Protocol):
    """What a :class:`RaftNode` applies committed entries to."""

    def apply(self, data: bytes) -> object:
        """Apply one committed command; the result resolves the proposal's future.

        A state machine may also offer ``apply_command(decoded)``: the leader then
        applies the entries it proposed with ``decoded`` (see
        :meth:`RaftNode.propose_callback`) without decoding them again. It may also offer
        ``apply_conf(conf, index)``, called with each committed configuration entry.
        """
        ...

    def snapshot(self) -> bytes:
        """Encode the whole state."""
        ...

    def restore(self, data: bytes) -> None:
        """Replace the whole state by a snapshot."""
        ...


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """Configuration of a :class:`RaftNode`.

    Attributes:
        id: this node's id.
        peers: every *other* node's id -> ``host:port`` of its server.
        tick_interval: seconds per Raft tick.
        election_tick: ticks without a leader before an election (randomized up to 2x).
        heartbeat_tick: ticks between leader heartbeats.
        snapshot_every: applied entries between snapshots (log compaction).
        token: shared cluster token required on every peer request (None = none).
        peer_queue: messages queued per peer before new ones are dropped.
        max_batch: messages per peer request.
        peer_timeout: seconds to connect to a peer; also the peer WebSocket heartbeat.
        snapshot_log_bytes: also snapshot once the log store holds more bytes than this.
        join: this node joins an existing cluster (added with a membership change);
            it learns the membership from the leader instead of bootstrapping it.
        proposal_batch: most proposals queued together that share one log entry (a
            BATCH entry: one append, one replication, one fsync slot); 1 turns it off.
        proposal_batch_bytes: most command bytes in one BATCH entry.
        proposal_timeout: seconds a proposal waits for its entry to commit before its
            caller gets ``TimeoutError`` (the entry may still commit afterwards).
        rng_seed: seed of the core's election-timeout randomness (None: from the id);
            a process running many groups gives each its own, so their timeouts differ.
        external_ticks: no tick timer of its own; the owner calls :meth:`RaftNode.tick`
            (a multi-Raft host ticks all its groups at once, so their heartbeats leave
            together in one frame per peer).
        quiet_ticks: ticks of idleness after which the leader quiets the group (no
            heartbeats until something happens; ``RaftConfig.quiet_ticks``); 0 = off.
            Only for a host that calls :meth:`RaftNode.wake` when it loses the
            connection to a peer's process.
        raw_peer_stream: send to peers over the raw stream where they serve it
            (:mod:`dsys.raft.peerwire`); False: always the WebSocket.
        commit_notice_delay: seconds a leader holds the notice of a new commit index to
            a follower, which the next append or heartbeat usually makes redundant (one
            message, one send and one follower wake-up less per write); 0 = at once.
    """

    id: NodeId
    peers: Mapping[NodeId, str] = field(default_factory=dict)
    tick_interval: float = 0.03
    election_tick: int = 10
    heartbeat_tick: int = 2
    snapshot_every: int = 10_000
    token: str | None = None
    peer_queue: int = 4096
    max_batch: int = 512
    peer_timeout: float = 5.0
    join: bool = False
    snapshot_log_bytes: int = 64 * 1024 * 1024
    proposal_batch: int = 256
    proposal_batch_bytes: int = 1024 * 1024
    proposal_timeout: float = 5.0
    rng_seed: int | None = None
    external_ticks: bool = False
    quiet_ticks: int = 0
    raw_peer_stream: bool = True
    commit_notice_delay: float = 0.005

    def __post_init__(self) -> None:
        if not self.id:
            raise ConfigError("node id must not be empty")
        if self.id in self.peers:
            raise ConfigError(f"node {self.id!r} must not list itself as a peer")
        if self.tick_interval <= 0:
            raise ConfigError("tick_interval must be > 0")
        if self.election_tick <= self.heartbeat_tick or self.heartbeat_tick < 1:
            raise ConfigError("need 1 <= heartbeat_tick < election_tick")
        if self.snapshot_every < 1 or self.peer_queue < 1 or self.max_batch < 1:
            raise ConfigError("snapshot_every, peer_queue and max_batch must be >= 1")
        if self.proposal_timeout <= 0:
            raise ConfigError("proposal_timeout must be > 0")
        if self.proposal_batch < 1 or self.proposal_batch_bytes < 1:
            raise ConfigError("proposal_batch and proposal_batch_bytes must be >= 1")


class _Peer:
    """One peer's outbound state: the raw stream (or the WebSocket fallback's queue)."""

    __slots__ = (
        "addr",
        "backoff",
        "connecting",
        "link",
        "link_addr",
        "out",
        "retry",
        "ws_queue",
    )

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.out: list[Message] = []  # queued, not written yet
        self.link: RawPeerLink | None = None  # the raw stream, once switched
        self.link_addr = ""
        self.connecting: asyncio.Task[None] | None = None
        self.retry: asyncio.TimerHandle | None = None  # a reconnect after a backoff
        self.backoff = 0.0
        self.ws_queue: asyncio.Queue[Message] | None = None  # WebSocket fallback


class PeerTransport:
    """Sends Raft messages to peers over one raw stream each, batched per peer.

    Each peer gets one TCP connection, upgraded from HTTP/1.1 to length-prefixed msgpack
    frames (:mod:`dsys.raft.peerwire`); messages queued in one loop turn leave in one
    ``write()`` at :meth:`flush` (which the node calls after each batch of sends, and
    which is scheduled on the loop otherwise). A peer that does not serve the raw stream
    (an older version, a server without the KV fast path) gets the WebSocket
    ``GET /raft/v1/stream`` instead (``raw=False``: always). Nothing waits for an
    answer (the peer answers over its own connection to us), so AppendEntries are
    pipelined up to the core's ``max_inflight_msgs``.

    Args:
        node_id: our id, sent in every request.
        peers: peer id -> ``host:port``.
        token: the cluster token to send, if any.
        queue_size: messages queued per peer before new ones are dropped.
        max_batch: messages per frame.
        timeout: seconds to connect; also the WebSocket heartbeat interval, and how
            long a raw stream may stay unwritable before it is cut.
        raw: use the raw stream where the peer serves it.
    """

    def __init__(
        self,
        node_id: NodeId,
        peers: Mapping[NodeId, str],
        *,
        token: str | None = None,
        queue_size: int = 4096,
        max_batch: int = 512,
        timeout: float = 5.0,
        raw: bool = True,
    ) -> None:
        self.node_id = node_id
        self.peers = dict(peers)
        self._token = token
        self._headers = {FROM_HEADER: node_id}
        if token:
            self._headers[TOKEN_HEADER] = token
        self._raw = raw
        self._state: dict[NodeId, _Peer] = {p: _Peer(a) for p, a in self.peers.items()}
        self._dirty: list[_Peer] = []
        self._flush_soon = False
        self._max_batch = max_batch
        self._queue_size = queue_size
        self._timeout_s = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._started = False
        self._ws_count = 0  # peers on the WebSocket fallback
        self._tasks: set[asyncio.Task[None]] = set()
        self._readers: set[asyncio.Task[None]] = set()
        self._heartbeat = timeout
        self.dropped = 0
        self.log = get_logger("raft.transport", node_id=node_id)

    async def start(self) -> None:
        """Open the HTTP session (for the WebSocket fallback); connections open on use."""
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._started = True
        if not self._raw:
            for st in self._state.values():
                self._use_ws(st, self._peer_id(st))

    @property
    def needs_turn(self) -> bool:
        """Whether queued messages leave only after a loop turn (a sender task writes
        them: the WebSocket fallback), rather than at :meth:`flush`."""
        return not self._started or self._ws_count > 0

    def _peer_id(self, st: _Peer) -> NodeId:
        for p, s in self._state.items():
            if s is st:
                return p
        return ""

    def set_peer(self, node_id: NodeId, addr: str | None) -> None:
        """Add, move or (``addr=None``) remove a peer at run time."""
        if node_id == self.node_id:
            return
        if addr is None:
            self.peers.pop(node_id, None)
            st = self._state.pop(node_id, None)
            if st is not None:
                self._drop_peer(st)
            return
        self.peers[node_id] = addr
        st = self._state.get(node_id)
        if st is None:
            st = self._state[node_id] = _Peer(addr)
            if self._started and not self._raw:
                self._use_ws(st, node_id)
        elif st.addr != addr:
            st.addr = addr
            if st.link is not None:  # reconnect to the new address on the next flush
                st.link.close()
                st.link = None

    def _drop_peer(self, st: _Peer) -> None:
        if st.link is not None:
            st.link.close()
            st.link = None
        if st.connecting is not None:
            st.connecting.cancel()
        if st.retry is not None:
            st.retry.cancel()
        if st.ws_queue is not None:
            st.ws_queue = None  # its sender notices and ends
            self._ws_count -= 1
        self.dropped += len(st.out)
        st.out.clear()

    def send(self, msg: Message) -> None:
        """Queue ``msg`` for its destination (dropped if unknown or the queue is full)."""
        st = self._state.get(msg.dst)
        if st is None:
            self.dropped += 1
            return
        q = st.ws_queue
        if q is not None:
            try:
                q.put_nowait(msg)
            except asyncio.QueueFull:
                self.dropped += 1  # Raft tolerates loss; the leader retries
            return
        out = st.out
        if len(out) >= self._queue_size:
            self.dropped += 1
            return
        if not out:
            self._dirty.append(st)
            if not self._flush_soon:
                self._flush_soon = True
                asyncio.get_running_loop().call_soon(self.flush)
        out.append(msg)

    def flush(self) -> None:
        """Write what :meth:`send` queued: one ``write()`` per peer."""
        self._flush_soon = False
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for st in dirty:
            if st.out and st.ws_queue is None:
                self._flush_peer(st)

    def _flush_peer(self, st: _Peer) -> None:
        link = st.link
        if link is None or link.transport is None:
            st.link = None
            if st.connecting is None and st.retry is None and self._started:
                peer = self._peer_id(st)
                task = asyncio.get_running_loop().create_task(self._connect_raw(st, peer))
                st.connecting = task
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return  # kept (bounded) until the connection is up
        batch, st.out = st.out, []
        if link.paused:
            # The peer does not read: drop (Raft resends), and cut a stuck connection.
            self.dropped += len(batch)
            if asyncio.get_running_loop().time() - link.paused_at > self._timeout_s:
                self.log.warning("peer_stream_stuck", peer=self._peer_id(st))
                link.close()
                st.link = None
            return
        if _TRACE:
            _trace_sent(batch)
        step = self._max_batch
        if len(batch) <= step:
            data = frame(encode([to_wire(m) for m in batch], max_size=MAX_PEER_BODY))
        else:
            data = b"".join(
                frame(encode([to_wire(m) for m in batch[i : i + step]], max_size=MAX_PEER_BODY))
                for i in range(0, len(batch), step)
            )
        link.transport.write(data)

    async def _connect_raw(self, st: _Peer, peer: NodeId) -> None:
        """Open ``peer``'s raw stream; on refusal or failure drop the queue and back off."""
        addr = st.addr
        host, _, port = addr.rpartition(":")
        loop = asyncio.get_running_loop()
        link: RawPeerLink | None = None
        status = 0
        why = ""
        try:
            async with asyncio.timeout(self._timeout_s):
                _, link = await loop.create_connection(
                    lambda: RawPeerLink(lambda lk, w: self._lost(st, peer, lk, w)),
                    host.strip("[]"),
                    int(port),
                )
                assert link.transport is not None
                link.transport.write(handshake(addr, self.node_id, self._token))
                status, said = await link.done
                why = said.decode("utf-8", "replace")[:200]
        except (OSError, TimeoutError, ValueError, RemoteProtocolError) as exc:
            why = str(exc) or type(exc).__name__
        except asyncio.CancelledError:
            if link is not None:
                link.close()
            raise
        finally:
            st.connecting = None
        if self._state.get(peer) is not st:
            if link is not None:
                link.close()
            return
        if status == 101 and link is not None:
            st.link = link
            st.link_addr = addr
            st.backoff = 0.0
            sock = link.transport.get_extra_info("socket") if link.transport else None
            if sock is not None:
                # A peer host that vanished without a RST: the kernel gives up on data
                # unacknowledged for `timeout` s (as the WebSocket heartbeat did).
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    ms = int(self._timeout_s * 1000)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)
            if st.out:
                self._flush_peer(st)
            return
        if link is not None:
            link.close()
        if status in (403, 400):
            self.log.warning("peer_refused", peer=peer, status=status, reason=why)
        elif status:
            # Not served (e.g. 404 from an older version): use its WebSocket.
            self.log.info("peer_raw_stream_unsupported", peer=peer, status=status)
            self._use_ws(st, peer)
            return
        else:
            self.log.debug("peer_unreachable", peer=peer, error=why)
        self.dropped += len(st.out)
        st.out.clear()
        st.backoff = min(0.2, max(0.01, st.backoff * 2))
        st.retry = loop.call_later(st.backoff, self._retry, st)

    def _retry(self, st: _Peer) -> None:
        st.retry = None
        if st.out and st.ws_queue is None:
            self._flush_peer(st)

    def _lost(self, st: _Peer, peer: NodeId, link: RawPeerLink, why: str) -> None:
        if st.link is link:
            st.link = None
            if why:
                self.log.warning("peer_stream_closed", peer=peer, reason=why)

    def _use_ws(self, st: _Peer, peer: NodeId) -> None:
        """Send to ``peer`` over the WebSocket from now on."""
        q: asyncio.Queue[Message] = asyncio.Queue(self._queue_size)
        for m in st.out[: self._queue_size]:
            q.put_nowait(m)
        st.out.clear()
        st.ws_queue = q
        self._ws_count += 1
        task = asyncio.get_running_loop().create_task(self._sender(peer, st, q))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sender(self, peer: NodeId, st: _Peer, q: asyncio.Queue[Message]) -> None:
        """Send ``peer``'s queue over one persistent WebSocket, one frame per batch.

        A failed connect or send drops the batch (Raft retries) and backs off before
        reconnecting.
        """
        backoff = 0.0
        ws: aiohttp.ClientWebSocketResponse | None = None
        ws_addr: str | None = None
        try:
            while st.ws_queue is q and self._state.get(peer) is st:
                batch = [await q.get()]
                addr = st.addr
                if ws is not None and (ws.closed or ws_addr != addr):
                    await ws.close()
                    ws = None
                if ws is None:
                    if backoff:
                        # The peer was unreachable: send only the newest state, not a backlog.
                        await asyncio.sleep(backoff)
                    ws = await self._connect(peer, addr)
                    if ws is None:
                        self.dropped += len(batch)
                        backoff = min(0.2, max(0.01, backoff * 2))
                        continue
                    ws_addr = addr
                while len(batch) < self._max_batch and not q.empty():
                    batch.append(q.get_nowait())
                body = encode([to_wire(m) for m in batch], max_size=MAX_PEER_BODY)
                if _TRACE:
                    _trace_sent(batch)
                try:
                    await ws.send_bytes(body)
                    backoff = 0.0
                except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                    self.dropped += len(batch)
                    self.log.debug("peer_send_failed", peer=peer, error=str(exc))
                    backoff = min(0.2, max(0.01, backoff * 2))
        finally:
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close()

    async def _connect(self, peer: NodeId, addr: str) -> aiohttp.ClientWebSocketResponse | None:
        assert self._session is not None
        try:
            ws = await self._session.ws_connect(
                f"http://{addr}{STREAM_PATH}",
                headers=self._headers,
                max_msg_size=MAX_PEER_BODY,
                heartbeat=self._heartbeat,
                timeout=_WS_TIMEOUT,
            )
        except aiohttp.WSServerHandshakeError as exc:
            self.log.warning("peer_refused", peer=peer, status=exc.status, reason=exc.message)
            return None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.log.debug("peer_unreachable", peer=peer, error=str(exc))
            return None
        # The peer sends nothing on this connection, but control frames (pong, close)
        # are only processed while someone reads.
        task = asyncio.create_task(_read_until_closed(ws))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)
        return ws

    async def close(self) -> None:
        """Stop the senders, close the connections and the session."""
        self._started = False
        for st in self._state.values():
            self._drop_peer(st)
        tasks = [*self._tasks, *self._readers]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_close=1.0)


def _trace_sent(batch: list[Message]) -> None:
    for m in batch:
        if isinstance(m, AppendRequest) and m.entries:
            _trace.mark("send_append", m.entries[-1].index, m.dst)
        elif isinstance(m, AppendResponse) and m.success:
            _trace.mark("send_ack", m.match_index, m.dst)


def _trace_received(msgs: list[Message]) -> None:
    for m in msgs:
        if isinstance(m, AppendRequest) and m.entries:
            _trace.mark("recv_append", m.entries[-1].index, m.src)
        elif isinstance(m, AppendResponse) and m.success:
            _trace.mark("recv_ack", m.match_index, m.src)


async def _read_until_closed(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass


ProposalCallback: TypeAlias = Callable[[object, BaseException | None], None]
"""Called once with ``(result, None)`` or ``(None, error)`` when a proposal's outcome is known."""


def _future_callback(fut: asyncio.Future[object]) -> ProposalCallback:
    def done(result: object, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)

    return done


ManyCallback: TypeAlias = Callable[[list[object] | None, BaseException | None], None]
"""Called once with ``(results, None)`` (one per command, in order) or ``(None, error)``."""


@dataclass(slots=True)
class _Proposal:
    """Who waits for one log entry (several callers when it is a BATCH entry)."""

    term: int
    callbacks: list[Any]
    started: float
    decoded: list[object] | None
    """The commands as the state machine's ``apply_command`` takes them, when every
    proposer gave them: the leader applies its own entries without decoding them."""
    count: int
    """How many commands the entry holds."""
    spans: list[int] | None
    """Per callback: 0 for a :data:`ProposalCallback` (one result), n for a
    :data:`ManyCallback` (a list of n results); None when all are 0."""

    def answer(self, results: list[object]) -> None:
        callbacks, spans = self.callbacks, self.spans
        if spans is None:
            for cb, result in zip(callbacks, results, strict=True):
                _call(cb, result, None)
            return
        i = 0
        for cb, n in zip(callbacks, spans, strict=True):
            if n:
                _call(cb, results[i : i + n], None)
                i += n
            else:
                _call(cb, results[i], None)
                i += 1

    def fail(self, exc: BaseException) -> None:
        for cb in self.callbacks:
            _call(cb, None, exc)


def _call(
    cb: Callable[[Any, BaseException | None], None], result: object, exc: BaseException | None
) -> None:
    try:
        cb(result, exc)
    except Exception:  # a caller's bug must not stop the Raft loop
        get_logger("raft.node").exception("proposal_callback_failed")


class RaftNode:
    """A Raft replica: core + durable stores + state machine + HTTP peer transport.

    Use :meth:`start` / :meth:`close` (or ``async with``). Writes go through
    :meth:`propose`; linearizable reads call :meth:`read_barrier` first.

    Args:
        config: node configuration.
        log: the log store (e.g. :class:`~dsys.raft.wal.WriteAheadLog`).
        stable: the hard-state store (often the same WAL object).
        snapshots: the snapshot store.
        fsm: the state machine committed commands are applied to.
        metrics: where to register ``dsys_raft_*`` metrics (a new registry by default).
        transport: what sends our messages (default: a :class:`PeerTransport` of our
            own); a multi-Raft host passes one that shares a connection per peer process
            among its groups, and hands inbound messages to :meth:`deliver`.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        log: LogStore,
        stable: StableStore,
        snapshots: SnapshotStore,
        fsm: StateMachine,
        metrics: Metrics | None = None,
        transport: PeerTransport | None = None,
    ) -> None:
        self.config = config
        self.id = config.id
        self._log_store = log
        self._stable = stable
        self._snapshots = snapshots
        self.fsm = fsm
        self._apply_decoded: Callable[[Any], object] | None = getattr(fsm, "apply_command", None)
        self._apply_conf: Callable[[ConfState, int], None] | None = getattr(fsm, "apply_conf", None)
        self.metrics = metrics or Metrics("raft")
        self.log = get_logger("raft.node", node_id=config.id)
        self.transport = transport or PeerTransport(
            config.id,
            config.peers,
            token=config.token,
            queue_size=config.peer_queue,
            max_batch=config.max_batch,
            timeout=config.peer_timeout,
            raw=config.raw_peer_stream,
        )
        self._inbox: deque[Message] = deque()
        self._streams: set[web.WebSocketResponse] = set()
        self._raw_streams: set[RawPeerStream] = set()
        self._notices: dict[NodeId, Heartbeat] = {}  # commit notices held (see _send)
        self._notice_timer: asyncio.TimerHandle | None = None
        self._notice_delay = config.commit_notice_delay
        # Peer requests waiting for the messages we answer them with (piggybacked on the
        # HTTP response instead of a POST of our own): registered, then armed once their
        # messages were stepped, then resolved after the resulting Ready was persisted.
        self._reply_wait: list[tuple[NodeId, asyncio.Future[list[Message]]]] = []
        self._armed: dict[NodeId, tuple[asyncio.Future[list[Message]], list[Message]]] = {}
        # (data, ProposalCallback, decoded) or ([data, ...], ManyCallback, [decoded, ...])
        self._proposals_in: deque[tuple[Any, Any, Any]] = deque()
        self._reads_in: deque[asyncio.Future[int]] = deque()
        self._conf_in: deque[tuple[ConfChange, asyncio.Future[object]]] = deque()
        self._transfers_in: deque[tuple[NodeId, asyncio.Future[None]]] = deque()
        self._transfer_waiters: list[tuple[NodeId, asyncio.Future[None]]] = []
        self._pending: dict[int, _Proposal] = {}
        self._read_waiters: dict[bytes, asyncio.Future[int]] = {}
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._snapshot_waiters: list[asyncio.Future[int]] = []
        self._read_seq = 0
        self._traced_commit = 0
        self._synced_hs: HardState | None = None  # the hard state last persisted
        self._ticks = 0
        self._wake_core = False  # wake() asked for a quiet core to wake
        self._wake = asyncio.Event()
        self._applied_event = asyncio.Event()
        self._closed = False
        self.failed: BaseException | None = None
        """Set when the loop died (a bug or a storage failure); the node is then unhealthy."""
        self._store_lock = asyncio.Lock()  # the stores are used from one thread at a time
        self._inline_persist = getattr(log, "fsync", True) is False
        # A log shared by many groups (dsys.raft.sharedwal.GroupLog) commits the batches
        # of all of them with one fsync: queue the records, then await its writer.
        self._group_sync: Callable[[], Awaitable[None]] | None = (
            getattr(log, "sync_async", None) if stable is log else None  # type: ignore[comparison-overlap]
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._run_task: asyncio.Task[None] | None = None
        self.applied_index = 0
        self.applied_term = 0
        self.snapshot_index = 0
        self.elections = 0
        self._m_term = self.metrics.gauge("term", "Current Raft term")
        self._m_elections = self.metrics.counter("elections_total", "Elections started")
        self._m_leader = self.metrics.gauge("is_leader", "1 when this node is the leader")
        # observed on every round of the Raft loop: lock-free histograms, and gauges read
        # at scrape time
        self._m_commit = self.metrics.fast_histogram(
            "commit_latency_seconds", "Proposal to apply latency on the leader"
        )
        self._m_fsync = self.metrics.fast_histogram(
            "fsync_seconds", "Time to persist one Ready batch (write + fsync)"
        )
        self.metrics.gauge("log_size_bytes", "Size of the write-ahead log").set_function(
            lambda: float(getattr(self._log_store, "size_bytes", 0))
        )
        self.metrics.gauge("applied_index", "Last applied log index").set_function(
            lambda: float(self.applied_index)
        )
        self._m_snapshots = self.metrics.counter("snapshots_total", "Snapshots taken")
        self._m_refused = self.metrics.counter(
            "peer_frames_refused_total", "Malformed peer batches refused"
        )
        self._m_batch = self.metrics.fast_histogram(
            "batch_entries",
            "Entries persisted per fsync (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.core = self._restore_core()

    # -- construction -----------------------------------------------------------------

    def _restore_core(self) -> RaftCore:
        snap = self._snapshots.load()
        loaded = self._log_store.load()
        hard = self._stable.load_hard_state()
        self._synced_hs = hard
        applied = 0
        if snap is not None:
            self.fsm.restore(snap.data)
            applied = snap.meta.index
            self.applied_term = snap.meta.term
            self.snapshot_index = snap.meta.index
        entries = [e for e in loaded.entries if e.index > applied]
        if entries and entries[0].index != applied + 1:
            raise AssertionError(
                f"log starts at {entries[0].index} but the snapshot ends at {applied}"
            )
        self.applied_index = applied
        voters = None if self.config.join else sorted([self.id, *self.config.peers])
        cfg = RaftConfig(
            id=self.id,
            election_tick=self.config.election_tick,
            heartbeat_tick=self.config.heartbeat_tick,
            quiet_ticks=self.config.quiet_ticks,
        )
        return RaftCore(
            cfg,
            voters=voters,
            hard_state=hard,
            snapshot=snap,
            entries=entries,
            applied=applied,
            rng_seed=self.config.rng_seed,
        )

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> RaftNode:
        """Start the transport, the tick timer and the main loop."""
        await self.transport.start()
        if not self.config.external_ticks:
            self._tasks.append(asyncio.create_task(self._ticker()))
        self._run_task = asyncio.create_task(self._run())
        self._tasks.append(self._run_task)
        return self

    async def wait_stopped(self) -> BaseException | None:
        """Wait until the loop ends (closed or crashed); returns the crash, if any."""
        if self._run_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self._run_task)
        return self.failed

    async def __aenter__(self) -> RaftNode:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the loop, fail pending requests with ClosedError, close the stores."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            # a crashed loop already logged and recorded its error in self.failed
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._notice_timer is not None:
            self._notice_timer.cancel()
            self._notice_timer = None
        await self._close_streams()
        await self.transport.close()
        for _, wfut in self._reply_wait:
            if not wfut.done():
                wfut.set_result([])
        for wfut, _ in self._armed.values():
            if not wfut.done():
                wfut.set_result([])
        err = ClosedError("raft node closed")
        for p in self._pending.values():
            p.fail(err)
        queued, self._proposals_in = self._proposals_in, deque()
        for _, cb, _ in queued:
            _call(cb, None, err)
        for rfut in [*self._read_waiters.values(), *self._reads_in]:
            if not rfut.done():
                rfut.set_exception(err)
        for _, tfut in [*self._transfers_in, *self._transfer_waiters]:
            if not tfut.done():
                tfut.set_exception(err)
        for _, afut in self._applied_waiters:
            if not afut.done():
                afut.set_exception(err)
        async with self._store_lock:
            await asyncio.to_thread(self._log_store.close)
        if _TRACE:
            _trace.dump(self.id)

    # -- public API -------------------------------------------------------------------

    @property
    def role(self) -> Role:
        """The core's current role."""
        return self.core.role

    @property
    def is_leader(self) -> bool:
        """Whether this node is the leader."""
        return self.core.role is Role.LEADER

    @property
    def leader_id(self) -> NodeId | None:
        """The leader this node knows of, if any."""
        return self.core.leader_id

    @property
    def term(self) -> int:
        """The current term."""
        return self.core.term

    def _not_leader(self) -> NotLeaderError:
        leader = self.core.leader_id
        return NotLeaderError(
            f"node {self.id} is not the leader",
            leader_hint=leader if leader != self.id else None,
            retry_after=self.config.tick_interval * self.config.election_tick,
        )

    def not_leader_error(self) -> NotLeaderError:
        """The error a server on this node answers when it is not the leader (with a hint)."""
        return self._not_leader()

    async def propose(self, data: bytes) -> object:
        """Replicate ``data`` and return the state machine's result once applied here.

        Raises:
            NotLeaderError: this node is not the leader (``leader_hint`` names it).
            ProposalDroppedError: leadership changed and the entry was overwritten.
            ClosedError: the node was closed.
        """
        if self._closed:
            raise ClosedError("raft node closed")
        if not self.is_leader:
            raise self._not_leader()
        return await self.propose_future(data)

    def propose_future(self, data: bytes) -> asyncio.Future[object]:
        """Queue a proposal; the future resolves like :meth:`propose` (no await needed).

        Raises:
            NotLeaderError: this node is not the leader.
        """
        if self._closed:
            raise ClosedError("raft node closed")
        if not self.is_leader:
            raise self._not_leader()
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._proposals_in.append((data, _future_callback(fut), None))
        self._wake.set()
        return fut

    def propose_callback(self, data: bytes, done: ProposalCallback, decoded: object = None) -> None:
        """Queue a proposal; ``done(result, None)`` or ``done(None, error)`` follows.

        The cheapest way to propose: no future, no task. ``done`` runs exactly once, in
        the Raft loop (keep it short; an exception from it is logged and ignored), with
        the errors :meth:`propose` raises, or ``TimeoutError`` once the proposal waited
        ``proposal_timeout`` seconds (its entry may still commit later).

        ``decoded`` is the command as the state machine's optional ``apply_command``
        takes it; the leader then applies its own entry without decoding ``data``. It
        must be exactly what decoding ``data`` gives.

        Raises:
            NotLeaderError: this node is not the leader.
            ClosedError: the node was closed.
        """
        self._enqueue((data, done, decoded))

    def propose_many(
        self, datas: list[bytes], done: ManyCallback, decoded: list[object] | None = None
    ) -> None:
        """Queue several commands that go into one log entry together, with one callback.

        Like :meth:`propose_callback`, but ``done(results, None)`` gets one result per
        command, in order (they commit together or not at all). For a server that
        receives many commands at once (a frame of a multiplexed connection), this costs
        one queue slot and one callback instead of one per command. The group is never
        split, so its entry may hold more than ``proposal_batch`` commands: callers bound
        their groups.

        Raises:
            ValueError: ``datas`` is empty, or ``decoded`` does not match it.
            NotLeaderError: this node is not the leader.
            ClosedError: the node was closed.
        """
        if not datas or (decoded is not None and len(decoded) != len(datas)):
            raise ValueError("propose_many needs commands (and as many decoded ones)")
        self._enqueue((datas, done, decoded))

    def _enqueue(self, item: tuple[Any, Any, Any]) -> None:
        if self._closed:
            raise ClosedError("raft node closed")
        if not self.is_leader:
            raise self._not_leader()
        self._proposals_in.append(item)
        if _TRACE:
            _trace.mark("enqueue", -1)
        if not self._wake.is_set():
            self._wake.set()

    async def propose_conf_change(self, change: ConfChange) -> object:
        """Propose a membership change; returns once it is applied here."""
        if not self.is_leader:
            raise self._not_leader()
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._conf_in.append((change, fut))
        self._wake.set()
        return await fut

    async def transfer_leadership(self, target: NodeId, timeout: float = 3.0) -> None:  # noqa: ASYNC109
        """Hand leadership to voter ``target`` and return once this node follows it.

        The leader stops taking proposals, brings ``target``'s log up to date and sends
        it TimeoutNow; ``target`` campaigns at once (Raft dissertation 3.10).

        Raises:
            NotLeaderError: this node is not the leader.
            BadInputError: ``target`` is not a voter.
            RequestTimeout: ``target`` did not take over in time (the leader gives the
                transfer up after an election timeout and takes proposals again).
        """
        if self._closed:
            raise ClosedError("raft node closed")
        if not self.is_leader:
            raise self._not_leader()
        if target == self.id:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transfers_in.append((target, fut))
        self._wake.set()
        try:
            await wait_future(fut, timeout)
        except TimeoutError:
            raise RequestTimeout(f"{target!r} did not take leadership over in time") from None
        finally:
            self._transfer_waiters = [w for w in self._transfer_waiters if w[1] is not fut]

    async def read_barrier(self, timeout: float = 3.0) -> int:  # noqa: ASYNC109
        """Wait until a linearizable read may be served locally (ReadIndex).

        Confirms leadership with a heartbeat round, then waits until this node has
        applied the read index. Returns that index.

        Raises:
            NotLeaderError: this node is not (or stopped being) the leader.
            RequestTimeout: no quorum confirmed leadership in time.
        """
        if self._closed:
            raise ClosedError("raft node closed")
        if not self.is_leader:
            raise self._not_leader()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reads_in.append(fut)
        self._wake.set()
        try:
            index = await wait_future(fut, timeout)
        except TimeoutError:
            raise RequestTimeout("read index not confirmed by a quorum in time") from None
        await self.wait_applied(index, timeout)
        return index

    async def wait_applied(self, index: int, timeout: float = 3.0) -> None:  # noqa: ASYNC109
        """Wait until this node has applied ``index``."""
        if self.applied_index >= index:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._applied_waiters.append((index, fut))
        try:
            await wait_future(fut, timeout)
        except TimeoutError:
            raise RequestTimeout(f"index {index} not applied in time") from None

    async def health(self) -> Mapping[str, object]:
        """Health details for ``/healthz`` (raises when the Raft loop has died)."""
        if self.failed is not None:
            raise RuntimeError(f"raft loop stopped: {self.failed!r}")
        return {"id": self.id, "role": self.role.name.lower(), "term": self.term}

    def status(self) -> dict[str, Any]:
        """A JSON-able status summary."""
        conf = self.core.conf
        return {
            "id": self.id,
            "role": self.core.role.name.lower(),
            "term": self.core.term,
            "leader": self.core.leader_id,
            "commit_index": self.core.commit_index,
            "applied_index": self.applied_index,
            "last_index": self.core.last_index,
            "snapshot_index": self.snapshot_index,
            "voters": list(conf.voters),
            "learners": list(conf.learners),
            "peers": dict(self.transport.peers),
        }

    # -- peer endpoint ----------------------------------------------------------------

    def _check_peer(self, request: web.Request) -> NodeId:
        """The sending peer's id, once its token and id check out (403 otherwise)."""
        token = self.config.token
        if not token_ok(request.headers.get(TOKEN_HEADER), token):
            raise web.HTTPForbidden(text="missing or wrong cluster token")
        src = request.headers.get(FROM_HEADER, "")
        if src not in self.transport.peers:
            raise web.HTTPForbidden(text=f"unknown peer {src!r}")
        return src

    def _decode_batch(self, body: bytes, src: NodeId) -> list[Message]:
        """Decode and check one batch of messages from ``src``.

        Raises:
            RemoteProtocolError: malformed, insane, or not from ``src`` to us.
        """
        try:
            raw = decode(body, max_size=MAX_PEER_BODY)
            if not isinstance(raw, list):
                raise RemoteProtocolError("peer body must be a msgpack list of messages")
            msgs = [check_message(from_wire(m)) for m in raw]
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"malformed peer message: {exc}") from None
        me = self.id
        for m in msgs:
            if m.src != src or m.dst != me:
                raise RemoteProtocolError("message src/dst do not match the request")
        return msgs

    async def handle_peer_stream(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /raft/v1/stream``: a WebSocket of message batches from one peer.

        The token and the peer id are checked before the upgrade (403). Each binary
        frame is a msgpack list of messages; a malformed frame (or a text frame) is
        logged, counted in ``dsys_raft_peer_frames_refused_total`` and closes the
        connection with code 1003 and the reason (the peer reconnects). Frames that
        arrive while the inbox is full are dropped (Raft retries).
        """
        src = self._check_peer(request)
        ws = web.WebSocketResponse(max_msg_size=MAX_PEER_BODY, heartbeat=self.config.peer_timeout)
        await ws.prepare(request)
        self._streams.add(ws)
        try:
            await self._read_stream(ws, src)
        finally:
            self._streams.discard(ws)
        return ws

    async def _read_stream(self, ws: web.WebSocketResponse, src: NodeId) -> None:
        inbox_limit = self._inbox_limit
        async for wsf in ws:
            if wsf.type != WSMsgType.BINARY:
                if wsf.type == WSMsgType.TEXT:
                    await self._refuse_frame(ws, src, "frames must be binary msgpack")
                    break
                continue
            try:
                if src not in self.transport.peers:
                    raise RemoteProtocolError(f"unknown peer {src!r}")
                msgs = self._decode_batch(wsf.data, src)
            except RemoteProtocolError as exc:
                await self._refuse_frame(ws, src, str(exc))
                break
            if _TRACE:
                _trace_received(msgs)
            if self._closed:
                break
            if len(self._inbox) >= inbox_limit:
                self.transport.dropped += len(msgs)
                continue
            self._inbox.extend(msgs)
            self._wake.set()

    def _receive_batch(self, msgs: list[Message]) -> None:
        """Queue a checked batch from a raw peer stream for the loop (dropped when full)."""
        if _TRACE:
            _trace_received(msgs)
        if self._closed or len(self._inbox) >= self._inbox_limit:
            self.transport.dropped += len(msgs)
            return
        self._inbox.extend(msgs)
        self._wake.set()

    def accept_raw_stream(
        self,
        transport: asyncio.Transport,
        headers: Iterable[tuple[bytes, bytes, bytes]],
        rest: bytes,
    ) -> None:
        """Take a connection whose first request asked for the raw peer stream.

        ``headers`` are the request's ``(raw name, lower-cased name, value)`` fields and
        ``rest`` the bytes read after its head. The token and the peer id are checked as
        for the WebSocket (a 403 answer and the connection closed otherwise); then the
        answer is ``101`` and the connection a :class:`~dsys.raft.peerwire.RawPeerStream`.
        """
        token = src = None
        for _, name, value in headers:
            if name == _TOKEN_LOWER:
                token = value.decode("latin-1")
            elif name == _FROM_LOWER:
                src = value.decode("latin-1")
        why = ""
        if not token_ok(token, self.config.token):
            why = "missing or wrong cluster token"
        elif src is None or src not in self.transport.peers:
            why = f"unknown peer {src!r}"
        elif self._closed:
            why = "node closed"
        if why:
            self._m_refused.inc()
            self.log.warning("peer_refused", src=src, error=why)
            transport.write(refusal(503 if self._closed else 403, why))
            transport.close()
            return
        assert src is not None
        transport.write(SWITCHED)
        hand_over(transport, RawPeerStream(self, src), rest)

    @property
    def _inbox_limit(self) -> int:
        """Most peer messages queued for the Raft loop; more are dropped (Raft resends)."""
        return 4 * self.config.peer_queue

    def deliver(self, msgs: list[Message]) -> bool:
        """Queue checked inbound messages for the loop (a shared transport's receive side).

        Returns False (and drops them; Raft resends) when closed or the inbox is full.
        """
        if self._closed or len(self._inbox) >= self._inbox_limit:
            self.transport.dropped += len(msgs)
            return False
        self._inbox.extend(msgs)
        self._wake.set()
        return True

    async def _close_streams(self, app: web.Application | None = None) -> None:
        """Close the inbound peer WebSockets (on shutdown, so handlers need not time out)."""
        for raw in list(self._raw_streams):
            raw.close("node shutting down")
        self._raw_streams.clear()
        streams = list(self._streams)
        self._streams.clear()
        for ws in streams:
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"node shutting down")

    async def _refuse_frame(self, ws: web.WebSocketResponse, src: NodeId, why: str) -> None:
        self._m_refused.inc()
        self.log.warning("peer_frame_refused", src=src, error=why)
        reason = why.encode("utf-8", "replace")[:120]
        await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=reason)

    async def handle_peer_request(self, request: web.Request) -> web.Response:
        """``POST /raft/v1/msgs``: a msgpack list of messages from one peer.

        The request/response form of the peer endpoint (answers ride back on the
        response); :class:`PeerTransport` uses :meth:`handle_peer_stream` instead.
        """
        src = self._check_peer(request)
        body = await request.read()
        try:
            msgs = self._decode_batch(body, src)
        except RemoteProtocolError as exc:
            self._m_refused.inc()
            raise web.HTTPBadRequest(text=str(exc)) from None
        if self._closed:
            raise web.HTTPServiceUnavailable(text="node closed")
        if len(self._inbox) >= self._inbox_limit:  # the same bound as the stream path
            self.transport.dropped += len(msgs)
            raise web.HTTPServiceUnavailable(text="peer inbox full; retry later")
        fut: asyncio.Future[list[Message]] = asyncio.get_running_loop().create_future()
        self._inbox.extend(msgs)
        self._reply_wait.append((src, fut))
        self._wake.set()
        try:
            replies = await wait_future(fut, REPLY_WAIT)
        except TimeoutError:
            replies = []  # whatever we answer later goes out in a request of our own
        if not replies:
            return web.Response(status=204)
        body = encode([to_wire(m) for m in replies], max_size=MAX_PEER_BODY)
        return web.Response(body=body, content_type="application/msgpack")

    def add_routes(self, app: web.Application) -> None:
        """Add the peer endpoints to ``app``."""
        app.router.add_post(PEER_PATH, self.handle_peer_request)
        app.router.add_get(STREAM_PATH, self.handle_peer_stream)
        app.on_shutdown.append(self._close_streams)

    # -- loop -------------------------------------------------------------------------

    def tick(self) -> None:
        """One Raft tick, from the owner's timer (with ``NodeConfig.external_ticks``)."""
        self._ticks += 1
        self._wake.set()

    @property
    def quiet(self) -> bool:
        """Whether the group is quiet here (``NodeConfig.quiet_ticks``)."""
        return self.core.quiet

    def wake(self) -> None:
        """Wake a quiet group (the host lost the connection to its leader's process)."""
        self._wake_core = True
        self._wake.set()

    async def _ticker(self) -> None:
        interval = self.config.tick_interval
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._closed:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if loop.time() - next_at > 5 * interval:
                next_at = loop.time()  # we were starved; do not burst ticks
            self._ticks += 1
            self._wake.set()

    async def _run(self) -> None:
        try:
            while not self._closed:
                await self._wake.wait()
                self._wake.clear()
                self._feed_core()
                rounds = 0
                while self.core.has_ready() and not self._closed and rounds < 64:
                    rounds += 1
                    await self._handle_ready(self.core.ready())
                    self._feed_core()
                    if _TRACE:
                        self._trace_commit()
                if rounds >= 64:
                    self._wake.set()
                armed, self._armed = self._armed, {}
                for fut, msgs in armed.values():
                    self._resolve_reply(fut, msgs)
                await self._maybe_snapshot()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed = exc
            self.log.exception("raft_loop_crashed")
            raise

    def _trace_commit(self) -> None:
        if self.core.commit_index > self._traced_commit:
            self._traced_commit = self.core.commit_index
            _trace.mark("commit", self._traced_commit)

    def _feed_core(self) -> None:
        core = self.core
        if self._wake_core:
            self._wake_core = False
            core.wake()
        ticks, self._ticks = self._ticks, 0
        for _ in range(min(ticks, 10)):
            core.tick()
        if ticks and self._pending:
            self._expire_proposals()
        waiting, self._reply_wait = self._reply_wait, []
        for src, wfut in waiting:
            old = self._armed.pop(src, None)
            if old is not None:
                self._resolve_reply(*old)
            self._armed[src] = (wfut, [])
        while self._inbox:
            msg = self._inbox.popleft()
            try:
                core.step(msg)
            except RemoteProtocolError as exc:  # e.g. an undecodable config entry
                self.log.warning("peer_message_refused", src=msg.src, error=str(exc))
        if _TRACE:
            self._trace_commit()
        if self._proposals_in:
            self._propose_queued()
        while self._conf_in:
            change, cfut = self._conf_in.popleft()
            try:
                index = core.propose_conf_change(change)
            except Exception as exc:
                cfut.set_exception(exc)
                continue
            self._pending[index] = _Proposal(
                core.term, [_future_callback(cfut)], time.perf_counter(), None, 1, None
            )
        while self._transfers_in:
            target, tfut = self._transfers_in.popleft()
            if tfut.done():
                continue
            try:
                core.transfer_leadership(target)
            except NotLeaderError:
                tfut.set_exception(self._not_leader())
            except Exception as exc:
                tfut.set_exception(exc)
            else:
                self._transfer_waiters.append((target, tfut))
        while self._reads_in:
            rfut = self._reads_in.popleft()
            if rfut.done():
                continue
            self._read_seq += 1
            ctx = self._read_seq.to_bytes(8, "big")
            try:
                core.read_index(ctx)
            except NotLeaderError:
                rfut.set_exception(self._not_leader())
                continue
            self._read_waiters[ctx] = rfut

    def _propose_queued(self) -> None:
        """Append the queued proposals: up to ``proposal_batch`` of them per log entry."""
        core, queue = self.core, self._proposals_in
        most, most_bytes = self.config.proposal_batch, self.config.proposal_batch_bytes
        now = time.perf_counter()
        while queue:
            datas: list[bytes] = []
            cbs: list[Any] = []
            spans: list[int] = []
            many = False
            decoded: list[object] | None = []
            size = 0
            while queue and len(datas) < most and size < most_bytes:
                data, cb, dec = queue[0]
                if type(data) is list:  # propose_many: the group stays in one entry
                    n, nbytes = len(data), sum(map(len, data))
                    if datas and (len(datas) + n > most or size + nbytes > most_bytes):
                        break
                    datas.extend(data)
                    spans.append(n)
                    many = True
                    if decoded is not None:
                        if dec is None:
                            decoded = None
                        else:
                            decoded.extend(dec)
                    size += nbytes
                else:
                    datas.append(data)
                    spans.append(0)
                    if decoded is not None:
                        if dec is None:
                            decoded = None
                        else:
                            decoded.append(dec)
                    size += len(data)
                queue.popleft()
                cbs.append(cb)
            try:
                index = core.propose(datas[0]) if len(datas) == 1 else core.propose_batch(datas)
            except NotLeaderError:
                exc: Exception = self._not_leader()
            except Exception as e:
                exc = e
            else:
                self._pending[index] = _Proposal(
                    core.term, cbs, now, decoded, len(datas), spans if many else None
                )
                if _TRACE:
                    _trace.mark("propose", index)
                continue
            for cb in cbs:
                _call(cb, None, exc)

    def _expire_proposals(self) -> None:
        """Answer ``TimeoutError`` to proposals older than ``proposal_timeout``."""
        pending = self._pending
        cutoff = time.perf_counter() - self.config.proposal_timeout
        expired = []
        for index, p in pending.items():  # in index order, so oldest first
            if p.started > cutoff:
                break
            expired.append(index)
        for index in expired:
            pending.pop(index).fail(
                TimeoutError("not committed in time; the entry may still commit")
            )

    async def _handle_ready(self, rd: Ready) -> None:
        # 1. persist (one fsync for the whole batch, in a worker thread). A leader
        #    replicates while it writes its own log (Raft thesis 10.2.1; its own copy
        #    counts toward a commit only after advance(), see RaftCore): its appends are
        #    written to the peer sockets first (one loop turn), then the records are
        #    encoded here and the thread only writes and syncs them. (Starting the thread
        #    before the sends measured no better: it delays the appends; benchmarks.md.)
        #    A hard state that only moves the commit index needs no fsync and nothing
        #    waits for it (the commit index is volatile in Raft): it is written after the
        #    committed entries are applied and answered.
        early = rd.messages_before_persist and bool(rd.messages)
        deferred = False
        if early:
            self._send(rd.messages)
            if rd.entries and not self._inline_persist and self.transport.needs_turn:
                await asyncio.sleep(0)  # the peer senders write the appends now
        if rd.snapshot is not None or rd.hard_state is not None or rd.entries:
            if not self._needs_fsync(rd):
                deferred = True
            else:
                started = time.perf_counter()
                if _TRACE and rd.entries:
                    _trace.mark("persist_start", rd.entries[-1].index)
                if self._inline_persist:  # fsync off: a plain write() beats a thread hop
                    self._persist(rd)
                elif self._group_sync is not None and rd.snapshot is None:
                    # a log shared by many groups: one write and fsync for all of them
                    self._stage(rd)
                    if early and rd.entries:
                        await self._apply_while_persisting(self._group_sync(), rd)
                    else:
                        await self._group_sync()
                else:
                    async with self._store_lock:
                        loop = asyncio.get_running_loop()
                        if rd.snapshot is None:
                            # Encode the records here: the thread then needs the GIL only
                            # around write() and fdatasync().
                            self._stage(rd)
                            sync = loop.run_in_executor(None, self._sync)
                            if early and rd.entries:
                                await self._apply_while_persisting(sync, rd)
                            else:
                                await sync
                        else:
                            await loop.run_in_executor(None, self._persist, rd)
                self._m_fsync.observe(time.perf_counter() - started)
                if rd.entries:
                    self._m_batch.observe(len(rd.entries))
                    if _TRACE:
                        _trace.mark("persist_end", rd.entries[-1].index)
        # 2. send (after persisting, unless sent above)
        if rd.messages and not early:
            self._send(rd.messages)
        # 3. install snapshot, apply committed, serve reads
        if rd.snapshot is not None and rd.snapshot.meta.index > self.applied_index:
            self.fsm.restore(rd.snapshot.data)
            self.applied_index = rd.snapshot.meta.index
            self.applied_term = rd.snapshot.meta.term
            self.snapshot_index = rd.snapshot.meta.index
            self._fail_pending_upto(self.applied_index)
        self._apply_committed(rd.committed)
        for rs in rd.read_states:
            rfut = self._read_waiters.pop(rs.ctx, None)
            if rfut is not None and not rfut.done():
                rfut.set_result(rs.index)
        self._wake_applied()
        if deferred:
            # A plain write() of the commit index, cheaper than a thread hop.
            if self._store_lock.locked():
                async with self._store_lock:
                    await asyncio.to_thread(self._persist, rd)
            else:
                self._persist(rd)
        # 4. events
        for ev in rd.events:
            self._on_event(ev)
        self.core.advance(rd)

    async def _apply_while_persisting(self, persist: Awaitable[None], rd: Ready) -> None:
        """Await a leader's own log write while stepping its inbox and applying what commits.

        etcd raft's asynchronous storage writes (dissertation 10.2.1): the followers'
        acknowledgements of ``rd``'s appends arrive before the leader's fsync ends, and
        two of three are a majority without the leader's copy (which the core does not
        count until ``advance``), so the entries commit, are applied and answered now.
        """
        done = asyncio.ensure_future(persist)  # an executor future stays as it is
        wake = self._wake
        done.add_done_callback(lambda _: wake.set())
        core = self.core
        if rd.committed:  # committed = durable on a majority: no need to wait for ours
            self._apply_committed(rd.committed)
            core.applied_to(rd.committed[-1].index)
        while not self._closed:
            await wake.wait()
            wake.clear()
            self._feed_core()
            applied = False
            while committed := core.apply_ready():
                if _TRACE:
                    self._trace_commit()
                self._apply_committed(committed)
                core.applied_to(committed[-1].index)
                applied = True
            if applied:
                self._wake_applied()
            if done.done():
                break
        await done

    def _apply_committed(self, committed: Sequence[Entry]) -> None:
        """Apply committed entries in order (skipping applied ones) and answer proposals."""
        pending, apply, apply_decoded = self._pending, self.fsm.apply, self._apply_decoded
        for entry in committed:
            if entry.index <= self.applied_index:
                continue
            if _TRACE:
                _trace.mark("apply_start", entry.index)
            kind = entry.kind
            p = pending.pop(entry.index, None)
            # (index, term) names one entry: a proposal of that term is exactly this entry
            mine = p is not None and p.term == entry.term
            decoded = p.decoded if p is not None and mine else None
            results: list[object]
            if kind == EntryKind.NORMAL or kind == EntryKind.BATCH:
                if decoded is not None and apply_decoded is not None:
                    results = [apply_decoded(c) for c in decoded]
                elif kind == EntryKind.NORMAL:
                    results = [apply(entry.data)]
                else:
                    results = [apply(cmd) for cmd in self._batch_commands(entry)]
            else:
                results = [None]
                if kind == EntryKind.CONFIG and self._apply_conf is not None:
                    # a state machine that tracks its membership (a multi-Raft range's
                    # descriptor) sees each committed configuration, in log order
                    self._apply_conf(decode_conf(entry.data), entry.index)
            self.applied_index = entry.index
            self.applied_term = entry.term
            if p is not None:
                if mine and p.count == len(results):
                    p.answer(results)
                    self._m_commit.observe(time.perf_counter() - p.started)
                    if _TRACE:
                        _trace.mark("answered", entry.index)
                else:
                    p.fail(ProposalDroppedError("leadership changed; the proposal was overwritten"))

    def _send(self, msgs: tuple[Message, ...]) -> None:
        """Queue ``msgs`` (answers to a waiting peer request ride on its HTTP response).

        A commit notice (a heartbeat with ``ctx`` 0, sent when the commit index moves) is
        held for ``NodeConfig.commit_notice_delay`` s: the next append or heartbeat to
        that peer carries the commit index anyway, and then the notice is dropped.
        """
        armed = self._armed
        notices = self._notices
        send = self.transport.send
        for msg in msgs:
            slot = armed.get(msg.dst) if armed else None
            if slot is not None and not slot[0].done():
                slot[1].append(msg)
                continue
            kind = type(msg)
            if kind is Heartbeat or kind is AppendRequest:
                held = notices.get(msg.dst) if notices else None
                if held is not None and msg.commit >= held.commit:  # type: ignore[union-attr]
                    del notices[msg.dst]
                if (
                    kind is Heartbeat
                    and not msg.ctx  # type: ignore[union-attr]
                    and not msg.quiet  # type: ignore[union-attr]
                    and self._notice_delay > 0
                ):
                    notices[msg.dst] = msg  # type: ignore[assignment]
                    if self._notice_timer is None:
                        self._notice_timer = asyncio.get_running_loop().call_later(
                            self._notice_delay, self._send_notices
                        )
                    continue
            send(msg)
        self.transport.flush()  # raw streams: one write() per peer, now

    def _send_notices(self) -> None:
        """The held commit notices that no append or heartbeat made redundant."""
        self._notice_timer = None
        notices, self._notices = self._notices, {}
        if notices and not self._closed:
            for msg in notices.values():
                self.transport.send(msg)
            self.transport.flush()

    def _needs_fsync(self, rd: Ready) -> bool:
        """Whether persisting ``rd`` syncs: entries, a snapshot, or a new term or vote."""
        if rd.entries or rd.snapshot is not None:
            return True
        hs = rd.hard_state
        if hs is None:
            return False
        old = self._synced_hs
        return old is None or old.term != hs.term or old.vote != hs.vote

    def _persist(self, rd: Ready) -> None:
        """Runs in a worker thread: durable before any message of ``rd`` is sent."""
        if rd.snapshot is not None:
            # A snapshot from the leader replaces our whole log (the core dropped it).
            self._snapshots.save(rd.snapshot)
            meta = rd.snapshot.meta
            self._log_store.compact(meta.index, meta.term, keep_tail=False)
        self._stage(rd)
        self._sync()

    def _stage(self, rd: Ready) -> None:
        """Queue ``rd``'s entries and hard state in the stores (durable after a sync)."""
        # Entries before the hard state: both go out in one write and one fsync, and if
        # a crash tears that write, a commit index beyond the surviving log is impossible.
        if rd.entries:
            self._log_store.append(rd.entries)
        if rd.hard_state is not None:
            self._stable.save_hard_state(rd.hard_state)
            self._synced_hs = rd.hard_state

    def _sync(self) -> None:
        """Make what was staged durable (may run in a worker thread)."""
        self._stable.sync()
        if self._stable is not self._log_store:  # type: ignore[comparison-overlap]
            self._log_store.sync()

    def _batch_commands(self, entry: Entry) -> list[bytes]:
        """The commands of a committed BATCH entry (none if it cannot be decoded).

        Every replica decides the same for the same bytes, so a bad entry is a
        replicated no-op and never wedges the log (our own leaders only write good ones).
        """
        try:
            return decode_batch(entry.data)
        except RemoteProtocolError as exc:
            self.log.error("batch_entry_undecodable", index=entry.index, error=str(exc))
            return []

    def _fail_pending_upto(self, index: int) -> None:
        for i in [i for i in self._pending if i <= index]:
            self._pending.pop(i).fail(
                ProposalDroppedError("a snapshot replaced the entry; outcome unknown")
            )

    def _wake_applied(self) -> None:
        if not self._applied_waiters:
            return
        keep = []
        for index, fut in self._applied_waiters:
            if fut.done():
                continue
            if self.applied_index >= index:
                fut.set_result(None)
            else:
                keep.append((index, fut))
        self._applied_waiters = keep

    def _on_event(self, ev: object) -> None:
        self._m_term.set(self.core.term)
        if isinstance(ev, BecameLeader):
            self._m_leader.set(1)
            self.log.info("became_leader", term=ev.term)
        elif isinstance(ev, BecameFollower):
            self._m_leader.set(0)
            self.log.info("became_follower", term=ev.term, leader=ev.leader)
            if self._transfer_waiters and ev.leader is not None:
                for target, tfut in self._transfer_waiters:
                    if target == ev.leader and not tfut.done():
                        tfut.set_result(None)
            self._fail_reads()
            self._fail_proposals()
        elif isinstance(ev, BecameCandidate):
            self._m_leader.set(0)
            if not ev.pre_vote:
                self.elections += 1
                self._m_elections.inc()
            self.log.info("campaign", term=ev.term, pre_vote=ev.pre_vote)
            self._fail_reads()
            self._fail_proposals()
        elif isinstance(ev, ReadIndexDropped):
            rfut = self._read_waiters.pop(ev.ctx, None)
            if rfut is not None and not rfut.done():
                rfut.set_exception(self._not_leader())
        else:
            self.log.info("raft_event", kind=type(ev).__name__, detail=repr(ev))

    def _resolve_reply(self, fut: asyncio.Future[list[Message]], msgs: list[Message]) -> None:
        if not fut.done():
            fut.set_result(msgs)
        else:  # the request gave up waiting: send the answers on our own
            for m in msgs:
                self.transport.send(m)

    def _fail_proposals(self) -> None:
        """Leadership was lost: answer pending proposals now instead of at their timeout.

        Their entries may still commit under the next leader, so the outcome is unknown;
        callers retry with the same client id and sequence number (exactly-once).
        """
        pending, self._pending = self._pending, {}
        err = ProposalDroppedError("leadership lost before the write committed; retry")
        for p in pending.values():
            p.fail(err)

    def _fail_reads(self) -> None:
        waiters, self._read_waiters = self._read_waiters, {}
        for rfut in waiters.values():
            if not rfut.done():
                rfut.set_exception(self._not_leader())

    async def request_snapshot(self, timeout: float = 3.0) -> int:  # noqa: ASYNC109
        """Have the Raft loop snapshot at its applied index and compact the log (unlike
        :meth:`snapshot_now`, safe to call from outside the loop); returns the index.

        Raises:
            RequestTimeout: the loop did not get to it in time.
        """
        if self._closed:
            raise ClosedError("raft node closed")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._snapshot_waiters.append(fut)
        self._wake.set()
        try:
            return await wait_future(fut, timeout)
        except TimeoutError:
            raise RequestTimeout("snapshot not taken in time") from None

    async def _maybe_snapshot(self) -> None:
        if self._snapshot_waiters:
            waiters, self._snapshot_waiters = self._snapshot_waiters, []
            index = await self.snapshot_now()
            for fut in waiters:
                if not fut.done():
                    fut.set_result(index)
            return
        behind = self.applied_index - self.snapshot_index
        if behind >= self.config.snapshot_every:
            await self.snapshot_now()
            return
        # Large values fill the log long before snapshot_every entries: compact by size too.
        size = getattr(self._log_store, "size_bytes", 0)
        if behind >= 16 and isinstance(size, int) and size > self.config.snapshot_log_bytes:
            await self.snapshot_now()

    async def snapshot_now(self) -> int:
        """Snapshot the state machine at the applied index and compact the log.

        Returns the snapshot's index (unchanged when nothing new was applied).
        """
        index, term = self.applied_index, self.applied_term
        if index <= self.snapshot_index or index > self.core.stable_index:
            # (applied before our own write ended: snapshot once it is in our log)
            return self.snapshot_index
        data = self.fsm.snapshot()
        self.core.compact(index, data)
        # The core's snapshot carries the configuration in effect at ``index``; core.conf
        # may already be a newer, uncommitted one, which must not be persisted with it.
        snap = self.core.snapshot
        assert snap is not None and snap.meta.index == index, "compact made no snapshot"
        self.snapshot_index = index
        async with self._store_lock:
            await asyncio.to_thread(self._save_snapshot, snap)
        self._m_snapshots.inc()
        self.log.info("snapshot_taken", index=index, term=term, bytes=len(data))
        return index

    def _save_snapshot(self, snap: Snapshot) -> None:
        self._snapshots.save(snap)
        self._log_store.compact(snap.meta.index, snap.meta.term)


GC_THRESHOLDS = (10_000, 20, 50)
"""``gc.set_threshold`` of a replica server process (Python's default is 700, 10, 10).

A server process allocates a few short-lived objects per request and keeps a large live
heap (log, state machine); collecting the young generation every 700 allocations costs
several percent of CPU for nothing (refcounting frees nearly everything)."""


class ReplicaServer(Protocol):
    """A server built around a :class:`RaftNode` (the KV and stream servers)."""

    node: RaftNode
    log: Any

    async def start(self) -> Any:
        """Start the node and listen."""
        ...

    async def close(self) -> None:
        """Stop serving and close the node."""
        ...


_S = TypeVar("_S", bound=ReplicaServer)


async def serve_replica(
    server: _S, *, on_started: Callable[[_S], None] | None, failure_event: str
) -> int:
    """Run ``server`` until SIGINT/SIGTERM; returns the process exit code.

    If the Raft loop dies (a storage failure such as a full disk, or a bug), the server
    stops and returns 1 instead of limping on, so a supervisor restarts it from its WAL;
    ``failure_event`` is the log event that says so.
    """
    await server.start()
    if on_started is not None:
        on_started(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    stop_task = asyncio.create_task(stop.wait())
    loop_task = asyncio.create_task(server.node.wait_stopped())
    try:
        await asyncio.wait({stop_task, loop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_task.cancel()
        loop_task.cancel()
        await server.close()
    if server.node.failed is not None:
        server.log.error(failure_event, error=repr(server.node.failed))
        return 1
    return 0


__all__ = [
    "GC_THRESHOLDS",
    "PEER_PATH",
    "STREAM_PATH",
    "NodeConfig",
    "PeerTransport",
    "RaftNode",
    "ReplicaServer",
    "StateMachine",
    "serve_replica",
    "wait_future",
]
