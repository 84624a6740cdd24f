"""Per-range metrics of a multi-Raft node on ``/metrics`` (label ``range``).

:class:`RangeCollector` is a prometheus-client collector: it builds the series at scrape
time from the ranges the node runs *now*, so a range that left the node (merged away,
moved) has no series any more, and the label cardinality is bounded by the local ranges.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dsys.kv.rangefsm import RangeStateMachine

if TYPE_CHECKING:
    from dsys.kv.multi import MultiRaftServer

_PREFIX = "dsys_kv_range_"


class RangeCollector(Collector):
    """Collects ``dsys_kv_range_*{range="ID"}`` for every local data range.

    Args:
        server: the node whose ranges are reported.
    """

    def __init__(self, server: MultiRaftServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        """The range families (called by the registry at scrape time)."""
        s = self.server
        now = time.monotonic()
        fams = {
            "keys": GaugeMetricFamily(
                _PREFIX + "keys", "Keys in the local replica", labels=["range"]
            ),
            "bytes": GaugeMetricFamily(
                _PREFIX + "bytes", "Bytes of keys and values in the local replica", labels=["range"]
            ),
            "leader": GaugeMetricFamily(
                _PREFIX + "is_leader", "1 when this node leads the range", labels=["range"]
            ),
            "conf_ver": GaugeMetricFamily(
                _PREFIX + "epoch_conf_ver", "The range's epoch conf_ver", labels=["range"]
            ),
            "version": GaugeMetricFamily(
                _PREFIX + "epoch_version", "The range's epoch version", labels=["range"]
            ),
            "applied": GaugeMetricFamily(
                _PREFIX + "applied_index", "Last log index applied here", labels=["range"]
            ),
            "qps": GaugeMetricFamily(
                _PREFIX + "requests_per_second",
                "Requests served here per second over the load window",
                labels=["range"],
            ),
            "frozen": GaugeMetricFamily(
                _PREFIX + "merging", "1 while the range is frozen by a merge", labels=["range"]
            ),
            "quiet": GaugeMetricFamily(
                _PREFIX + "quiet", "1 while the group is quiet here (quiet ticks)", labels=["range"]
            ),
        }
        requests = CounterMetricFamily(
            _PREFIX + "requests", "Requests served here (as the range's leader)", labels=["range"]
        )
        for g in s.data_groups():
            fsm = g.fsm
            if not isinstance(fsm, RangeStateMachine):
                continue
            label = [str(g.range_id)]
            d = g.desc
            load = s.upkeep.loads.get(g.range_id)
            fams["keys"].add_metric(label, len(fsm))
            fams["bytes"].add_metric(label, fsm.size_bytes())
            fams["leader"].add_metric(label, 1.0 if g.node.is_leader else 0.0)
            fams["conf_ver"].add_metric(label, d.epoch.conf_ver)
            fams["version"].add_metric(label, d.epoch.version)
            fams["applied"].add_metric(label, g.node.applied_index)
            fams["qps"].add_metric(label, load.qps(now) if load is not None else 0.0)
            fams["frozen"].add_metric(label, 1.0 if s.upkeep.frozen(g) else 0.0)
            fams["quiet"].add_metric(label, 1.0 if g.node.quiet else 0.0)
            requests.add_metric(label, load.total if load is not None else 0)
        yield from fams.values()
        yield requests


__all__ = ["RangeCollector"]
