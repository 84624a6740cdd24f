"""dsys: distributed-systems building blocks for asyncio Python.

The top-level package re-exports the names most users need; each building block
lives in its own subpackage (``dsys.sharding``, ``dsys.raft``, ``dsys.kv``,
``dsys.ratelimit``, ``dsys.resilience``, ``dsys.pubsub``, ``dsys.balance``).
"""

from __future__ import annotations

__version__ = "0.1.0"

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
from dsys.raft import RaftConfig, RaftCore

__all__ = [
    "BadInputError",
    "ClosedError",
    "ConfigError",
    "ConflictError",
    "DsysError",
    "KVClient",
    "NotLeaderError",
    "ProtocolError",
    "RaftConfig",
    "RaftCore",
    "RequestTimeout",
    "TransportError",
    "UnavailableError",
    "__version__",
]
