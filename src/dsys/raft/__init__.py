"""Raft consensus: a pure, sans-I/O core (:class:`RaftCore`) plus its messages.

The asyncio node, durable storage and KV server that drive the core live beside it
(``dsys.raft.node``, ``dsys.raft.storage``, ``dsys.kv``).
"""

from __future__ import annotations

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
    ConfChanged,
    ConfChangeType,
    ConfState,
    Entry,
    EntryKind,
    Event,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    Message,
    NodeId,
    ReadIndexDropped,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from dsys.raft.session import SessionHit, SessionTable

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
    "RaftConfig",
    "RaftCore",
    "ReadIndexDropped",
    "ReadState",
    "Ready",
    "Role",
    "SessionHit",
    "SessionTable",
    "Snapshot",
    "SnapshotMeta",
    "SnapshotRequest",
    "TimeoutNow",
    "VoteRequest",
    "VoteResponse",
]
