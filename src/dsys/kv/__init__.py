"""Raft-replicated key-value store: state machine, server, client and CLI.

``KVClient`` is importable from here and from the top-level ``dsys`` package;
``ShardedKVClient`` (the multi-Raft client, :mod:`dsys.kv.sharded`) and its watch
(:mod:`dsys.kv.shardedwatch`) from here.
"""

from __future__ import annotations

from dsys.kv.client import GetResult, KVClient, ScanItem, ScanPage, Watcher
from dsys.kv.fsm import WatchEvent
from dsys.kv.sharded import ShardedKVClient
from dsys.kv.shardedwatch import ShardedWatcher, ShardedWatchEvent

__all__ = [
    "GetResult",
    "KVClient",
    "ScanItem",
    "ScanPage",
    "ShardedKVClient",
    "ShardedWatchEvent",
    "ShardedWatcher",
    "WatchEvent",
    "Watcher",
]
