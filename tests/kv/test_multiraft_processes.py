"""Multi-Raft KV on three real ``dsys kv multi-serve`` processes: splits during writes,
``kill -9`` of a node and its restart from its WALs; the history must be linearizable
per key (slow: it starts processes and runs for half a minute)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dsys.errors import DsysError
from dsys.testing.linearizability import KVModel, check

from .helpers import Proc, ready_sharded_client, running_multi_procs, start_register_clients

pytestmark = pytest.mark.slow


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Proc]]:
    async with running_multi_procs(tmp_path, 3) as procs:
        yield procs


@pytest.mark.timeout(300)
async def test_kill9_and_splits_on_processes_are_linearizable(nodes: list[Proc]) -> None:
    addrs = [n.addr for n in nodes]
    admin = await ready_sharded_client(addrs)
    keys = [f"k{i}" for i in range(10)]
    history, stop, tasks = start_register_clients(addrs, keys)
    rng = random.Random(7)
    splits = iter(["k2", "k5", "k8", "k1", "k4", "k7"])
    for _ in range(6):
        await asyncio.sleep(1.0)
        at = next(splits)
        with contextlib.suppress(DsysError):  # e.g. no leader just after a kill: go on
            await admin.split((await admin.locate(at)).range_id, at)
        victim = rng.choice(nodes)
        victim.kill9()
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        victim.start()
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.gather(*tasks)
    for _ in range(100):  # the metadata range shows the splits that went through
        ranges = len(await admin.refresh())
        if ranges >= 4:
            break
        await asyncio.sleep(0.1)
    await admin.close()
    assert ranges >= 4, ranges
    ops = history.operations()
    done = [o for o in ops if o.ret is not None]
    assert len(done) > 200, len(done)
    result = check(ops, KVModel())
    assert result.linearizable, result.explain()
    print(f"{len(ops)} ops, {len(ops) - len(done)} unknown, {ranges} ranges")
