"""The shared WAL of a multi-Raft process: real files, replay, group commit, compaction."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsys.raft.messages import Entry, HardState
from dsys.raft.sharedwal import GroupLog, SharedWAL
from dsys.raft.wal import CorruptLogError


def _entries(lo: int, hi: int, term: int = 1, tag: str = "v") -> list[Entry]:
    return [Entry(term=term, index=i, kind=0, data=f"{tag}{i}".encode()) for i in range(lo, hi + 1)]


def _segments(d: Path) -> list[Path]:
    return sorted(d.glob("wal-*.log"))


def _crash(wal: SharedWAL) -> None:
    """Drop the WAL as kill -9 would: nothing queued is written, the fd just closes."""
    assert wal._fd is not None
    os.close(wal._fd)
    wal._fd = None
    wal._closed = True


def test_interleaved_groups_round_trip(tmp_path: Path) -> None:
    wal = SharedWAL(tmp_path)
    a, b, c = wal.group(1), wal.group(2), wal.group(7)
    for lo in (1, 4, 7):
        a.append(_entries(lo, lo + 2, tag="a"))
        b.append(_entries(lo, lo + 2, tag="b"))
    c.save_hard_state(HardState(term=5, vote="n3", commit=0))
    a.save_hard_state(HardState(term=1, vote="n1", commit=6))
    b.append(_entries(5, 6, term=2, tag="B"))  # conflicting suffix of group 2 only
    wal.sync()
    assert wal.fsync_count == 1  # one fsync for all three groups
    assert wal.batch_groups_max == 3
    wal.close()
    again = SharedWAL(tmp_path)
    assert again.range_ids() == [1, 2, 7]
    assert again.group(1).load().entries == _entries(1, 9, tag="a")
    assert again.group(2).load().entries == _entries(1, 4, tag="b") + _entries(
        5, 6, term=2, tag="B"
    )
    assert again.group(7).load().entries == []
    assert again.group(7).load_hard_state() == HardState(term=5, vote="n3", commit=0)
    assert again.group(1).load_hard_state() == HardState(term=1, vote="n1", commit=6)
    assert again.repaired_bytes == 0
    again.close()


def test_torn_tail_is_cut_at_the_last_good_record(tmp_path: Path) -> None:
    wal = SharedWAL(tmp_path)
    g = wal.group(3)
    g.append(_entries(1, 3))
    wal.sync()
    last = _segments(tmp_path)[-1]
    good = last.stat().st_size
    g.append(_entries(4, 5))
    wal.group(4).append(_entries(1, 1))
    wal.sync()
    _crash(wal)
    with open(last, "r+b") as f:  # the crash tore the second write
        f.truncate(good + 7)
    again = SharedWAL(tmp_path)
    assert again.repaired_bytes == 7
    assert again.group(3).load().entries == _entries(1, 3)
    assert again.range_ids() == [3]
    again.group(3).append(_entries(4, 4, term=2))
    again.close()
    third = SharedWAL(tmp_path)
    assert third.group(3).load().entries == _entries(1, 3) + _entries(4, 4, term=2)
    third.close()


def test_damage_before_the_tail_is_corruption(tmp_path: Path) -> None:
    wal = SharedWAL(tmp_path, segment_bytes=200, rewrite_bytes=0)
    g = wal.group(1)
    for i in range(1, 30):
        g.append(_entries(i, i))
        wal.sync()
    wal.close()
    first = _segments(tmp_path)[0]
    raw = bytearray(first.read_bytes())
    raw[20] ^= 0xFF
    first.write_bytes(bytes(raw))
    with pytest.raises(CorruptLogError):
        SharedWAL(tmp_path, segment_bytes=200)


def test_compaction_deletes_segments_no_group_needs(tmp_path: Path) -> None:
    wal = SharedWAL(tmp_path, segment_bytes=512, rewrite_bytes=0)
    a, b = wal.group(1), wal.group(2)
    for i in range(1, 41):
        a.append(_entries(i, i, tag="a" * 20))
        b.append(_entries(i, i, tag="b" * 20))
        wal.sync()
    many = len(_segments(tmp_path))
    assert many > 4
    a.compact(40, 1)
    wal.sync()
    assert len(_segments(tmp_path)) == many  # group 2 still needs them all
    b.compact(30, 1)
    wal.sync()
    kept = len(_segments(tmp_path))
    assert kept < many
    wal.remove(2)  # a removed group stops pinning its segments
    wal.sync()
    assert len(_segments(tmp_path)) == 1
    wal.close()
    again = SharedWAL(tmp_path, segment_bytes=512, rewrite_bytes=0)
    assert again.range_ids() == [1]
    loaded = again.group(1).load()
    assert (loaded.compacted_index, loaded.compacted_term, loaded.entries) == (40, 1, [])
    again.close()


@pytest.mark.parametrize("rewrite", [False, True], ids=["pinned", "rewritten"])
def test_an_idle_group_with_live_entries(tmp_path: Path, rewrite: bool) -> None:
    # Without rewriting, an idle group's first live entry pins its segment and every one
    # after it; with it, its few entries move into each new segment's header.
    rewrite_bytes = 1024 if rewrite else 0
    wal = SharedWAL(tmp_path, segment_bytes=400, rewrite_bytes=rewrite_bytes)
    idle, busy = wal.group(1), wal.group(2)
    idle.append(_entries(1, 2, tag="idle"))
    idle.save_hard_state(HardState(term=2, vote="n1", commit=1))
    for i in range(1, 60):
        busy.append(_entries(i, i, tag="x" * 30))
        busy.compact(i, 1)
        wal.sync()
    if rewrite:
        assert len(_segments(tmp_path)) <= 2
    else:
        assert len(_segments(tmp_path)) > 10
        idle.compact(2, 1)
        idle.append(_entries(3, 3, tag="idle"))
        wal.sync()
        assert len(_segments(tmp_path)) <= 2
    _crash(wal)
    again = SharedWAL(tmp_path, segment_bytes=400, rewrite_bytes=rewrite_bytes)
    s = again.group(1).load()
    if rewrite:
        assert (s.compacted_index, s.entries) == (0, _entries(1, 2, tag="idle"))
    else:
        assert (s.compacted_index, s.entries) == (2, _entries(3, 3, tag="idle"))
    assert again.group(1).load_hard_state() == HardState(term=2, vote="n1", commit=1)
    assert again.group(2).load().compacted_index == 59
    again.close()


def test_reset_drops_every_entry_of_one_group(tmp_path: Path) -> None:
    wal = SharedWAL(tmp_path)
    wal.group(1).append(_entries(1, 8))
    wal.group(2).append(_entries(1, 3))
    wal.group(1).compact(20, 4, keep_tail=False)  # installed a leader's snapshot
    wal.group(1).append(_entries(21, 22, term=4))
    wal.sync()
    _crash(wal)
    again = SharedWAL(tmp_path)
    one = again.group(1).load()
    assert (one.compacted_index, one.compacted_term, one.entries) == (20, 4, _entries(21, 22, 4))
    assert again.group(2).load().entries == _entries(1, 3)
    again.close()


async def test_groups_syncing_while_a_flush_runs_share_the_next_fsync(tmp_path: Path) -> None:
    wal = SharedWAL(tmp_path)
    groups = [wal.group(rid) for rid in range(1, 9)]

    async def write(g: GroupLog, lo: int) -> None:
        g.append(_entries(lo, lo, tag=str(g.range_id)))
        await g.sync_async()

    # the first group starts a flush at once; the seven others queue while it runs
    await asyncio.gather(*(write(g, 1) for g in groups))
    assert wal.fsync_count == 2
    assert wal.batch_groups_max == 7
    await asyncio.gather(*(write(g, i) for i in (2, 3) for g in groups))
    assert wal.fsync_count <= 2 + 3
    await wal.aclose()
    again = SharedWAL(tmp_path)
    for g in groups:
        assert again.group(g.range_id).load().entries[-1].index == 3
    again.close()


async def test_flush_at_turn_end_gathers_every_group_of_the_turn(tmp_path: Path) -> None:
    wal = SharedWAL(tmp_path, flush_at_turn_end=True)
    groups = [wal.group(rid) for rid in range(1, 9)]

    async def write(g: GroupLog) -> None:
        g.append(_entries(1, 1))
        await g.sync_async()

    await asyncio.gather(*(write(g) for g in groups))
    assert (wal.fsync_count, wal.batch_groups_max) == (1, 8)
    await wal.aclose()


async def test_blocking_sync_from_a_thread_completes_waiters_on_the_loop(tmp_path: Path) -> None:
    wal = SharedWAL(tmp_path)
    a, b = wal.group(1), wal.group(2)
    a.append(_entries(1, 1))
    waiter = asyncio.ensure_future(a.sync_async())
    await asyncio.sleep(0)
    b.append(_entries(1, 1))
    await asyncio.to_thread(b.sync)  # e.g. a node persisting a snapshot in a thread
    await asyncio.wait_for(waiter, 5)
    await wal.aclose()
    again = SharedWAL(tmp_path)
    assert [again.group(r).last_index for r in (1, 2)] == [1, 1]
    again.close()


# -- model test ---------------------------------------------------------------------


class _Model:
    """The expected state: per group a compaction point, a list of entries, a hard state."""

    def __init__(self) -> None:
        self.groups: dict[int, dict[str, Any]] = {}

    def g(self, rid: int) -> dict[str, Any]:
        return self.groups.setdefault(rid, {"base": (0, 0), "entries": [], "hard": None})

    @staticmethod
    def last(g: dict[str, Any]) -> int:
        return g["entries"][-1].index if g["entries"] else g["base"][0]


_ops = st.lists(
    st.tuples(
        st.sampled_from(["append", "append", "append", "compact", "reset", "hard", "remove"]),
        st.integers(1, 4),  # range id
        st.integers(0, 6),  # offset / count
        st.integers(1, 5),  # term
        st.booleans(),  # sync after
    ),
    max_size=60,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_ops, crash_at=st.integers(0, 60), rewrite=st.sampled_from([0, 100, 10_000]))
def test_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[Any], crash_at: int, rewrite: int
) -> None:
    d = tmp_path_factory.mktemp("swal")
    model = _Model()
    synced: dict[int, dict[str, Any]] = {}
    wal = SharedWAL(d, fsync=False, segment_bytes=300, rewrite_bytes=rewrite)
    for n, (op, rid, k, term, sync) in enumerate(ops):
        g = model.g(rid)
        gl = wal.group(rid)
        last, base = model.last(g), g["base"]
        if op == "append":
            first = max(base[0] + 1, last + 1 - k)  # overwrite up to k entries
            new = _entries(first, first + k, term=term, tag=f"{n}.")
            gl.append(new)
            g["entries"] = [e for e in g["entries"] if e.index < first] + new
        elif op == "compact" and last > base[0]:
            index = min(last, base[0] + 1 + k)
            t = next(e.term for e in g["entries"] if e.index == index)
            gl.compact(index, t)
            g["entries"] = [e for e in g["entries"] if e.index > index]
            g["base"] = (index, t)
        elif op == "reset":
            index = base[0] + k
            gl.compact(index, term, keep_tail=False)
            g["entries"] = []
            if index > base[0]:
                g["base"] = (index, term)
        elif op == "hard":
            hs = HardState(term=term, vote=f"n{k}", commit=min(k, last))
            gl.save_hard_state(hs)
            g["hard"] = hs
        elif op == "remove":
            wal.remove(rid)
            del model.groups[rid]
        if sync:
            wal.sync()
            synced = {
                r: {"base": v["base"], "entries": list(v["entries"]), "hard": v["hard"]}
                for r, v in model.groups.items()
            }
        if n == crash_at:
            break
    _crash(wal)
    again = SharedWAL(d, fsync=False, segment_bytes=300, rewrite_bytes=rewrite)
    got = {}
    for rid in again.range_ids():
        loaded = again.group(rid).load()
        got[rid] = {
            "base": (loaded.compacted_index, loaded.compacted_term),
            "entries": loaded.entries,
            "hard": again.group(rid).load_hard_state(),
        }
    again.close()
    # groups that only ever queued records before the last sync are not expected
    want = {r: v for r, v in synced.items() if v["entries"] or v["hard"] or v["base"] != (0, 0)}
    got = {r: v for r, v in got.items() if v["entries"] or v["hard"] or v["base"] != (0, 0)}
    assert got == want


async def test_a_failed_write_fails_every_waiter_and_every_later_sync(tmp_path: Path) -> None:
    wal = SharedWAL(tmp_path)
    g = wal.group(1)
    g.append(_entries(1, 1))
    await g.sync_async()
    assert wal._fd is not None
    os.close(wal._fd)
    wal._fd = os.open(os.devnull, os.O_RDONLY)  # the disk is gone: writes fail (EBADF)
    g.append(_entries(2, 2))
    with pytest.raises(OSError):
        await g.sync_async()
    with pytest.raises(OSError):  # no write is ever acknowledged after a failed one
        await g.sync_async()
    with pytest.raises(OSError):
        g.sync()
    await wal.aclose()
    again = SharedWAL(tmp_path)
    assert again.group(1).load().entries == _entries(1, 1)
    again.close()
