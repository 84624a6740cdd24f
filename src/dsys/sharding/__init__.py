"""Consistent-hash shard routing: rings, jump hash, rendezvous hashing, bounded loads.

* :class:`HashRing`: virtual nodes, weights, replica preference lists, and a
  uhashring/libketama-compatible mode.
* :func:`jump_hash`: Lamping-Veach jump consistent hash for numbered buckets.
* :class:`RendezvousHash`: weighted highest-random-weight hashing.
* :class:`BoundedLoadRing`: consistent hashing with bounded loads (Mirrokni et al.).
* :class:`ShardRouter`: keys -> fixed shards -> replica nodes, with
  :meth:`ShardRouter.plan_rebalance` returning a :class:`RebalancePlan` of moves.

Everything here is pure (no I/O); ``dsys shard`` is the command-line front end.
"""

from __future__ import annotations

from dsys.sharding.bounded import BoundedLoadRing
from dsys.sharding.jump import jump_hash
from dsys.sharding.rendezvous import RendezvousHash
from dsys.sharding.ring import HashRing, Key, hash_key
from dsys.sharding.router import KeyRange, Move, RebalancePlan, ShardRouter, plan_rebalance

__all__ = [
    "BoundedLoadRing",
    "HashRing",
    "Key",
    "KeyRange",
    "Move",
    "RebalancePlan",
    "RendezvousHash",
    "ShardRouter",
    "hash_key",
    "jump_hash",
    "plan_rebalance",
]
