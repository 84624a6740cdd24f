"""A node that stays down on four real ``dsys kv multi-serve`` processes (ranges on
three): after ``kill -9`` and ``--down-after`` seconds, the placement loop replaces its
replicas on live nodes, no acknowledged write is lost, and the node's restart disturbs
nothing (its stale replicas are dropped by epoch). Slow: processes, about 20 s."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dsys.errors import DsysError
from dsys.kv.ranges import RangeDescriptor
from dsys.kv.sharded import ShardedKVClient

from .helpers import Proc, dsys_kv, running_multi_procs, status, warm_up

pytestmark = pytest.mark.slow

IDS = ["n1", "n2", "n3", "n4"]
DOWN_AFTER = 2.0


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Proc]]:
    async with running_multi_procs(
        tmp_path,
        len(IDS),
        "--initial-replicas",
        "n1,n2,n3",
        "--placement-interval",
        "0.3",
        "--down-after",
        str(DOWN_AFTER),
        "--move-timeout",
        "10",
        "--merge-keys",
        "0",
    ) as procs:
        yield procs


async def _until(what: str, limit_s: float, cond: Any) -> Any:
    """Poll the coroutine function ``cond`` until it returns something truthy."""
    deadline = time.monotonic() + limit_s
    last = None
    while time.monotonic() < deadline:
        last = await cond()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.mark.timeout(180)
async def test_replicas_of_a_node_that_stays_down_are_replaced(
    nodes: list[Proc], tmp_path: Path
) -> None:
    addrs = [n.addr for n in nodes]
    by_id = {n.cfg.id: n for n in nodes}
    acked: dict[str, bytes] = {}
    kv = ShardedKVClient(addrs, timeout=30.0)
    try:
        await warm_up(kv)
        for at in ("k2", "k4", "k6"):
            for _ in range(50):  # a node whose metadata replica lags may refuse (retried)
                with contextlib.suppress(DsysError):
                    await kv.split((await kv.locate(at)).range_id, at)
                    break
                await asyncio.sleep(0.1)

        async def four_ranges() -> bool:
            with contextlib.suppress(DsysError):
                return len(await kv.refresh()) == 4
            return False

        await _until("the map shows the splits", 30, four_ranges)

        async def quiet_moves() -> bool:
            views = [await status(a) for a in addrs]
            return all(v is not None and not v["moves"] for v in views)

        # the victim: n1..n3 hold every range; pick one that drives or takes no move now
        await _until("no move in flight", 30, quiet_moves)
        victim = by_id["n2"]

        stop = asyncio.Event()

        async def writer() -> None:
            i = 0
            while not stop.is_set() and i < 2000:
                key, value = f"k{i % 8}/{i:05d}", f"v{i}".encode()
                try:
                    await kv.put(key, value)
                except DsysError:
                    await asyncio.sleep(0.05)
                    continue
                acked[key] = value
                i += 1
                await asyncio.sleep(0.005)

        w = asyncio.create_task(writer())
        await asyncio.sleep(1.0)
        victim.kill9()
        killed_at = time.monotonic()

        async def repaired() -> list[RangeDescriptor] | None:
            with contextlib.suppress(DsysError):
                m = list(await kv.refresh())
                if all(victim.cfg.id not in r.replicas and len(r.replicas) == 3 for r in m):
                    return m
            return None

        # `dsys kv ranges` shows the node down while its replicas move
        async def shown_down() -> str | None:
            rc, out, _ = await dsys_kv("ranges", "--cluster", ",".join(addrs))
            return out if rc == 0 and f"node {victim.cfg.id}" in out and "down" in out else None

        out = await _until("the victim shown down", 30, shown_down)
        assert time.monotonic() - killed_at >= DOWN_AFTER, "declared down too early"
        final = await _until("every range back to 3 live replicas", 90, repaired)
        await asyncio.sleep(1.0)
        stop.set()
        await w
        assert len(acked) > 50, len(acked)
        for r in final:
            assert set(r.replicas) <= {"n1", "n3", "n4"}, r.describe()
        # no acknowledged write is lost
        for key, value in acked.items():
            got = await kv.get(key)
            assert got is not None and got.value == value, (key, got)

        # the victim comes back: its stale replicas are dropped, nothing else changes
        before = {r.range_id: r for r in await kv.refresh()}
        victim.start()

        async def victim_clean() -> bool:
            v = await status(victim.addr)
            with contextlib.suppress(DsysError):
                m = {r.range_id: r for r in await kv.refresh()}
                if v is None:
                    return False
                held = [r["range_id"] for r in v["ranges"] if r.get("initialized")]
                # what it holds is what the map says it holds (a balancing move to it
                # after its return is fine; a stale replica is not)
                return all(rid in m and victim.cfg.id in m[rid].replicas for rid in held)
            return False

        await _until("the victim dropped its stale replicas", 60, victim_clean)
        after = {r.range_id: r for r in await kv.refresh()}
        for rid, r in after.items():
            assert len(r.replicas) == 3 and rid in before, r.describe()
            # only the ordinary balancing may have moved a replica since (rate-limited)
        for key, value in list(acked.items())[-50:]:
            got = await kv.get(key)
            assert got is not None and got.value == value, (key, got)
        await kv.put("after", b"restart")
        leader = next(
            (
                v
                for v in [await status(a) for a in addrs]
                if v and v["placement"]["metadata_leader"]
            ),
            None,
        )
        assert leader is not None and leader["placement"]["down"] == [], leader
        print(f"{len(acked)} acked writes, repaired map {[r.describe() for r in final]}\n{out}")
    finally:
        await kv.close()
