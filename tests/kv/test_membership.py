"""Membership at run time: add a learner, promote it, remove a node."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from dsys.kv.client import KVClient
from dsys.kv.server import KVServer, ServerConfig

from .helpers import cluster_configs, free_ports, wait_leader


async def _until(cond, limit_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_add_learner_promote_and_remove(tmp_path: Path) -> None:
    ports = free_ports(4)
    cfgs = cluster_configs(tmp_path, 3, ports=ports[:3], snapshot_every=50)
    servers = [KVServer(c) for c in cfgs]
    n4 = KVServer(
        ServerConfig(
            id="n4",
            port=ports[3],
            peers={c.id: f"127.0.0.1:{c.port}" for c in cfgs},
            data_dir=str(tmp_path / "n4"),
            join=True,
        )
    )
    for s in servers:
        await s.start()
    try:
        leader = await wait_leader(servers)
        eps = [f"127.0.0.1:{s.port}" for s in servers]
        async with KVClient(eps) as kv:
            await asyncio.gather(*(kv.put(f"k{i}", b"v") for i in range(120)))
        await n4.start()
        follower = next(s for s in servers if s is not leader)
        async with aiohttp.ClientSession() as http:
            # through a follower: the admin call is redirected to the leader
            url = f"http://127.0.0.1:{follower.port}/v1/admin/members"
            async with http.post(url, json={"id": "n4", "addr": f"127.0.0.1:{ports[3]}"}) as r:
                assert r.status == 200, await r.text()
                assert "n4" in (await r.json())["learners"]
            async with http.post(url, json={"id": "n4", "addr": "nope"}) as r:
                assert r.status == 400
            # the learner catches up (from the snapshot: the log was compacted)
            await _until(lambda: n4.fsm.revision == leader.fsm.revision)
            assert n4.node.role.name == "LEARNER"
            assert n4.fsm.get("k7") is not None
            base = f"http://127.0.0.1:{leader.port}/v1/admin/members"
            async with http.post(f"{base}/n4/promote") as r:
                assert r.status == 200, await r.text()
                assert "n4" in (await r.json())["voters"]
            await _until(lambda: "n4" in n4.node.core.conf.voters)
            async with KVClient([*eps, f"127.0.0.1:{ports[3]}"]) as kv:
                rev = await kv.put("after-promote", b"1")
            await _until(lambda: n4.fsm.revision >= rev)
            victim = next(s for s in servers if s is not leader)
            async with http.delete(f"{base}/{victim.config.id}") as r:
                assert r.status == 200, await r.text()
                assert victim.config.id not in (await r.json())["voters"]
            async with http.delete(f"{base}/nobody") as r:
                assert r.status == 400
        assert sorted(leader.node.core.conf.voters) == sorted(
            {"n1", "n2", "n3", "n4"} - {victim.config.id}
        )
        async with KVClient([f"127.0.0.1:{s.port}" for s in (*servers, n4)]) as kv:
            assert await kv.put("after-remove", b"1") > rev
    finally:
        await n4.close()
        for s in servers:
            await s.close()
