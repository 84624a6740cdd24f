"""Multi-Raft KV on three real ``dsys kv multi-serve`` processes: splits during writes,
``kill -9`` of a node and its restart from its WALs; the history must be linearizable
per key (slow: it starts processes and runs for half a minute)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dsys.errors import DsysError
from dsys.kv.sharded import ShardedKVClient
from dsys.testing.linearizability import History, KVModel, check

from .helpers import free_ports, sharded_register_client, warm_up

pytestmark = pytest.mark.slow


class Node:
    def __init__(self, node_id: str, ports: dict[str, int], data: Path) -> None:
        self.id = node_id
        self.addr = f"127.0.0.1:{ports[node_id]}"
        self.args = [
            sys.executable,
            "-m",
            "dsys",
            "kv",
            "multi-serve",
            "--id",
            node_id,
            "--listen",
            self.addr,
            "--data-dir",
            str(data / node_id),
            "--snapshot-every",
            "200",
            "--balance-interval",
            "1",
            *[f"--peer={j}=127.0.0.1:{p}" for j, p in ports.items() if j != node_id],
        ]
        self.log = data / f"{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, start_new_session=True)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    ids = ["n1", "n2", "n3"]
    ports = dict(zip(ids, free_ports(3), strict=True))
    ns = [Node(i, ports, tmp_path) for i in ids]
    for n in ns:
        n.start()
    try:
        yield ns
    finally:
        for n in ns:
            n.kill9()


@pytest.mark.timeout(300)
async def test_kill9_and_splits_on_processes_are_linearizable(nodes: list[Node]) -> None:
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
