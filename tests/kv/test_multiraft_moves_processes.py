"""Multi-Raft KV on four real ``dsys kv multi-serve`` processes, ranges on three: a
nemesis that splits ranges, moves replicas between nodes and ``kill -9``s a node (restarted
from its WALs) during writes; the history must be linearizable per key (slow)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dsys.errors import DsysError
from dsys.testing.linearizability import KVModel, check

from .helpers import Proc, ready_sharded_client, running_multi_procs, start_register_clients

pytestmark = pytest.mark.slow

IDS = ["n1", "n2", "n3", "n4"]


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Proc]]:
    async with running_multi_procs(tmp_path, 4, "--initial-replicas", "n1,n2,n3") as procs:
        yield procs


@pytest.mark.timeout(300)
async def test_moves_splits_and_kill9_on_processes_are_linearizable(
    nodes: list[Proc], tmp_path: Path
) -> None:
    addrs = [n.addr for n in nodes]
    admin = await ready_sharded_client(addrs)
    keys = [f"k{i}" for i in range(10)]
    history, stop, tasks = start_register_clients(addrs, keys)
    seed = int(os.environ.get("DSYS_MOVES_SEED", "11"))
    rng = random.Random(seed)
    splits = iter(["k3", "k6", "k1", "k8"])
    moved = 0

    async def move() -> None:
        nonlocal moved
        with contextlib.suppress(DsysError, TimeoutError):
            desc = await admin.locate(rng.choice(keys))
            src = rng.choice(desc.replicas)
            dst = rng.choice([n for n in IDS if n not in desc.replicas])
            await asyncio.wait_for(admin.move(desc.range_id, src, dst), 40)
            moved += 1

    movers = []
    for round_ in range(8):
        await asyncio.sleep(1.0)
        if round_ % 2 == 0:
            with contextlib.suppress(DsysError):  # e.g. no leader just after a kill
                at = next(splits)
                await admin.split((await admin.locate(at)).range_id, at)
        else:
            movers.append(asyncio.create_task(move()))
        if round_ in (3, 5):  # while a move may be under way
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            victim = rng.choice(nodes)
            victim.kill9()
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            victim.start()
    await asyncio.gather(*movers)
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.gather(*tasks)
    await admin.refresh()
    await admin.close()
    ops = history.operations()
    done = [o for o in ops if o.ret is not None]
    assert moved >= 1, moved
    assert len(done) > 200, len(done)
    result = check(ops, KVModel())
    assert result.linearizable, result.explain()
    print(f"seed {seed}: {len(ops)} ops, {len(ops) - len(done)} unknown, {moved} moves")
