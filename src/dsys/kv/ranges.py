"""Ranges of the key space and the map of them (pure: no I/O, no clock, no asyncio).

Theory of operation
-------------------
The KV key space (every string, ``""`` first) is cut into contiguous half-open
*ranges* ``[start, end)``; ``end=None`` means "to the end of the key space". Each range is
one Raft group whose replicas hold only its keys (TiKV calls them regions, CockroachDB
ranges). A :class:`RangeDescriptor` names a range, its bounds, its replicas and its
:class:`Epoch`, which follows TiKV's ``RegionEpoch``:

* ``version`` grows when the range's *bounds* change (a split or a merge);
* ``conf_ver`` grows when its *replica set* changes.

A request carries the epoch it was routed with; a range whose epoch differs refuses it
with :class:`~dsys.errors.EpochNotMatchError` (the client refreshes and retries), and a
key that no local range owns is refused with :class:`~dsys.errors.KeyNotInRangeError`.

A :class:`RangeMap` holds the descriptors of the whole key space. Invariant (checked by
:meth:`RangeMap.check`): the ranges partition the key space, so every key maps to
exactly one range, found by a binary search over the start keys
(:class:`sortedcontainers.SortedList`, O(log n)). :meth:`RangeMap.split` and
:meth:`RangeMap.merge` keep the invariant; :meth:`RangeMap.apply_report` takes the
descriptors a range reported after it changed itself (the range's own log is the
authority; the map in the metadata range follows it), and ignores stale reports.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from sortedcontainers import SortedKeyList

from dsys.errors import BadInputError, EpochNotMatchError, KeyNotInRangeError, RemoteProtocolError

META_RANGE_ID = 0
"""The metadata range: it holds the range map (no user keys)."""

FIRST_RANGE_ID = 1
"""The range that covers the whole key space when a cluster is bootstrapped."""


class Epoch(NamedTuple):
    """A range's epoch, as TiKV's ``RegionEpoch``.

    Attributes:
        conf_ver: bumped by every change of the replica set.
        version: bumped by every split and merge (a change of the bounds).
    """

    conf_ver: int
    version: int


_EPOCH_1 = Epoch(1, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class RangeDescriptor:
    """One range: ``[start, end)`` of the key space, its replicas and its epoch.

    Attributes:
        range_id: unique for the life of the cluster (a split allocates a new one).
        start: first key of the range (``""`` is the start of the key space).
        end: first key after the range, or None for the end of the key space.
        epoch: ``(conf_ver, version)``.
        replicas: ids of the nodes holding a replica, in a stable order.
    """

    range_id: int
    start: str
    end: str | None
    epoch: Epoch = _EPOCH_1
    replicas: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.range_id < 0:
            raise BadInputError(f"range id must be >= 0, got {self.range_id}")
        if self.end is not None and self.end <= self.start:
            raise BadInputError(f"range {self.range_id}: end {self.end!r} <= start {self.start!r}")

    def contains(self, key: str) -> bool:
        """Whether ``key`` falls in ``[start, end)``."""
        return self.start <= key and (self.end is None or key < self.end)

    def to_plain(self) -> list[Any]:
        """Plain (msgpack/JSON-able) form: ``[id, start, end, conf_ver, version, replicas]``."""
        return [
            self.range_id,
            self.start,
            self.end,
            self.epoch.conf_ver,
            self.epoch.version,
            list(self.replicas),
        ]

    @classmethod
    def from_plain(cls, v: Any) -> RangeDescriptor:
        """Inverse of :meth:`to_plain`, checking every field.

        Raises:
            RemoteProtocolError: malformed descriptor.
        """
        if not isinstance(v, (list, tuple)) or len(v) != 6:
            raise RemoteProtocolError(
                "a range descriptor is [id, start, end, conf_ver, version, replicas]"
            )
        rid, start, end, conf_ver, version, replicas = v
        if not all(type(x) is int and x >= 0 for x in (rid, conf_ver, version)):
            raise RemoteProtocolError("range id, conf_ver and version must be integers >= 0")
        if type(start) is not str or (end is not None and type(end) is not str):
            raise RemoteProtocolError("range bounds must be strings (end may be null)")
        if not isinstance(replicas, (list, tuple)) or not all(type(r) is str for r in replicas):
            raise RemoteProtocolError("range replicas must be a list of node ids")
        try:
            return cls(
                range_id=rid,
                start=start,
                end=end,
                epoch=Epoch(conf_ver, version),
                replicas=tuple(replicas),
            )
        except BadInputError as exc:
            raise RemoteProtocolError(str(exc)) from None

    def describe(self) -> str:
        """``[start, end)`` for messages and tables."""
        return f"[{self.start!r}, {'+inf' if self.end is None else repr(self.end)})"


def split_descriptor(
    desc: RangeDescriptor, at_key: str, new_range_id: int
) -> tuple[RangeDescriptor, RangeDescriptor]:
    """The two halves of ``desc`` split at ``at_key``: ``[start, at)`` keeps the id, and
    ``[at, end)`` is range ``new_range_id``; both get ``version + 1`` (TiKV's rule).

    Raises:
        BadInputError: ``at_key`` is not strictly inside the range.
    """
    if not (desc.start < at_key and (desc.end is None or at_key < desc.end)):
        raise BadInputError(
            f"split key {at_key!r} is not strictly inside range {desc.range_id} {desc.describe()}"
        )
    epoch = Epoch(desc.epoch.conf_ver, desc.epoch.version + 1)
    left = replace(desc, end=at_key, epoch=epoch)
    right = replace(desc, range_id=new_range_id, start=at_key, epoch=epoch)
    return left, right


def check_epoch(
    desc: RangeDescriptor,
    epoch: Epoch | tuple[int, int] | None,
    *,
    others: Sequence[RangeDescriptor] = (),
) -> None:
    """Refuse a request routed with a stale ``epoch`` of ``desc`` (None: not checked).

    Raises:
        EpochNotMatchError: the epochs differ (carries ``desc`` and ``others``).
    """
    if epoch is not None and tuple(epoch) != tuple(desc.epoch):
        raise EpochNotMatchError(desc.range_id, (epoch[0], epoch[1]), ranges=[desc, *others])


def plan_leader_move(
    leaders: Mapping[int, str | None], nodes: Sequence[str], me: str
) -> tuple[int, str] | None:
    """One leader transfer that ``me`` should start to even out leaders, or None.

    ``leaders`` maps each range to its leader (None: unknown). Only the node with the
    most leaders moves, and only when it leads at least two more ranges than the node
    with the fewest: a move then never makes the gap flip, so leaders do not oscillate
    (the same hysteresis as PD's balance-leader). Ties break by node id, and the range
    moved is ``me``'s highest-numbered one, so the plan is deterministic.

    Returns:
        ``(range_id, target_node)``, or None when nothing should move (or some range
        has no known leader, so the counts are not trustworthy).
    """
    if not nodes or any(v is None for v in leaders.values()):
        return None
    count = {n: 0 for n in nodes}
    for leader in leaders.values():
        if leader in count:
            count[leader] += 1
    most = max(sorted(count), key=lambda n: count[n])
    fewest = min(sorted(count), key=lambda n: count[n])
    if most != me or count[most] - count[fewest] < 2:
        return None
    mine = sorted(rid for rid, leader in leaders.items() if leader == me)
    return mine[-1], fewest


def _overlaps(a: RangeDescriptor, b: RangeDescriptor) -> bool:
    return (a.end is None or b.start < a.end) and (b.end is None or a.start < b.end)


def _start_of(desc: RangeDescriptor) -> str:
    return desc.start


class RangeMap:
    """The descriptors of every range; they partition the key space.

    Args:
        ranges: descriptors that partition the key space (default: one range, id
            :data:`FIRST_RANGE_ID`, over everything, with ``replicas``).
        replicas: replicas of the default range.
        version: the map's own version, bumped by every change (0 for a new map).

    Raises:
        BadInputError: ``ranges`` do not partition the key space, or ids repeat.
    """

    def __init__(
        self,
        ranges: Iterable[RangeDescriptor] | None = None,
        *,
        replicas: Sequence[str] = (),
        version: int = 0,
    ) -> None:
        if ranges is None:
            ranges = [
                RangeDescriptor(
                    range_id=FIRST_RANGE_ID, start="", end=None, replicas=tuple(replicas)
                )
            ]
        self._ranges: SortedKeyList = SortedKeyList(ranges, key=_start_of)
        self._by_id: dict[int, RangeDescriptor] = {r.range_id: r for r in self._ranges}
        self.version = version
        """Bumped by every change of the map (a coarse "map epoch" for clients)."""
        problem = self._problem()
        if problem:
            raise BadInputError(f"not a range map: {problem}")

    # -- reads ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ranges)

    def __iter__(self) -> Iterator[RangeDescriptor]:
        return iter(self._ranges)

    def get(self, range_id: int) -> RangeDescriptor | None:
        """The descriptor of ``range_id``, if it exists."""
        return self._by_id.get(range_id)

    def lookup(self, key: str) -> RangeDescriptor:
        """The range owning ``key`` (there is always exactly one)."""
        i = self._ranges.bisect_key_right(key) - 1
        desc: RangeDescriptor = self._ranges[i]
        return desc

    def locate(
        self, key: str, range_id: int | None = None, epoch: tuple[int, int] | None = None
    ) -> RangeDescriptor:
        """The range owning ``key``, checked against the caller's ``range_id``/``epoch``.

        Raises:
            KeyNotInRangeError: the caller named another range than the owner.
            EpochNotMatchError: the caller's epoch of the owner is stale.
        """
        desc = self.lookup(key)
        if range_id is not None and range_id != desc.range_id:
            raise KeyNotInRangeError(
                key,
                ranges=[desc],
                map_version=self.version,
                message=f"key {key!r} is in range {desc.range_id}, not {range_id}",
            )
        check_epoch(desc, epoch)
        return desc

    def check(self) -> None:
        """Assert the partition invariant (a broken one is a bug)."""
        problem = self._problem()
        assert not problem, f"range map broken: {problem}"

    def _problem(self) -> str:
        rs = list(self._ranges)
        if not rs:
            return "no ranges"
        if rs[0].start != "":
            return f"the first range starts at {rs[0].start!r}, not ''"
        if rs[-1].end is not None:
            return f"the last range ends at {rs[-1].end!r}, not +inf"
        for a, b in itertools.pairwise(rs):
            if a.end != b.start:
                return (
                    f"range {a.range_id} ends at {a.end!r} "
                    f"but range {b.range_id} starts at {b.start!r}"
                )
        if len(self._by_id) != len(rs):
            return "range ids repeat"
        return ""

    # -- changes ----------------------------------------------------------------------

    def split(
        self, range_id: int, at_key: str, new_range_id: int
    ) -> tuple[RangeDescriptor, RangeDescriptor]:
        """Split ``range_id`` at ``at_key`` (see :func:`split_descriptor`).

        Raises:
            BadInputError: unknown range, id in use, or the key not strictly inside.
        """
        desc = self._need(range_id)
        if new_range_id in self._by_id:
            raise BadInputError(f"range id {new_range_id} is already in use")
        left, right = split_descriptor(desc, at_key, new_range_id)
        self._replace([desc], [left, right])
        return left, right

    def merge(self, left_id: int, right_id: int) -> RangeDescriptor:
        """Merge range ``right_id`` into its left neighbour ``left_id``.

        The merged range keeps ``left_id``; its ``version`` is one more than the larger
        of the two, and ``conf_ver`` the larger (TiKV's rule for the surviving region).

        Raises:
            BadInputError: unknown ranges, not neighbours, or different replica sets.
        """
        left, right = self._need(left_id), self._need(right_id)
        if left.end is None or left.end != right.start:
            raise BadInputError(f"ranges {left_id} and {right_id} are not neighbours (left, right)")
        if sorted(left.replicas) != sorted(right.replicas):
            raise BadInputError(f"ranges {left_id} and {right_id} have different replicas")
        merged = replace(
            left,
            end=right.end,
            epoch=Epoch(
                max(left.epoch.conf_ver, right.epoch.conf_ver),
                max(left.epoch.version, right.epoch.version) + 1,
            ),
        )
        self._replace([left, right], [merged])
        return merged

    def change_replicas(self, range_id: int, replicas: Sequence[str]) -> RangeDescriptor:
        """Set the replicas of ``range_id``; bumps ``conf_ver``.

        Raises:
            BadInputError: unknown range or no replicas.
        """
        desc = self._need(range_id)
        if not replicas:
            raise BadInputError("a range needs at least one replica")
        new = replace(
            desc, replicas=tuple(replicas), epoch=Epoch(desc.epoch.conf_ver + 1, desc.epoch.version)
        )
        self._replace([desc], [new])
        return new

    def apply_report(self, reported: Sequence[RangeDescriptor]) -> bool:
        """Take descriptors a range reported after changing itself (e.g. both halves of
        a split); returns whether the map changed.

        The reported ranges (contiguous) replace the ones they overlap when together they
        cover exactly the same span and each changed one is newer than every old range it
        overlaps (a higher ``version``; or the same range with a higher ``conf_ver``);
        reported ranges identical to the map's are kept. Anything else (an old report,
        or half a change) is ignored, so the map always partitions the key space.
        """
        if not reported:
            return False
        new = sorted(reported, key=_start_of)
        for a, b in itertools.pairwise(new):
            if a.end != b.start:
                return False
        old = self._overlapping(new[0].start, new[-1].end)
        if not old or old[0].start != new[0].start or old[-1].end != new[-1].end:
            return False
        old_ids = {o.range_id for o in old}
        for r in new:
            if r.range_id in self._by_id and r.range_id not in old_ids:
                return False  # the id lives elsewhere in the map
        kept = [r for r in new if r in old]
        changed = [r for r in new if r not in kept]
        if not changed:
            return False  # nothing new
        gone = [o for o in old if o not in kept]
        for r in changed:
            for o in gone:
                if not _overlaps(r, o) or r.epoch.version > o.epoch.version:
                    continue
                if (
                    r.range_id == o.range_id
                    and (r.start, r.end) == (o.start, o.end)
                    and r.epoch.version == o.epoch.version
                    and r.epoch.conf_ver > o.epoch.conf_ver
                ):
                    continue  # a replica change of the same range
                return False  # stale: an overlapped range is as new or newer
        self._replace(old, new)
        return True

    def _overlapping(self, start: str, end: str | None) -> list[RangeDescriptor]:
        i = self._ranges.bisect_key_right(start) - 1
        out: list[RangeDescriptor] = []
        for r in self._ranges.islice(max(i, 0)):
            if end is not None and r.start >= end:
                break
            out.append(r)
        return out

    def _need(self, range_id: int) -> RangeDescriptor:
        desc = self._by_id.get(range_id)
        if desc is None:
            raise BadInputError(f"no range {range_id}")
        return desc

    def _replace(self, old: Sequence[RangeDescriptor], new: Sequence[RangeDescriptor]) -> None:
        for r in old:
            self._ranges.remove(r)
            del self._by_id[r.range_id]
        for r in new:
            self._ranges.add(r)
            self._by_id[r.range_id] = r
        self.version += 1

    # -- encoding ---------------------------------------------------------------------

    def to_plain(self) -> dict[str, Any]:
        """Plain form: ``{"version": V, "ranges": [descriptor, ...]}``."""
        return {"version": self.version, "ranges": [r.to_plain() for r in self._ranges]}

    @classmethod
    def from_plain(cls, v: Any) -> RangeMap:
        """Inverse of :meth:`to_plain`.

        Raises:
            RemoteProtocolError: malformed, or the ranges do not partition the key space.
        """
        if (
            not isinstance(v, dict)
            or type(v.get("version")) is not int
            or not isinstance(v.get("ranges"), list)
        ):
            raise RemoteProtocolError('a range map is {"version": int, "ranges": [...]}')
        descs = [RangeDescriptor.from_plain(r) for r in v["ranges"]]
        try:
            return cls(descs, version=v["version"])
        except BadInputError as exc:
            raise RemoteProtocolError(str(exc)) from None


__all__ = [
    "FIRST_RANGE_ID",
    "META_RANGE_ID",
    "Epoch",
    "RangeDescriptor",
    "RangeMap",
    "check_epoch",
    "plan_leader_move",
    "split_descriptor",
]
