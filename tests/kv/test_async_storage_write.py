"""A leader answers a put that its followers made durable while its own fsync still runs."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from dsys.kv.client import KVClient

from .helpers import running_cluster, wait_leader


async def test_the_leader_answers_before_its_own_fsync_ends(tmp_path: Path) -> None:
    # etcd raft's asynchronous storage writes: the two followers' acknowledgements are a
    # majority without the leader's copy, so the put is applied and answered while the
    # leader's own write of it is held back; its copy then lands and nothing is lost.
    async with running_cluster(tmp_path) as servers:
        leader = await wait_leader(servers)
        node = leader.node
        gate, blocked = threading.Event(), threading.Event()
        real_sync = node._sync

        def held_sync() -> None:  # runs in the executor thread
            blocked.set()
            gate.wait(30)
            real_sync()

        node._sync = held_sync  # type: ignore[method-assign]
        try:
            async with KVClient([f"127.0.0.1:{leader.port}"]) as kv:
                await asyncio.wait_for(kv.put("k", b"early"), 10)
            assert blocked.is_set() and not gate.is_set()  # answered; its fsync still held
            early = node.applied_index
            assert node.core.stable_index < early
        finally:
            node._sync = real_sync  # type: ignore[method-assign]
            gate.set()
        async with KVClient([f"127.0.0.1:{s.port}" for s in servers]) as kv:
            await kv.put("k2", b"after")
            assert (await kv.get("k")).value == b"early"
        assert node.core.stable_index >= early  # and the leader's own copy landed
