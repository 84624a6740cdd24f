"""3 real server processes: kill -9 the leader, nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsys.kv.client import KVClient

from .helpers import Proc, cluster_configs, status, wait_proc_leader


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    ps = [Proc(c, extra=["--snapshot-every", "20"]) for c in cluster_configs(tmp_path, 3)]
    for p in ps:
        p.start()
    try:
        yield ps
    finally:
        for p in ps:
            p.kill9()


async def _wait_applied(proc: Proc, index: int, limit_s: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + limit_s
    st: dict[str, object] | None = None
    while time.monotonic() < deadline:
        st = await status(proc.addr)
        if st is not None and int(st["applied_index"]) >= index:  # type: ignore[call-overload]
            return st
        await asyncio.sleep(0.05)
    raise AssertionError(f"{proc.cfg.id} did not apply {index}: {st}")


async def test_kill9_leader_loses_no_acknowledged_write_and_restart_catches_up(
    procs: list[Proc],
) -> None:
    leader = await wait_proc_leader(procs)
    async with KVClient([p.addr for p in procs], timeout=20.0) as kv:
        acked: dict[str, bytes] = {}

        async def writer(w: int, n: int) -> None:
            for i in range(n):
                key, value = f"w{w}/{i}", b"%d-%d" % (w, i)
                await kv.put(key, value)
                acked[key] = value

        await asyncio.gather(*(writer(w, 40) for w in range(8)))
        assert len(acked) == 320
        leader.kill9()
        # keep writing while the cluster fails over: every acknowledged write must survive
        await asyncio.gather(*(writer(w, 20) for w in range(8, 12)))
        new_leader = await wait_proc_leader([p for p in procs if p is not leader])
        assert new_leader is not leader
        for key, value in acked.items():
            got = await kv.get(key)
            assert got is not None and got.value == value, key
        # the killed node restarts from its WAL (+ snapshot) and catches up
        leader.start()
        st_leader = await status(new_leader.addr)
        assert st_leader is not None
        st = await _wait_applied(leader, int(st_leader["applied_index"]))  # type: ignore[call-overload]
        assert st["revision"] == st_leader["revision"]
        assert int(st["snapshot_index"]) > 0  # type: ignore[call-overload]
        sample = sorted(acked)[::37]
        for key in sample:
            got = await kv.get(key, stale=True)
            assert got is not None  # served by whichever node the client uses


async def test_lagging_node_catches_up_from_a_snapshot(procs: list[Proc]) -> None:
    leader = await wait_proc_leader(procs)
    victim = next(p for p in procs if p is not leader)
    victim.kill9()
    async with KVClient([p.addr for p in procs if p is not victim], timeout=20.0) as kv:
        # one at a time: concurrent writes share BATCH entries, and the snapshot (every
        # 20 entries here) needs entries
        for i in range(60):
            await kv.put(f"s{i}", b"x" * 100)
        await asyncio.gather(*(kv.put(f"s{i}", b"y" * 100) for i in range(60, 400)))
        st_leader = await status(leader.addr)
        assert st_leader is not None and int(st_leader["snapshot_index"]) > 0  # type: ignore[call-overload]
    victim.start()
    st = await _wait_applied(victim, int(st_leader["applied_index"]))  # type: ignore[call-overload]
    assert int(st["snapshot_index"]) >= int(st_leader["snapshot_index"])  # type: ignore[call-overload]
    assert st["keys"] == st_leader["keys"]


async def test_whole_cluster_kill9_and_restart_keeps_every_acknowledged_write(
    procs: list[Proc],
) -> None:
    await wait_proc_leader(procs)
    async with KVClient([p.addr for p in procs], timeout=20.0) as kv:
        # 50 entries one at a time (snapshots are taken every 20), then concurrent writes
        # that share BATCH entries in the WAL tail
        revs = [await kv.put(f"d{i}", b"%d" % i) for i in range(50)]
        revs += await asyncio.gather(*(kv.put(f"d{i}", b"%d" % i) for i in range(50, 250)))
        cas_rev = await kv.cas("d0", b"changed", revision=revs[0])
    for p in procs:
        p.kill9()
    for p in procs:
        p.start()  # snapshot (every 20 entries) + WAL tail replay
    await wait_proc_leader(procs)
    async with KVClient([p.addr for p in procs], timeout=20.0) as kv:
        got = await kv.get("d0")
        assert got is not None and got.value == b"changed" and got.revision == cas_rev
        for i in range(1, 250):
            got = await kv.get(f"d{i}")
            assert got is not None and got.value == b"%d" % i and got.revision == revs[i]
        assert len(await kv.scan("d", limit=1000)) == 250


async def test_torn_wal_tail_is_repaired_on_restart(procs: list[Proc]) -> None:
    leader = await wait_proc_leader(procs)
    victim = next(p for p in procs if p is not leader)
    async with KVClient([p.addr for p in procs], timeout=20.0) as kv:
        await asyncio.gather(*(kv.put(f"t{i}", b"x") for i in range(30)))
        victim.kill9()
        wal = Path(victim.cfg.data_dir) / "wal" / "raft.wal"
        good = wal.stat().st_size
        # a record cut short by the crash: header of a 64-byte record, 2 payload bytes
        wal.write_bytes(wal.read_bytes() + b"\x40\x00\x00\x00\xbf\xff\xff\xff\x00\x00")
        await kv.put("after", b"y")
        victim.start()
        st_leader = await status(leader.addr)
        assert st_leader is not None
        await _wait_applied(victim, int(st_leader["applied_index"]))  # type: ignore[call-overload]
    log = (Path(victim.cfg.data_dir).parent / f"{victim.cfg.id}.log").read_text()
    assert "wal_torn_tail_repaired" in log
    assert wal.stat().st_size >= good
