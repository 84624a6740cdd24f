"""Watch on the multi-Raft KV, three in-process nodes over real sockets: a prefix watch
spanning several ranges while writes go on through splits, a merge, leader transfers and
a resume from a cursor; every acknowledged write is delivered once, per key in revision
order. Plus the typed compacted error, the per-range NDJSON stream and bad input."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import aiohttp
import msgpack
import pytest

from dsys.errors import BadInputError, CompactedError, ConflictError
from dsys.kv.multi import MultiConfig, MultiRaftServer
from dsys.kv.rangefsm import RangeStateMachine
from dsys.kv.sharded import ShardedKVClient
from dsys.kv.shardedwatch import ShardedWatcher, ShardedWatchEvent

from .helpers import dsys_kv, free_ports
from .test_multiraft import _addrs, _configs, _leaders

Acked = dict[str, list[tuple[int, bytes | None]]]


def _watch_configs(tmp: Path, **kw: object) -> list[MultiConfig]:
    base = {
        "merge_keys": None,
        "split_qps": None,
        "merge_after_split": 0.3,
        "balance_interval": None,
    }
    return [dataclasses.replace(c, **{**base, **kw}) for c in _configs(tmp, free_ports(3))]  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _cluster(tmp: Path, **kw: object):  # type: ignore[no-untyped-def]
    servers = [MultiRaftServer(c) for c in _watch_configs(tmp, **kw)]
    try:
        for s in servers:
            await s.start()
        await _leaders(servers, [0, 1])
        yield servers
    finally:
        for s in servers:
            await s.close()


async def _merge_when_allowed(kv: ShardedKVClient, left: int, right: int) -> None:
    for _ in range(60):  # the interval after a split must pass first
        try:
            await kv.merge(left, right)
            return
        except ConflictError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"ranges {left} and {right} did not merge")


async def _collect(w: ShardedWatcher, into: Acked, last: list[ShardedWatchEvent]) -> None:
    async for ev in w:
        into[ev.key].append((ev.revision, ev.value))
        last[:] = [ev]


async def _until(cond: object, what: str, limit: float = 10.0) -> None:
    for _ in range(int(limit / 0.02)):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_watch_across_splits_merge_leader_moves_and_a_cursor_resume(tmp_path: Path) -> None:
    async with _cluster(tmp_path) as servers:
        addrs = _addrs(servers)
        async with ShardedKVClient(addrs) as kv, ShardedKVClient(addrs) as wkv:
            acked: Acked = defaultdict(list)
            seen: Acked = defaultdict(list)
            last: list[ShardedWatchEvent] = []
            keys = [f"w/k{i}" for i in range(8)]
            stop = asyncio.Event()

            async def writer(n: int) -> None:
                i = 0
                while not stop.is_set():
                    key = keys[(i * 3 + n) % len(keys)]
                    i += 1
                    if i % 7 == 0:
                        rev = await kv.delete(key)
                        if rev is not None:
                            acked[key].append((rev, None))
                    else:
                        val = f"{n}-{i}".encode()
                        acked[key].append((await kv.put(key, val), val))
                    await kv.put(f"x/{i % 3}", b"not watched")
                    await asyncio.sleep(0.005)

            watcher = wkv.watch("w/", start_revision=1)
            await watcher.start()
            collect = asyncio.create_task(_collect(watcher, seen, last))
            writers = [asyncio.create_task(writer(n)) for n in range(2)]
            await asyncio.sleep(0.3)
            left, right = await kv.split(1, "w/k4")  # the prefix now spans two ranges
            await asyncio.sleep(0.3)
            _, right2 = await kv.split(right.range_id, "w/k6")  # and three
            await asyncio.sleep(0.3)
            # a new watch from revision 1 catches up across both splits (events of the
            # split-off keys up to each split come from the parent, later ones from
            # the children); it stops once it has everything acknowledged so far
            upto = {k: sorted(v) for k, v in acked.items()}
            late: Acked = defaultdict(list)
            async with wkv.watch("w/", start_revision=1) as w2:
                catchup = asyncio.create_task(_collect(w2, late, []))
                try:
                    await _until(
                        lambda: catchup.done() or all(len(late[k]) >= len(upto[k]) for k in upto),
                        "the catch-up watch",
                    )
                finally:
                    catchup.cancel()
            for k, revs in upto.items():
                assert late[k][: len(revs)] == revs, f"{k}: catch-up across splits differs"
            # the watcher goes away; a new one resumes from the last event's cursor
            collect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collect
            await watcher.close()
            assert last, "no event before the restart"
            cursor = last[0].cursor
            await asyncio.sleep(0.2)
            watcher = wkv.watch("w/", cursor=cursor)
            await watcher.start()
            collect = asyncio.create_task(_collect(watcher, seen, last))
            # merge once the resumed watch has caught up (its watch of the source range is
            # open): a watch that first reaches a merged-away range after the merge finds
            # the source's history gone and gets the typed compacted error
            sofar = {k: len(v) for k, v in acked.items()}
            await _until(
                lambda: all(len(seen[k]) >= n for k, n in sofar.items()),
                "the resumed watch to catch up",
            )
            await _merge_when_allowed(kv, right.range_id, right2.range_id)
            await asyncio.sleep(0.3)
            # a leader moves: watches on followers and leaders go on
            lead = next(s for s in servers if s.groups[left.range_id].node.is_leader)
            other = next(s for s in servers if s is not lead)
            await lead.transfer_range_leader(left.range_id, other.config.id)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*writers)

            def complete() -> bool:
                if collect.done():  # the watch failed: say how
                    collect.result()
                    raise AssertionError("the watch ended")
                return all(len(seen[k]) >= len(acked[k]) for k in acked)

            try:
                await _until(complete, "every acknowledged write delivered")
            finally:
                collect.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collect
                await watcher.close()
            for k in keys:
                assert seen[k] == sorted(acked[k]), f"{k}: delivered != acknowledged"
            assert not [k for k in seen if not k.startswith("w/")]
            assert watcher.moves >= 2  # the splits were followed


async def test_catch_up_across_a_split_and_a_merge_keeps_the_targets_history(
    tmp_path: Path,
) -> None:
    """A watch catches up across a split; a merge does not compact the target: a watch
    of the target's span from before the merge still gets every change (it failed with
    compacted when a merge cleared the target's history)."""
    async with _cluster(tmp_path) as servers, ShardedKVClient(_addrs(servers)) as kv:
        r1 = await kv.put("a/1", b"x")
        rq = await kv.put("q/1", b"q")
        _, right = await kv.split(1, "m")
        rz = await kv.put("z/1", b"y")  # the child's revisions go on from the split's
        await kv.put("a/2", b"p")  # and so do the parent's
        await kv.put("a/3", b"p")
        # a watch from 1 catches up across the split: q/1 from the parent, then the
        # child from the split on (the parent's later revisions are not the child's)
        got0: list[tuple[int, str]] = []

        async def five() -> None:
            async with kv.watch("", start_revision=1) as w:
                async for ev in w:
                    got0.append((ev.revision, ev.key))
                    if len(got0) == 5:
                        break

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(five(), 10)
        assert sorted(x for x in got0 if x[1] >= "m") == [(rq, "q/1"), (rz, "z/1")]
        await _merge_when_allowed(kv, 1, right.range_id)
        r2 = await kv.put("a/1", b"z")
        got: list[tuple[int, str, bytes | None]] = []
        async with kv.watch("a/1", start_revision=r1) as w:
            async for ev in w:
                got.append((ev.revision, ev.key, ev.value))
                if len(got) == 2:
                    break
        assert got == [(r1, "a/1", b"x"), (r2, "a/1", b"z")]
        # the source's span: its history left with the source, a typed error says so
        with pytest.raises(CompactedError) as info:
            async with kv.watch("z/", start_revision=1) as w:
                async for _ in w:
                    pass
        assert info.value.revision > 1
        assert info.value.span == ("z/", "z0")  # type: ignore[attr-defined]
        fsm = servers[0].groups[1].fsm
        assert isinstance(fsm, RangeStateMachine) and fsm.span_records


