"""Wire messages, log entries, persisted state and the ``Ready`` batch of the Raft core.

Everything here is a frozen, slotted dataclass registered with :data:`CODEC`, so any
message can cross a network as ``CODEC.encode(msg)`` / ``CODEC.decode(data)``. The
module is pure: no I/O, no clocks.

Every message carries ``src``, ``dst`` and ``term`` (the sender's current term, or for a
pre-vote request the term the sender *would* campaign in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeAlias

import msgpack

from dsys.codec import MessageCodec, decode
from dsys.errors import RemoteProtocolError

NodeId: TypeAlias = str
"""Identifier of a Raft node (any stable string, e.g. ``"n1"``)."""

CODEC = MessageCodec()
"""Codec for every message and persisted structure in this module."""


class EntryKind(IntEnum):
    """What a log entry carries."""

    NORMAL = 0
    """An opaque command for the state machine."""
    CONFIG = 1
    """A :class:`ConfState` (``data`` is ``CODEC.encode(conf_state)``); takes effect on append."""
    NOOP = 2
    """The empty entry a new leader appends to commit entries of earlier terms."""
    BATCH = 3
    """Several opaque commands in one entry (``data`` is :func:`encode_batch`'s output),
    applied in order as if each were a NORMAL entry."""


class Role(IntEnum):
    """The role a node currently plays."""

    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3
    LEARNER = 4


class ConfChangeType(IntEnum):
    """Kinds of single-node membership changes."""

    ADD_VOTER = 0
    """Add a voter, or promote an existing learner to voter."""
    ADD_LEARNER = 1
    """Add a non-voting learner (receives the log, never votes or counts for commit)."""
    REMOVE_NODE = 2
    """Remove a voter or a learner."""


@CODEC.register("raft.entry")
@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry. ``kind`` is an :class:`EntryKind` value."""

    term: int
    index: int
    kind: int
    data: bytes


@CODEC.register("raft.hard_state")
@dataclass(frozen=True, slots=True)
class HardState:
    """State that must be durable before any message reflecting it is sent."""

    term: int
    vote: NodeId | None
    commit: int


@CODEC.register("raft.conf_state")
@dataclass(frozen=True, slots=True)
class ConfState:
    """The cluster membership: who votes and who only learns."""

    voters: tuple[NodeId, ...]
    learners: tuple[NodeId, ...] = ()


@CODEC.register("raft.conf_change")
@dataclass(frozen=True, slots=True)
class ConfChange:
    """A single-node membership change proposed with ``RaftCore.propose_conf_change``."""

    type: int
    node_id: NodeId


@CODEC.register("raft.snapshot_meta")
@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Position and membership a snapshot covers (everything up to ``index``)."""

    index: int
    term: int
    conf: ConfState


@CODEC.register("raft.snapshot")
@dataclass(frozen=True, slots=True)
class Snapshot:
    """A state-machine snapshot (opaque ``data``) plus its metadata."""

    meta: SnapshotMeta
    data: bytes


# -- messages ----------------------------------------------------------------------------


@CODEC.register("raft.vote_req")
@dataclass(frozen=True, slots=True)
class VoteRequest:
    """RequestVote (or pre-vote when ``pre_vote``): asks ``dst`` for its vote."""

    src: NodeId
    dst: NodeId
    term: int
    pre_vote: bool
    last_log_index: int
    last_log_term: int
    transfer: bool = False
    """Set when the campaign follows a leadership transfer (bypasses the leader lease)."""


@CODEC.register("raft.vote_resp")
@dataclass(frozen=True, slots=True)
class VoteResponse:
    """Answer to a :class:`VoteRequest`."""

    src: NodeId
    dst: NodeId
    term: int
    pre_vote: bool
    granted: bool


@CODEC.register("raft.append_req")
@dataclass(frozen=True, slots=True)
class AppendRequest:
    """AppendEntries: entries following ``(prev_index, prev_term)`` and the leader's commit."""

    src: NodeId
    dst: NodeId
    term: int
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@CODEC.register("raft.append_resp")
@dataclass(frozen=True, slots=True)
class AppendResponse:
    """Answer to an :class:`AppendRequest` or :class:`SnapshotRequest`.

    On success ``match_index`` is the last index known to match the leader. On failure
    ``reject_index`` is the ``prev_index`` that did not match and ``conflict_index`` /
    ``conflict_term`` drive fast backtracking: ``conflict_term`` is the follower's term at
    ``reject_index`` (0 when the follower's log is too short) and ``conflict_index`` the
    first index the follower holds for that term (or its last index + 1).
    """

    src: NodeId
    dst: NodeId
    term: int
    success: bool
    match_index: int
    reject_index: int = 0
    conflict_index: int = 0
    conflict_term: int = 0


@CODEC.register("raft.heartbeat")
@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Leader liveness ping; ``commit`` never exceeds what ``dst`` is known to hold.

    ``ctx`` is the leader's read round (ReadIndex); it is echoed back. ``quiet`` (quiet
    ticks): the group is idle and every member caught up; stop expecting heartbeats.
    """

    src: NodeId
    dst: NodeId
    term: int
    commit: int
    ctx: int = 0
    quiet: bool = False


@CODEC.register("raft.heartbeat_resp")
@dataclass(frozen=True, slots=True)
class HeartbeatResponse:
    """Answer to a :class:`Heartbeat`, echoing its ``ctx``; ``last_index`` helps repair."""

    src: NodeId
    dst: NodeId
    term: int
    ctx: int = 0


@CODEC.register("raft.snapshot_req")
@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """InstallSnapshot: the leader's whole snapshot for a follower that is too far behind.

    The follower answers with an :class:`AppendResponse`.
    """

    src: NodeId
    dst: NodeId
    term: int
    snapshot: Snapshot


@CODEC.register("raft.timeout_now")
@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leadership transfer: tells ``dst`` to campaign at once."""

    src: NodeId
    dst: NodeId
    term: int


