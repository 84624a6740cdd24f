"""Off-by-default timestamps of the Raft write path, per log index (for benchmarks).

Set ``DSYS_RAFT_TRACE`` to a directory before the process starts: :data:`ENABLED` is
read once at import, the node then records ``(stage, index, peer, time_ns)`` tuples in
memory and :func:`dump` writes them to ``<dir>/<node id>.trace`` (JSON lines) when the
node closes. With the variable unset every hook is one ``if ENABLED:`` on a module
constant. Times are ``time.perf_counter_ns()``: CLOCK_MONOTONIC on Linux, the same clock
in every process of one machine, so stages can be compared across replicas.
``benchmarks/trace_put.py`` reads the files and prints where a put's time goes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from time import perf_counter_ns

ENABLED: bool = bool(os.environ.get("DSYS_RAFT_TRACE"))
"""Whether tracing is on (``DSYS_RAFT_TRACE`` set when this module was imported)."""

_events: list[tuple[str, int, str, int]] = []
_MAX_EVENTS = 2_000_000


def mark(stage: str, index: int, peer: str = "") -> None:
    """Record that ``stage`` happened now for log ``index`` (``peer``: the other end)."""
    if len(_events) < _MAX_EVENTS:
        _events.append((stage, index, peer, perf_counter_ns()))


def dump(node_id: str) -> Path | None:
    """Write the recorded events to ``$DSYS_RAFT_TRACE/<node_id>.trace``; clear them."""
    target = os.environ.get("DSYS_RAFT_TRACE")
    if not ENABLED or not target:
        return None
    path = Path(target) / f"{node_id}.trace"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ev in _events:
            f.write(json.dumps(ev) + "\n")
    _events.clear()
    return path


__all__ = ["ENABLED", "dump", "mark"]
