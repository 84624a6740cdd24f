"""Replica moves on four in-process multi-Raft nodes over real sockets (ranges on three):
a move during writes keeps every key linearizable, bumps the epoch at each step, and the
removed node drops its data; the move API's bad input; the placement loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
from pathlib import Path

import aiohttp
import pytest

from dsys.errors import RequestTimeout
from dsys.kv.multi import MultiConfig, MultiRaftServer
from dsys.kv.placement import PlacementRules, node_loads
from dsys.kv.sharded import ShardedKVClient
from dsys.testing.linearizability import History, KVModel, check

from .helpers import dsys_kv, free_ports, multi_cluster, multi_configs, sharded_register_client


def _configs(tmp: Path, ports: list[int], **kw: object) -> list[MultiConfig]:
    settings: dict[str, object] = {
        "fsync": False,
        "snapshot_every": 100,
        "request_timeout": 2.0,
        "balance_interval": None,
        "initial_replicas": ("n1", "n2", "n3"),
        "move_timeout": 15.0,
    }
    return multi_configs(tmp, ports, **{**settings, **kw})


def _cluster(
    tmp: Path, **kw: object
) -> contextlib.AbstractAsyncContextManager[list[MultiRaftServer]]:
    return multi_cluster(_configs(tmp, free_ports(4), **kw))


def _addrs(servers: list[MultiRaftServer]) -> list[str]:
    return [f"127.0.0.1:{s.config.port}" for s in servers]


def _leader(servers: list[MultiRaftServer], rid: int) -> MultiRaftServer | None:
    ls = [s for s in servers if rid in s.groups and s.groups[rid].node.is_leader]
    return ls[0] if len(ls) == 1 else None


async def _wait(cond: object, what: str, limit: int = 500) -> None:
    for _ in range(limit):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_move_during_writes_is_linearizable_and_the_source_drops_its_data(
    tmp_path: Path,
) -> None:
    async with _cluster(tmp_path) as servers:
        n4 = servers[3]
        await _wait(lambda: _leader(servers, 0) and _leader(servers, 1), "leaders")
        assert 1 not in n4.groups  # range 1 starts on n1..n3 only
        # and the metadata range's first map says so (before any range reported)
        assert all(s.meta.map.lookup("").replicas == ("n1", "n2", "n3") for s in servers)
        addrs = _addrs(servers)
        keys = [f"k{i}" for i in range(8)]
        history = History()
        values = itertools.count(1)
        stop = asyncio.Event()
        async with ShardedKVClient(addrs) as admin:
            _, right = await admin.split(1, "k4")
        await _wait(lambda: _leader(servers, right.range_id), "leader of the new range")

        async def client(cid: int) -> None:
            await sharded_register_client(addrs, cid, keys, history, values, stop)

        clients = [asyncio.create_task(client(i)) for i in range(4)]
        await asyncio.sleep(1.0)  # enough writes that the log was compacted (snapshot_every)
        # move the LEADER's replica of range 1 (the move hands leadership over first) and
        # a follower's replica of the right range, both to n4, during the writes
        src1 = _leader(servers, 1)
        assert src1 is not None
        rid2 = right.range_id
        src2 = next(
            s for s in servers[:3] if rid2 in s.groups and not s.groups[rid2].node.is_leader
        )
        before = servers[0].groups[1].desc.epoch
        async with aiohttp.ClientSession() as http:
            # asked of a node that does not host the range: forwarded to its leader
            url = f"http://{addrs[3]}/v1/ranges/1/move"
            async with http.post(url, json={"from": src1.config.id, "to": "n4"}) as r:
                body = await r.json()
                assert r.status == 200, body
            moved1 = body["range"]
            url = f"http://{addrs[0]}/v1/ranges/{rid2}/move"
            async with http.post(url, json={"from": src2.config.id, "to": "n4"}) as r:
                assert r.status == 200, await r.text()
        await asyncio.sleep(1.0)  # keep writing after the moves
        stop.set()
        await asyncio.gather(*clients)

        # every step bumped conf_ver: learner, promote, remove
        assert moved1[3] == before.conf_ver + 3 and moved1[4] == before.version
        assert sorted(moved1[5]) == sorted({"n1", "n2", "n3", "n4"} - {src1.config.id})
        ops = history.operations()
        done = [o for o in ops if o.ret is not None]
        assert len(done) > 50, f"too few completed operations: {len(done)}"
        result = check(ops, KVModel())
        assert result.linearizable, result.explain()
        # the sources dropped the groups and deleted their data; n4 holds both ranges
        for src, rid in ((src1, 1), (src2, rid2)):
            await _wait(lambda src=src, rid=rid: rid not in src.groups, f"{src.config.id} drop")
            assert not (Path(src.config.data_dir) / f"r{rid}").exists()
        await _wait(
            lambda: all(n4.groups.get(r) and n4.groups[r].initialized for r in (1, rid2)),
            "n4 replicas",
        )
        # the metadata range follows, and the learner got the range's bounds from its
        # snapshot; every key written is readable through the new map
        await _wait(
            lambda: all("n4" in (s.meta.map.get(1) or right).replicas for s in servers),
            "map update",
        )
        assert (n4.groups[1].desc.start, n4.groups[1].desc.end) == ("", "k4")
        async with ShardedKVClient(addrs) as kv:
            for k in keys:
                await kv.get(k)
            await kv.put("k1", b"after")
            got = await kv.get("k1")
            assert got is not None and got.value == b"after"
        print(f"{len(ops)} ops, {len(ops) - len(done)} unknown")
        # restarts from the data dirs: n4 (not an initial replica) keeps the metadata range
        # and its moved-in ranges; the old source of range 1 does not bootstrap it again
        i_src = servers.index(src1)
        for i in (3, i_src):
            await servers[i].close()
            servers[i] = MultiRaftServer(servers[i].config)
            await servers[i].start()
        assert sorted(servers[3].groups) == sorted({0, 1, rid2})
        assert servers[3].meta.map.get(1) is not None
        assert 1 not in servers[i_src].groups
        async with ShardedKVClient(addrs) as kv:
            await kv.put("k1", b"again")


async def test_move_api_refuses_bad_input(tmp_path: Path) -> None:
    async with _cluster(tmp_path) as servers:
        await _wait(lambda: _leader(servers, 0) and _leader(servers, 1), "leaders")
        base = f"http://127.0.0.1:{servers[0].config.port}"
        async with aiohttp.ClientSession() as http:
            for path, body, want in [
                ("/v1/ranges/1/move", {"from": "n1", "to": "n9"}, 400),
                ("/v1/ranges/1/move", {"from": "n1", "to": "n1"}, 400),
                ("/v1/ranges/1/move", {"from": 1}, 400),
                ("/v1/ranges/1/move", [1], 400),
                ("/v1/ranges/x/move", {"from": "n1", "to": "n4"}, 400),
                ("/v1/ranges/77/move", {"from": "n1", "to": "n4"}, 400),
                ("/v1/ranges/1/leader", {"to": "n4"}, 400),  # not a voter
            ]:
                async with http.post(base + path, json=body) as r:
                    assert r.status == want, (path, body, r.status, await r.text())
            async with http.post(base + "/v1/ranges/1/move", data=b"{") as r:
                assert r.status == 400
            # asking again for a move that is done (n4 holds none, n1 is a voter) is
            # answered with the range as it is: a retried move is idempotent
            async with http.post(base + "/v1/ranges/1/move", json={"from": "n4", "to": "n1"}) as r:
                assert r.status == 200 and (await r.json())["range"][3] == 1
        async with ShardedKVClient(_addrs(servers)) as kv:
            assert await kv.put("still", b"up") > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_placement_loop_spreads_replicas_then_stays_put(tmp_path: Path) -> None:
    rules = PlacementRules(max_moves=1, interval=0.5, cooldown=30.0)
    async with _cluster(tmp_path, placement_interval=0.2, placement_rules=rules) as servers:
        await _wait(lambda: _leader(servers, 0) and _leader(servers, 1), "leaders")
        async with ShardedKVClient(_addrs(servers)) as kv:
            for k in ["b", "d", "f", "h", "j"]:
                await kv.split((await kv.locate(k)).range_id, k)
            for i in range(60):
                await kv.put(f"k{i:02d}", b"x")

        def per_node() -> list[int]:
            return [len(s.data_groups()) for s in servers]

        def total() -> int:
            return sum(s.replica_moves for s in servers)

        # wait for the fixed point: no move for 2 s and none in flight (bounded)
        last, quiet = -1, 0
        for _ in range(600):
            await asyncio.sleep(0.1)
            busy = any(s.moves for s in servers)
            quiet = quiet + 1 if total() == last and not busy else 0
            last = total()
            if quiet >= 20:
                break
        assert quiet >= 20, f"placement did not settle: {total()} moves, {per_node()}"
        assert total() > 0 and per_node()[3] >= 3, per_node()  # n4 took replicas
        # at the fixed point no candidate fits PD's rule
        meta = next(s for s in servers if s.groups[0].node.is_leader)
        infos = meta.range_infos(await meta._gather_status())
        load = node_loads(infos, ["n1", "n2", "n3", "n4"], floor=rules.size_floor)
        for r in infos:
            for src in r.replicas:
                for dst in set(load) - set(r.replicas):
                    assert load[src] - load[dst] <= 2 * r.weight(rules.size_floor), (load, r)
        moves = total()
        await asyncio.sleep(3.0)  # steady load: nothing moves back
        assert total() == moves, per_node()
        print(f"{moves} moves, replicas per node {per_node()}, loads {load}")


def test_config_checks_initial_replicas(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="initial_replicas"):
        dataclasses.replace(_configs(tmp_path, [1, 2])[0], initial_replicas=("n7",))


@pytest.mark.slow
async def test_cli_move_and_ranges(tmp_path: Path) -> None:
    async with _cluster(tmp_path) as servers:
        await _wait(lambda: _leader(servers, 0) and _leader(servers, 1), "leaders")
        eps = ",".join(_addrs(servers))
        rc, out, err = await dsys_kv("move", "1", "n2", "n4", "--cluster", eps)
        assert rc == 0, err
        row = json.loads(out)["range"]
        assert sorted(row["replicas"]) == ["n1", "n3", "n4"] and row["conf_ver"] == 4
        rc, out, err = await dsys_kv("move", "1", "n2", "n2", "--cluster", eps)
        assert rc != 0 and "itself" in err
        # a move in progress shows in `dsys kv ranges` with its step: hold one at the
        # catch-up step by moving to a node that is down
        await servers[1].close()
        n1 = next(s for s in servers if s.config.id == "n1")
        task = asyncio.create_task(n1.move_replica(1, "n3", "n2"))
        try:
            for _ in range(10):
                rc, out, err = await dsys_kv("ranges", "--cluster", eps, "--json")
                moves = json.loads(out)["moves"] if rc == 0 else []
                if moves:
                    break
            assert (
                moves
                and moves[0]["to"] == "n2"
                and moves[0]["step"]
                in (
                    "add_learner",
                    "catch_up",
                )
            ), moves
            rc, out, err = await dsys_kv("ranges", "--cluster", eps)
            assert rc == 0 and "move of range 1: n3 -> n2, step" in out, out
            # the target stays down: the move gives up and removes the learner again
            with pytest.raises(RequestTimeout, match="learner n2 removed again"):
                await task
            assert n1.groups[1].node.core.conf.learners == ()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@pytest.mark.slow
async def test_a_learner_no_move_drives_is_removed(tmp_path: Path) -> None:
    async with _cluster(tmp_path, move_timeout=1.0) as servers:
        await _wait(lambda: _leader(servers, 0) and _leader(servers, 1), "leaders")
        await servers[3].close()  # the target is down: the learner never catches up
        leader = _leader(servers, 1)
        assert leader is not None
        src = next(s.config.id for s in servers[:3] if s is not leader)
        task = asyncio.create_task(leader.move_replica(1, src, "n4"))
        conf = leader.groups[1].node.core.conf
        await _wait(lambda: leader.groups[1].node.core.conf.learners == ("n4",), "learner")
        task.cancel()  # the driver goes away (as when its node crashes)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        g = leader.groups[1]
        # the core's configuration changes when the removal is appended; the range's
        # descriptor when it is applied: wait for both
        await _wait(
            lambda: g.node.core.conf.learners == () and g.desc.replicas == tuple(conf.voters),
            "cleanup",
            300,
        )


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_skewed_writes_split_the_hot_range_and_placement_spreads_it(tmp_path: Path) -> None:
    rules = PlacementRules(max_moves=1, interval=0.3, cooldown=30.0)
    async with _cluster(
        tmp_path, placement_interval=0.2, placement_rules=rules, split_keys=40, report_interval=0.1
    ) as servers:
        await _wait(lambda: _leader(servers, 0) and _leader(servers, 1), "leaders")
        async with ShardedKVClient(_addrs(servers)) as kv:
            for i in range(200):  # 9 in 10 writes go to one hot prefix
                await kv.put(f"hot/{i:04d}" if i % 10 else f"cold/{i:04d}", b"x" * 32)

        def settled_moves() -> tuple[int, int]:
            return sum(s.replica_moves for s in servers), sum(s.leader_moves for s in servers)

        last, quiet = (-1, -1), 0
        for _ in range(600):  # bounded: until nothing moves for 2 s
            await asyncio.sleep(0.1)
            now = settled_moves()
            busy = any(s.moves for s in servers)
            quiet = quiet + 1 if now == last and not busy else 0
            last = now
            if quiet >= 20:
                break
        assert quiet >= 20, f"placement did not settle: {settled_moves()}"
        ranges = servers[0].meta.map
        hot = [r for r in ranges if r.end is None or r.end > "hot/"]
        assert len(hot) >= 4, [r.describe() for r in ranges]  # the hot range split
        lead = [s.config.id for s in servers for g in s.data_groups() if g.node.is_leader]
        counts = [lead.count(i) for i in ("n1", "n2", "n3", "n4")]
        assert max(counts) - min(counts) <= 1, counts  # leaders spread, n4 too
        before = settled_moves()
        await asyncio.sleep(3.0)  # steady: nothing moves back
        assert settled_moves() == before
        print(f"{len(ranges)} ranges, leaders per node {counts}, moves {before}")


async def test_replicas_of_a_node_that_stays_down_move_to_a_live_node(tmp_path: Path) -> None:
    rules = PlacementRules(down_after=0.5, size_floor=1)
    async with _cluster(tmp_path, placement_interval=0.1, placement_rules=rules) as servers:
        await _wait(lambda: _leader(servers, 0) and _leader(servers, 1), "leaders")
        async with ShardedKVClient(_addrs(servers)) as kv:
            for i in range(20):
                await kv.put(f"k{i}", str(i).encode())
            victim = next(s for s in servers[:3] if not s.groups[1].node.is_leader)
            await victim.close()
            live = [s for s in servers if s is not victim]

            def repaired() -> bool:
                return all(
                    s.meta.map.get(1) is not None
                    and sorted(s.meta.map.get(1).replicas)  # type: ignore[union-attr]
                    == sorted({"n1", "n2", "n3", "n4"} - {victim.config.id})
                    for s in live
                )

            await _wait(repaired, "range 1 back on three live nodes", 600)
            meta = next(s for s in live if s.groups[0].node.is_leader)
            assert meta.down_nodes == [victim.config.id]
            # (the map is reported before the move's driver returns and counts it)
            await _wait(lambda: meta.repairs == 1, "the repair counted")
            url = f"http://127.0.0.1:{meta.port}/metrics"
            async with aiohttp.ClientSession() as http, http.get(url) as r:
                text = await r.text()
            assert "dsys_kv_placement_down_nodes 1.0" in text, text
            assert "dsys_kv_placement_repairs_total 1.0" in text
            rc, out, err = await dsys_kv("ranges", "--cluster", ",".join(_addrs(live)), "--json")
            assert rc == 0, err
            states = {n["id"]: n["state"] for n in json.loads(out)["nodes"]}
            assert states == {s.config.id: "up" for s in live} | {victim.config.id: "down"}
            assert servers[3].groups[1].initialized  # n4 holds the range now
            for i in range(20):  # no acknowledged write lost
                got = await kv.get(f"k{i}")
                assert got is not None and got.value == str(i).encode()
            await kv.put("after", b"1")


async def test_a_replica_moves_back_to_a_node_that_held_it(tmp_path: Path) -> None:
    async with _cluster(tmp_path) as servers:
        await _wait(lambda: _leader(servers, 0) and _leader(servers, 1), "leaders")
        n3 = servers[2]
        async with ShardedKVClient(_addrs(servers)) as kv:
            await kv.put("k", b"1")
            away = await kv.move(1, "n3", "n4")
            await _wait(lambda: 1 not in n3.groups, "n3 drops range 1")
            tomb = n3.tombs.get(1)  # on disk, at the epoch that removed n3
            assert tomb is not None and tomb.epoch == away.epoch and not tomb.merged
            await kv.put("k", b"2")
            back = await kv.move(1, "n4", "n3")  # n3's tombstone is older: it may
            assert sorted(back.replicas) == ["n1", "n2", "n3"]
            assert back.epoch.conf_ver == away.epoch.conf_ver + 3
            await _wait(lambda: 1 in n3.groups and n3.groups[1].initialized, "n3 holds it")
            got = await kv.get("k")
            assert got is not None and got.value == b"2"
