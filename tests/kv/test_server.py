from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dsys.errors import BadInputError, ConflictError, NotLeaderError
from dsys.kv.client import KVClient
from dsys.kv.fsm import Put
from dsys.kv.server import KVServer

from .helpers import running_cluster, wait_leader


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[KVServer]]:
    async with running_cluster(tmp_path) as servers:
        yield servers


async def test_http_api_put_get_delete_cas_scan(cluster: list[KVServer]) -> None:
    leader = await wait_leader(cluster)
    base = f"http://127.0.0.1:{leader.port}"
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{base}/v1/kv/a/1", data=b"hello") as r:
            assert r.status == 200
            rev = (await r.json())["revision"]
        async with http.get(f"{base}/v1/kv/a/1") as r:
            assert r.status == 200 and await r.read() == b"hello"
            assert r.headers["X-Dsys-Revision"] == str(rev)
        async with http.put(f"{base}/v1/kv/a/1?if_revision=0", data=b"x") as r:
            assert r.status == 409
        async with http.put(f"{base}/v1/kv/a/1?if_revision={rev}", data=b"x") as r:
            assert r.status == 200
        async with http.put(f"{base}/v1/kv/a/2", data=b"y") as r:
            assert r.status == 200
        async with http.get(f"{base}/v1/kv?prefix=a/&limit=10") as r:
            items = await r.json()
            assert [i["key"] for i in items] == ["a/1", "a/2"]
        async with http.delete(f"{base}/v1/kv/a/2") as r:
            assert r.status == 200
        async with http.delete(f"{base}/v1/kv/a/2") as r:
            assert r.status == 404
        async with http.get(f"{base}/v1/kv/a/2") as r:
            assert r.status == 404
        follower = next(s for s in cluster if s is not leader)
        fbase = f"http://127.0.0.1:{follower.port}"
        async with http.put(f"{fbase}/v1/kv/z", data=b"1", allow_redirects=False) as r:
            assert r.status == 307
            assert r.headers["Location"] == f"{base}/v1/kv/z"
        async with http.get(f"{fbase}/v1/kv/a/1?consistency=stale") as r:
            assert r.status in (200, 404)  # a stale read answers locally
        async with http.get(f"{base}/v1/status") as r:
            st = await r.json()
            assert st["role"] == "leader" and st["leader"] == leader.config.id
        # a retried HTTP write with the same client id + seq applies once
        hdrs = {"X-Dsys-Client-Id": "curl-1", "X-Dsys-Seq": "1"}
        async with http.put(f"{base}/v1/kv/once", data=b"1", headers=hdrs) as r:
            first = (await r.json())["revision"]
        async with http.put(f"{base}/v1/kv/once", data=b"1", headers=hdrs) as r:
            assert (await r.json())["revision"] == first
        async with http.get(f"{base}/v1/kv/once") as r:
            assert r.headers["X-Dsys-Revision"] == str(first)
        async with http.put(
            f"{base}/v1/kv/once", data=b"1", headers={"X-Dsys-Client-Id": "c"}
        ) as r:
            assert r.status == 400 and "X-Dsys-Seq" in await r.text()


async def test_client_ops_and_many_in_flight(cluster: list[KVServer]) -> None:
    await wait_leader(cluster)
    eps = [f"127.0.0.1:{s.port}" for s in cluster]
    async with KVClient(eps) as kv:
        revs = await asyncio.gather(*(kv.put(f"k{i:03d}", b"v%d" % i) for i in range(200)))
        assert sorted(revs) == list(range(min(revs), min(revs) + 200))
        got = await kv.get("k007")
        assert got is not None and got.value == b"v7"
        assert await kv.get("missing") is None
        rev = await kv.cas("c", b"1", revision=0)
        with pytest.raises(ConflictError):
            await kv.cas("c", b"2", revision=0)
        assert await kv.cas("c", b"2", revision=rev) > rev
        assert [i.key for i in await kv.scan("k00", limit=3)] == ["k000", "k001", "k002"]
        assert await kv.delete("c") is not None
        assert await kv.delete("c") is None


async def test_storage_failure_stops_the_server_with_an_error(tmp_path: Path) -> None:
    from dsys.kv.server import ServerConfig, serve

    started: asyncio.Future[KVServer] = asyncio.get_running_loop().create_future()
    cfg = ServerConfig(id="solo", data_dir=str(tmp_path / "solo"))
    task = asyncio.create_task(serve(cfg, on_started=started.set_result))
    server = await started
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(200):  # a single node elects itself (bounded wait)
            if server.node.is_leader:
                break
            await asyncio.sleep(0.02)
        async with http.put(f"{base}/v1/kv/a", data=b"1") as r:
            assert r.status == 200

        def broken_sync() -> None:
            raise OSError(28, "No space left on device")

        server.wal.sync = broken_sync  # type: ignore[method-assign]
        try:
            async with http.put(f"{base}/v1/kv/b", data=b"2") as r:
                assert r.status >= 500  # never acknowledged
        except aiohttp.ClientError:
            pass  # or the server already stopped
    assert await asyncio.wait_for(task, 10) == 1
    assert isinstance(server.node.failed, OSError)


