"""Merges of multi-Raft ranges on three in-process nodes over real sockets: a merge and
a split during writes with the history checked linearizable per key, automatic merges of
cold neighbours with the per-range metrics following, and a hot range split by load."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import random
import re
from pathlib import Path

import aiohttp
import pytest

from dsys.errors import BadInputError, ConflictError
from dsys.kv.multi import MultiConfig, MultiRaftServer
from dsys.kv.ranges import Epoch
from dsys.kv.sharded import ShardedKVClient
from dsys.testing.linearizability import History, KVModel, check

from .helpers import dsys_kv, free_ports, sharded_register_client
from .test_multiraft import _addrs, _configs, _leaders


def _merge_configs(tmp: Path, **kw: object) -> list[MultiConfig]:
    base = {"merge_keys": None, "split_qps": None, "merge_after_split": 0.5}
    return [dataclasses.replace(c, **{**base, **kw}) for c in _configs(tmp, free_ports(3))]  # type: ignore[arg-type]


async def _start(configs: list[MultiConfig]) -> list[MultiRaftServer]:
    servers = [MultiRaftServer(c) for c in configs]
    for s in servers:
        await s.start()
    await _leaders(servers, [0, 1])
    return servers


async def _merge_when_allowed(admin: ShardedKVClient, left: int, right: int) -> None:
    for _ in range(50):  # the split interval (0.5 s here) must pass first
        try:
            await admin.merge(left, right)
            return
        except ConflictError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"ranges {left} and {right} did not merge")


async def _metrics(server: MultiRaftServer) -> dict[str, float]:
    url = f"http://127.0.0.1:{server.port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        text = await r.text()
    return {
        m[1]: float(m[2])
        for m in re.finditer(r"^(dsys_(?:kv_range|raft)_\w+\{range=\"\d+\"\}) (\S+)$", text, re.M)
    }


async def test_merge_and_split_during_writes_are_linearizable_per_key(tmp_path: Path) -> None:
    servers = await _start(_merge_configs(tmp_path))
    try:
        addrs = _addrs(servers)
        keys = [f"k{i}" for i in range(10)]
        history = History()
        values = itertools.count(1)
        stop = asyncio.Event()
        async with ShardedKVClient(addrs) as admin:
            _, right = await admin.split(1, "k5")
            with pytest.raises(ConflictError, match="recently"):
                await admin.merge(1, right.range_id)  # within the interval after the split
            with pytest.raises(BadInputError, match="not neighbours"):
                await admin.merge(right.range_id, 1)
            clients = [
                asyncio.create_task(sharded_register_client(addrs, i, keys, history, values, stop))
                for i in range(4)
            ]
            await asyncio.sleep(1.0)
            await _merge_when_allowed(admin, 1, right.range_id)  # during the writes
            await asyncio.sleep(0.5)
            _, again = await admin.split(1, "k3")
            await asyncio.sleep(0.3)
            await _merge_when_allowed(admin, 1, again.range_id)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*clients)
            merged = await admin.locate("k9")
        ops = history.operations()
        done = [o for o in ops if o.ret is not None]
        assert len(done) > 100, f"too few completed operations: {len(done)}"
        result = check(ops, KVModel())
        assert result.linearizable, result.explain()
        i = next(i for i, o in enumerate(ops) if o.input[0] == "get" and o.ret is not None)
        forged = [*ops[:i], dataclasses.replace(ops[i], output=-1), *ops[i + 1 :]]
        assert not check(forged, KVModel()).linearizable
        # one range again, version bumped by each split (+1) and merge (prepare +1, max+1)
        assert (merged.range_id, merged.start, merged.end) == (1, "", None)
        assert merged.epoch == Epoch(1, 7)
        for s in servers:
            for _ in range(200):
                if [g.range_id for g in s.data_groups()] == [1] and len(s.meta.map) == 1:
                    break
                await asyncio.sleep(0.02)
            assert [g.range_id for g in s.data_groups()] == [1]
            assert [(r.range_id, r.epoch) for r in s.meta.map] == [(1, Epoch(1, 7))]
            for gone in (right.range_id, again.range_id):
                for _ in range(100):
                    if not (Path(s.config.data_dir) / f"r{gone}").exists():
                        break
                    await asyncio.sleep(0.02)
                assert not (Path(s.config.data_dir) / f"r{gone}").exists()
        for _ in range(200):
            counts = [len(s.groups[1].fsm) for s in servers]
            if counts[0] == counts[1] == counts[2]:
                break
            await asyncio.sleep(0.02)
        assert counts[0] == counts[1] == counts[2] and counts[0] > 0, counts
        print(f"{len(ops)} ops, {len(ops) - len(done)} unknown")
    finally:
        for s in servers:
            await s.close()


async def test_cold_neighbours_merge_by_themselves_and_metrics_follow(tmp_path: Path) -> None:
    servers = await _start(
        _merge_configs(
            tmp_path,
            merge_keys=100,
            merge_qps=5.0,
            merge_cold_for=0.3,
            merge_after_split=1.0,
            split_qps_window=1.0,
            report_interval=0.05,
        )
    )
    try:
        async with ShardedKVClient(_addrs(servers)) as kv:
            for k in ["a", "g", "p", "w"]:
                await kv.put(k, k.encode())
            _, b = await kv.split(1, "f")
            _, c = await kv.split(b.range_id, "o")
            await _leaders(servers, [c.range_id])  # merges wait a second after a split
            for _ in range(250):  # a follower applies the last split a moment later
                m = await _metrics(servers[0])
                if m.get(f'dsys_kv_range_epoch_version{{range="{c.range_id}"}}') == 3.0:
                    break
                await asyncio.sleep(0.02)
            for rid in (1, b.range_id, c.range_id):
                assert f'dsys_kv_range_keys{{range="{rid}"}}' in m, m
            assert m[f'dsys_kv_range_keys{{range="{c.range_id}"}}'] == 2.0
            assert m[f'dsys_kv_range_bytes{{range="{c.range_id}"}}'] == 4.0
            assert m[f'dsys_kv_range_epoch_version{{range="{c.range_id}"}}'] == 3.0
            scrapes = [await _metrics(s) for s in servers]  # one scrape per node for both
            flags = [x.get(f'dsys_kv_range_is_leader{{range="{c.range_id}"}}') for x in scrapes]
            assert sorted(flags) == [0.0, 0.0, 1.0], flags  # type: ignore[type-var]
            # the Raft figures of every group, the metadata range too, labelled by range
            for rid in (0, 1, b.range_id, c.range_id):
                assert m[f'dsys_raft_term{{range="{rid}"}}'] >= 1, m
                assert m[f'dsys_raft_commit_index{{range="{rid}"}}'] >= 1, m
                assert f'dsys_raft_elections_total{{range="{rid}"}}' in m, m
            assert m['dsys_raft_applied_index{range="0"}'] <= m['dsys_raft_commit_index{range="0"}']
            raft_leads = [x.get(f'dsys_raft_is_leader{{range="{c.range_id}"}}') for x in scrapes]
            assert raft_leads == flags, (raft_leads, flags)
            # idle and small: the three ranges merge back into one, with no admin call
            for _ in range(400):
                if all(len(s.data_groups()) == 1 for s in servers):
                    break
                await asyncio.sleep(0.02)
            assert all(len(s.data_groups()) == 1 for s in servers)
            # (the merge counter may miss one whose answer timed out after it committed)
            assert sum(s.upkeep.merges for s in servers) >= 1
            assert servers[0].local_descriptors()[0].describe() == "['', +inf)"
            for k in ["a", "g", "p", "w"]:
                got = await kv.get(k)
                assert got is not None and got.value == k.encode()
        # the series of the merged-away ranges are gone (bounded label cardinality)
        m = await _metrics(servers[0])
        ids = {re.sub(r".*range=\"(\d+)\".*", r"\1", k) for k in m if k.startswith("dsys_kv")}
        assert ids == {"1"}
        raft_ids = {re.sub(r".*range=\"(\d+)\".*", r"\1", k) for k in m if "raft" in k}
        assert raft_ids == {"0", "1"}
        assert m['dsys_kv_range_keys{range="1"}'] == 4.0
        assert m['dsys_kv_range_requests_total{range="1"}'] >= 0
    finally:
        for s in servers:
            await s.close()


@pytest.mark.slow
async def test_skewed_load_splits_the_hot_range_and_spreads_its_leaders(tmp_path: Path) -> None:
    servers = await _start(
        _merge_configs(tmp_path, split_qps=60.0, split_qps_window=2.0, report_interval=0.1)
    )
    try:
        addrs = _addrs(servers)
        async with ShardedKVClient(addrs) as admin:
            await admin.split(1, "m")
        stop = asyncio.Event()

        async def client(cid: int) -> None:
            # three clients write the right range as fast as they can; one writes the left
            # range at most 20 times a second, well under split_qps however fast the
            # machine is (a share of the writes would cross it on a fast one)
            rng = random.Random(cid)
            cold = cid == 0
            async with ShardedKVClient(addrs) as kv:
                while not stop.is_set():
                    await kv.put(f"{'a' if cold else 'n'}{rng.randrange(1000):03d}", b"v")
                    if cold:
                        await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(client(i)) for i in range(4)]
        for _ in range(200):  # up to 20 s of load
            if sum(s.upkeep.load_splits for s in servers):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        assert sum(s.upkeep.load_splits for s in servers) >= 1
        descs = servers[0].local_descriptors()
        # the hot range [m, +inf) was cut at a key among the hot ones; the cold one not
        assert descs[0].range_id == 1 and descs[0].end == "m"
        cut = [d.start for d in descs if d.start > "m"]
        assert cut and all("n000" < k < "n999" for k in cut), descs
        # and the leaders of the ranges spread over the nodes (the leader balancer)
        ids = [d.range_id for d in descs]
        for _ in range(300):
            lead = [s.config.id for rid in ids for s in servers if s.groups[rid].node.is_leader]
            counts = [lead.count(s.config.id) for s in servers]
            if len(lead) == len(ids) and max(counts) - min(counts) <= 1:
                break
            await asyncio.sleep(0.05)
        assert len(lead) == len(ids) and max(counts) - min(counts) <= 1, counts
        print(f"{len(ids)} ranges: {[d.describe() for d in descs]}, leaders {counts}")
    finally:
        for s in servers:
            await s.close()


@pytest.mark.slow
async def test_a_node_down_during_a_merge_drops_its_stale_replica(tmp_path: Path) -> None:
    servers = await _start(_merge_configs(tmp_path, snapshot_every=20, report_interval=0.1))
    try:
        async with ShardedKVClient(_addrs(servers)) as kv:
            _, right = await kv.split(1, "m")
            await _leaders(servers, [right.range_id])
            for i in range(10):
                await kv.put(f"z{i}", b"before")
            victim = servers[2]
            await victim.close()  # misses the merge, and (snapshot_every=20) its log entry
            await _merge_when_allowed(kv, 1, right.range_id)
            for i in range(60):  # enough writes that range 1 snapshots past the merge
                await kv.put(f"a{i % 7}", str(i).encode())
            servers[2] = MultiRaftServer(victim.config)
            await servers[2].start()
            back = servers[2]
            for _ in range(400):
                if [g.range_id for g in back.data_groups()] == [1] and len(back.groups[1].fsm):
                    break
                await asyncio.sleep(0.05)
            assert [g.range_id for g in back.data_groups()] == [1]
            assert right.range_id in back.upkeep.tombstones
            assert back.groups[1].desc.end is None
            for i in range(10):
                got = await kv.get(f"z{i}")
                assert got is not None and got.value == b"before"
    finally:
        for s in servers:
            await s.close()


async def test_quiet_ticks_silence_idle_groups_and_a_lost_leader_is_replaced(
    tmp_path: Path,
) -> None:
    servers = await _start(_merge_configs(tmp_path, quiet_ticks=10, balance_interval=None))
    try:
        async with ShardedKVClient(_addrs(servers)) as kv:
            _, right = await kv.split(1, "m")
            await kv.put("a", b"1")
            await kv.put("z", b"1")
            ids = [0, 1, right.range_id]
            await _leaders(servers, ids)
            for _ in range(300):  # idle: every group goes quiet on every node
                if all(s.groups[r].node.quiet for s in servers for r in ids):
                    break
                await asyncio.sleep(0.02)
            assert all(s.groups[r].node.quiet for s in servers for r in ids)
            sent = [s.transport.messages_sent for s in servers]
            await asyncio.sleep(1.0)  # 33 ticks: no heartbeats at all
            assert [s.transport.messages_sent for s in servers] == sent
            m = await _metrics(servers[0])
            assert m[f'dsys_kv_range_quiet{{range="{right.range_id}"}}'] == 1.0
            assert await kv.put("z", b"2") > 0  # a write wakes its group and commits
            # the node leading range 1 goes away: the followers lose its connection,
            # wake, and elect a new leader
            victim = next(s for s in servers if s.groups[1].node.is_leader)
            await victim.close()
            rest = [s for s in servers if s is not victim]
            await _leaders(rest, [1])
            assert (await kv.get("a")).value == b"1"  # type: ignore[union-attr]
            assert await kv.put("a", b"2") > 0
    finally:
        for s in servers:
            await s.close()


@pytest.mark.slow
async def test_cli_merge(tmp_path: Path) -> None:
    servers = await _start(_merge_configs(tmp_path, merge_after_split=0.0))
    try:
        eps = ",".join(_addrs(servers))
        async with ShardedKVClient(_addrs(servers)) as kv:
            _, right = await kv.split(1, "m")
        await _leaders(servers, [right.range_id])
        rc, out, err = await dsys_kv("merge", "1", str(right.range_id), "--cluster", eps)
        assert rc == 0, err
        merged = json.loads(out)["merged"]
        assert (merged["range_id"], merged["start"], merged["end"]) == (1, "", None)
        rc, out, err = await dsys_kv("merge", "1", "99", "--cluster", eps)
        assert rc != 0 and "no data ranges" in err, err
    finally:
        for s in servers:
            await s.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_long_run_of_splits_merges_and_a_restart_is_linearizable(tmp_path: Path) -> None:
    servers = await _start(_merge_configs(tmp_path, merge_after_split=0.3))
    try:
        addrs = _addrs(servers)
        keys = [f"k{i}" for i in range(10)]
        history = History()
        values = itertools.count(1)
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(sharded_register_client(addrs, i, keys, history, values, stop))
            for i in range(4)
        ]
        rng = random.Random(5)
        merges = splits = 0
        async with ShardedKVClient(addrs, timeout=20.0) as admin:
            for round_ in range(12):
                at = f"k{rng.randrange(1, 10)}"
                desc = await admin.locate(at)
                if desc.start != at:
                    await admin.split(desc.range_id, at)
                    splits += 1
                await asyncio.sleep(0.5)
                if round_ == 5:  # a node stops, the merges go on, it comes back
                    victim = servers[2]
                    await victim.close()
                if round_ == 8:
                    servers[2] = MultiRaftServer(victim.config)
                    await servers[2].start()
                await admin.refresh()
                assert admin.map is not None
                ranges = list(admin.map)
                if len(ranges) > 1:
                    i = rng.randrange(len(ranges) - 1)
                    # a map read from a lagging node may name a range merged away: 400
                    with contextlib.suppress(ConflictError, BadInputError):
                        await _merge_when_allowed(admin, ranges[i].range_id, ranges[i + 1].range_id)
                        merges += 1
        stop.set()
        await asyncio.gather(*clients)
        ops = history.operations()
        result = check(ops, KVModel())
        assert result.linearizable, result.explain()
        assert merges >= 4 and splits >= 4, (merges, splits)
        for _ in range(300):
            counts = [sorted(g.range_id for g in s.data_groups()) for s in servers]
            if counts[0] == counts[1] == counts[2]:
                break
            await asyncio.sleep(0.05)
        assert counts[0] == counts[1] == counts[2], counts
        print(f"{len(ops)} ops, {splits} splits, {merges} merges, ranges {counts[0]}")
    finally:
        for s in servers:
            await s.close()
