"""Load of the ranges: requests per second and sampled keys, for splits by load and
merges of cold neighbours (pure: no I/O, no clock, no asyncio).

Theory of operation
-------------------
A :class:`RangeLoad` counts the requests one range's leader served in per-second buckets
over a sliding window (TiKV's load-based split looks at 10 s of QPS, and splits past
3000) and keeps a reservoir sample of their keys (Vitter's algorithm R, seeded, so a
test replays it). :meth:`RangeLoad.split_key` picks the **median** of the sampled keys:
about half of the sampled requests fall on each side. A key that would leave less than
``min_side`` of the sample on either side (one hot key, say) is no split key: splitting
there would not share the load (TiKV refuses such keys too).

:func:`plan_merge` picks, among a node's ranges in key order, one pair of neighbours
that stayed small and cold for a while and may merge (see its docstring).

Time is an argument (``now``, seconds on any monotonic clock).
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dsys.errors import ConfigError
from dsys.kv.ranges import RangeDescriptor


class RangeLoad:
    """Requests to one range over a sliding window, and a sample of their keys.

    Args:
        window: seconds of history (QPS = requests in the window / window).
        sample_size: keys kept in the reservoir.
        seed: seed of the reservoir's random choices.
    """

    def __init__(self, *, window: float = 10.0, sample_size: int = 512, seed: int = 0) -> None:
        if window <= 0 or sample_size < 1:
            raise ConfigError("window must be > 0 and sample_size >= 1")
        self.window = window
        self.sample_size = sample_size
        self._rng = random.Random(seed)
        self._buckets: deque[list[int]] = deque()  # [second, count], oldest first
        self._sample: list[str] = []
        self._seen = 0  # requests offered to the reservoir since the last reset
        self._since: float | None = None  # when the sample started
        self.total = 0
        """Requests recorded since the range was created here (a counter)."""

    def record(self, key: str, now: float) -> None:
        """Count one request for ``key`` at ``now``."""
        self.total += 1
        sec = int(now)
        b = self._buckets
        if b and b[-1][0] == sec:
            b[-1][1] += 1
        else:
            b.append([sec, 1])
            self._trim(now)
        if self._since is None or now - self._since > self.window:
            self._sample.clear()  # a fresh sample each window: old hot spots fade
            self._seen = 0
            self._since = now
        self._seen += 1
        if len(self._sample) < self.sample_size:
            self._sample.append(key)
        else:
            j = self._rng.randrange(self._seen)
            if j < self.sample_size:
                self._sample[j] = key

    def _trim(self, now: float) -> None:
        oldest = int(now - self.window) + 1
        b = self._buckets
        while b and b[0][0] < oldest:
            b.popleft()

    def qps(self, now: float) -> float:
        """Requests per second over the last ``window`` seconds."""
        self._trim(now)
        return sum(c for _, c in self._buckets) / self.window

    def reset(self) -> None:
        """Forget the window and the sample (the range's bounds changed)."""
        self._buckets.clear()
        self._sample.clear()
        self._seen = 0
        self._since = None

    @property
    def sample(self) -> list[str]:
        """The sampled keys (a copy)."""
        return list(self._sample)

    def split_key(self, desc: RangeDescriptor, *, min_side: float = 0.2) -> str | None:
        """The median sampled key if it is strictly inside ``desc`` and leaves at least
        ``min_side`` of the sample on each side; else None."""
        return median_split_key(self._sample, desc, min_side=min_side)


def median_split_key(
    keys: Sequence[str], desc: RangeDescriptor, *, min_side: float = 0.2
) -> str | None:
    """The median of ``keys`` as a split key of ``desc`` (see :meth:`RangeLoad.split_key`)."""
    inside = sorted(k for k in keys if desc.contains(k))
    if len(inside) < 2:
        return None
    at = inside[len(inside) // 2]
    if at <= desc.start:
        return None
    left = sum(1 for k in inside if k < at)
    need = min_side * len(inside)
    if left < need or len(inside) - left < need:
        return None
    return at


@dataclass(frozen=True, slots=True)
class RangeStats:
    """What :func:`plan_merge` knows of one local range.

    Attributes:
        keys: keys the local replica holds.
        qps: requests per second (served here if we lead it, else applied writes).
        cold_since: since when the range has been small and cold (None: it is not).
        changed_at: when the range last split or merged here (its bounds changed).
        frozen: the range is frozen by a merge in progress.
    """

    keys: int
    qps: float
    cold_since: float | None
    changed_at: float
    frozen: bool = False


def plan_merge(
    ranges: Sequence[RangeDescriptor],
    stats: Mapping[int, RangeStats],
    leads: Sequence[int],
    now: float,
    *,
    cold_for: float,
    after_split: float,
    max_keys: int,
) -> tuple[int, int] | None:
    """One pair ``(left_id, right_id)`` of neighbours to merge, or None.

    ``ranges`` are the local ranges in key order, ``leads`` the ids this node leads (the
    right range, the merge's source, must be one of them: its leader runs the merge). A
    pair qualifies when both ranges have been small and cold for ``cold_for`` seconds,
    neither split or merged in the last ``after_split`` seconds, neither is frozen, they
    have the same replicas, and together they hold fewer than ``max_keys`` keys (so the
    merged range does not split again by size at once). The leftmost qualifying pair wins.
    """
    for left, right in itertools.pairwise(ranges):
        if left.end != right.start or right.range_id not in leads:
            continue
        a, b = stats.get(left.range_id), stats.get(right.range_id)
        if a is None or b is None or a.frozen or b.frozen:
            continue
        if sorted(left.replicas) != sorted(right.replicas):
            continue  # a merge needs the same replica set (a move would come first)
        if a.cold_since is None or b.cold_since is None:
            continue
        if now - a.cold_since < cold_for or now - b.cold_since < cold_for:
            continue
        if now - a.changed_at < after_split or now - b.changed_at < after_split:
            continue
        if a.keys + b.keys >= max_keys:
            continue
        return left.range_id, right.range_id
    return None


def merged_away(local: Sequence[RangeDescriptor], known: Iterable[RangeDescriptor]) -> list[int]:
    """Ids of ``local`` ranges that the map ``known`` (the metadata range's) shows were
    merged away: the map no longer lists the id, and lists another range with a higher
    ``version`` that covers the local range's whole span.

    A range that a split just made (not reported yet) is kept: the map then still shows
    its parent, whose version is lower. Ids are never reused, so a range that left the
    map this way never comes back.
    """
    known = list(known)
    ids = {r.range_id for r in known}
    out = []
    for d in local:
        if d.range_id in ids:
            continue
        if any(
            r.epoch.version > d.epoch.version
            and r.start <= d.start
            and (r.end is None or (d.end is not None and d.end <= r.end))
            for r in known
        ):
            out.append(d.range_id)
    return out


__all__ = ["RangeLoad", "RangeStats", "median_split_key", "merged_away", "plan_merge"]
