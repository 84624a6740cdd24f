"""Distributed accuracy with real processes: 3 `dsys ratelimit serve` nodes, 6 clients.

Six client tasks, each with its own ClusterStore (its own connections and leases), hammer
ONE key for a bounded time. Every decision about the key is made by its owner node
between `t_start` (before the first request is sent) and `t_end` (after the last answer
arrived), so the owner can have granted at most ``b + r * (t_end - t_start)`` tokens.

For the lower bound we use the inner window ``[first answer received, last request
sent]``, which lies inside the span of the owner's decisions: the bucket starts full and
the clients keep it drained, so it must have granted at least ``b + r * inner`` minus one
partial token, less whatever full-bucket idleness a stall caused (none, with a burst
that covers a second of stalls). No timing is asserted; the clock only measures
the window that defines the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest

from dsys.ratelimit import ClusterStore, Limiter
from dsys.testing.procs import start_dsys

RATE = 200.0  # tokens per second
BURST = 200  # covers 1 s of client stalls without wasting tokens
DURATION = 3.0
CLIENTS = 6


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(start_dsys("ratelimit", "serve", "--listen", "127.0.0.1:0")).addr
            for _ in range(3)
        ]


async def _hammer(
    nodes: list[str], key: str, lease_size: int, lease_ttl: float, duration: float = DURATION
) -> tuple[int, int, float, float, float, float, list[ClusterStore]]:
    stores = [
        ClusterStore(nodes, lease_size=lease_size, lease_ttl=lease_ttl, timeout=5.0)
        for _ in range(CLIENTS)
    ]
    limiters = [
        Limiter(rate=RATE, per=1.0, burst=BURST, store=s, on_store_error="closed") for s in stores
    ]
    # Warm every client's connection to the owner with a different policy (same node,
    # separate bucket), so connection set-up does not fall inside the measured window.
    for s in stores:
        await Limiter(rate=1, burst=1, store=s).hit(key)
    first_answers: list[float] = []
    last_sends: list[float] = []
    admitted = [0] * CLIENTS
    decisions = [0] * CLIENTS
    t_start = time.monotonic()
    stop_at = t_start + duration

    async def client(i: int) -> None:
        lim = limiters[i]
        first = True
        for _ in range(10_000_000):  # bounded; the time check ends it first
            sent = time.monotonic()
            if sent >= stop_at:
                break
            d = await lim.hit(key)
            if first:
                first_answers.append(time.monotonic())
                first = False
            last_sends.append(sent)
            admitted[i] += d.allowed
            decisions[i] += 1

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    t_end = time.monotonic()
    for lim in limiters:
        assert lim.store_errors == 0
    inner = min(first_answers), max(last_sends)
    return sum(admitted), sum(decisions), t_start, t_end, *inner, stores


async def test_cluster_without_leases_admits_the_limit(nodes: list[str]) -> None:
    admitted, total, t_start, t_end, inner_lo, inner_hi, stores = await _hammer(
        nodes, "hot", 0, 1.0
    )
    try:
        upper = BURST + RATE * (t_end - t_start)
        lower = BURST + RATE * (inner_hi - inner_lo) - 1
        assert admitted <= upper, (admitted, upper)
        assert admitted >= 0.99 * lower, (admitted, lower)
        # One round trip per decision (plus the warm-up hit of each client).
        assert sum(s.round_trips for s in stores) == total + CLIENTS
    finally:
        for s in stores:
            await s.close()


async def test_cluster_with_leases_stays_within_the_stated_bound(nodes: list[str]) -> None:
    lease_size, lease_ttl = 10, 0.5
    admitted, total, t_start, t_end, inner_lo, inner_hi, stores = await _hammer(
        nodes, "hot-leased", lease_size, lease_ttl
    )
    try:
        leftover = sum(s.leased_tokens() for s in stores)
        expired = sum(s.expired_tokens for s in stores)
        assert leftover <= CLIENTS * lease_size  # each client holds at most one lease
        bound = min(CLIENTS * lease_size, RATE * lease_ttl)  # see dsys.ratelimit.cluster
        upper = BURST + RATE * (t_end - t_start) + bound
        lower = BURST + RATE * (inner_hi - inner_lo) - 1
        assert admitted <= upper, (admitted, upper)
        # Tokens granted by the owner = spent + still leased + expired unspent.
        assert admitted + leftover + expired >= 0.99 * lower, (admitted, leftover, expired)
        # Leased tokens and cached refusals are decided locally, without a round trip.
        assert sum(s.round_trips for s in stores) < total
    finally:
        for s in stores:
            await s.close()


async def test_a_dead_owner_only_affects_its_keys() -> None:
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(start_dsys("ratelimit", "serve", "--listen", "127.0.0.1:0"))
            for _ in range(2)
        ]
        addrs = [p.addr for p in procs]
        store = ClusterStore(addrs, timeout=2.0)
        lim = Limiter(rate=10, burst=2, store=store, on_store_error="closed")
        keys = {store.owner(f"user{i}"): f"user{i}" for i in range(50)}
        alive_key, dead_key = keys[addrs[0]], keys[addrs[1]]
        assert (await lim.hit(dead_key)).allowed
        procs[1].proc.kill()
        procs[1].proc.wait()
        refused = await lim.hit(dead_key)
        assert not refused.allowed and refused.retry_after == 1.0
        assert lim.store_errors == 1
        assert [(await lim.hit(alive_key)).allowed for _ in range(3)] == [True, True, False]
        assert lim.store_errors == 1
        await lim.close()


@pytest.mark.slow
@pytest.mark.parametrize("lease_size", [0, 25])
async def test_soak_30s(nodes: list[str], lease_size: int) -> None:
    """The same accuracy check for 30 s (run with -m slow)."""
    admitted, _, t_start, t_end, inner_lo, inner_hi, stores = await _hammer(
        nodes, f"soak-{lease_size}", lease_size, 0.5, duration=30.0
    )
    try:
        leftover = sum(s.leased_tokens() for s in stores)
        expired = sum(s.expired_tokens for s in stores)
        bound = min(CLIENTS * lease_size, RATE * 0.5)
        assert admitted <= BURST + RATE * (t_end - t_start) + bound
        lower = BURST + RATE * (inner_hi - inner_lo) - 1
        assert admitted + leftover + expired >= 0.99 * lower
    finally:
        for s in stores:
            await s.close()
