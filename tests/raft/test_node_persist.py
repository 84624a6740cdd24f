"""RaftNode's persistence order on a real WAL: what a restart finds on disk."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dsys.raft.messages import EntryKind
from dsys.raft.node import NodeConfig, RaftNode
from dsys.raft.wal import FileSnapshotStore, WriteAheadLog


class _Counter:
    """Appends every command; answers how many it has seen."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def apply(self, data: bytes) -> object:
        self.seen.append(data)
        return len(self.seen)

    def snapshot(self) -> bytes:
        return b"\n".join(self.seen)

    def restore(self, data: bytes) -> None:
        self.seen = data.split(b"\n") if data else []


async def _single_node(path: Path) -> tuple[RaftNode, WriteAheadLog, _Counter]:
    wal = WriteAheadLog(path / "wal")
    fsm = _Counter()
    node = RaftNode(
        NodeConfig(id="n1", tick_interval=0.01),
        log=wal,
        stable=wal,
        snapshots=FileSnapshotStore(path / "snap"),
        fsm=fsm,
    )
    await node.start()
    for _ in range(500):
        if node.is_leader:
            break
        await asyncio.sleep(0.01)
    assert node.is_leader
    return node, wal, fsm


async def test_answered_writes_are_durable_and_the_commit_index_follows(tmp_path: Path) -> None:
    # The commit-only hard state is written after the entries are applied and answered
    # (it needs no fsync): a clean restart still finds the entries and the commit index.
    node, _, fsm = await _single_node(tmp_path)
    results = [await node.propose(f"c{i}".encode()) for i in range(5)]
    assert results == [1, 2, 3, 4, 5]
    last = node.applied_index
    await node.close()

    wal = WriteAheadLog(tmp_path / "wal")
    hs = wal.load_hard_state()
    assert hs is not None and hs.commit == last
    normal = [e.data for e in wal.load().entries if e.kind == EntryKind.NORMAL]
    assert normal == [f"c{i}".encode() for i in range(5)] == fsm.seen
    wal.close()


async def test_a_restarted_node_applies_what_it_had_committed(tmp_path: Path) -> None:
    node, _, _ = await _single_node(tmp_path)
    for i in range(3):
        await node.propose(f"c{i}".encode())
    await node.close()

    again, _, fsm = await _single_node(tmp_path)
    try:
        assert await again.propose(b"c3") == 4
        assert fsm.seen == [b"c0", b"c1", b"c2", b"c3"]
    finally:
        await again.close()
