"""Load-balancing strategies behind one :class:`Picker` interface (pure, seeded).

Theory of operation
-------------------
A picker chooses one endpoint (a string id, usually its base URL) out of the
*eligible* set the pool gives it with :meth:`Picker.update` (healthy, not ejected,
not draining). The pool tells the picker when a request starts and when it
finishes (with its latency and whether it failed); time always arrives as an
argument (``now``), randomness from a ``random.Random(seed)`` the picker owns, so
every pick sequence is reproducible in tests.

========================  ==========================================  ==========
strategy                  rule                                        cost/pick
========================  ==========================================  ==========
``round-robin``           nginx's smooth weighted round robin         O(1)
``random``                weighted random                             O(log n)
``least-outstanding``     fewest in-flight requests per weight        O(log n)
``p2c``                   two random choices, fewer in-flight wins     O(1)
``p2c-ewma``              two random choices, lower peak-EWMA cost     O(1)
``consistent-hash``       hash ring on the request key, bounded load  O(log n)
========================  ==========================================  ==========

Per-pick costs assume a small ``exclude`` set (the endpoints a retry already tried).
Membership changes (:meth:`Picker.update`) may cost O(n) or, for the smooth round
robin, O(total weight); they are rare compared with picks.

Peak EWMA follows Finagle and Linkerd: each endpoint keeps a latency estimate that
jumps up to any slower observation at once (the *peak*) and decays towards faster
ones with time constant ``decay`` seconds; an endpoint's cost is that estimate times
``outstanding + 1``. Failures count as at least ``failure_penalty`` seconds so an
endpoint that fails fast does not attract traffic.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from abc import abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from sortedcontainers import SortedList

from dsys.errors import ConfigError
from dsys.sharding.ring import HashRing

STRATEGIES: tuple[str, ...] = (
    "round-robin",
    "random",
    "least-outstanding",
    "p2c",
    "p2c-ewma",
    "consistent-hash",
)
"""Names accepted by :func:`make_picker` (and ``dsys lb serve --strategy``)."""

MAX_WEIGHT = 1000
"""Largest endpoint weight accepted (weights are integers in 1..MAX_WEIGHT)."""


class Picker(Protocol):
    """What every strategy implements; the pool is its only caller."""

    name: str

    def update(self, endpoints: Mapping[str, int]) -> None:
        """Replace the eligible set: endpoint id -> integer weight in 1..MAX_WEIGHT."""
        ...

    def pick(
        self, *, now: float, key: str | None = None, exclude: Collection[str] = ()
    ) -> str | None:
        """Choose an eligible endpoint not in ``exclude``; ``None`` when there is none.

        Args:
            now: current time in seconds (only time-aware strategies use it).
            key: the request key (consistent hashing only; others ignore it).
            exclude: endpoints not to choose (e.g. the ones a retry already tried).
        """
        ...

    def started(self, endpoint: str, *, now: float) -> None:
        """A request to ``endpoint`` started (call once per successful :meth:`pick`)."""
        ...

    def finished(self, endpoint: str, *, now: float, latency: float, ok: bool) -> None:
        """A request to ``endpoint`` finished after ``latency`` seconds (``ok`` if it worked)."""
        ...

    def outstanding(self, endpoint: str) -> int:
        """Requests started and not yet finished on ``endpoint``."""
        ...


def _check_weights(endpoints: Mapping[str, int]) -> None:
    for ep, w in endpoints.items():
        if not isinstance(w, int) or not 1 <= w <= MAX_WEIGHT:
            raise ConfigError(f"endpoint {ep!r}: weight must be an integer in 1..{MAX_WEIGHT}")


class _Base:
    """Outstanding-request bookkeeping shared by every strategy.

    Counts survive :meth:`update`: a request started on an endpoint that is later
    made ineligible still finishes and decrements its count.
    """

    name = "base"

    def __init__(self) -> None:
        self._weights: dict[str, int] = {}
        self._ids: list[str] = []
        self._pending: dict[str, int] = {}
        self._total = 0  # invariant: == sum(self._pending.values())

    def update(self, endpoints: Mapping[str, int]) -> None:
        """Replace the eligible set: endpoint id -> integer weight in 1..MAX_WEIGHT."""
        _check_weights(endpoints)
        self._weights = dict(endpoints)
        self._ids = sorted(self._weights)
        # Forget idle endpoints that left; keep counts of in-flight ones.
        self._pending = {ep: n for ep, n in self._pending.items() if n > 0 or ep in self._weights}
        self._total = sum(self._pending.values())
        self._rebuild()

    def _rebuild(self) -> None:
        """Recompute strategy-specific structures after the eligible set changed."""

    def started(self, endpoint: str, *, now: float) -> None:
        """A request to ``endpoint`` started."""
        self._pending[endpoint] = self._pending.get(endpoint, 0) + 1
        self._total += 1

    def finished(self, endpoint: str, *, now: float, latency: float, ok: bool) -> None:
        """A request to ``endpoint`` finished."""
        n = self._pending.get(endpoint, 0)
        if n > 0:
            self._pending[endpoint] = n - 1
            self._total -= 1

    def outstanding(self, endpoint: str) -> int:
        """Requests started and not yet finished on ``endpoint``."""
        return self._pending.get(endpoint, 0)

    def _first_allowed(self, exclude: Collection[str]) -> str | None:
        for ep in self._ids:
            if ep not in exclude:
                return ep
        return None


class SmoothWeightedRoundRobin(_Base):
    """nginx's smooth weighted round robin: weights honoured, picks spread evenly.

    With weights ``{a: 5, b: 1, c: 1}`` one cycle is ``a a b a c a a``, never five
    ``a`` in a row. The cycle (length = sum of weights / their gcd, at most
    ``max_cycle``) is computed once per membership change so each pick is O(1); a
    larger cycle falls back to an earliest-deadline-first heap (O(log n), same
    long-run shares).

    Args:
        max_cycle: largest precomputed schedule length.
    """

    name = "round-robin"

    def __init__(self, *, max_cycle: int = 1 << 16) -> None:
        super().__init__()
        self._max_cycle = max_cycle
        self._cycle: list[str] = []
        self._pos = 0
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0

    def _rebuild(self) -> None:
        self._cycle, self._heap, self._pos = [], [], 0
        if not self._ids:
            return
        weights = [self._weights[ep] for ep in self._ids]
        g = 0
        for w in weights:
            g = math.gcd(g, w)
        length = sum(weights) // g
        if length * len(weights) <= self._max_cycle * 4 and length <= self._max_cycle:
            current = [0] * len(weights)
            total = sum(weights)
            for _ in range(length):
                best = 0
                for i, w in enumerate(weights):
                    current[i] += w
                    if current[i] > current[best]:
                        best = i
                current[best] -= total
                self._cycle.append(self._ids[best])
        else:
            self._heap = [
                (1.0 / w, i, ep) for i, (ep, w) in enumerate(zip(self._ids, weights, strict=True))
            ]
            heapq.heapify(self._heap)
            self._seq = len(self._heap)

    def pick(
        self, *, now: float, key: str | None = None, exclude: Collection[str] = ()
    ) -> str | None:
        """Next endpoint in the smooth weighted order, skipping ``exclude``."""
        if self._cycle:
            n = len(self._cycle)
            for _ in range(n):
                ep = self._cycle[self._pos]
                self._pos = self._pos + 1 if self._pos + 1 < n else 0
                if ep not in exclude:
                    return ep
            return None
        skipped: list[tuple[float, int, str]] = []
        chosen: str | None = None
        while self._heap:
            deadline, seq, ep = heapq.heappop(self._heap)
            self._seq += 1
            heapq.heappush(self._heap, (deadline + 1.0 / self._weights[ep], self._seq, ep))
            if ep not in exclude:
                chosen = ep
                break
            skipped.append((deadline, seq, ep))
            if len(skipped) >= len(self._heap):
                break
        return chosen


class WeightedRandom(_Base):
    """Pick at random in proportion to weight (bisect over cumulative weights).

    Args:
        seed: seed of the picker's own ``random.Random``.
    """

    name = "random"

    def __init__(self, *, seed: int | None = None) -> None:
        super().__init__()
        self._rng = random.Random(seed)
        self._cum: list[int] = []

    def _rebuild(self) -> None:
        total, self._cum = 0, []
        for ep in self._ids:
            total += self._weights[ep]
            self._cum.append(total)

    def pick(
        self, *, now: float, key: str | None = None, exclude: Collection[str] = ()
    ) -> str | None:
        """A weighted random endpoint not in ``exclude``."""
        if not self._cum:
            return None
        for _ in range(4 + len(exclude)):
            r = self._rng.randrange(self._cum[-1])
            ep = self._ids[bisect.bisect_right(self._cum, r)]
            if ep not in exclude:
                return ep
        return self._first_allowed(exclude)


class LeastOutstanding(_Base):
    """Pick the endpoint with the fewest in-flight requests per unit of weight.

    Endpoints are kept in a sorted list by ``(outstanding / weight, last pick)``, so
    ties go to the endpoint picked longest ago and a pick is O(log n).
    """

    name = "least-outstanding"

    def __init__(self) -> None:
        super().__init__()
        self._order: SortedList = SortedList()
        self._keys: dict[str, tuple[float, int, str]] = {}
        self._tick = 0

    def _key(self, ep: str, stamp: int) -> tuple[float, int, str]:
        return (self._pending.get(ep, 0) / self._weights[ep], stamp, ep)

    def _rebuild(self) -> None:
        old = self._keys
        self._keys = {ep: self._key(ep, old[ep][1] if ep in old else 0) for ep in self._ids}
        self._order = SortedList(self._keys.values())

    def _reposition(self, ep: str, stamp: int | None = None) -> None:
        old = self._keys.get(ep)
        if old is None:
            return
        self._order.remove(old)
        new = self._key(ep, old[1] if stamp is None else stamp)
        self._keys[ep] = new
        self._order.add(new)

    def pick(
        self, *, now: float, key: str | None = None, exclude: Collection[str] = ()
    ) -> str | None:
        """The least-loaded endpoint not in ``exclude``."""
        for entry in self._order:
            if entry[2] not in exclude:
                return str(entry[2])
        return None

    def started(self, endpoint: str, *, now: float) -> None:
        """Count the request and move ``endpoint`` in the load order."""
        super().started(endpoint, now=now)
        self._tick += 1
        self._reposition(endpoint, self._tick)

    def finished(self, endpoint: str, *, now: float, latency: float, ok: bool) -> None:
        """Uncount the request and move ``endpoint`` in the load order."""
        super().finished(endpoint, now=now, latency=latency, ok=ok)
        self._reposition(endpoint)


class _TwoChoices(_Base):
    """Power of two random choices: sample two distinct endpoints, keep the cheaper."""

    def __init__(self, *, seed: int | None = None) -> None:
        super().__init__()
        self._rng = random.Random(seed)

    @abstractmethod
    def _cost(self, ep: str, now: float) -> float:
        """The endpoint's cost now; lower wins."""

    def pick(
        self, *, now: float, key: str | None = None, exclude: Collection[str] = ()
    ) -> str | None:
        """The cheaper of two distinct random endpoints not in ``exclude``."""
        ids = self._ids
        n = len(ids)
        if n == 0:
            return None
        if n == 1:
            return ids[0] if ids[0] not in exclude else None
        rnd = self._rng.random
        for _ in range(4 + len(exclude)):
            i = int(rnd() * n)  # cheaper than randrange, and as uniform for small n
            j = int(rnd() * (n - 1))
            if j >= i:
                j += 1
            a, b = ids[i], ids[j]
            if a in exclude:
                if b in exclude:
                    continue
                return b
            if b in exclude:
                return a
            return a if self._cost(a, now) <= self._cost(b, now) else b
        allowed = [ep for ep in ids if ep not in exclude]
        if not allowed:
            return None
        return min(allowed, key=lambda ep: self._cost(ep, now))


