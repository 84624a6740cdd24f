"""One write-ahead log for every Raft group of a process, with group commit across groups.

A multi-Raft process runs many groups; with one :class:`~dsys.raft.wal.WriteAheadLog`
each, every busy group pays its own fsync. :class:`SharedWAL` is the idea of TiKV's
raft-engine and CockroachDB's shared engine: one append-only file set for all groups,
records tagged by range id, and ONE writer (one flush in a thread at a time) that turns
the records every group queued into one ``write`` and one ``fsync``, then tells each
group its entries are stable. The first group to sync while the writer is idle starts a
flush at once; every group that queues while it runs (the rest of that loop turn and the
next ones) shares the next write and fsync, which starts as soon as the first ends: the
group commit of databases, across Raft groups.

Each group sees its own :class:`GroupLog` (a ``LogStore`` and ``StableStore``, what
:class:`~dsys.raft.node.RaftNode` already uses); :meth:`GroupLog.sync_async` is the
group-commit path the node takes when its store offers it.

**Files.** ``<dir>/wal-<n>.log`` segments, framed as in :mod:`dsys.raft.wal` (length,
inverted length, CRC32, msgpack payload). Payloads start with the range id::

    [rid, 0, first, [[term, kind, data], ...]]   entries first, first + 1, ...
    [rid, 1, term, vote, commit]                 hard state
    [rid, 2, index]                              entries from index on are discarded
    [rid, 3, index, term]                        compacted up to index (a snapshot)
    [rid, 4, index, term]                        reset: every entry dropped (snapshot installed)
    [rid, 5]                                     the group was removed

A segment is closed once it passes ``segment_bytes``; the next one starts with a header
holding every live group's compaction point and hard state (and the live entries of the
groups that have few, so an idle group that never snapshots does not pin old segments),
so replay can start at any segment. A segment is deleted once no group has a live entry
in it (entries after its compaction point), so a removed group, or one that
snapshotted, stops pinning old segments. Opening always starts a fresh segment with
such a header.

**Recovery.** Replay reads the segments in order from the oldest. A damaged *last*
record of the last segment is a torn write: cut off and synced, as in the single-group
WAL; any other damage raises :class:`~dsys.raft.wal.CorruptLogError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from dsys.raft.messages import Entry, EntryKind, HardState
from dsys.raft.storage import LoadedLog, _append, _compact
from dsys.raft.wal import CorruptLogError, frame, fsync_dir, scan_records

_ENTRIES, _HARD, _TRUNC, _COMPACTED, _RESET, _REMOVED = 0, 1, 2, 3, 4, 5
_SEGMENT_BYTES = 64 * 1024 * 1024


def _segment_name(no: int) -> str:
    return f"wal-{no:016d}.log"


@dataclass(slots=True)
class _Replayed:
    """One group's state while replaying: entries by index, each with its segment.

    Entries may have holes while replaying (their predecessors lived in a deleted
    segment); every hole must be dead by the end, compacted or truncated away.
    """

    entries: dict[int, tuple[Entry, int]] = field(default_factory=dict)
    last: int = 0  # an upper bound of the highest index in ``entries``
    compacted_index: int = 0
    compacted_term: int = 0
    hard: HardState | None = None
    log: LoadedLog = field(default_factory=LoadedLog)
    segs: deque[list[int]] = field(default_factory=deque)  # [first index, segment no]

    def add(self, first: int, items: Sequence[Any], seg: int) -> None:
        if first <= self.last:
            self.truncate(first)
        for off, (term, kind, data) in enumerate(items):
            index = first + off
            if index > self.compacted_index:
                self.entries[index] = (Entry(term, index, EntryKind(kind), data), seg)
        self.last = max(self.last, first + len(items) - 1)

    def truncate(self, index: int) -> None:
        for k in [k for k in self.entries if k >= index]:
            del self.entries[k]
        self.last = min(self.last, index - 1)

    def compact(self, index: int, term: int, *, reset: bool) -> None:
        if reset:
            self.entries.clear()
        if index > self.compacted_index:
            for k in [k for k in self.entries if k <= index]:
                del self.entries[k]
            self.compacted_index, self.compacted_term = index, term
        self.last = max(self.last, self.compacted_index)

    def finish(self, range_id: int) -> None:
        """Build the loaded log and its segment pins; a hole left is corruption."""
        keys = sorted(self.entries)
        expected = self.compacted_index + 1
        for k in keys:
            if k != expected:
                raise CorruptLogError(f"range {range_id}: entries before {k} are missing")
            expected += 1
        log = LoadedLog(self.compacted_index, self.compacted_term, [])
        for k in keys:
            entry, seg = self.entries[k]
            log.entries.append(entry)
            if not self.segs or self.segs[-1][1] != seg:
                self.segs.append([k, seg])
        self.log = log
        self.entries = {}


def _compact_segs(segs: deque[list[int]], index: int, last: int) -> None:
    """Drop the segment boundaries of entries up to ``index``."""
    if index >= last:
        segs.clear()
        return
    while len(segs) >= 2 and segs[1][0] <= index + 1:
        segs.popleft()
    if segs and segs[0][0] <= index:
        segs[0][0] = index + 1


class GroupLog:
    """One Raft group's view of a :class:`SharedWAL`: its ``LogStore`` and ``StableStore``.

    Get one with :meth:`SharedWAL.group`; thread-safe (calls lock the shared WAL).
    """

    def __init__(self, wal: SharedWAL, range_id: int, replayed: _Replayed | None) -> None:
        self.wal = wal
        self.range_id = range_id
        r = replayed or _Replayed()
        self._log = r.log
        self._hard_state = r.hard
        self._segs = r.segs  # where the live entries start, per segment; pins segments
        self.size_bytes = 0
        """Bytes of this group's records since its last compaction (drives snapshots)."""

    @property
    def fsync(self) -> bool:
        """Whether the shared WAL fsyncs (False: unsafe, for benchmarks)."""
        return self.wal.fsync

    @property
    def last_index(self) -> int:
        """Index of the last entry (the compaction index when there is none)."""
        log = self._log
        return log.entries[-1].index if log.entries else log.compacted_index

    @property
    def pinned_segment(self) -> int | None:
        """The oldest segment holding one of this group's live entries (None: none)."""
        return self._segs[0][1] if self._segs else None

    def load(self) -> LoadedLog:
        """The group's log (entries after its compaction point)."""
        with self.wal._lock:
            log = self._log
            return LoadedLog(log.compacted_index, log.compacted_term, list(log.entries))

    def load_hard_state(self) -> HardState | None:
        """The last hard state saved."""
        return self._hard_state

    def save_hard_state(self, hard_state: HardState) -> None:
        """Queue a hard-state record; a term or vote change makes the next batch fsync
        (a commit-only change rides along, as in the single-group WAL)."""
        with self.wal._lock:
            old = self._hard_state
            force = old is None or old.term != hard_state.term or old.vote != hard_state.vote
            self._hard_state = hard_state
            self._queue([self.range_id, _HARD, hard_state.term, hard_state.vote, hard_state.commit])
            if force:
                self.wal._must_fsync(self.range_id)

    def append(self, entries: Sequence[Entry]) -> None:
        """Queue entries, with a truncation record first when they overwrite a suffix."""
        if not entries:
            return
        wal = self.wal
        with wal._lock:
            log = self._log
            live = [e for e in entries if e.index > log.compacted_index]
            if not live:
                return
            first = live[0].index
            if first <= self.last_index:
                self._queue([self.range_id, _TRUNC, first])
                while self._segs and self._segs[-1][0] >= first:
                    self._segs.pop()
            _append(log, live)
            seg = wal._seg_no
            if not self._segs or self._segs[-1][1] != seg:
                self._segs.append([first, seg])
            self._queue(
                [self.range_id, _ENTRIES, first, [[e.term, int(e.kind), e.data] for e in live]]
            )
            wal._must_fsync(self.range_id)

    def compact(self, index: int, term: int, *, keep_tail: bool = True) -> None:
        """Forget entries up to ``index`` (all of them unless ``keep_tail``).

        The record is written with the next batch; the segments it frees are deleted
        only after that batch is durable.
        """
        with self.wal._lock:
            log = self._log
            if keep_tail and index <= log.compacted_index:
                return
            _compact(log, index, term, keep_tail=keep_tail)
            if keep_tail:
                _compact_segs(self._segs, index, self.last_index if log.entries else index)
                kind = _COMPACTED
            else:
                self._segs.clear()
                kind = _RESET
            self._queue([self.range_id, kind, log.compacted_index, log.compacted_term])
            self.size_bytes = 0
            self.wal._must_fsync(self.range_id)  # a reset must be durable with its snapshot

    def _queue(self, record: list[Any]) -> None:
        data = frame(msgpack.packb(record, use_bin_type=True))
        self.size_bytes += len(data)
        self.wal._pending += data
        self.wal._batch_rids.add(self.range_id)

    def sync(self) -> None:
        """Make everything this group queued durable (blocking; any thread).

        On the event loop it blocks only when this group queued something that needs an
        fsync (the node uses :meth:`sync_async` for those); a commit-only hard state is
        left for the writer's next batch, as the single-group WAL leaves it unsynced.
        """
        self.wal._sync_blocking(self.range_id)

    async def sync_async(self) -> None:
        """Wait until everything queued so far is durable: the shared writer's next
        batch, one write and one fsync for every group that queued meanwhile."""
        await self.wal._sync_async()

    def close(self) -> None:
        """Nothing to release per group (the shared WAL closes its files)."""