async def test_snapshot_keeps_the_config_in_effect_at_its_index(tmp_path: Path) -> None:
    """A snapshot taken while a membership change is still uncommitted stores the old one.

    The core applies a configuration when it is appended (not committed), so ``core.conf``
    can run ahead of the snapshot index; the snapshot must carry the configuration in
    effect at its own index, or a restart from it would resurrect an uncommitted change.
    """
    from dsys.raft.messages import ConfChange, ConfChangeType

    async with running_cluster(tmp_path) as servers:
        leader = await wait_leader(servers)
        async with KVClient([f"127.0.0.1:{leader.port}"]) as kv:
            await kv.put("k", b"v")
        for s in servers:  # no quorum left: the change below cannot commit
            if s is not leader:
                await s.close()
        change = asyncio.ensure_future(
            leader.node.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "n9"))
        )
        for _ in range(100):  # until the leader has appended (and so adopted) it
            await asyncio.sleep(0.01)
            if "n9" in leader.node.core.conf.learners:
                break
        assert "n9" in leader.node.core.conf.learners
        index = await leader.node.snapshot_now()
        assert index == leader.node.applied_index
        snap = leader.node._snapshots.load()  # what a restart would load
        assert snap is not None and snap.meta.index == index
        assert "n9" not in snap.meta.conf.learners
        assert sorted(snap.meta.conf.voters) == ["n1", "n2", "n3"]
        change.cancel()


async def test_concurrent_writes_share_batch_entries_and_every_replica_agrees(
    cluster: list[KVServer],
) -> None:
    leader = await wait_leader(cluster)
    first = leader.node.applied_index
    async with KVClient([f"127.0.0.1:{s.port}" for s in cluster]) as kv:
        revs = await asyncio.gather(*(kv.put(f"b{i}", b"%d" % i) for i in range(300)))
    # every write got its own revision, and the revisions are exactly the next 300
    assert sorted(revs) == list(range(min(revs), min(revs) + 300))
    entries = leader.node.applied_index - first
    assert 1 <= entries < 300, "concurrent proposals should share BATCH entries"
    # followers apply the same commands in the same order: identical state
    target = leader.node.applied_index
    for _ in range(200):
        if all(s.node.applied_index >= target for s in cluster):
            break
        await asyncio.sleep(0.02)
    want = {f"b{i}": (b"%d" % i, revs[i]) for i in range(300)}
    for s in cluster:
        got = {f"b{i}": s.fsm.get(f"b{i}") for i in range(300)}
        assert {k: (v.value, v.mod_revision) for k, v in got.items() if v} == want
        assert s.fsm.revision == leader.fsm.revision


async def test_propose_many_and_single_proposals_share_entries_and_answer_in_order(
    cluster: list[KVServer],
) -> None:
    from dsys.kv.fsm import Put, Result, encode_command

    leader = await wait_leader(cluster)
    loop = asyncio.get_running_loop()
    got: dict[str, object] = {}
    done = loop.create_future()

    def answer(name: str) -> Any:
        def cb(result: object, exc: BaseException | None) -> None:
            got[name] = exc if exc is not None else result
            if len(got) == 3 and not done.done():
                done.set_result(None)

        return cb

    puts = [Put(key=f"m{i}", value=b"%d" % i) for i in range(5)]
    with pytest.raises(ValueError):
        leader.node.propose_many([], answer("never"))
    leader.node.propose_callback(encode_command(puts[0]), answer("first"))
    leader.node.propose_many([encode_command(p) for p in puts[1:4]], answer("many"), puts[1:4])
    leader.node.propose_callback(encode_command(puts[4]), answer("last"), puts[4])
    await asyncio.wait_for(done, 5)
    first, many, last = got["first"], got["many"], got["last"]
    assert isinstance(first, Result) and isinstance(last, Result) and isinstance(many, list)
    revs = [first.revision, *(r.revision for r in many), last.revision]
    assert revs == list(range(revs[0], revs[0] + 5))  # one revision each, in queue order
    for p, rev in zip(puts, revs, strict=True):
        kv = leader.fsm.get(p.key)
        assert kv is not None and kv.value == p.value and kv.mod_revision == rev


async def test_raft_node_transfers_leadership_to_a_follower(cluster: list[KVServer]) -> None:
    leader = await wait_leader(cluster)
    await leader.write(Put(key="before", value=b"1"))
    target = next(s for s in cluster if s is not leader)
    with pytest.raises(NotLeaderError):
        await target.node.transfer_leadership(leader.node.id)
    with pytest.raises(BadInputError):
        await leader.node.transfer_leadership("nobody")
    await leader.node.transfer_leadership(target.node.id)
    assert target.node.is_leader and not leader.node.is_leader
    assert leader.node.leader_id == target.node.id
    with pytest.raises(NotLeaderError):
        await leader.write(Put(key="after", value=b"2"))
    result = await target.write(Put(key="after", value=b"2"))
    assert result.ok
