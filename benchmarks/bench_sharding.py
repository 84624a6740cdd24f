"""Benchmark dsys.sharding against uhashring and jump-consistent-hash.

For each algorithm, over the same keys on 10 nodes:

* lookups/s: ``get(key)`` on ``str`` keys, timed in rounds that alternate dsys and the
  peers (so they share the machine's noise); the median round is reported;
* balance over 1,000,000 keys: the busiest node's load over the mean, and the
  coefficient of variation (std/mean) of the per-node loads;
* movement: the fraction of keys whose owner changes when an 11th node joins
  (ideal ``1/11`` = 9.09%).

Ratios are dsys / peer: ``dsys ring`` vs ``uhashring`` (both default layouts),
``dsys ring (ketama)`` vs ``uhashring (ketama)``, ``dsys jump_hash`` vs the C
``jump.hash`` (both hash ``str`` keys with 64-bit mmh3 first), and dsys rendezvous
vs ``uhashring`` (there is no common rendezvous peer).

Run: ``.venv/bin/python benchmarks/bench_sharding.py [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jump
import mmh3
import uhashring

from dsys.sharding import HashRing, RendezvousHash, jump_hash

Lookup = Callable[[str], object]


@dataclass
class Contender:
    name: str
    peer: str | None  # name of the contender it is compared with
    make: Callable[[Sequence[str]], Lookup]  # nodes -> lookup function


def _dsys_ring(nodes: Sequence[str]) -> Lookup:
    return HashRing(nodes).get


def _dsys_ketama(nodes: Sequence[str]) -> Lookup:
    return HashRing(nodes, mode="ketama").get


def _dsys_jump(nodes: Sequence[str]) -> Lookup:
    n = len(nodes)
    names = list(nodes)

    def get(key: str) -> str:
        return names[jump_hash(key, n)]

    return get


def _dsys_rendezvous(nodes: Sequence[str]) -> Lookup:
    return RendezvousHash(nodes).get


def _uhashring(nodes: Sequence[str]) -> Lookup:
    return uhashring.HashRing(list(nodes)).get_node  # type: ignore[no-any-return]


def _uhashring_ketama(nodes: Sequence[str]) -> Lookup:
    return uhashring.HashRing(list(nodes), hash_fn="ketama").get_node  # type: ignore[no-any-return]


def _jump_c(nodes: Sequence[str]) -> Lookup:
    n = len(nodes)
    names = list(nodes)
    hash64 = mmh3.hash64
    c_hash = jump.hash

    def get(key: str) -> str:
        return names[c_hash(hash64(key, 0, signed=False)[0], n)]

    return get


CONTENDERS = [
    Contender("dsys ring", "uhashring", _dsys_ring),
    Contender("uhashring", None, _uhashring),
    Contender("dsys ring (ketama)", "uhashring (ketama)", _dsys_ketama),
    Contender("uhashring (ketama)", None, _uhashring_ketama),
    Contender("dsys jump_hash", "jump-consistent-hash", _dsys_jump),
    Contender("jump-consistent-hash", None, _jump_c),
    Contender("dsys rendezvous", "uhashring", _dsys_rendezvous),
]


def _time_lookups(get: Lookup, keys: Sequence[str]) -> float:
    gc.collect()
    start = time.perf_counter()
    for key in keys:
        get(key)
    return len(keys) / (time.perf_counter() - start)


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="100k keys, 3 short rounds")
    parser.add_argument("--nodes", type=int, default=10)
    args = parser.parse_args(argv)

    total_keys = 100_000 if args.quick else 1_000_000
    timed_keys = 30_000 if args.quick else 100_000
    rounds = 3 if args.quick else 7
    nodes = [f"node-{i}" for i in range(args.nodes)]
    grown = [*nodes, f"node-{args.nodes}"]
    keys = [f"user:{i}" for i in range(total_keys)]
    timed = keys[:timed_keys]

    started = time.perf_counter()
    lookups = {c.name: c.make(nodes) for c in CONTENDERS}

    # Throughput: alternate contenders inside each round; rotate the order per round.
    rates: dict[str, list[float]] = {c.name: [] for c in CONTENDERS}
    for r in range(rounds):
        order = CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]
        for c in order:
            rates[c.name].append(_time_lookups(lookups[c.name], timed))
        _progress(f"round {r + 1}/{rounds} done")

    # Balance and movement over all keys (deterministic, computed once).
    balance: dict[str, tuple[float, float, float]] = {}
    for c in CONTENDERS:
        before_get, after_get = lookups[c.name], c.make(grown)
        owners = [before_get(k) for k in keys]
        counts = Counter(owners)
        loads = [counts.get(n, 0) for n in nodes]
        mean = statistics.fmean(loads)
        cv = statistics.pstdev(loads) / mean
        moved = sum(1 for k, o in zip(keys, owners, strict=True) if after_get(k) != o)
        balance[c.name] = (max(loads) / mean, cv, moved / total_keys)
        _progress(f"{c.name}: balance and movement done")

    med = {name: statistics.median(v) for name, v in rates.items()}
    ideal = 1 / (args.nodes + 1)
    print(
        f"## sharding: {args.nodes} nodes, {total_keys:,} keys, "
        f"lookups timed over {timed_keys:,} keys x {rounds} rounds (median)\n"
    )
    print(
        "| contender | lookups/s | vs peer | load max/mean | load CV | "
        f"moved on +1 node (ideal {ideal:.2%}) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for c in CONTENDERS:
        mx, cv, moved = balance[c.name]
        ratio = f"{med[c.name] / med[c.peer]:.2f}x {c.peer}" if c.peer else "peer"
        print(f"| {c.name} | {med[c.name]:,.0f} | {ratio} | {mx:.3f} | {cv:.3f} | {moved:.2%} |")
    print(
        f"\nPython {platform.python_version()}, {platform.machine()}, "
        f"{time.perf_counter() - started:.0f} s total"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