class SharedWAL:
    """The write-ahead log shared by every Raft group of a process (see module doc).

    Args:
        directory: where the segments live (created if missing).
        fsync: False only writes to the OS (unsafe, for benchmarks).
        segment_bytes: size after which a segment is closed and a new one started.
        rewrite_bytes: a group whose live entries take at most this many bytes has them
            copied into each new segment's header instead of pinning old segments
            (while the header is under a quarter of ``segment_bytes``).
        flush_at_turn_end: when no flush is running, wait for the end of the loop turn
            before starting one (every group woken in the turn joins it) instead of
            starting at once (the default: the fsync then overlaps the rest of the turn,
            and whatever arrives meanwhile forms the next batch).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        segment_bytes: int = _SEGMENT_BYTES,
        rewrite_bytes: int = 1024 * 1024,
        flush_at_turn_end: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.rewrite_bytes = rewrite_bytes
        self.flush_at_turn_end = flush_at_turn_end
        self._lock = threading.Lock()  # group state, _pending, batch numbers
        self._io_lock = threading.Lock()  # one flush (cut, write, fsync) at a time
        self._pending = bytearray()
        self._pending_fsync = False
        self._fsync_rids: set[int] = set()  # groups whose queued records need an fsync
        self._batch_rids: set[int] = set()
        self._open_no = 1  # the batch records are queued into now
        self._durable_no = 0  # every batch up to this one is written (and synced)
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}  # batch -> waiters
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick_scheduled = False  # a flush is due at the next loop turn
        self._in_flight: asyncio.Future[None] | None = None  # the flush in the thread
        self._closed = False
        self.groups: dict[int, GroupLog] = {}
        self.repaired_bytes = 0
        """Bytes cut from a torn tail when the WAL was opened."""
        self.fsync_count = 0
        self.write_count = 0
        self.batch_groups_max = 0
        """The most groups whose records one write carried (group commit at work)."""
        self.batch_groups_total = 0
        self.size_bytes = 0
        """Bytes in the segments on disk."""
        self._seg_sizes: dict[int, int] = {}
        replayed = self._replay()
        self._seg_no = max(self._seg_sizes, default=0) + 1
        for rid, r in replayed.items():
            self.groups[rid] = GroupLog(self, rid, r)
        self._fd: int | None = None
        self._start_segment(self._seg_no, self._header())
        self._delete_unpinned(self._min_pin())

    # -- replay -----------------------------------------------------------------------

    def _segments(self) -> list[int]:
        nos = sorted(
            int(p.name[4:-4])
            for p in self.directory.glob("wal-*.log")
            if p.name[4:-4].isdigit() and len(p.name) == len(_segment_name(0))
        )
        # Replay the contiguous run that ends at the newest segment: an older segment
        # before a hole was deleted (its unlink lost in a crash) and is not needed.
        run: list[int] = []
        for no in reversed(nos):
            if run and no != run[0] - 1:
                break
            run.insert(0, no)
        for no in nos[: len(nos) - len(run)]:
            with contextlib.suppress(OSError):
                (self.directory / _segment_name(no)).unlink()
        return run

    def _replay(self) -> dict[int, _Replayed]:
        groups: dict[int, _Replayed] = {}
        nos = self._segments()
        for i, no in enumerate(nos):
            path = self.directory / _segment_name(no)
            buf = path.read_bytes()
            payloads, good = scan_records(buf)
            if good < len(buf):
                if i != len(nos) - 1:
                    raise CorruptLogError(f"{path.name}: damaged record at offset {good}")
                self.repaired_bytes = len(buf) - good
                with open(path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
            for payload in payloads:
                self._replay_record(groups, payload, no)
            self._seg_sizes[no] = good
        for rid, g in groups.items():
            g.finish(rid)
        self.size_bytes = sum(self._seg_sizes.values())
        return groups

    @staticmethod
    def _replay_record(groups: dict[int, _Replayed], payload: bytes, seg: int) -> None:
        try:
            rec: Any = msgpack.unpackb(payload, raw=False)
            rid, kind = rec[0], rec[1]
            if kind == _REMOVED:
                groups.pop(rid, None)
                return
            g = groups.get(rid)
            if g is None:
                g = groups[rid] = _Replayed()
            if kind == _ENTRIES:
                g.add(rec[2], rec[3], seg)
            elif kind == _HARD:
                g.hard = HardState(term=rec[2], vote=rec[3], commit=rec[4])
            elif kind == _TRUNC:
                g.truncate(rec[2])
            elif kind in (_COMPACTED, _RESET):
                g.compact(rec[2], rec[3], reset=kind == _RESET)
            else:
                raise CorruptLogError(f"unknown shared WAL record kind {kind!r}")
        except (ValueError, TypeError, IndexError, KeyError, msgpack.UnpackException) as exc:
            raise CorruptLogError(f"undecodable shared WAL record: {exc}") from exc

    # -- groups -----------------------------------------------------------------------

    def group(self, range_id: int) -> GroupLog:
        """The log of group ``range_id`` (created empty when the WAL has none)."""
        with self._lock:
            g = self.groups.get(range_id)
            if g is None:
                g = self.groups[range_id] = GroupLog(self, range_id, None)
            return g

    def remove(self, range_id: int) -> None:
        """Forget group ``range_id`` (merged away, moved, or never completed): its
        records stop pinning segments. Durable with the next batch."""
        with self._lock:
            g = self.groups.pop(range_id, None)
            if g is None:
                return
            g._queue([range_id, _REMOVED])
            self._must_fsync(range_id)

    def range_ids(self) -> list[int]:
        """The groups the WAL holds state for."""
        with self._lock:
            return sorted(self.groups)

    # -- writing ----------------------------------------------------------------------

    def _header(self) -> bytes:
        """The head of segment ``_seg_no``: every group's compaction point and hard
        state, and the live entries of each group that has few of them (caller holds
        the lock or is the only user).

        Rewriting a small group's entries moves its pin to the new segment, so an idle
        group that never snapshots does not keep every segment after its first entry
        (raft-engine's rewrite of cold groups does the same).
        """
        out = bytearray()
        for rid, g in sorted(self.groups.items()):
            log = g._log
            out += frame(msgpack.packb([rid, _COMPACTED, log.compacted_index, log.compacted_term]))
            hs = g._hard_state
            if hs is not None:
                out += frame(msgpack.packb([rid, _HARD, hs.term, hs.vote, hs.commit]))
            if (
                log.entries
                and len(out) < self.segment_bytes // 4  # never a header that fills a segment
                and sum(len(e.data) + 16 for e in log.entries) <= self.rewrite_bytes
            ):
                first = log.entries[0].index
                items = [[e.term, int(e.kind), e.data] for e in log.entries]
                out += frame(msgpack.packb([rid, _ENTRIES, first, items], use_bin_type=True))
                g._segs = deque([[first, self._seg_no]])
        return bytes(out)

    def _min_pin(self) -> int:
        pins = [p for g in self.groups.values() if (p := g.pinned_segment) is not None]
        return min([*pins, self._seg_no])

    def _start_segment(self, no: int, header: bytes) -> None:
        path = self.directory / _segment_name(no)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, header)
            if self.fsync:
                os.fsync(fd)
                fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._seg_sizes[no] = len(header)
        self.size_bytes += len(header)

    def _delete_unpinned(self, min_pin: int) -> None:
        for no in sorted(self._seg_sizes):
            if no >= min_pin:
                break
            with contextlib.suppress(FileNotFoundError):
                (self.directory / _segment_name(no)).unlink()
            self.size_bytes -= self._seg_sizes.pop(no)

    def _flush(self) -> None:
        """Cut the queued records into one batch: one write, one fsync (any thread)."""
        with self._io_lock:
            if self._failed is not None:
                raise self._failed
            if self._fd is None:
                raise AssertionError("shared WAL used after close")
            with self._lock:
                no = self._open_no
                self._open_no += 1
                data = bytes(self._pending)
                self._pending.clear()
                must_fsync, self._pending_fsync = self._pending_fsync, False
                self._fsync_rids.clear()
                groups = len(self._batch_rids)
                self._batch_rids.clear()
                old_seg = self._seg_no
                rotate = bool(data) and self._seg_sizes[old_seg] + len(data) >= self.segment_bytes
                header = b""
                if rotate:
                    self._seg_no += 1
                    header = self._header()
                min_pin = self._min_pin()
            try:
                if data:
                    _write_all(self._fd, data)
                    self._seg_sizes[old_seg] += len(data)
                    self.size_bytes += len(data)
                    self.write_count += 1
                    self.batch_groups_total += groups
                    self.batch_groups_max = max(self.batch_groups_max, groups)
                if data and self.fsync and (must_fsync or rotate):
                    os.fsync(self._fd)
                    self.fsync_count += 1
                if rotate:
                    self._start_segment(old_seg + 1, header)
                if min_pin > min(self._seg_sizes):
                    self._delete_unpinned(min_pin)
            except BaseException as exc:
                self._failed = exc
                raise
            with self._lock:
                self._durable_no = no

    def _on_loop_thread(self) -> bool:
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:
            return False

    def _must_fsync(self, range_id: int) -> None:
        """Mark the open batch as needing an fsync for ``range_id`` (lock held)."""
        self._pending_fsync = True
        self._fsync_rids.add(range_id)

    def _sync_blocking(self, range_id: int | None = None) -> None:
        if self._failed is not None:
            raise self._failed
        if (
            range_id is not None
            and self.fsync
            and range_id not in self._fsync_rids
            and self._on_loop_thread()
        ):
            self._wake_writer()  # commit-only records: the next batch writes them
            return
        self._flush()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            if self._on_loop_thread():
                self._resolve()
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._resolve)

    async def _sync_async(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise AssertionError("shared WAL used after close")
        loop = asyncio.get_running_loop()
        self._loop = loop
        fut = loop.create_future()
        with self._lock:
            no = self._open_no
        self._waiters.setdefault(no, []).append(fut)
        self._wake_writer()
        await fut

    def _wake_writer(self) -> None:
        """Start a flush (at once, or at the end of this loop turn), unless one is
        running: its end starts the next one with everything queued meanwhile."""
        loop = self._loop
        if self._kick_scheduled or self._in_flight is not None or loop is None:
            return
        if self.flush_at_turn_end:
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        else:
            self._kick()

    def _kick(self) -> None:
        self._kick_scheduled = False
        loop = self._loop
        if self._in_flight is not None or self._closed or loop is None:
            return
        if self._pending or self._waiters:
            self._in_flight = loop.run_in_executor(None, self._flush_in_thread, loop)

    def _flush_in_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        exc: BaseException | None = None
        try:
            self._flush()
        except BaseException as e:  # every waiter, now and later, gets the failure
            exc = e
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(self._after_flush, exc)

    def _after_flush(self, exc: BaseException | None) -> None:
        self._in_flight = None
        if exc is not None:
            if self._failed is None:
                self._failed = exc
            self._resolve(exc)
            return
        self._resolve()
        if self._pending or self._waiters:
            self._wake_writer()

    def _resolve(self, exc: BaseException | None = None) -> None:
        """Complete the waiters of every durable batch (on the event loop)."""
        durable = self._durable_no
        for no in sorted(self._waiters):
            if exc is None and no > durable:
                break
            for fut in self._waiters.pop(no):
                if fut.done():
                    continue  # its node was closed while it waited
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)

    def sync(self) -> None:
        """Write and sync everything queued (blocking)."""
        self._flush()

    async def aclose(self) -> None:
        """Wait for the running flush, write what is queued, close the files."""
        if self._in_flight is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._in_flight)
        await asyncio.to_thread(self.close)
        self._resolve(self._failed)

    def close(self) -> None:
        """Write and sync what is queued and close the current segment."""
        if self._closed:
            return
        self._closed = True
        if self._failed is None and self._fd is not None:
            with contextlib.suppress(OSError):
                self._flush()
        with self._io_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


__all__ = ["GroupLog", "SharedWAL"]