class P2CLeastOutstanding(_TwoChoices):
    """Power of two choices over outstanding requests per unit of weight.

    Args:
        seed: seed of the picker's own ``random.Random``.
    """

    name = "p2c"

    def _cost(self, ep: str, now: float) -> float:
        return self._pending.get(ep, 0) / self._weights[ep]


@dataclass(slots=True)
class _Ewma:
    cost: float  # seconds; invariant: >= 0
    stamp: float  # time of the last observation


class PeakEwma(_TwoChoices):
    """Peak-EWMA latency with power of two choices, as in Finagle and Linkerd.

    An endpoint's cost is its latency estimate times ``outstanding + 1``. An endpoint
    that has not answered yet costs nothing while idle (so a new endpoint gets a
    first request at once) and ``failure_penalty`` per request while its first
    answers are outstanding (so it is not flooded before anything is known).

    Args:
        seed: seed of the picker's own ``random.Random``.
        decay: time constant (seconds) of the moving average. Finagle and Linkerd
            use 10 s; dsys defaults to 2 s so that a one-off hiccup of a fast
            endpoint (a busy host, a GC pause) stops counting against it quickly.
        failure_penalty: a failed request counts as at least this many seconds.
    """

    name = "p2c-ewma"

    def __init__(
        self,
        *,
        seed: int | None = None,
        decay: float = 2.0,
        failure_penalty: float = 0.5,
    ) -> None:
        super().__init__(seed=seed)
        if decay <= 0 or failure_penalty < 0:
            raise ConfigError("decay must be > 0 and failure_penalty >= 0")
        self._decay = decay
        self._penalty = failure_penalty
        self._ewma: dict[str, _Ewma] = {}

    def _rebuild(self) -> None:
        self._ewma = {ep: e for ep, e in self._ewma.items() if ep in self._weights}

    def latency_estimate(self, endpoint: str, now: float) -> float | None:
        """The endpoint's peak-EWMA latency estimate in seconds (``None``: no answer yet)."""
        e = self._ewma.get(endpoint)
        if e is None:
            return None
        td = now - e.stamp
        if td <= 0:
            return e.cost
        return e.cost * math.exp(-td / self._decay)

    def _cost(self, ep: str, now: float) -> float:
        pending = self._pending.get(ep, 0)
        est = self.latency_estimate(ep, now)
        if est is None:
            est = self._penalty if pending else 0.0
        return est * (pending + 1) / self._weights[ep]

    def finished(self, endpoint: str, *, now: float, latency: float, ok: bool) -> None:
        """Uncount the request and fold its latency into the endpoint's peak EWMA."""
        super().finished(endpoint, now=now, latency=latency, ok=ok)
        rtt = latency if ok else max(latency, self._penalty)
        e = self._ewma.get(endpoint)
        if e is None:
            if endpoint in self._weights:
                self._ewma[endpoint] = _Ewma(cost=rtt, stamp=now)
            return
        td = max(now - e.stamp, 0.0)
        if rtt > e.cost:
            e.cost = rtt  # the peak: slower news is believed at once
        else:
            w = math.exp(-td / self._decay)
            e.cost = e.cost * w + rtt * (1.0 - w)
        e.stamp = max(now, e.stamp)


