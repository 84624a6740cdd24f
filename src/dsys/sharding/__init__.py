"""Consistent-hash shard routing: rings, jump hash, rendezvous hashing, bounded loads.

``HashRing`` maps keys to nodes with virtual nodes, weights and replica preference
lists (with a uhashring/libketama-compatible mode).
"""

from __future__ import annotations

from dsys.sharding.ring import HashRing, Key

__all__ = ["HashRing", "Key"]
