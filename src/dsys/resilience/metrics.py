"""Prometheus metrics of breakers, bulkheads and retries, read at scrape time.

Breakers, bulkheads and retries count in plain ints; one collector per registry reads
them when Prometheus scrapes, so the per-call cost of metrics is nothing. Objects are
held weakly (reported while alive) and aggregated by name (two breakers named
``"inventory"`` add up; the state gauge then counts breakers per state)::

    dsys_resilience_breaker_state{breaker, state}            1 for the current state
    dsys_resilience_breaker_calls_total{breaker, outcome}    successful|failed|slow|rejected|ignored
    dsys_resilience_breaker_transitions_total{breaker, from_state, to_state}
    dsys_resilience_bulkhead_active{bulkhead} / _waiting{bulkhead}
    dsys_resilience_bulkhead_rejected_total{bulkhead} / _completed_total{bulkhead}
    dsys_resilience_retry_retries_total{retry} / _gave_up_total{retry}
    dsys_resilience_retry_budget_denied_total{retry}
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dsys.errors import ConfigError
from dsys.observability import Metrics
from dsys.resilience.breaker_core import BreakerState

if TYPE_CHECKING:
    from dsys.resilience.breaker import CircuitBreaker
    from dsys.resilience.bulkhead import Bulkhead
    from dsys.resilience.retry import Retry

DEFAULT_REGISTRY = CollectorRegistry()
"""The registry breakers, bulkheads and retries report to when given no ``metrics``."""

_OUTCOMES = ("successful", "failed", "slow", "rejected", "ignored")


class ResilienceCollector(Collector):
    """Reads the counters of every live breaker, bulkhead and retry of one registry."""

    def __init__(self) -> None:
        self.breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
        self.bulkheads: weakref.WeakSet[Bulkhead] = weakref.WeakSet()
        self.retries: weakref.WeakSet[Retry] = weakref.WeakSet()

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the metric names appear with the first object."""
        return []

    def collect(self) -> Iterable[Metric]:
        """Build the metric families from the objects' counters."""
        return [*self._breakers(), *self._bulkheads(), *self._retries()]

    def _breakers(self) -> list[Metric]:
        states: defaultdict[tuple[str, str], float] = defaultdict(float)
        calls: defaultdict[tuple[str, str], float] = defaultdict(float)
        moves: defaultdict[tuple[str, str, str], float] = defaultdict(float)
        for b in list(self.breakers):
            core = b._core
            for s in BreakerState:
                states[b.name, s.value] += 1.0 if core.state is s else 0.0
            values = (
                core.calls_successful,
                core.calls_failed,
                core.calls_slow,
                core.calls_rejected,
                core.calls_ignored,
            )
            for outcome, count in zip(_OUTCOMES, values, strict=True):
                calls[b.name, outcome] += count
            for (frm, to), n in list(core.transitions.items()):
                moves[b.name, frm.value, to.value] += n
        state = GaugeMetricFamily(
            "dsys_resilience_breaker_state",
            "Breakers of this name in this state (1 for the current state of one breaker)",
            labels=["breaker", "state"],
        )
        total = CounterMetricFamily(
            "dsys_resilience_breaker_calls",
            "Calls by outcome (slow calls are also counted as successful or failed)",
            labels=["breaker", "outcome"],
        )
        transitions = CounterMetricFamily(
            "dsys_resilience_breaker_transitions",
            "State transitions",
            labels=["breaker", "from_state", "to_state"],
        )
        for key, v in states.items():
            state.add_metric(list(key), v)
        for key, v in calls.items():
            total.add_metric(list(key), v)
        for key3, v in moves.items():
            transitions.add_metric(list(key3), v)
        return [state, total, transitions]

    def _bulkheads(self) -> list[Metric]:
        sums: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
        for b in list(self.bulkheads):
            row = sums[b.name]
            row[0] += b.active
            row[1] += b.waiting
            row[2] += b.rejected
            row[3] += b.completed
        families: list[Metric] = [
            GaugeMetricFamily(
                "dsys_resilience_bulkhead_active", "Calls holding a slot", labels=["bulkhead"]
            ),
            GaugeMetricFamily(
                "dsys_resilience_bulkhead_waiting", "Calls waiting for a slot", labels=["bulkhead"]
            ),
            CounterMetricFamily(
                "dsys_resilience_bulkhead_rejected",
                "Calls refused (full, or waited too long)",
                labels=["bulkhead"],
            ),
            CounterMetricFamily(
                "dsys_resilience_bulkhead_completed",
                "Calls that held a slot and finished",
                labels=["bulkhead"],
            ),
        ]
        for name, row in sums.items():
            for family, value in zip(families, row, strict=True):
                family.add_metric([name], value)  # type: ignore[attr-defined]
        return families

    def _retries(self) -> list[Metric]:
        sums: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for r in list(self.retries):
            row = sums[r.name]
            row[0] += r.retries
            row[1] += r.gave_up
            row[2] += r.budget_denied
        families: list[Metric] = [
            CounterMetricFamily("dsys_resilience_retry_retries", "Retries made", labels=["retry"]),
            CounterMetricFamily(
                "dsys_resilience_retry_gave_up",
                "Calls that failed after retrying stopped",
                labels=["retry"],
            ),
            CounterMetricFamily(
                "dsys_resilience_retry_budget_denied",
                "Retries refused by the retry budget",
                labels=["retry"],
            ),
        ]
        for name, row in sums.items():
            for family, value in zip(families, row, strict=True):
                family.add_metric([name], value)  # type: ignore[attr-defined]
        return families


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, ResilienceCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def collector_for(metrics: Metrics | CollectorRegistry | None) -> ResilienceCollector:
    """The collector of ``metrics``' registry (default :data:`DEFAULT_REGISTRY`), created once.

    Raises:
        ConfigError: ``metrics`` is neither a ``Metrics``, a registry nor ``None``.
    """
    if metrics is None:
        registry = DEFAULT_REGISTRY
    elif isinstance(metrics, Metrics):
        registry = metrics.registry
    elif isinstance(metrics, CollectorRegistry):
        registry = metrics
    else:
        raise ConfigError(f"metrics must be a Metrics or a CollectorRegistry, got {metrics!r}")
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = ResilienceCollector()
            registry.register(collector)
            _collectors[registry] = collector
        return collector


__all__ = ["DEFAULT_REGISTRY", "ResilienceCollector", "collector_for"]