class ConsistentHash(_Base):
    """Consistent hashing on the request key with bounded loads.

    The same key goes to the same endpoint while it is eligible, and membership
    changes move only about 1/n of the keys. With bounded loads (Mirrokni et al.,
    as in HAProxy's ``hash-balance-factor``) an endpoint already holding
    ``ceil(load_factor * (in_flight + 1) / n)`` requests is passed over for the next
    one on the ring. Requests without a key go to the least-loaded endpoint.

    The ring is :class:`dsys.sharding.HashRing` (virtual nodes proportional to
    weight); a pick is a bisect (O(log n)) plus a walk that is short unless most
    endpoints are at their bound.

    Args:
        load_factor: ``c`` >= 1 in the bound above; ``math.inf`` disables it.
        vnodes: ring points per unit of weight.
    """

    name = "consistent-hash"

    def __init__(self, *, load_factor: float = 1.25, vnodes: int = 160) -> None:
        super().__init__()
        if not load_factor >= 1.0:
            raise ConfigError(f"load_factor must be >= 1 (got {load_factor})")
        if vnodes < 1:
            raise ConfigError(f"vnodes must be >= 1 (got {vnodes})")
        self._factor = load_factor
        self._vnodes = vnodes
        self._ring = HashRing(vnodes=vnodes)

    def _rebuild(self) -> None:
        self._ring = HashRing(self._weights, vnodes=self._vnodes)

    def owner(self, key: str) -> str | None:
        """The endpoint ``key`` maps to when loads are ignored."""
        return self._ring.get(key) if self._ids else None

    def pick(
        self, *, now: float, key: str | None = None, exclude: Collection[str] = ()
    ) -> str | None:
        """The first endpoint on the ring after ``key`` that is under the load bound."""
        n = len(self._ids)
        if n == 0:
            return None
        if key is None:
            allowed = [ep for ep in self._ids if ep not in exclude]
            return min(allowed, key=self.outstanding) if allowed else None
        if math.isinf(self._factor):
            bound = math.inf
        else:
            bound = math.ceil(self._factor * (self._total + 1) / n)
        fallback: str | None = None
        for ep in self._ring.iter_owners(key):
            if ep in exclude:
                continue
            if self._pending.get(ep, 0) < bound:
                return ep
            if fallback is None:
                fallback = ep
        return fallback


def make_picker(strategy: str, *, seed: int | None = None, decay: float = 2.0) -> Picker:
    """Build the picker named ``strategy`` (one of :data:`STRATEGIES`).

    Args:
        strategy: the strategy's name.
        seed: seed for randomized strategies.
        decay: time constant of the peak-EWMA average (``p2c-ewma`` only).

    Raises:
        ConfigError: the name is unknown.
    """
    if strategy == "round-robin":
        return SmoothWeightedRoundRobin()
    if strategy == "random":
        return WeightedRandom(seed=seed)
    if strategy == "least-outstanding":
        return LeastOutstanding()
    if strategy == "p2c":
        return P2CLeastOutstanding(seed=seed)
    if strategy == "p2c-ewma":
        return PeakEwma(seed=seed, decay=decay)
    if strategy == "consistent-hash":
        return ConsistentHash()
    raise ConfigError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


__all__ = [
    "MAX_WEIGHT",
    "STRATEGIES",
    "ConsistentHash",
    "LeastOutstanding",
    "P2CLeastOutstanding",
    "PeakEwma",
    "Picker",
    "SmoothWeightedRoundRobin",
    "WeightedRandom",
    "make_picker",
]
