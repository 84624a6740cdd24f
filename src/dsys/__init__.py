"""dsys: distributed-systems building blocks for asyncio Python.

The top-level package re-exports the names most users need; each building block
lives in its own subpackage (``dsys.sharding``, ``dsys.raft``, ``dsys.kv``,
``dsys.ratelimit``, ``dsys.resilience``, ``dsys.pubsub``, ``dsys.balance``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from dsys.balance import LoadBalancer
from dsys.balance import Session as BalancedSession
from dsys.errors import (
    BadInputError,
    ClosedError,
    ConfigError,
    ConflictError,
    DsysError,
    NotLeaderError,
    ProtocolError,
    RequestTimeout,
    TransportError,
    UnavailableError,
)
from dsys.kv.client import KVClient
from dsys.pubsub import Broker as PubSubBroker
from dsys.pubsub import Client as PubSubClient
from dsys.raft import RaftConfig, RaftCore
from dsys.ratelimit import Decision, Limiter
from dsys.resilience import Bulkhead, CircuitBreaker, Policy, Retry, Timeout
from dsys.sharding import BoundedLoadRing, HashRing, RendezvousHash, ShardRouter, jump_hash

__all__ = [
    "BadInputError",
    "BalancedSession",
    "BoundedLoadRing",
    "Bulkhead",
    "CircuitBreaker",
    "ClosedError",
    "ConfigError",
    "ConflictError",
    "Decision",
    "DsysError",
    "HashRing",
    "KVClient",
    "Limiter",
    "LoadBalancer",
    "NotLeaderError",
    "Policy",
    "ProtocolError",
    "PubSubBroker",
    "PubSubClient",
    "RaftConfig",
    "RaftCore",
    "RendezvousHash",
    "RequestTimeout",
    "Retry",
    "ShardRouter",
    "Timeout",
    "TransportError",
    "UnavailableError",
    "__version__",
    "jump_hash",
]
