"""dsys: distributed-systems building blocks for asyncio Python.

The top-level package re-exports the names most users need; each building block
lives in its own subpackage (``dsys.sharding``, ``dsys.raft``, ``dsys.kv``,
``dsys.ratelimit``, ``dsys.resilience``, ``dsys.pubsub``, ``dsys.balance``,
``dsys.streams``, ``dsys.jobs``).

The re-exports load on first use (PEP 562), so ``import dsys.sharding`` or the
``dsys`` command line does not pay for importing every block and aiohttp's client.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

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

if _typing.TYPE_CHECKING:
    from dsys.balance import LoadBalancer
    from dsys.balance import Session as BalancedSession
    from dsys.kv.client import KVClient
    from dsys.pubsub import Broker as PubSubBroker
    from dsys.pubsub import Client as PubSubClient
    from dsys.raft import RaftConfig, RaftCore
    from dsys.ratelimit import Decision, Limiter
    from dsys.resilience import Bulkhead, CircuitBreaker, Policy, Retry, Timeout
    from dsys.sharding import BoundedLoadRing, HashRing, RendezvousHash, ShardRouter, jump_hash

# name -> (module, attribute) of the re-exports that load on first use.
_LAZY: dict[str, tuple[str, str]] = {
    "LoadBalancer": ("dsys.balance", "LoadBalancer"),
    "BalancedSession": ("dsys.balance", "Session"),
    "KVClient": ("dsys.kv.client", "KVClient"),
    "PubSubBroker": ("dsys.pubsub", "Broker"),
    "PubSubClient": ("dsys.pubsub", "Client"),
    "RaftConfig": ("dsys.raft", "RaftConfig"),
    "RaftCore": ("dsys.raft", "RaftCore"),
    "Decision": ("dsys.ratelimit", "Decision"),
    "Limiter": ("dsys.ratelimit", "Limiter"),
    "Bulkhead": ("dsys.resilience", "Bulkhead"),
    "CircuitBreaker": ("dsys.resilience", "CircuitBreaker"),
    "Policy": ("dsys.resilience", "Policy"),
    "Retry": ("dsys.resilience", "Retry"),
    "Timeout": ("dsys.resilience", "Timeout"),
    "BoundedLoadRing": ("dsys.sharding", "BoundedLoadRing"),
    "HashRing": ("dsys.sharding", "HashRing"),
    "RendezvousHash": ("dsys.sharding", "RendezvousHash"),
    "ShardRouter": ("dsys.sharding", "ShardRouter"),
    "jump_hash": ("dsys.sharding", "jump_hash"),
}


def __getattr__(name: str) -> object:
    """Load a lazy re-export on first access and keep it as a module attribute."""
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'dsys' has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
