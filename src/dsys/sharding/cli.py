"""``dsys shard``: locate keys and plan rebalances from the command line.

Examples::

    dsys shard locate --nodes a,b,c --replicas 2 user:1 user:2
    dsys shard locate --nodes a=2,b=1 --algo rendezvous user:1
    dsys shard rebalance --nodes a,b,c --add d --keys 100000
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

from dsys.errors import ConfigError
from dsys.sharding.jump import jump_hash
from dsys.sharding.rendezvous import RendezvousHash
from dsys.sharding.ring import HashRing, RingMode
from dsys.sharding.router import ShardRouter

MAX_KEYS = 10_000_000
_PROGRESS_EVERY = 100_000


def parse_nodes(spec: str) -> dict[str, float]:
    """Parse ``a,b,c`` or ``a=2,b=1`` into a ``node -> weight`` mapping.

    Raises:
        ConfigError: empty names, duplicates or weights that are not positive numbers.
    """
    nodes: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, raw = item.strip().partition("=")
        name = name.strip()
        if not name:
            raise ConfigError(f"empty node name in {spec!r}")
        if name in nodes:
            raise ConfigError(f"node {name!r} is listed twice in {spec!r}")
        try:
            weight = float(raw) if sep else 1.0
        except ValueError:
            raise ConfigError(f"weight of node {name!r} must be a number, got {raw!r}") from None
        nodes[name] = weight
    return nodes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers: Any) -> None:
    """Add the ``shard`` command and its verbs to the ``dsys`` parser."""
    parser = subparsers.add_parser(
        "shard",
        help="consistent-hash shard routing: locate keys, plan rebalances",
        description="Consistent-hash shard routing (dsys.sharding).",
    )
    parser.set_defaults(block_parser=parser)
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>")

    locate = verbs.add_parser(
        "locate",
        help="print the owners of keys",
        description="Print each key's owners (primary first), one key per line.",
    )
    locate.add_argument("--nodes", required=True, help="a,b,c or with weights a=2,b=1")
    locate.add_argument("--replicas", type=_positive, default=1, help="owners per key")
    locate.add_argument(
        "--algo",
        choices=("ring", "rendezvous", "jump"),
        default="ring",
        help="ring (default), rendezvous (weighted HRW) or jump (bucket index into --nodes)",
    )
    locate.add_argument("--mode", choices=("mmh3", "ketama"), default="mmh3", help="ring layout")
    locate.add_argument("keys", nargs="+", metavar="KEY", help="keys to locate")
    locate.set_defaults(func=cmd_locate)

    rebalance = verbs.add_parser(
        "rebalance",
        help="plan the shard moves for a membership change",
        description="Compare shard placements before and after adding/removing nodes, "
        "count how many sample keys move, and print the first moves of the plan.",
    )
    rebalance.add_argument("--nodes", required=True, help="current nodes: a,b,c or a=2,b=1")
    rebalance.add_argument("--add", default="", help="nodes to add: d or d=2,e")
    rebalance.add_argument("--remove", default="", help="nodes to remove: a,b")
    rebalance.add_argument("--shards", type=_positive, default=256, help="fixed shard count")
    rebalance.add_argument("--replicas", type=_positive, default=1, help="owners per shard")
    rebalance.add_argument(
        "--keys", type=_positive, default=100_000, help=f"sample keys (max {MAX_KEYS:,})"
    )
    rebalance.add_argument("--show", type=int, default=10, help="moves to print (default 10)")
    rebalance.set_defaults(func=cmd_rebalance)


def cmd_locate(args: argparse.Namespace) -> int:
    """Print ``KEY<TAB>owner[,owner...]`` for each key."""
    nodes = parse_nodes(args.nodes)
    if args.replicas > len(nodes):
        raise ConfigError(f"--replicas {args.replicas} is more than the {len(nodes)} nodes")
    lookup: Callable[[str], list[str]]
    if args.algo == "ring":
        mode: RingMode = args.mode
        ring = HashRing(nodes, mode=mode)
        lookup = lambda key: ring.get_n(key, args.replicas)  # noqa: E731
    elif args.algo == "rendezvous":
        hrw = RendezvousHash(nodes)
        lookup = lambda key: hrw.get_n(key, args.replicas)  # noqa: E731
    else:
        if args.replicas != 1:
            raise ConfigError("jump hash gives one bucket per key: use --replicas 1")
        names = list(nodes)
        lookup = lambda key: [names[jump_hash(key, len(names))]]  # noqa: E731
    for key in args.keys:
        print(f"{key}\t{','.join(lookup(key))}")
    return 0


def _load_line(counts: Counter[str], nodes: list[str], total: int) -> str:
    mean = total / len(nodes)
    cells = [f"{n}={counts[n]} ({counts[n] / mean:.2f}x)" for n in nodes]
    return "  ".join(cells)


def cmd_rebalance(args: argparse.Namespace) -> int:
    """Print the moved fraction versus the ideal, per-node loads and the first moves."""
    old_nodes = parse_nodes(args.nodes)
    added = parse_nodes(args.add) if args.add else {}
    removed = [n.strip() for n in args.remove.split(",") if n.strip()]
    for name in added:
        if name in old_nodes:
            raise ConfigError(f"--add {name!r}: already in --nodes")
    for name in removed:
        if name not in old_nodes:
            raise ConfigError(f"--remove {name!r}: not in --nodes")
    if not added and not removed:
        raise ConfigError("nothing changes: give --add and/or --remove")
    if args.keys > MAX_KEYS:
        raise ConfigError(f"--keys must be at most {MAX_KEYS:,}, got {args.keys:,}")
    new_nodes = {n: w for n, w in old_nodes.items() if n not in removed} | added

    old = ShardRouter(old_nodes, shards=args.shards, replicas=args.replicas)
    new = old.with_nodes(new_nodes)
    plan = old.plan_rebalance(new)

    before: Counter[str] = Counter()
    after: Counter[str] = Counter()
    moved_keys = 0
    total = args.keys
    progress = total >= 2 * _PROGRESS_EVERY
    for i in range(total):
        key = f"key:{i}"
        shard = old.shard_for(key)
        a, b = old.placement[shard][0], new.placement[shard][0]
        before[a] += 1
        after[b] += 1
        moved_keys += a != b
        if progress and ((i + 1) % _PROGRESS_EVERY == 0 or i + 1 == total):
            print(f"\r  {i + 1:,}/{total:,} keys", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)

    print(f"nodes: {', '.join(old.nodes)} -> {', '.join(new.nodes)}")
    print(f"shards: {plan.shards}, replicas: {plan.replicas}")
    print(
        f"moved shards: {len(plan.moves)} of {plan.shards}; replica copies moved "
        f"{plan.moved_fraction:.2%} (ideal {plan.ideal_fraction:.2%})"
    )
    print(
        f"moved keys (primary changed): {moved_keys:,} of {total:,} = "
        f"{moved_keys / total:.2%} (ideal {plan.ideal_fraction:.2%})"
    )
    print(f"keys per node before: {_load_line(before, list(old.nodes), total)}")
    print(f"keys per node after:  {_load_line(after, list(new.nodes), total)}")
    shown = plan.moves[: max(0, args.show)]
    if shown:
        print(f"first {len(shown)} of {len(plan.moves)} moves:")
        for move in shown:
            print(f"  {move}")
    return 0
