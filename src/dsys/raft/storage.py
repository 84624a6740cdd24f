"""Storage seams of a Raft node: the log, the hard state and snapshots.

:class:`LogStore`, :class:`StableStore` and :class:`SnapshotStore` are the small
``Protocol`` s :class:`~dsys.raft.node.RaftNode` persists through. The ``Memory*``
versions here keep everything in memory; they are for tests and examples (nothing
survives a restart). The durable versions live in :mod:`dsys.raft.wal`:
:class:`~dsys.raft.wal.WriteAheadLog` (log + hard state in one append-only file with a
CRC per record and one fsync per batch) and :class:`~dsys.raft.wal.FileSnapshotStore`.

The node's persistence order for each ``Ready`` is: ``stable.save_hard_state`` and
``log.append``, then ``sync()`` (one fsync for both when they are the same WAL), and only
then are messages sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from dsys.raft.messages import Entry, HardState, Snapshot


@dataclass(slots=True)
class LoadedLog:
    """What a :class:`LogStore` holds after opening: entries after its compaction point.

    Attributes:
        compacted_index: index of the last entry compacted away (0 = none).
        compacted_term: term of that entry.
        entries: the remaining entries, contiguous from ``compacted_index + 1``.
    """

    compacted_index: int = 0
    compacted_term: int = 0
    entries: list[Entry] = field(default_factory=list)


@runtime_checkable
class LogStore(Protocol):
    """Where a node persists its Raft log entries."""

    def load(self) -> LoadedLog:
        """The persisted log (called once, at start)."""
        ...

    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries; when ``entries[0].index <= last index`` the conflicting suffix
        from that index on is discarded first. Durable only after :meth:`sync`."""
        ...

    def compact(self, index: int, term: int, *, keep_tail: bool = True) -> None:
        """Forget entries up to and including ``index`` (now covered by a snapshot).

        With ``keep_tail=False`` the entries after ``index`` are discarded too (a follower
        installing a leader's snapshot that its log conflicts with).
        """
        ...

    def sync(self) -> None:
        """Make everything appended so far durable (one fsync for the whole batch)."""
        ...

    def close(self) -> None:
        """Release files; the store cannot be used afterwards."""
        ...


@runtime_checkable
class StableStore(Protocol):
    """Where a node persists its hard state (term, vote, commit)."""

    def load_hard_state(self) -> HardState | None:
        """The last saved hard state, or None on a fresh node."""
        ...

    def save_hard_state(self, hard_state: HardState) -> None:
        """Save the hard state; durable only after :meth:`sync`."""
        ...

    def sync(self) -> None:
        """Make the saved hard state durable."""
        ...


@runtime_checkable
class SnapshotStore(Protocol):
    """Where a node keeps its latest state-machine snapshot."""

    def save(self, snapshot: Snapshot) -> None:
        """Durably store ``snapshot`` (replacing older ones)."""
        ...

    def load(self) -> Snapshot | None:
        """The newest valid snapshot, or None."""
        ...


class MemoryLogStore:
    """An in-memory :class:`LogStore`, for tests and examples."""

    fsync = False  # nothing to wait for: the node persists inline

    def __init__(self) -> None:
        self._log = LoadedLog()
        self.syncs = 0

    @property
    def last_index(self) -> int:
        """Index of the last stored entry (the compaction index when empty)."""
        return self._log.entries[-1].index if self._log.entries else self._log.compacted_index

    def load(self) -> LoadedLog:
        """A copy of the stored log."""
        return LoadedLog(
            self._log.compacted_index, self._log.compacted_term, list(self._log.entries)
        )

    def append(self, entries: Sequence[Entry]) -> None:
        """Append, truncating a conflicting suffix first."""
        _append(self._log, entries)

    def compact(self, index: int, term: int, *, keep_tail: bool = True) -> None:
        """Drop entries up to ``index`` (and after it unless ``keep_tail``)."""
        _compact(self._log, index, term, keep_tail=keep_tail)

    def sync(self) -> None:
        """Count the sync (nothing to make durable in memory)."""
        self.syncs += 1

    def close(self) -> None:
        """Nothing to release."""


class MemoryStableStore:
    """An in-memory :class:`StableStore`, for tests and examples."""

    def __init__(self) -> None:
        self._hard_state: HardState | None = None

    def load_hard_state(self) -> HardState | None:
        """The last saved hard state."""
        return self._hard_state

    def save_hard_state(self, hard_state: HardState) -> None:
        """Keep ``hard_state``."""
        self._hard_state = hard_state

    def sync(self) -> None:
        """Nothing to make durable in memory."""


class MemorySnapshotStore:
    """An in-memory :class:`SnapshotStore`, for tests and examples."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None

    def save(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot``."""
        self._snapshot = snapshot

    def load(self) -> Snapshot | None:
        """The kept snapshot."""
        return self._snapshot


def _append(log: LoadedLog, entries: Sequence[Entry]) -> None:
    """Append ``entries`` to ``log`` in memory, truncating a conflicting suffix first."""
    if not entries:
        return
    first = entries[0].index
    start = log.entries[0].index if log.entries else log.compacted_index + 1
    if first <= log.compacted_index:
        # Entries already covered by the snapshot: keep only the ones after it.
        entries = [e for e in entries if e.index > log.compacted_index]
        if not entries:
            return
        first = entries[0].index
    last = log.entries[-1].index if log.entries else log.compacted_index
    if first > last + 1:
        raise AssertionError(f"log gap: appending index {first} after last index {last}")
    del log.entries[first - start :]
    log.entries.extend(entries)


def _compact(log: LoadedLog, index: int, term: int, *, keep_tail: bool = True) -> None:
    """Drop entries up to ``index`` from ``log`` in memory (all of them unless ``keep_tail``)."""
    if not keep_tail:
        log.entries = []
    if index <= log.compacted_index:
        return
    log.entries = [e for e in log.entries if e.index > index]
    log.compacted_index, log.compacted_term = index, term


__all__ = [
    "LoadedLog",
    "LogStore",
    "MemoryLogStore",
    "MemorySnapshotStore",
    "MemoryStableStore",
    "SnapshotStore",
    "StableStore",
]
