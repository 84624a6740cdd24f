"""The multi-Raft KV on its shared WAL: group commit across ranges, restart from it, and
acknowledged writes surviving ``kill -9`` of every process (slow)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dsys.errors import ConfigError
from dsys.kv.multi import MultiConfig, MultiRaftServer
from dsys.kv.rangefsm import RangeStateMachine
from dsys.kv.sharded import ShardedKVClient

from .helpers import free_ports, multi_cluster, multi_configs, multi_procs, ready_sharded_client


def _configs(tmp: Path, ports: list[int], wal: str = "shared") -> list[MultiConfig]:
    return multi_configs(
        tmp, ports, fsync=True, wal=wal, request_timeout=3.0, balance_interval=None
    )


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[MultiRaftServer]]:
    async with multi_cluster(_configs(tmp_path, free_ports(3))) as servers:
        yield servers


async def test_ranges_share_fsyncs_and_a_node_restarts_from_the_shared_wal(
    cluster: list[MultiRaftServer], tmp_path: Path
) -> None:
    addrs = [f"127.0.0.1:{s.config.port}" for s in cluster]
    async with ShardedKVClient(addrs, timeout=20.0) as kv:
        for key in ["g", "p"]:
            await kv.split((await kv.locate(key)).range_id, key)
        keys = [f"{p}{i}" for i in range(20) for p in "atz"]  # three ranges, interleaved
        await asyncio.gather(*(kv.put(k, k.encode()) for k in keys))
    stats = [s.wal_stats() for s in cluster]
    assert all(st["kind"] == "shared" for st in stats)
    # the writes of the three ranges went to disk together, not one fsync per range
    assert max(int(st["groups_per_write_max"]) for st in stats) >= 2, stats
    assert not any((tmp_path / s.config.id / "r1" / "wal").exists() for s in cluster)
    # restart one node from its shared WAL: every range comes back with its data
    victim = cluster[1]
    await victim.close()
    again = MultiRaftServer(victim.config)
    cluster[1] = again
    await again.start()
    data_ranges = {g.range_id for g in again.data_groups()}
    assert len(data_ranges) == 3
    fsms = [g.fsm for g in again.data_groups() if isinstance(g.fsm, RangeStateMachine)]
    missing = set(keys)
    for _ in range(500):  # caught up from its own WAL (and the leaders, for the tail)
        missing = {k for k in missing if all(f.get(k) is None for f in fsms)}
        if not missing:
            break
        await asyncio.sleep(0.02)
    assert not missing


def test_a_data_dir_keeps_its_wal_kind(tmp_path: Path) -> None:
    cfg = _configs(tmp_path, free_ports(1), wal="per-range")[0]
    MultiRaftServer(cfg)  # creates per-range WALs for ranges 0 and 1
    with pytest.raises(ConfigError, match="per-range"):
        MultiRaftServer(_configs(tmp_path, free_ports(1), wal="shared")[0])
    with pytest.raises(ConfigError, match="wal must be"):
        MultiConfig(id="n1", data_dir=str(tmp_path), wal="sqlite")


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_acknowledged_writes_survive_kill9_of_every_process(tmp_path: Path) -> None:
    # no snapshots: what survives comes from the WAL
    nodes = multi_procs(tmp_path, 3, "--snapshot-every", "1000000")
    for n in nodes:
        n.start()
    acked: dict[str, bytes] = {}
    try:
        addrs = [n.addr for n in nodes]
        async with await ready_sharded_client(addrs, "a-warm", attempts=300) as kv:
            for key in ["f", "m", "t"]:
                await kv.split((await kv.locate(key)).range_id, key)

            async def writer(prefix: str) -> None:
                for i in range(10_000):
                    key, value = f"{prefix}{i % 150}", f"{prefix}-{i}".encode()
                    await kv.put(key, value)
                    acked[key] = value  # only after the cluster acknowledged it

            tasks = [asyncio.create_task(writer(p)) for p in "cgpw"]  # four ranges
            await asyncio.sleep(4.0)
            for n in nodes:  # every process at once, in the middle of the writes
                n.kill9()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert len(acked) > 40
        for n in nodes:
            n.start()
        async with ShardedKVClient(addrs, timeout=60.0) as kv:
            for _ in range(300):
                try:
                    await kv.refresh()
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            for key, value in sorted(acked.items()):
                got = await kv.get(key)
                assert got is not None, key
                # the acked value, or the one write in flight after it on that key
                n_acked = value.decode().split("-")[1]
                n_got = int(got.value.decode().split("-")[1])
                assert n_got in (int(n_acked), int(n_acked) + 150), (key, value, got.value)
    finally:
        for n in nodes:
            n.kill9()