async def test_range_watch_ndjson_and_bad_input(tmp_path: Path) -> None:
    async with _cluster(tmp_path) as servers:
        addrs = _addrs(servers)
        async with ShardedKVClient(addrs) as kv, aiohttp.ClientSession() as http:
            rev = await kv.put("n/a", b"1")
            rev_bb = await kv.put("n/bb", b"\xff")  # leaves with the split (not UTF-8)
            _, right = await kv.split(1, "n/b")
            await kv.put("n/c", b"2")
            url = f"http://{addrs[1]}/v1/ranges/1/watch"
            params = {"start": "n/", "end": "n0", "start_revision": str(rev)}
            lines = []
            async with http.get(url, params=params) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("application/x-ndjson")
                while len(lines) < 4:
                    lines.append(json.loads(await r.content.readline()))
            assert lines[0]["status"] == "ok"
            # the event of the part that stays, and the part that moved (either order)
            event = {"revision": rev, "type": "put", "key": "n/a", "value": "1", "range": 1}
            assert event in lines
            bb = {"revision": rev_bb, "type": "put", "key": "n/bb", "value_b64": "/w==", "range": 1}
            assert lines.index(bb) < next(i for i, x in enumerate(lines) if "status" in x and i)
            moved = next(x for x in lines if x.get("status") == "moved")
            assert (moved["start"], moved["end"], moved["range"]) == ("n/b", "n0", right.range_id)
            for bad in ({"start": "b", "end": "a"}, {"start_revision": "x"}):
                async with http.get(url, params=bad) as r:
                    assert r.status == 400
            async with http.get(f"http://{addrs[0]}/v1/ranges/x/watch") as r:
                assert r.status == 400
            # the WebSocket: bad requests are answered, the node stays up
            async with http.ws_connect(f"http://{addrs[0]}/v1/ws") as ws:
                reqs = [
                    {"id": 1, "op": "watch", "range": "nope"},
                    {"id": 2, "op": "watch", "range": 1, "start": 5},
                    {"id": 3, "op": "watch", "range": 1, "start_revision": -1},
                    {"id": 4, "op": "watch", "range": 999},
                    {"id": 5, "op": "unwatch", "watch": 77},
                ]
                await ws.send_bytes(msgpack.packb(reqs))
                got: dict[int, str] = {}
                while len(got) < len(reqs):
                    msg = await ws.receive(timeout=5)
                    for a in msgpack.unpackb(msg.data):
                        got[a["id"]] = a["status"]
            assert got == {
                1: "bad_request",
                2: "bad_request",
                3: "bad_request",
                4: "unavailable",
                5: "bad_request",
            }
            with pytest.raises(BadInputError):
                kv.watch("n/", cursor="w1.garbage")
            with pytest.raises(BadInputError):
                kv.watch("n/", cursor=kv.watch("m/").cursor)
            assert (await kv.get("n/a")) is not None
            # a whole prefix over HTTP, fanned in by the node; resumed from a cursor
            url = f"http://{addrs[2]}/v1/watch"
            async with http.get(url, params={"prefix": "n/", "start_revision": "1"}) as r:
                assert r.status == 200
                first = [json.loads(await r.content.readline()) for _ in range(3)]
            assert sorted(x["key"] for x in first) == ["n/a", "n/bb", "n/c"]
            nc = next(x for x in first if x["key"] == "n/c")
            assert nc["range"] == right.range_id and nc["value"] == "2"
            # resumed after the first event: the other two, once each
            async with http.get(url, params={"prefix": "n/", "cursor": first[0]["cursor"]}) as r:
                again = [json.loads(await r.content.readline()) for _ in range(2)]
            assert sorted((x["key"], x["revision"]) for x in again) == sorted(
                (x["key"], x["revision"]) for x in first[1:]
            )
            async with http.get(url, params={"prefix": "n/", "cursor": "w1.x"}) as r:
                assert r.status == 400
            # the CLI, a real process
            code, out, err = await dsys_kv(
                "watch", "n/", "--sharded", "--start-revision", "1", "--count", "3",
                "--cluster", addrs[0],
            )  # fmt: skip
            assert code == 0, err
            keys = sorted(json.loads(x)["key"] for x in out.splitlines())
            assert keys == ["n/a", "n/bb", "n/c"]


