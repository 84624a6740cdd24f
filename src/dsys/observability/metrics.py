"""Per-component prometheus metrics with a registry per server instance.

Each server owns a :class:`Metrics` with its own ``CollectorRegistry`` so that many
servers (or tests) can live in one process without name clashes. Names follow
``dsys_<component>_<what>_<unit>``::

    m = Metrics("raft")
    elections = m.counter("elections_total", "Elections started")
    term = m.gauge("term", "Current term")
    text = m.render()   # Prometheus exposition format
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The Content-Type header value of the Prometheus text exposition format."""

DEFAULT_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Histogram buckets in seconds suited to request latencies on a LAN."""


class Metrics:
    """A set of prometheus metrics named ``dsys_<component>_*`` in their own registry.

    Args:
        component: the building block's name, e.g. ``"kv"`` or ``"pubsub"``.
        registry: share a registry between components; a new one by default.
    """

    def __init__(self, component: str, registry: CollectorRegistry | None = None) -> None:
        self.component = component
        self.registry = registry if registry is not None else CollectorRegistry()

    def _name(self, name: str) -> str:
        return f"dsys_{self.component}_{name}"

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """Create a counter ``dsys_<component>_<name>`` (name should end in ``_total``)."""
        return Counter(self._name(name), doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        """Create a gauge ``dsys_<component>_<name>``."""
        return Gauge(self._name(name), doc, list(labels), registry=self.registry)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
    ) -> Histogram:
        """Create a histogram ``dsys_<component>_<name>`` (seconds by default)."""
        return Histogram(
            self._name(name), doc, list(labels), registry=self.registry, buckets=list(buckets)
        )

    def render(self) -> bytes:
        """The registry's metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "DEFAULT_LATENCY_BUCKETS", "Metrics"]
