from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsys.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from dsys.raft.storage import MemoryLogStore
from dsys.raft.wal import CorruptLogError, FileSnapshotStore, WriteAheadLog


def _entries(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(term=term, index=i, kind=0, data=f"v{i}".encode()) for i in range(lo, hi + 1)]


def test_reopen_round_trips_entries_and_hard_state(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.save_hard_state(HardState(term=3, vote="n2", commit=2))
    wal.append(_entries(1, 5))
    wal.sync()
    assert wal.fsync_count == 1  # one fsync for hard state and five entries
    wal.close()
    again = WriteAheadLog(tmp_path)
    assert again.load_hard_state() == HardState(term=3, vote="n2", commit=2)
    assert again.load().entries == _entries(1, 5)
    assert again.repaired_bytes == 0
    again.close()


def test_conflicting_suffix_is_truncated_and_survives_reopen(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(_entries(1, 5, term=1))
    wal.append(_entries(3, 4, term=2))
    wal.sync()
    wal.close()
    want = _entries(1, 2, term=1) + _entries(3, 4, term=2)
    again = WriteAheadLog(tmp_path)
    assert again.load().entries == want
    mem = MemoryLogStore()
    mem.append(_entries(1, 5, term=1))
    mem.append(_entries(3, 4, term=2))
    assert mem.load().entries == want
    again.close()


def test_compaction_rewrites_file_and_keeps_tail(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.save_hard_state(HardState(term=1, vote=None, commit=8))
    wal.append(_entries(1, 10))
    wal.sync()
    size = wal.path.stat().st_size
    wal.compact(8, 1)
    assert wal.path.stat().st_size < size
    wal.append(_entries(11, 12))
    wal.sync()
    wal.close()
    again = WriteAheadLog(tmp_path)
    loaded = again.load()
    assert (loaded.compacted_index, loaded.compacted_term) == (8, 1)
    assert [e.index for e in loaded.entries] == [9, 10, 11, 12]
    assert again.load_hard_state() == HardState(term=1, vote=None, commit=8)
    again.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(min_value=0, max_value=10_000), nbytes=st.integers(1, 300))
def test_torn_tail_at_any_offset_repairs_to_previous_records(
    tmp_path: Path, cut: int, nbytes: int
) -> None:
    d = tmp_path / f"t{cut}-{nbytes}"
    wal = WriteAheadLog(d)
    wal.append(_entries(1, 3))
    wal.sync()
    good = wal.path.stat().st_size
    wal.append([Entry(term=1, index=4, kind=0, data=b"x" * nbytes)])
    wal.sync()
    wal.close()
    full = wal.path.stat().st_size
    offset = good + cut % (full - good)  # every byte offset inside the last record
    with open(wal.path, "r+b") as f:
        f.truncate(offset)
    again = WriteAheadLog(d)
    assert again.load().entries == _entries(1, 3)
    assert again.repaired_bytes == offset - good
    assert again.path.stat().st_size == good
    # the repaired log accepts new appends and reopens cleanly
    again.append(_entries(4, 4))
    again.sync()
    again.close()
    assert WriteAheadLog(d).load().entries == _entries(1, 4)


def test_every_truncation_of_last_record_exhaustively(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "base")
    wal.append(_entries(1, 2))
    wal.sync()
    good = wal.path.stat().st_size
    wal.append(_entries(3, 3))
    wal.sync()
    wal.close()
    image = wal.path.read_bytes()
    for offset in range(good, len(image)):
        d = tmp_path / f"cut{offset}"
        d.mkdir()
        (d / WriteAheadLog.FILENAME).write_bytes(image[:offset])
        assert WriteAheadLog(d).load().entries == _entries(1, 2), offset


def test_crc_corruption_in_the_middle_is_detected(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(_entries(1, 5))
    wal.sync()
    wal.close()
    image = bytearray(wal.path.read_bytes())
    image[20] ^= 0xFF  # inside the first record's payload
    wal.path.write_bytes(bytes(image))
    with pytest.raises(CorruptLogError):
        WriteAheadLog(tmp_path)


def test_corrupted_header_in_the_middle_is_detected(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(_entries(1, 5))
    wal.sync()
    wal.close()
    image = bytearray(wal.path.read_bytes())
    image[1] ^= 0x01
    wal.path.write_bytes(bytes(image))
    with pytest.raises(CorruptLogError):
        WriteAheadLog(tmp_path)


def test_snapshot_store_round_trip_and_fallback(tmp_path: Path) -> None:
    store = FileSnapshotStore(tmp_path)
    assert store.load() is None
    conf = ConfState(voters=("n1", "n2", "n3"))
    s1 = Snapshot(meta=SnapshotMeta(index=10, term=2, conf=conf), data=b"one")
    s2 = Snapshot(meta=SnapshotMeta(index=20, term=3, conf=conf), data=b"two")
    store.save(s1)
    store.save(s2)
    assert store.load() == s2
    newest = sorted(tmp_path.glob("snap-*.snap"))[-1]
    blob = bytearray(newest.read_bytes())
    blob[-1] ^= 0xFF
    newest.write_bytes(bytes(blob))
    assert store.load() == s1  # a damaged newest snapshot falls back to the previous one
    assert not list(tmp_path.glob("*.tmp"))
    assert os.path.isdir(tmp_path)


def test_installing_a_leader_snapshot_drops_the_whole_log(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(_entries(1, 6, term=1))
    wal.save_hard_state(HardState(term=2, vote="n1", commit=3))
    wal.sync()
    wal.compact(5, 2, keep_tail=False)  # the leader's snapshot conflicts with our entry 5
    wal.append(_entries(6, 7, term=2))
    wal.sync()
    wal.close()
    loaded = WriteAheadLog(tmp_path).load()
    assert (loaded.compacted_index, loaded.compacted_term) == (5, 2)
    assert loaded.entries == _entries(6, 7, term=2)
    mem = MemoryLogStore()
    mem.append(_entries(1, 6, term=1))
    mem.compact(5, 2, keep_tail=False)
    assert mem.load().entries == []


def test_commit_only_hard_state_rides_along_without_its_own_fsync(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.save_hard_state(HardState(term=1, vote="n1", commit=0))
    wal.append(_entries(1, 2))
    wal.sync()
    assert wal.fsync_count == 1
    wal.save_hard_state(HardState(term=1, vote="n1", commit=2))  # only the commit moved
    wal.sync()
    assert wal.fsync_count == 1
    wal.save_hard_state(HardState(term=2, vote=None, commit=2))  # a new term must be durable
    wal.sync()
    assert wal.fsync_count == 2
    wal.close()
    assert WriteAheadLog(tmp_path).load_hard_state() == HardState(term=2, vote=None, commit=2)
