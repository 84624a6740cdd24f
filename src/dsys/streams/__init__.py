"""Durable, Raft-replicated streams with consumers, acks and dead letters.

The state machine (:mod:`dsys.streams.fsm`) is pure; :mod:`dsys.streams.server` runs it on
a :class:`~dsys.raft.node.RaftNode` behind an HTTP + WebSocket API, and
:class:`~dsys.streams.client.StreamClient` talks to a cluster.
"""

from __future__ import annotations

from dsys.streams.fsm import (
    ConsumerConfig,
    Delivery,
    Message,
    PubAck,
    StreamConfig,
    StreamStateMachine,
)

__all__ = [
    "ConsumerConfig",
    "Delivery",
    "Message",
    "PubAck",
    "StreamConfig",
    "StreamStateMachine",
]
