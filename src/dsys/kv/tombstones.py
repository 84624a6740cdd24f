"""Tombstones of the ranges a multi-Raft node no longer holds (pure: no I/O, no clock).

Theory of operation
-------------------
When a node drops its replica of a range (moved away, or merged into a neighbour) it
keeps a :class:`Tombstone`: the range id and the epoch the range had when the replica
left, as TiKV keeps a tombstone ``RegionLocalState``. The host persists them (one small
file in the data directory, replaced atomically with fsync) *before* it deletes the
replica's data, so they survive a restart and a crash between the two steps.

A tombstone refuses (:meth:`Tombstones.refuses`) a replica of the range that is older
than it:

* a **merged-away** range never comes back (range ids are never reused): every replica
  of it is refused;
* a **moved-away** range may be moved back here later. The tombstone holds the epoch
  *after* the change that removed this node, so a descriptor with a lower ``conf_ver``
  (or an older ``version``) is from before the removal, when this node was still a
  member: a stale replica (a late snapshot from a leader that missed the move, the right
  half of a split re-applied from an old log after a restart, a replica a crash left
  behind) that could vote in a configuration that no longer exists, and is refused. A
  snapshot at the tombstone's own ``conf_ver`` is the state after the removal (this node
  is no member of it): that is how a move back starts (the leader snapshots, then adds
  the learner), so it is accepted.

The set is bounded: past ``max_entries`` the lowest range ids (the oldest, ids only
grow) are forgotten first.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack

from dsys.errors import BadInputError
from dsys.kv.ranges import Epoch, RangeDescriptor

MAGIC = b"DSYSTOMB1"
"""First bytes of an encoded tombstone set."""


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A range this node dropped, with the epoch it had then.

    Attributes:
        range_id: the range.
        epoch: its epoch when the local replica left.
        merged: it was merged away (it never comes back).
    """

    range_id: int
    epoch: Epoch
    merged: bool = False

    def refuses(self, desc: RangeDescriptor) -> bool:
        """Whether ``desc`` (a replica of the same range) is older than the tombstone."""
        e = desc.epoch
        return self.merged or e.conf_ver < self.epoch.conf_ver or e.version < self.epoch.version


class Tombstones:
    """The tombstones of one node, by range id, bounded (see the module docstring).

    Args:
        max_entries: tombstones kept at most.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise BadInputError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._by_id: dict[int, Tombstone] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Tombstone]:
        return iter(sorted(self._by_id.values(), key=lambda t: t.range_id))

    def __contains__(self, range_id: object) -> bool:
        return range_id in self._by_id

    def get(self, range_id: int) -> Tombstone | None:
        """The tombstone of ``range_id``, if any."""
        return self._by_id.get(range_id)

    def add(self, t: Tombstone) -> bool:
        """Record ``t`` (merged with an older tombstone of the range: the newer epoch
        wins, and merged stays merged); returns whether anything changed."""
        old = self._by_id.get(t.range_id)
        if old is not None:
            t = Tombstone(t.range_id, max(old.epoch, t.epoch), old.merged or t.merged)
            if t == old:
                return False
        self._by_id[t.range_id] = t
        while len(self._by_id) > self.max_entries:
            del self._by_id[min(self._by_id)]
        return True

    def merged(self, range_id: int) -> bool:
        """Whether ``range_id`` was merged away here."""
        t = self._by_id.get(range_id)
        return t is not None and t.merged

    def refuses(self, desc: RangeDescriptor) -> bool:
        """Whether a replica of ``desc`` is stale by its range's tombstone (if any)."""
        t = self._by_id.get(desc.range_id)
        return t is not None and t.refuses(desc)

    def encode(self) -> bytes:
        """``MAGIC``, a CRC32 of the payload, and the payload (msgpack)."""
        body: bytes = msgpack.packb(
            [[t.range_id, t.epoch.conf_ver, t.epoch.version, t.merged] for t in self],
            use_bin_type=True,
        )
        return MAGIC + zlib.crc32(body).to_bytes(4, "big") + body

    @classmethod
    def decode(cls, data: bytes, max_entries: int = 10_000) -> Tombstones:
        """The set :meth:`encode` wrote.

        Raises:
            BadInputError: not an encoded tombstone set, or damaged.
        """
        head = len(MAGIC) + 4
        if not data.startswith(MAGIC) or len(data) < head:
            raise BadInputError("not a tombstone file")
        body = data[head:]
        if zlib.crc32(body).to_bytes(4, "big") != data[len(MAGIC) : head]:
            raise BadInputError("tombstone file damaged (CRC mismatch)")
        try:
            rows = msgpack.unpackb(body, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise BadInputError(f"tombstone file damaged: {exc}") from None
        out = cls(max_entries)
        if not isinstance(rows, list):
            raise BadInputError("tombstone file damaged: not a list")
        for row in rows:
            if (
                not isinstance(row, list)
                or len(row) != 4
                or not all(type(x) is int for x in row[:3])
                or type(row[3]) is not bool
            ):
                raise BadInputError(f"tombstone file damaged: bad row {row!r}")
            out.add(Tombstone(row[0], Epoch(row[1], row[2]), row[3]))
        return out


__all__ = ["MAGIC", "Tombstone", "Tombstones"]