def _serving(servers: list[MultiRaftServer], rid: int) -> MultiRaftServer:
    """The node whose replica of ``rid`` serves a range watch now."""
    for s in servers:
        got = s.watches._hubs.get(rid)
        if got is not None and got[1].count > 0 and rid in s.groups:
            return s
    raise AssertionError(f"no node serves a watch of range {rid}")


@pytest.mark.slow
async def test_watch_across_a_replica_move_and_a_closed_node(tmp_path: Path) -> None:
    from .test_multiraft_moves import _configs as move_configs

    servers = [MultiRaftServer(c) for c in move_configs(tmp_path, free_ports(4))]
    try:
        for s in servers:
            await s.start()
        await _leaders(servers, [0, 1])
        addrs = _addrs(servers)
        async with ShardedKVClient(addrs) as kv, ShardedKVClient(addrs) as wkv:
            _, right = await kv.split(1, "w/k4")
            await _leaders(servers, [right.range_id])
            acked: Acked = defaultdict(list)
            maybe: set[tuple[str, bytes]] = set()  # outcome unknown (a node closed)
            seen: Acked = defaultdict(list)
            last: list[ShardedWatchEvent] = []
            keys = [f"w/k{i}" for i in range(8)]
            stop = asyncio.Event()

            async def writer(n: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    key, val = keys[(i * 3 + n) % len(keys)], f"{n}-{i}".encode()
                    try:
                        acked[key].append((await kv.put(key, val), val))
                    except Exception:
                        maybe.add((key, val))
                    await asyncio.sleep(0.005)

            watcher = wkv.watch("w/", start_revision=1)
            await watcher.start()
            collect = asyncio.create_task(_collect(watcher, seen, last))
            writers = [asyncio.create_task(writer(n)) for n in range(2)]
            await asyncio.sleep(0.5)
            # move the replica that serves the watch of range 1 away, to n4
            src = _serving(servers, 1)
            await kv.move(1, src.config.id, "n4")
            await asyncio.sleep(0.5)
            # close the node that serves the watch of the right range
            gone = _serving(servers, right.range_id)
            await gone.close()
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*writers)

            def complete() -> bool:
                if collect.done():
                    collect.result()
                    raise AssertionError("the watch ended")
                return all(len(seen[k]) >= len(acked[k]) for k in acked)

            try:
                await _until(complete, "every acknowledged write delivered", 20.0)
                await asyncio.sleep(0.3)  # writes of unknown outcome may still come
            finally:
                collect.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collect
                await watcher.close()
            for k in keys:
                revs = [r for r, _ in seen[k]]
                assert revs == sorted(set(revs)), f"{k}: out of order or duplicated"
                extra = set(seen[k]) - set(acked[k])
                assert set(acked[k]) <= set(seen[k]), f"{k}: acknowledged writes missing"
                assert all((k, v) in maybe for _, v in extra), f"{k}: unknown events {extra}"
            assert watcher.resumes >= 2, watcher.resumes
    finally:
        for s in servers:
            await s.close()
