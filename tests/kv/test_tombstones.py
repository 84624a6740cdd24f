"""Tombstones of dropped ranges: the pure set (epochs, bound, encoding) and a multi-Raft
node that keeps them across a restart and refuses stale replicas of those ranges."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsys.codec import encode
from dsys.errors import BadInputError
from dsys.kv.multi import MultiRaftServer
from dsys.kv.rangefsm import RangeStateMachine, Report, encode_meta
from dsys.kv.ranges import Epoch, RangeDescriptor
from dsys.kv.tombstones import Tombstone, Tombstones
from dsys.raft.messages import ConfState, Heartbeat, Message, Snapshot, SnapshotMeta
from dsys.raft.messages import SnapshotRequest as SnapReq
from dsys.raft.node import MAX_PEER_BODY, to_wire
from dsys.raft.wal import CorruptLogError, FileSnapshotStore

from .helpers import free_ports, multi_configs

REPLICAS = ("n1", "n2", "n3")


def _desc(rid: int, epoch: Epoch, start: str = "m", end: str | None = None) -> RangeDescriptor:
    return RangeDescriptor(range_id=rid, start=start, end=end, epoch=epoch, replicas=REPLICAS)


def test_a_tombstone_refuses_what_is_not_newer() -> None:
    moved = Tombstone(7, Epoch(4, 2))
    assert moved.refuses(_desc(7, Epoch(3, 2)))  # from before the move
    assert moved.refuses(_desc(7, Epoch(9, 1)))  # an older version (bounds)
    # the state right after the removal: a move back snapshots it, then adds the learner
    assert not moved.refuses(_desc(7, Epoch(4, 2)))
    assert not moved.refuses(_desc(7, Epoch(5, 2)))  # moved back here since
    merged = Tombstone(9, Epoch(1, 3), merged=True)
    assert merged.refuses(_desc(9, Epoch(99, 99)))  # a merged range never comes back


def test_the_set_keeps_the_newest_epoch_is_bounded_and_round_trips() -> None:
    ts = Tombstones(max_entries=3)
    assert ts.add(Tombstone(5, Epoch(4, 2)))
    assert not ts.add(Tombstone(5, Epoch(3, 2)))  # older: nothing changes
    assert ts.add(Tombstone(5, Epoch(6, 2), merged=True))
    assert ts.get(5) == Tombstone(5, Epoch(6, 2), merged=True)
    for rid in (2, 8, 9):
        ts.add(Tombstone(rid, Epoch(1, 1)))
    assert [t.range_id for t in ts] == [5, 8, 9]  # the lowest (oldest) id went first
    back = Tombstones.decode(ts.encode(), max_entries=3)
    assert list(back) == list(ts) and back.merged(5) and not back.merged(8)
    data = bytearray(ts.encode())
    data[-1] ^= 1
    with pytest.raises(BadInputError, match="CRC"):
        Tombstones.decode(bytes(data))
    with pytest.raises(BadInputError):
        Tombstones.decode(b"nonsense")
    with pytest.raises(BadInputError):
        Tombstones(max_entries=0)


def _frame(rid: int, msgs: list[Message]) -> bytes:
    return encode([[rid, [to_wire(m) for m in msgs]]], max_size=MAX_PEER_BODY)


def _snapshot(desc: RangeDescriptor) -> Snapshot:
    meta = SnapshotMeta(index=20, term=5, conf=ConfState(voters=REPLICAS))
    return Snapshot(meta, RangeStateMachine(desc).snapshot())


async def test_tombstones_survive_a_restart_and_refuse_stale_replicas(tmp_path: Path) -> None:
    # n1 alone (n2, n3 are never started): the frames below are what their stale
    # replicas would send; nothing here needs a quorum
    cfg = multi_configs(tmp_path, free_ports(3), balance_interval=None)[0]
    s = MultiRaftServer(cfg)
    s.bury(7, Epoch(4, 2))  # range 7 moved away at conf_ver 4
    s.bury(9, Epoch(1, 3), merged=True)  # range 9 merged away
    await s.close()

    s = MultiRaftServer(cfg)  # the restart
    try:
        assert s.tombs.get(7) == Tombstone(7, Epoch(4, 2)) and s.upkeep.tombstones == {9}
        # the right half of a split re-applied from an old log is not resurrected
        left = _desc(1, Epoch(1, 2), start="", end="m")
        s._on_split(
            left, _desc(7, Epoch(1, 2)), RangeStateMachine(_desc(7, Epoch(1, 2))).snapshot()
        )
        assert 7 not in s.groups and not (Path(cfg.data_dir) / "r7").exists()
        # a stale leader's heartbeats create no replica; its snapshot is refused
        hb = Heartbeat(src="n2", dst="n1", term=5, commit=0)
        s._deliver_frame(_frame(9, [hb]), "n2")
        s._deliver_frame(_frame(7, [hb]), "n2")
        stale = SnapReq(src="n2", dst="n1", term=5, snapshot=_snapshot(_desc(7, Epoch(3, 2))))
        s._deliver_frame(_frame(7, [stale]), "n2")
        assert 7 not in s.groups and 9 not in s.groups
        assert s.stale_replicas_refused == 2 and s.unknown_group_msgs == 2  # the heartbeats
        # moved back here (the map lists n1 at conf_ver 5): a replica is created, and
        # still only a newer snapshot reaches it
        s.meta.apply(encode_meta(Report((left, _desc(7, Epoch(5, 2))))))
        assert s.meta.map.get(7) == _desc(7, Epoch(5, 2))
        s._deliver_frame(_frame(7, [hb, stale]), "n2")
        assert 7 in s.groups and not s.groups[7].initialized
        assert s.stale_replicas_refused == 3
        # the leader of a move back snapshots the state right after the removal (the
        # tombstone's own epoch), then adds the learner: that snapshot gets through
        fresh = SnapReq(src="n2", dst="n1", term=5, snapshot=_snapshot(_desc(7, Epoch(4, 2))))
        s._deliver_frame(_frame(7, [fresh]), "n2")
        assert s.stale_replicas_refused == 3
        # a crash between the tombstone and the removal of the data: the directory of
        # the replica (conf_ver 5) is still there, the tombstone says 6
        FileSnapshotStore(Path(cfg.data_dir) / "r7" / "snap").save(_snapshot(_desc(7, Epoch(5, 2))))
        s.bury(7, Epoch(6, 2))
    finally:
        await s.close()
    s = MultiRaftServer(cfg)
    try:
        assert 7 not in s.groups and not (Path(cfg.data_dir) / "r7").exists()
        assert s.stale_replicas_refused == 1
    finally:
        await s.close()
    # a damaged tombstone file stops the node (as a damaged WAL does)
    (Path(cfg.data_dir) / "tombstones").write_bytes(b"DSYSTOMB1 garbage")
    with pytest.raises(CorruptLogError, match="tombstones"):
        MultiRaftServer(cfg)