Message: TypeAlias = (
    VoteRequest
    | VoteResponse
    | AppendRequest
    | AppendResponse
    | Heartbeat
    | HeartbeatResponse
    | SnapshotRequest
    | TimeoutNow
)
"""Any message exchanged between Raft nodes."""

MESSAGE_TYPES: tuple[type, ...] = (
    VoteRequest,
    VoteResponse,
    AppendRequest,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    SnapshotRequest,
    TimeoutNow,
)
"""The classes of :data:`Message`, for ``isinstance`` checks at the edges."""


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BecameLeader:
    """This node won the election of ``term``."""

    term: int


@dataclass(frozen=True, slots=True)
class BecameFollower:
    """This node follows ``leader`` (``None`` when unknown) in ``term``."""

    term: int
    leader: NodeId | None


@dataclass(frozen=True, slots=True)
class BecameCandidate:
    """This node started an election (``pre_vote`` for the pre-vote phase)."""

    term: int
    pre_vote: bool


@dataclass(frozen=True, slots=True)
class ReadIndexDropped:
    """A ``read_index`` request could not be served (leadership lost); retry elsewhere."""

    ctx: bytes


@dataclass(frozen=True, slots=True)
class ConfChanged:
    """The membership in effect changed (config entries take effect when appended)."""

    conf: ConfState
    index: int


Event = BecameLeader | BecameFollower | BecameCandidate | ReadIndexDropped | ConfChanged


# -- ready --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadState:
    """A confirmed ReadIndex: the read with ``ctx`` is linearizable once applied >= index."""

    ctx: bytes
    index: int


@dataclass(frozen=True, slots=True)
class Ready:
    """Everything the core wants done, in this order.

    1. Persist: ``snapshot`` (if any; it replaces the whole log), ``entries`` (if
       ``entries[0].index`` is already in the log, truncate the log from there first)
       and ``hard_state`` (if not ``None``). Durably (fsync) - all of it before step 2.
       Writing entries before the hard state is the safest order; a restart clamps a
       persisted commit index that is ahead of the log.
    2. Send ``messages``. When ``messages_before_persist`` is true (a leader whose term
       and vote are already durable) they may be sent before or while step 1 runs: the
       leader replicates in parallel with its own fsync (Raft dissertation 10.2.1).
    3. Install ``snapshot`` into the state machine (if any), then apply ``committed``
       in order; serve ``read_states`` whose index is applied.
    4. Call ``RaftCore.advance(ready)``: only then does a leader count its own copy of
       ``entries`` toward a commit quorum.

    While step 1 runs, a leader may apply ``committed`` early and then what
    ``RaftCore.apply_ready`` hands out as its followers' answers commit more (acknowledged
    with ``RaftCore.applied_to``): committed entries are durable on a majority already.
    """

    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    messages: tuple[Message, ...] = ()
    committed: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    events: tuple[Event, ...] = field(default=())
    messages_before_persist: bool = False

    def is_empty(self) -> bool:
        """True when there is nothing to do."""
        return not (
            self.hard_state is not None
            or self.entries
            or self.snapshot is not None
            or self.messages
            or self.committed
            or self.read_states
            or self.events
        )


def encode_conf(conf: ConfState) -> bytes:
    """Encode a :class:`ConfState` as the data of a CONFIG entry."""
    return CODEC.encode(conf)


def decode_conf(data: bytes) -> ConfState:
    """Decode the data of a CONFIG entry (raises ``RemoteProtocolError`` if malformed)."""
    conf = CODEC.decode(data)
    if not isinstance(conf, ConfState):
        from dsys.errors import RemoteProtocolError

        raise RemoteProtocolError(f"config entry holds {type(conf).__name__}, not ConfState")
    return conf


def encode_batch(commands: Sequence[bytes]) -> bytes:
    """Encode commands as the data of one BATCH entry."""
    data: bytes = msgpack.packb(list(commands), use_bin_type=True)
    return data


def decode_batch(data: bytes) -> list[bytes]:
    """Decode the data of a BATCH entry into its commands.

    Raises:
        RemoteProtocolError: ``data`` is not a msgpack list of byte strings.
    """
    items = decode(data, max_size=len(data) + 1)
    if type(items) is not list or not all(type(c) is bytes for c in items):
        raise RemoteProtocolError("a batch entry must be a list of byte strings")
    return items


__all__ = [
    "CODEC",
    "MESSAGE_TYPES",
    "AppendRequest",
    "AppendResponse",
    "BecameCandidate",
    "BecameFollower",
    "BecameLeader",
    "ConfChange",
    "ConfChangeType",
    "ConfChanged",
    "ConfState",
    "Entry",
    "EntryKind",
    "Event",
    "HardState",
    "Heartbeat",
    "HeartbeatResponse",
    "Message",
    "NodeId",
    "ReadIndexDropped",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "SnapshotRequest",
    "TimeoutNow",
    "VoteRequest",
    "VoteResponse",
    "decode_batch",
    "encode_batch",
]
