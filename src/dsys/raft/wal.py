"""Durable Raft storage: an append-only write-ahead log and a snapshot directory.

:class:`WriteAheadLog` keeps log entries *and* the hard state (term, vote, commit) in one
append-only file, so that one ``fsync`` makes a whole ``Ready`` durable: that is the group
commit — every proposal that arrived while the previous batch was being synced shares the
next fsync. Each record is framed as::

    u32 length | u32 ~length | u32 crc32(payload) | payload (msgpack list)

with payloads ``[0, term, index, kind, data]`` (entry), ``[1, term, vote, commit]``
(hard state), ``[2, index]`` (entries from ``index`` on are discarded: a conflicting
suffix) and ``[3, index, term]`` (everything up to ``index`` is covered by a snapshot).

On open the file is replayed. A damaged *last* record (cut short by a crash, or with a
bad checksum and nothing after it) is a torn write: the file is truncated back to the
last good record and synced. A damaged record with valid data after it is corruption and
raises :class:`CorruptLogError`; nothing is silently dropped from the middle of a log.

:meth:`WriteAheadLog.compact` rewrites the file without the compacted prefix (temp file,
fsync, rename, fsync of the directory). :class:`FileSnapshotStore` writes snapshots the
same way. With ``fsync=False`` (``--fsync none``) data only reaches the OS page cache:
**unsafe** — a power loss or kernel crash can lose acknowledged writes; for benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack

from dsys.errors import RaftError
from dsys.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from dsys.raft.storage import LoadedLog, _append, _compact

_HEADER = struct.Struct("<III")
MAX_RECORD = 256 * 1024 * 1024
"""Largest single WAL record accepted on replay (256 MiB)."""

_ENTRY, _HARD, _TRUNC, _COMPACTED = 0, 1, 2, 3
_SNAP_MAGIC = b"DSYSSNAP1"


class CorruptLogError(RaftError):
    """A WAL or snapshot file is damaged somewhere other than a torn tail."""


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# fdatasync, as etcd's WAL: the data and the file size, without the mtime (Linux; fsync
# where there is none). Never dearer than fsync in this VM's runs (docs/benchmarks.md).
_datasync = getattr(os, "fdatasync", os.fsync)


def frame(payload: bytes) -> bytes:
    """Frame one record payload with its length, inverted length and CRC32."""
    n = len(payload)
    return _HEADER.pack(n, n ^ 0xFFFFFFFF, zlib.crc32(payload)) + payload


def scan_records(buf: bytes) -> tuple[list[bytes], int]:
    """Split a WAL image into record payloads.

    Returns:
        The payloads of the good records and the byte offset where the good prefix ends
        (``len(buf)`` when the file is intact; less when the tail is torn).

    Raises:
        CorruptLogError: a damaged record is followed by more data.
    """
    out: list[bytes] = []
    off, size = 0, len(buf)
    while off < size:
        if size - off < _HEADER.size:
            return out, off  # torn header
        n, inv, crc = _HEADER.unpack_from(buf, off)
        end = off + _HEADER.size + n
        if n ^ 0xFFFFFFFF != inv or n > MAX_RECORD:
            if not buf[off:].strip(b"\x00"):
                return out, off  # zero-filled tail (preallocation after a crash)
            raise CorruptLogError(f"WAL record header at offset {off} is damaged")
        if end > size:
            return out, off  # torn payload
        payload = buf[off + _HEADER.size : end]
        if zlib.crc32(payload) != crc:
            if end == size:
                return out, off  # torn last record
            raise CorruptLogError(f"WAL record at offset {off} fails its CRC check")
        out.append(payload)
        off = end
    return out, off


class WriteAheadLog:
    """A durable :class:`~dsys.raft.storage.LogStore` and ``StableStore`` in one file.

    Not thread-safe: the node calls it from one persistence thread at a time.

    Args:
        directory: where ``raft.wal`` lives (created if missing).
        fsync: True to fsync on :meth:`sync` (safe); False only flushes to the OS
            (unsafe, for benchmarks).
    """

    FILENAME = "raft.wal"

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / self.FILENAME
        self.fsync = fsync
        self._log = LoadedLog()
        self._hard_state: HardState | None = None
        self._pending = bytearray()
        self._must_fsync = False
        self.repaired_bytes = 0
        """Bytes cut from a torn tail when the file was opened."""
        self.fsync_count = 0
        self.size_bytes = 0
        self._replay()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    # -- replay -----------------------------------------------------------------------

    def _replay(self) -> None:
        if not self.path.exists():
            return
        buf = self.path.read_bytes()
        payloads, good = scan_records(buf)
        for payload in payloads:
            self._apply_record(payload)
        if good < len(buf):
            self.repaired_bytes = len(buf) - good
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        self.size_bytes = good

    def _apply_record(self, payload: bytes) -> None:
        try:
            rec: Any = msgpack.unpackb(payload, raw=False)
            kind = rec[0]
            if kind == _ENTRY:
                _, term, index, ekind, data = rec
                _append(self._log, [Entry(term=term, index=index, kind=ekind, data=data)])
            elif kind == _HARD:
                _, term, vote, commit = rec
                self._hard_state = HardState(term=term, vote=vote, commit=commit)
            elif kind == _TRUNC:
                index = rec[1]
                first = self._log.entries[0].index if self._log.entries else index
                del self._log.entries[max(0, index - first) :]
            elif kind == _COMPACTED:
                _compact(self._log, rec[1], rec[2])
            else:
                raise CorruptLogError(f"unknown WAL record kind {kind!r}")
        except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
            raise CorruptLogError(f"undecodable WAL record: {exc}") from exc

    # -- LogStore / StableStore -------------------------------------------------------

    def load(self) -> LoadedLog:
        """The replayed log (entries after the compaction point)."""
        return LoadedLog(
            self._log.compacted_index, self._log.compacted_term, list(self._log.entries)
        )

    @property
    def last_index(self) -> int:
        """Index of the last entry (the compaction index when there is none)."""
        return self._log.entries[-1].index if self._log.entries else self._log.compacted_index

    def load_hard_state(self) -> HardState | None:
        """The last hard state written."""
        return self._hard_state

    def save_hard_state(self, hard_state: HardState) -> None:
        """Queue a hard-state record (durable after :meth:`sync`).

        A record that only moves the commit index does not by itself force an fsync:
        the commit index is volatile state in Raft (a restarted node learns it again from
        the leader), so it rides along with the next fsync. Term and vote changes, which
        must be durable before any vote or message goes out, always force one.
        """
        old = self._hard_state
        if old is None or old.term != hard_state.term or old.vote != hard_state.vote:
            self._must_fsync = True
        self._hard_state = hard_state
        self._queue([_HARD, hard_state.term, hard_state.vote, hard_state.commit])

    def append(self, entries: Sequence[Entry]) -> None:
        """Queue entries, with a truncation record first when they overwrite a suffix."""
        if not entries:
            return
        self._must_fsync = True
        if entries[0].index <= self.last_index:
            self._queue([_TRUNC, max(entries[0].index, self._log.compacted_index + 1)])
        _append(self._log, entries)
        for e in entries:
            if e.index > self._log.compacted_index:
                self._queue([_ENTRY, e.term, e.index, int(e.kind), e.data])

    def _queue(self, record: list[Any]) -> None:
        self._pending += frame(msgpack.packb(record, use_bin_type=True))

    def sync(self) -> None:
        """Write every queued record with one ``write`` and (if enabled) one ``fsync``."""
        if self._fd is None:
            raise AssertionError("WAL used after close")
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self.size_bytes += len(data)
            if self.fsync and self._must_fsync:
                _datasync(self._fd)
                self.fsync_count += 1
            self._must_fsync = False

    def compact(self, index: int, term: int, *, keep_tail: bool = True) -> None:
        """Rewrite the file without entries up to ``index`` (atomically, via rename).

        With ``keep_tail=False`` every entry is dropped (installing a leader's snapshot).
        """
        if index <= self._log.compacted_index and keep_tail:
            return
        self.sync()
        _compact(self._log, index, term, keep_tail=keep_tail)
        index, term = self._log.compacted_index, self._log.compacted_term
        records: list[list[Any]] = [[_COMPACTED, index, term]]
        if self._hard_state is not None:
            hs = self._hard_state
            records.append([_HARD, hs.term, hs.vote, hs.commit])
        records.extend([_ENTRY, e.term, e.index, int(e.kind), e.data] for e in self._log.entries)
        data = b"".join(frame(msgpack.packb(r, use_bin_type=True)) for r in records)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if self._fd is not None:
            os.close(self._fd)
        os.replace(tmp, self.path)
        fsync_dir(self.directory)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size_bytes = len(data)

    def close(self) -> None:
        """Sync what is queued and close the file."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.sync()
            os.close(self._fd)
            self._fd = None


class FileSnapshotStore:
    """Durable :class:`~dsys.raft.storage.SnapshotStore`: one file per snapshot.

    Files are ``snap-<index>.snap`` holding a magic, a CRC32 and a msgpack body. Each is
    written to a temp file, fsynced, renamed into place and the directory fsynced; the
    two newest are kept. :meth:`load` returns the newest that passes its CRC.

    Args:
        directory: where snapshot files live (created if missing).
        fsync: False skips fsyncs (unsafe, for benchmarks).
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob("snap-*.snap"), reverse=True)

    def save(self, snapshot: Snapshot) -> None:
        """Write ``snapshot`` durably and delete all but the previous one."""
        meta = snapshot.meta
        body = msgpack.packb(
            {
                "index": meta.index,
                "term": meta.term,
                "conf": _plain_conf(meta.conf),
                "data": snapshot.data,
            },
            use_bin_type=True,
        )
        blob = _SNAP_MAGIC + struct.pack("<I", zlib.crc32(body)) + body
        final = self.directory / f"snap-{meta.index:020d}.snap"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if self.fsync:
            fsync_dir(self.directory)
        for old in self._files()[2:]:
            with contextlib.suppress(OSError):
                old.unlink()

    def load(self) -> Snapshot | None:
        """The newest snapshot whose checksum is good (older ones are the fallback)."""
        for path in self._files():
            snap = _read_snapshot(path)
            if snap is not None:
                return snap
        return None


def _plain_conf(conf: ConfState) -> dict[str, Any]:
    return {
        f.name: list(v) if isinstance(v := getattr(conf, f.name), tuple) else v
        for f in dataclasses.fields(conf)
    }


def _read_snapshot(path: Path) -> Snapshot | None:
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    head = len(_SNAP_MAGIC) + 4
    if len(blob) < head or not blob.startswith(_SNAP_MAGIC):
        return None
    (crc,) = struct.unpack_from("<I", blob, len(_SNAP_MAGIC))
    body = blob[head:]
    if zlib.crc32(body) != crc:
        return None
    try:
        v = msgpack.unpackb(body, raw=False)
        conf = ConfState(
            **{k: tuple(x) if isinstance(x, list) else x for k, x in v["conf"].items()}
        )
        meta = SnapshotMeta(index=v["index"], term=v["term"], conf=conf)
        return Snapshot(meta=meta, data=v["data"])
    except (KeyError, TypeError, ValueError, msgpack.UnpackException):
        return None


__all__ = ["MAX_RECORD", "CorruptLogError", "FileSnapshotStore", "WriteAheadLog", "frame"]
