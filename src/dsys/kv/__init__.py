"""Raft-replicated key-value store: state machine, server, client and CLI.

``KVClient`` is importable from here and from the top-level ``dsys`` package.
"""

from __future__ import annotations

from dsys.kv.client import GetResult, KVClient, ScanItem, ScanPage, Watcher
from dsys.kv.fsm import WatchEvent

__all__ = ["GetResult", "KVClient", "ScanItem", "ScanPage", "WatchEvent", "Watcher"]
