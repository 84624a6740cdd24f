"""Per-call overhead of circuit breakers: dsys vs pybreaker, circuitbreaker, aiobreaker, purgatory.

Each case wraps a trivial function (sync) or coroutine (async) in a closed breaker and
calls it ``N`` times in a loop; the same loop over the bare function is timed in the same
round and subtracted, so the figure is the breaker's own cost per call in nanoseconds.
Cases run in alternating order in every round; the table shows medians over rounds and
the ratio to the best peer of the same kind (sync or async). Lower is better.

    .venv/bin/python benchmarks/bench_resilience.py            # full run (about a minute)
    .venv/bin/python benchmarks/bench_resilience.py --quick    # a few seconds

Peers come from the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Awaitable, Callable

import aiobreaker
import circuitbreaker
import pybreaker
from prometheus_client import CollectorRegistry
from purgatory import AsyncCircuitBreakerFactory

from dsys.resilience import CircuitBreaker, TimeWindow


def work() -> int:
    return 1


async def awork() -> int:
    return 1


def time_sync(fn: Callable[[], object], n: int) -> float:
    """Nanoseconds per call of ``fn`` over ``n`` calls."""
    rng = range(n)
    t0 = time.perf_counter_ns()
    for _ in rng:
        fn()
    return (time.perf_counter_ns() - t0) / n


async def time_async(fn: Callable[[], Awaitable[object]], n: int) -> float:
    """Nanoseconds per awaited call of ``fn`` over ``n`` calls."""
    rng = range(n)
    t0 = time.perf_counter_ns()
    for _ in rng:
        await fn()
    return (time.perf_counter_ns() - t0) / n


def dsys_breaker(name: str, **kw: object) -> CircuitBreaker:
    return CircuitBreaker(name, metrics=CollectorRegistry(), **kw)  # type: ignore[arg-type]


def sync_cases() -> dict[str, tuple[str, Callable[[], object]]]:
    """name -> (library, zero-argument callable)."""
    d_count = dsys_breaker("bench-sync")
    d_time = dsys_breaker(
        "bench-sync-time", window=TimeWindow(seconds=60, buckets=60), slow_call_duration=1.0
    )
    pb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    cb_deco = circuitbreaker.circuit(failure_threshold=5, recovery_timeout=60)(work)
    d_call = d_count.call
    pb_call = pb.call
    return {
        "dsys @breaker (count window)": ("dsys", d_count(work)),
        "dsys breaker.call(fn)": ("dsys", lambda: d_call(work)),
        "dsys @breaker (time window + slow calls)": ("dsys", d_time(work)),
        "pybreaker @breaker": ("pybreaker", pb(work)),
        "pybreaker breaker.call(fn)": ("pybreaker", lambda: pb_call(work)),
        "circuitbreaker @circuit": ("circuitbreaker", cb_deco),
    }


def async_cases() -> dict[str, tuple[str, Callable[[], Awaitable[object]]]]:
    d_count = dsys_breaker("bench-async")
    d_time = dsys_breaker(
        "bench-async-time", window=TimeWindow(seconds=60, buckets=60), slow_call_duration=1.0
    )
    ab = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=datetime.timedelta(seconds=60))
    pf = AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)
    d_call = d_count.call_async
    ab_call = ab.call_async

    async def dsys_with() -> int:
        async with d_count:
            return await awork()

    return {
        "dsys @breaker (count window)": ("dsys", d_count(awork)),
        "dsys await breaker.call_async(fn)": ("dsys", lambda: d_call(awork)),
        "dsys async with breaker": ("dsys", dsys_with),
        "dsys @breaker (time window + slow calls)": ("dsys", d_time(awork)),
        "aiobreaker await breaker.call_async(fn)": ("aiobreaker", lambda: ab_call(awork)),
        "aiobreaker @breaker": ("aiobreaker", ab(awork)),
        "purgatory @factory(name)": ("purgatory", pf("bench")(awork)),
    }


def run(rounds: int, n: int) -> list[tuple[str, str, str, float]]:
    """Rows (kind, case, library, median overhead ns)."""
    samples: dict[tuple[str, str, str], list[float]] = {}
    scases = sync_cases()
    acases = async_cases()
    loop = asyncio.new_event_loop()
    try:
        # warm up every case once (first calls create breakers, caches...)
        for _, fn in scases.values():
            time_sync(fn, 1000)
        for _, afn in acases.values():
            loop.run_until_complete(time_async(afn, 1000))
        for r in range(rounds):
            gc.collect()
            order = list(scases.items())
            if r % 2:
                order.reverse()
            bare = time_sync(work, n)
            for name, (lib, fn) in order:
                cost = time_sync(fn, n) - bare
                samples.setdefault(("sync", name, lib), []).append(cost)
            aorder = list(acases.items())
            if r % 2:
                aorder.reverse()
            abare = loop.run_until_complete(time_async(awork, n))
            for name, (lib, afn) in aorder:
                cost = loop.run_until_complete(time_async(afn, n)) - abare
                samples.setdefault(("async", name, lib), []).append(cost)
    finally:
        loop.close()
    return [(k, name, lib, statistics.median(v)) for (k, name, lib), v in samples.items()]


def table(rows: list[tuple[str, str, str, float]]) -> str:
    best_peer = {
        kind: min(m for k, _, lib, m in rows if k == kind and lib != "dsys")
        for kind in ("sync", "async")
    }
    lines = [
        "| kind | case | library | overhead per call (ns, median) | ratio to best peer |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for kind, name, lib, median in rows:
        ratio = median / best_peer[kind]
        lines.append(f"| {kind} | {name} | {lib} | {median:,.0f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (3 rounds)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--calls", type=int, default=None, help="calls per measurement")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 21)
    n = args.calls or (20_000 if args.quick else 50_000)
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    t0 = time.monotonic()
    rows = run(rounds, n)
    print(
        f"# resilience: breaker overhead, {rounds} rounds x {n:,} calls, "
        f"Python {platform.python_version()} on {platform.machine()}, "
        f"{time.monotonic() - t0:.0f} s\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
