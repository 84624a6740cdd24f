"""Multi-Raft KV on four real ``dsys kv multi-serve`` processes, ranges on three: a
nemesis that splits ranges, moves replicas between nodes and ``kill -9``s a node (restarted
from its WALs) during writes; the history must be linearizable per key (slow)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dsys.errors import DsysError
from dsys.kv.sharded import ShardedKVClient
from dsys.testing.linearizability import History, KVModel, check

from .helpers import free_ports, sharded_register_client, warm_up
from .test_multiraft_processes import Node

pytestmark = pytest.mark.slow

IDS = ["n1", "n2", "n3", "n4"]


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    ports = dict(zip(IDS, free_ports(4), strict=True))
    ns = [Node(i, ports, tmp_path) for i in IDS]
    for n in ns:
        n.args += ["--initial-replicas", "n1,n2,n3"]
        n.start()
    try:
        yield ns
    finally:
        for n in ns:
            n.kill9()


@pytest.mark.timeout(300)
async def test_moves_splits_and_kill9_on_processes_are_linearizable(
    nodes: list[Node], tmp_path: Path
) -> None:
    addrs = [n.addr for n in nodes]
    admin = ShardedKVClient(addrs, timeout=30.0)
    await warm_up(admin)
    keys = [f"k{i}" for i in range(10)]
    history = History()
    values = itertools.count(1)
    stop = asyncio.Event()

    async def client(cid: int) -> None:
        await sharded_register_client(addrs, cid, keys, history, values, stop)

    tasks = [asyncio.create_task(client(i)) for i in range(4)]
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
