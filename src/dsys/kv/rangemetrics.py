"""Per-range metrics of a multi-Raft node on ``/metrics`` (label ``range``).

:class:`RangeCollector` is ONE prometheus-client collector for every local group: it
builds the series at scrape time from the groups the node runs *now*, so a range that
left the node (merged away, moved) has no series any more, the label cardinality is
bounded by the local ranges, and a scrape costs one pass over them (no per-range
registry or collector). It yields:

* ``dsys_kv_range_*{range="ID"}`` for every local data range (keys, bytes, epoch, load);
* ``dsys_raft_*{range="ID"}`` for every local Raft group, the metadata range (``"0"``)
  included: the single-group server's ``dsys_raft_*`` gauges and counters, labelled by
  range (term, leadership, commit/applied/last/snapshot index, elections). The shared
  WAL's size is one figure for all groups (``/v1/status``);
* ``dsys_kv_placement_down_nodes`` and ``dsys_kv_placement_repairs_total``: the placement
  loop's down nodes and the replicas it replaced (non-zero on the metadata leader).

:class:`RangeSizes` caches each range's size in bytes (an O(keys) sum), recomputed at
most once per ``max_age`` seconds and only after the range applied something.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dsys.kv.rangefsm import RangeStateMachine

if TYPE_CHECKING:
    from dsys.kv.multi import Group, MultiRaftServer
    from dsys.kv.multimerge import RangeUpkeep

_PREFIX = "dsys_kv_range_"
_RAFT = "dsys_raft_"

_Get = Callable[["MultiRaftServer", "Group", float], float]


def _keys(s: MultiRaftServer, g: Group, now: float) -> float:
    return len(g.fsm) if isinstance(g.fsm, RangeStateMachine) else 0


def _bytes(s: MultiRaftServer, g: Group, now: float) -> float:
    sizes: RangeSizes = s.sizes
    return sizes.get(g, now)


def _qps(s: MultiRaftServer, g: Group, now: float) -> float:
    upkeep: RangeUpkeep = s.upkeep
    return upkeep.qps(g.range_id, now)


def _merging(s: MultiRaftServer, g: Group, now: float) -> float:
    upkeep: RangeUpkeep = s.upkeep
    return float(upkeep.frozen(g))


# (name, help, value) of the gauges of a data range
_RANGE_GAUGES: tuple[tuple[str, str, _Get], ...] = (
    ("keys", "Keys in the local replica", _keys),
    ("bytes", "Bytes of keys and values in the local replica", _bytes),
    ("is_leader", "1 when this node leads the range", lambda s, g, t: float(g.node.is_leader)),
    ("epoch_conf_ver", "The range's epoch conf_ver", lambda s, g, t: g.desc.epoch.conf_ver),
    ("epoch_version", "The range's epoch version", lambda s, g, t: g.desc.epoch.version),
    ("applied_index", "Last log index applied here", lambda s, g, t: g.node.applied_index),
    ("requests_per_second", "Requests served here per second over the load window", _qps),
    ("merging", "1 while the range is frozen by a merge", _merging),
    ("quiet", "1 while the group is quiet (quiet ticks)", lambda s, g, t: float(g.node.quiet)),
)

# (name, help, value) of the Raft gauges of any group
_RAFT_GAUGES: tuple[tuple[str, str, _Get], ...] = (
    ("term", "Current Raft term", lambda s, g, t: g.node.core.term),
    ("is_leader", "1 when this node is the leader", lambda s, g, t: float(g.node.is_leader)),
    ("commit_index", "Highest log index known committed", lambda s, g, t: g.node.core.commit_index),
    ("applied_index", "Last applied log index", lambda s, g, t: g.node.applied_index),
    ("last_index", "Last log index", lambda s, g, t: g.node.core.last_index),
    ("snapshot_index", "Index of the latest snapshot", lambda s, g, t: g.node.snapshot_index),
)


class RangeSizes:
    """Bytes per local data range, recomputed at most every ``max_age`` seconds.

    Args:
        max_age: seconds a computed size is reused while the range applies writes.
    """

    def __init__(self, max_age: float = 1.0) -> None:
        self.max_age = max_age
        self._cache: dict[int, tuple[float, int, int]] = {}  # range -> (at, applied, bytes)

    def get(self, g: Group, now: float) -> int:
        """Range ``g``'s size in bytes (0 for the metadata range)."""
        fsm = g.fsm
        if not isinstance(fsm, RangeStateMachine):
            return 0
        hit = self._cache.get(g.range_id)
        applied = g.node.applied_index
        if hit is not None and (hit[1] == applied or now - hit[0] < self.max_age):
            return hit[2]
        size = fsm.size_bytes()
        self._cache[g.range_id] = (now, applied, size)
        return size

    def keep(self, range_ids: Iterable[int]) -> None:
        """Forget the ranges not in ``range_ids`` (they left the node)."""
        keep = set(range_ids)
        self._cache = {r: v for r, v in self._cache.items() if r in keep}


class RangeCollector(Collector):
    """Collects ``dsys_kv_range_*`` and ``dsys_raft_*`` with a ``range`` label for every
    local group (see the module docstring).

    Args:
        server: the node whose ranges are reported.
    """

    def __init__(self, server: MultiRaftServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        """The families (called by the registry at scrape time)."""
        s = self.server
        now = time.monotonic()
        data = [g for g in s.data_groups() if isinstance(g.fsm, RangeStateMachine)]
        groups = sorted(s.groups.values(), key=lambda g: g.range_id)
        s.sizes.keep(g.range_id for g in data)
        yield from _gauges(_PREFIX, _RANGE_GAUGES, s, data, now)
        requests = CounterMetricFamily(
            _PREFIX + "requests", "Requests served here (as the range's leader)", labels=["range"]
        )
        for g in data:
            load = s.upkeep.loads.get(g.range_id)
            requests.add_metric([str(g.range_id)], load.total if load is not None else 0)
        yield requests
        yield from _gauges(_RAFT, _RAFT_GAUGES, s, groups, now)
        elections = CounterMetricFamily(
            _RAFT + "elections", "Elections this replica started", labels=["range"]
        )
        for g in groups:
            elections.add_metric([str(g.range_id)], g.node.elections)
        yield elections
        # the placement loop's view (non-zero on the metadata leader only)
        yield GaugeMetricFamily(
            "dsys_kv_placement_down_nodes",
            "Nodes the placement loop found down (silent for down_after seconds)",
            value=len(s.down_nodes),
        )
        yield CounterMetricFamily(
            "dsys_kv_placement_repairs",
            "Replicas on down nodes replaced on live ones, as the metadata leader",
            value=s.repairs,
        )


def _gauges(
    prefix: str,
    table: tuple[tuple[str, str, _Get], ...],
    server: MultiRaftServer,
    groups: list[Group],
    now: float,
) -> Iterator[Metric]:
    """One gauge family per row of ``table``, one series per group."""
    for name, doc, value in table:
        fam = GaugeMetricFamily(prefix + name, doc, labels=["range"])
        for g in groups:
            fam.add_metric([str(g.range_id)], float(value(server, g, now)))
        yield fam


__all__ = ["RangeCollector", "RangeSizes"]
