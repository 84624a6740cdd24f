"""Watches against 3 real server processes: kill -9 the leader under write load."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsys.kv.client import KVClient
from dsys.kv.fsm import WatchEvent

from .helpers import Proc, cluster_configs, dsys_kv, wait_proc_leader


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    ps = [Proc(c, extra=["--snapshot-every", "50"]) for c in cluster_configs(tmp_path, 3)]
    for p in ps:
        p.start()
    try:
        yield ps
    finally:
        for p in ps:
            p.kill9()


async def test_watch_resumes_without_gaps_or_duplicates_across_kill9_of_the_leader(
    procs: list[Proc],
) -> None:
    leader = await wait_proc_leader(procs)
    others = [p for p in procs if p is not leader]
    async with (
        KVClient([leader.addr, *[p.addr for p in others]], timeout=20.0) as wc,
        KVClient([p.addr for p in procs], timeout=20.0) as kv,
    ):
        start = await kv.put("w/start", b"s")
        watcher = await wc.watch("w/", start_revision=start).start()
        assert watcher.endpoint == leader.addr
        acked: dict[int, tuple[str, bytes]] = {start: ("w/start", b"s")}
        stop = asyncio.Event()

        async def writer(n: int) -> None:
            i = 0
            while not stop.is_set():
                key, value = f"w/{n}/{i}", b"%d-%d" % (n, i)
                acked[await kv.put(key, value)] = (key, value)
                i += 1

        got: list[WatchEvent] = []

        async def consume() -> None:
            async for ev in watcher:
                got.append(ev)

        consumer = asyncio.create_task(consume())
        writers = [asyncio.create_task(writer(n)) for n in range(6)]
        await asyncio.sleep(1.0)
        leader.kill9()
        new_leader = await wait_proc_leader(others)
        await asyncio.sleep(1.0)
        leader.start()  # restarts from its snapshot + WAL; its history starts there
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*writers)
        last = max(acked)
        for _ in range(200):
            if got and got[-1].revision >= last:
                break
            await asyncio.sleep(0.05)
        await watcher.close()
        consumer.cancel()
        # the same events through the CLI, from another node
        rc, out, err = await dsys_kv(
            "watch", "w/", "--start-revision", str(start), "--count", "5",
            "--cluster", new_leader.addr,
        )  # fmt: skip
    revs = [e.revision for e in got]
    assert revs == list(range(start, last + 1)), "a gap or a duplicate"
    for ev in got:
        if ev.revision in acked:
            assert (ev.key, ev.value) == acked[ev.revision]
    assert watcher.resumes >= 1 and watcher.endpoint != leader.addr
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [ln["revision"] for ln in lines] == revs[:5]
    assert lines[0] == {"revision": start, "type": "put", "key": "w/start", "value": "s"}
