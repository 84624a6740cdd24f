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

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

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

    def request_stats(
        self,
        count_name: str,
        count_doc: str,
        latency_name: str,
        latency_doc: str,
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
        labels: tuple[str, str] = ("op", "status"),
    ) -> RequestStats:
        """Create a :class:`RequestStats` registered in this registry."""
        stats = RequestStats(
            self._name(count_name),
            count_doc,
            self._name(latency_name),
            latency_doc,
            buckets,
            labels,
        )
        self.registry.register(stats)
        return stats

    def fast_histogram(
        self, name: str, doc: str, buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS
    ) -> FastHistogram:
        """Create a :class:`FastHistogram` ``dsys_<component>_<name>`` in this registry."""
        hist = FastHistogram(self._name(name), doc, buckets)
        self.registry.register(hist)
        return hist

    def render(self) -> bytes:
        """The registry's metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class RequestStats(Collector):
    """Requests by ``op`` and ``status`` and their latency, cheap enough for every request.

    (``labels`` renames the two labels, e.g. ``("endpoint", "code")`` for a proxy.)

    Exports the same series as a ``Counter`` labelled ``(op, status)`` plus a
    ``Histogram`` labelled ``(op,)``, but :meth:`observe` is a few dict and list updates
    without locks or label lookups (prometheus-client's objects lock on every update).
    Only for code running on one event loop, with scrapes served by that loop.
    """

    def __init__(
        self,
        count_name: str,
        count_doc: str,
        latency_name: str,
        latency_doc: str,
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
        labels: tuple[str, str] = ("op", "status"),
    ) -> None:
        self._labels = labels
        self._count_name = count_name.removesuffix("_total")
        self._count_doc = count_doc
        self._latency_name = latency_name
        self._latency_doc = latency_doc
        self._bounds = sorted(buckets)
        self._counts: dict[tuple[str, str], int] = {}
        self._hist: dict[str, list[float]] = {}  # per-bucket counts, +Inf, then the sum

    def observe(self, op: str, status: int | str, seconds: float, n: int = 1) -> None:
        """Count ``n`` requests of ``op`` that ended with ``status`` after ``seconds``."""
        key = (op, str(status))
        counts = self._counts
        counts[key] = counts.get(key, 0) + n
        h = self._hist.get(op)
        if h is None:
            h = self._hist[op] = [0.0] * (len(self._bounds) + 2)
        h[bisect_left(self._bounds, seconds)] += n
        h[-1] += seconds * n

    def collect(self) -> Iterator[Metric]:
        """The counter and histogram families (called by the registry at scrape time)."""
        key, status_label = self._labels
        count = CounterMetricFamily(self._count_name, self._count_doc, labels=[key, status_label])
        for (op, status), n in sorted(self._counts.items()):
            count.add_metric([op, status], n)
        yield count
        latency = HistogramMetricFamily(self._latency_name, self._latency_doc, labels=[key])
        for op, h in sorted(self._hist.items()):
            latency.add_metric([op], _cumulative(self._bounds, h), sum_value=h[-1])
        yield latency


class FastHistogram(Collector):
    """An unlabelled histogram whose :meth:`observe` takes no lock.

    Exports what a prometheus-client ``Histogram`` exports (buckets, count, sum), for code
    on one event loop that observes on every round of a hot loop.
    """

    def __init__(
        self, name: str, doc: str, buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS
    ) -> None:
        self._name = name
        self._doc = doc
        self._bounds = sorted(buckets)
        self._h = [0.0] * (len(self._bounds) + 2)  # per-bucket counts, +Inf, then the sum

    def observe(self, value: float) -> None:
        """Record one observation."""
        h = self._h
        h[bisect_left(self._bounds, value)] += 1
        h[-1] += value

    def collect(self) -> Iterator[Metric]:
        """The histogram family (called by the registry at scrape time)."""
        family = HistogramMetricFamily(self._name, self._doc, labels=[])
        family.add_metric([], _cumulative(self._bounds, self._h), sum_value=self._h[-1])
        yield family


def _cumulative(bounds: Sequence[float], h: Sequence[float]) -> list[tuple[str, float]]:
    """Prometheus' cumulative ``(le, count)`` pairs from per-bucket counts (+ a sum)."""
    cumulative, out = 0.0, []
    for bound, hits in zip([*(repr(float(b)) for b in bounds), "+Inf"], h[:-1], strict=True):
        cumulative += hits
        out.append((bound, cumulative))
    return out


__all__ = ["CONTENT_TYPE", "DEFAULT_LATENCY_BUCKETS", "FastHistogram", "Metrics", "RequestStats"]
