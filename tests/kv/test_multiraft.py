"""Multi-Raft KV on three in-process nodes over real sockets: routing by range, splits
during writes, a node stopped and restarted, and the history linearizable per key."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgpack
import pytest

from dsys.errors import BadInputError
from dsys.kv.multi import MultiConfig, MultiRaftServer
from dsys.kv.sharded import ShardedKVClient
from dsys.testing.linearizability import History, KVModel, check

from .helpers import dsys_kv, free_ports, multi_cluster, multi_configs, sharded_register_client


def _configs(tmp: Path, ports: list[int]) -> list[MultiConfig]:
    return multi_configs(
        tmp, ports, fsync=False, snapshot_every=300, request_timeout=2.0, balance_interval=0.2
    )


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[MultiRaftServer]]:
    async with multi_cluster(_configs(tmp_path, free_ports(3))) as servers:
        yield servers


async def _leaders(servers: list[MultiRaftServer], range_ids: list[int]) -> None:
    for _ in range(500):
        if all(
            sum(1 for s in servers if rid in s.groups and s.groups[rid].node.is_leader) == 1
            for rid in range_ids
        ):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no leader for every range of {range_ids}")


def _addrs(servers: list[MultiRaftServer]) -> list[str]:
    return [f"127.0.0.1:{s.config.port}" for s in servers]


async def test_routing_errors_and_split(cluster: list[MultiRaftServer]) -> None:
    await _leaders(cluster, [0, 1])
    async with ShardedKVClient(_addrs(cluster)) as kv, aiohttp.ClientSession() as http:
        for k in ["a", "m", "z"]:
            await kv.put(k, k.encode())
        left, right = await kv.split(1, "m")
        assert (left.end, right.start, right.epoch.version) == ("m", "m", 2)
        with pytest.raises(BadInputError, match="not strictly inside"):
            await kv.split(left.range_id, "q")
        # the keys moved with the split: every replica holds each key in one range only
        await _leaders(cluster, [1, right.range_id])
        for s in cluster:
            for _ in range(200):
                if right.range_id in s.groups and len(s.groups[right.range_id].fsm) == 2:
                    break
                await asyncio.sleep(0.02)
            assert len(s.groups[1].fsm) == 1 and len(s.groups[right.range_id].fsm) == 2
        assert (await kv.get("z")) is not None and (await kv.get("a")) is not None
        # a request routed with the pre-split epoch is refused with the new descriptors
        leader = next(s for s in cluster if s.groups[right.range_id].node.is_leader)
        url = f"http://127.0.0.1:{leader.config.port}/v1/kv/zz"
        async with http.put(url, data=b"x", headers={"X-Dsys-Range": "1:1:1"}) as r:
            body = await r.json()
            assert r.status == 421 and body["error"] == "key_not_in_range"
            assert [d[0] for d in body["ranges"]] == [1, right.range_id]
        hdr = {"X-Dsys-Range": f"{right.range_id}:1:1"}
        async with http.put(url, data=b"x", headers=hdr) as r:
            body = await r.json()
            assert r.status == 421 and body["error"] == "epoch_not_match", body
        async with http.put(url, data=b"x", headers={"X-Dsys-Range": "nope"}) as r:
            assert r.status == 400
        # a TTL key in the new range expires by the range's replicated clock
        async with http.put(url + "?ttl=1", data=b"brief") as r:
            assert r.status == 200
        for _ in range(200):
            if await kv.get("zz") is None:
                break
            await asyncio.sleep(0.05)
        assert await kv.get("zz") is None
        # the client with a stale map follows the 421 and lands in the new range
        async with ShardedKVClient(_addrs(cluster)) as stale:
            stale.map = None
            await stale.refresh()
            assert stale.map is not None
            await kv.split(right.range_id, "t")
            assert await stale.put("zz", b"1") > 0
            assert (await stale.get("zz")) is not None
            assert len(stale.map) == 3
        # the metadata range follows: every node's map shows three ranges
        for s in cluster:
            for _ in range(200):
                if len(s.meta.map) == 3:
                    break
                await asyncio.sleep(0.02)
            assert [r.start for r in s.meta.map] == ["", "m", "t"]
        # a scan walks the ranges in key order, page by page
        assert [i.key for i in await kv.scan("")] == ["a", "m", "z", "zz"]
        assert [i.key for i in await kv.scan("", limit=3)] == ["a", "m", "z"]
        assert [i.key for i in await kv.scan("z")] == ["z", "zz"]
        assert await kv.scan("q") == []
        async with http.get(url.replace("/v1/kv/zz", "/v1/ranges/1/kv?limit=0")) as r:
            assert r.status == 400


async def test_bad_input_gets_4xx_and_the_node_stays_up(cluster: list[MultiRaftServer]) -> None:
    await _leaders(cluster, [0, 1])
    base = f"http://127.0.0.1:{cluster[0].config.port}"
    async with aiohttp.ClientSession() as http:
        for method, path, body, want in [
            ("POST", "/v1/ranges/x/split?at=m", None, 400),
            ("POST", "/v1/ranges/1/split", None, 400),  # no key
            ("POST", "/v1/ranges/99/split?at=m", None, 400),
            ("POST", "/v1/ranges/meta", b"not json", 400),
            ("POST", "/v1/ranges/meta", b"[1]", 400),
            ("GET", "/v1/ranges/1/kv?limit=-1", None, 400),
            ("GET", "/raft/v1/multi", None, 403),  # no peer id
        ]:
            async with http.request(method, base + path, data=body) as r:
                assert r.status == want, (method, path, r.status, await r.text())
        # a peer that sends garbage is cut off with 1003; the node keeps serving
        hdr = {"X-Dsys-From": "n2"}
        for frame in [b"\xc1", msgpack.packb([[1, [["A", "n3", "n1", 1]]]]), msgpack.packb(7)]:
            async with http.ws_connect(base + "/raft/v1/multi", headers=hdr) as ws:
                await ws.send_bytes(frame)
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1003, msg
        async with http.get(base + "/v1/ranges") as r:
            assert r.status == 200
    async with ShardedKVClient(_addrs(cluster)) as kv:
        assert await kv.put("still", b"up") > 0


async def test_cluster_token_guards_peers_and_admin(tmp_path: Path) -> None:
    configs = [dataclasses.replace(c, token="s3cret") for c in _configs(tmp_path, free_ports(3))]
    servers = [MultiRaftServer(c) for c in configs]
    try:
        for s in servers:
            await s.start()
        await _leaders(servers, [0, 1])  # the peers talk with the token
        leader = next(s for s in servers if s.groups[1].node.is_leader)
        base = f"http://127.0.0.1:{leader.config.port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/v1/ranges/1/split?at=m") as r:
                assert r.status == 403
            async with http.get(base + "/raft/v1/multi", headers={"X-Dsys-From": "n2"}) as r:
                assert r.status == 403
            async with http.post(base + "/v1/ranges/meta", json={"op": "alloc"}) as r:
                assert r.status == 403
        async with ShardedKVClient(_addrs(servers), token="s3cret") as kv:
            _, right = await kv.split(1, "m")
            assert right.start == "m"
    finally:
        for s in servers:
            await s.close()


async def test_websocket_channel_routes_by_range(cluster: list[MultiRaftServer]) -> None:
    await _leaders(cluster, [0, 1])
    async with ShardedKVClient(_addrs(cluster)) as kv:
        _, right = await kv.split(1, "m")
    await _leaders(cluster, [1, right.range_id])
    # the leader balancer hands one of the two ranges away if one node leads both; wait
    # for that, or the node picked below as a follower may be made the leader meanwhile
    for _ in range(200):
        lead = [s for rid in (1, right.range_id) for s in cluster if s.groups[rid].node.is_leader]
        if len(lead) == 2 and lead[0] is not lead[1]:
            break
        await asyncio.sleep(0.02)
    leader = next(s for s in cluster if s.groups[1].node.is_leader)
    other = next(s for s in cluster if not s.groups[right.range_id].node.is_leader)
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"http://127.0.0.1:{leader.config.port}/v1/ws") as ws,
    ):

        async def ask(reqs: list[object]) -> dict[int | None, dict[str, object]]:
            await ws.send_bytes(msgpack.packb(reqs))
            got: dict[int | None, dict[str, object]] = {}
            while len(got) < len(reqs):
                for a in msgpack.unpackb(await ws.receive_bytes(), raw=False):
                    got[a["id"]] = a
            return got

        a = await ask(
            [
                {"id": 1, "op": "put", "key": "a", "value": b"1", "range": [1, 1, 2]},
                {"id": 2, "op": "put", "key": "a2", "value": b"2", "range": [1, 1, 1]},
                {"id": 3, "op": "put", "key": "x", "value": b"3", "range": [1, 1, 2]},
                {"id": 4, "op": "frob", "key": "a"},
                {"id": 5, "op": "put", "key": "a", "value": "not bytes"},
            ]
        )
        assert a[1]["status"] == "ok"
        assert a[2]["status"] == "wrong_range" and a[2]["error"] == "epoch_not_match"
        assert a[3]["status"] == "wrong_range" and a[3]["error"] == "key_not_in_range"
        assert [d[0] for d in a[3]["ranges"]] == [1, right.range_id]  # type: ignore[union-attr]
        assert a[4]["status"] == "bad_request" and a[5]["status"] == "bad_request"
        b = await ask([{"id": 6, "op": "get", "key": "a"}, {"id": 7, "op": "get", "key": "b"}])
        assert (b[6]["status"], b[6]["value"], b[7]["status"]) == ("ok", b"1", "not_found")
        await ws.send_bytes(b"\xc1")  # not msgpack: an error answer, the channel stays
        bad = msgpack.unpackb(await ws.receive_bytes(), raw=False)
        assert bad[0]["status"] == "bad_request"
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"http://127.0.0.1:{other.config.port}/v1/ws") as ws,
    ):
        await ws.send_bytes(msgpack.packb([{"id": 1, "op": "put", "key": "z", "value": b"z"}]))
        (ans,) = msgpack.unpackb(await ws.receive_bytes(), raw=False)
        assert ans["status"] == "not_leader" and ans["leader_addr"], ans


async def test_leaders_spread_over_the_nodes(cluster: list[MultiRaftServer]) -> None:
    await _leaders(cluster, [0, 1])
    async with ShardedKVClient(_addrs(cluster)) as kv:
        for key in ["b", "d", "f", "h", "j"]:
            await kv.split((await kv.locate(key)).range_id, key)
    ids = [g.range_id for g in cluster[0].data_groups()]
    assert len(ids) == 6
    counts: list[int] = []
    for _ in range(600):  # balancing moves one leader per node every 0.2 s
        await asyncio.sleep(0.02)
        lead = [s.config.id for rid in ids for s in cluster if s.groups[rid].node.is_leader]
        counts = [lead.count(s.config.id) for s in cluster]
        if len(lead) == 6 and max(counts) - min(counts) <= 1:
            break
    assert len(lead) == 6 and max(counts) - min(counts) <= 1, counts
    moves = sum(s.leader_moves for s in cluster)
    frames = [(s.transport.frames_sent, s.transport.messages_sent) for s in cluster]
    await asyncio.sleep(0.6)  # steady: nothing moves back and forth
    assert sum(s.leader_moves for s in cluster) == moves
    # idle groups: the heartbeats (and answers) of a process's groups made in one tick
    # leave together, so frames carry more messages than there are frames
    for s, (f0, m0) in zip(cluster, frames, strict=True):
        f, m = s.transport.frames_sent - f0, s.transport.messages_sent - m0
        assert 0 < f < m, (s.config.id, f, m)
    # a node that is down gets no leaders handed to it (its ranges elect new leaders on
    # the other two, which may even out between themselves)
    down = cluster[2]
    await down.close()
    await asyncio.sleep(0.6)  # two election timeouts: the others stop counting it
    before = sum(s.leader_moves_to.get(down.config.id, 0) for s in cluster[:2])
    await asyncio.sleep(1.0)
    assert sum(s.leader_moves_to.get(down.config.id, 0) for s in cluster[:2]) == before


async def test_ranges_split_by_size(tmp_path: Path) -> None:
    configs = [
        dataclasses.replace(c, split_keys=40, report_interval=0.05)
        for c in _configs(tmp_path, free_ports(3))
    ]
    servers = [MultiRaftServer(c) for c in configs]
    try:
        for s in servers:
            await s.start()
        await _leaders(servers, [0, 1])
        keys = [f"k{i:03d}" for i in range(150)]
        async with ShardedKVClient(_addrs(servers)) as kv:
            for k in keys:
                await kv.put(k, k.encode())
            sizes: list[int] = []
            for _ in range(500):
                sizes = [len(g.fsm) for g in servers[0].data_groups()]
                if sum(sizes) == 150 and max(sizes) < 40:
                    break
                await asyncio.sleep(0.02)
            assert sum(sizes) == 150 and max(sizes) < 40, sizes
            for k in keys[::7]:  # every key is still there, through the new map
                got = await kv.get(k)
                assert got is not None and got.value == k.encode()
    finally:
        for s in servers:
            await s.close()


async def _linearizable_run(servers: list[MultiRaftServer], tmp: Path, seconds: float) -> None:
    await _leaders(servers, [0, 1])
    keys = [f"k{i}" for i in range(10)]
    history = History()
    values = itertools.count(1)
    stop = asyncio.Event()
    addrs = _addrs(servers)
    async with ShardedKVClient(addrs) as admin:
        await admin.split(1, "k3")
        await admin.split((await admin.locate("k6")).range_id, "k6")

    async def client(cid: int) -> None:
        await sharded_register_client(addrs, cid, keys, history, values, stop)

    async def nemesis() -> None:
        async with ShardedKVClient(addrs) as admin:
            await asyncio.sleep(seconds * 0.2)
            await admin.split((await admin.locate("k1")).range_id, "k1")  # during writes
            await asyncio.sleep(seconds * 0.1)
            victim = servers[2]  # stop a node, keep writing, bring it back from its WALs
            await victim.close()
            await asyncio.sleep(seconds * 0.25)
            await admin.split((await admin.locate("k8")).range_id, "k8")  # with a node down
            await asyncio.sleep(seconds * 0.1)
            servers[2] = MultiRaftServer(victim.config)
            await servers[2].start()

    clients = [asyncio.create_task(client(i)) for i in range(4)]
    await nemesis()
    await asyncio.sleep(seconds * 0.35)
    stop.set()
    await asyncio.gather(*clients)
    ops = history.operations()
    done = [o for o in ops if o.ret is not None]
    assert len(done) > 100, f"too few completed operations: {len(done)}"
    assert {o.input[1] for o in done} == set(keys)
    result = check(ops, KVModel())
    assert result.linearizable, result.explain()
    i = next(i for i, o in enumerate(ops) if o.input[0] == "get" and o.ret is not None)
    forged = [*ops[:i], dataclasses.replace(ops[i], output=-1), *ops[i + 1 :]]
    assert not check(forged, KVModel()).linearizable
    print(f"{len(ops)} ops, {len(ops) - len(done)} unknown, {len(servers[0].data_groups())} ranges")
    # five ranges now; the restarted node runs all of them (the last split it applied
    # from its parent's log after the restart) and holds the same keys
    await _leaders(servers, [0, *[g.range_id for g in servers[0].data_groups()]])
    assert len(servers[0].data_groups()) == 5
    for _ in range(300):
        counts = [[len(g.fsm) for g in s.data_groups()] for s in servers]
        if counts[0] == counts[1] == counts[2]:
            break
        await asyncio.sleep(0.02)
    assert counts[0] == counts[1] == counts[2], counts


async def test_writes_splits_and_a_restart_are_linearizable_per_key(
    cluster: list[MultiRaftServer], tmp_path: Path
) -> None:
    await _linearizable_run(cluster, tmp_path, seconds=5.0)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_long_multiraft_run_is_linearizable(
    cluster: list[MultiRaftServer], tmp_path: Path
) -> None:
    await _linearizable_run(cluster, tmp_path, seconds=60.0)


@pytest.mark.slow
async def test_cli_ranges_and_split(cluster: list[MultiRaftServer]) -> None:
    await _leaders(cluster, [0, 1])
    eps = ",".join(_addrs(cluster))
    rc, out, err = await dsys_kv("split", "1", "m", "--cluster", eps)
    assert rc == 0, err
    right = json.loads(out)["right"]
    assert (right["start"], right["end"], right["version"]) == ("m", None, 2)
    rc, out, err = await dsys_kv("split", "1", "zz", "--cluster", eps)
    assert rc != 0 and "not strictly inside" in err
    await _leaders(cluster, [0, 1, right["range_id"]])
    for _ in range(100):
        rc, out, err = await dsys_kv("ranges", "--cluster", eps, "--json")
        rows = json.loads(out)["ranges"]
        if len(rows) == 2 and all(r["leader"] for r in rows):
            break
    assert [(r["start"], r["end"], r["version"]) for r in rows] == [("", "m", 2), ("m", None, 2)]
    rc, out, err = await dsys_kv("ranges", "--cluster", eps)
    assert rc == 0 and "range map version" in out and "'m'" in out and "+inf" in out, out
    rc, out, err = await dsys_kv("ranges", "--help")
    assert rc == 0 and "--cluster" in out
