"""The ``dsys`` command line: ``dsys <block> <verb>``.

Each building block adds its own subcommands from ``dsys/<block>/cli.py``, which
defines ``register(subparsers)``; this module only finds and wires them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import dsys
from dsys.errors import DsysError
from dsys.observability.logging import configure_logging

# Blocks in the order `dsys --help` lists them. A block whose
# cli module is not present in this installation is simply not offered.
BLOCKS: tuple[str, ...] = (
    "sharding",
    "kv",
    "raft",
    "ratelimit",
    "resilience",
    "pubsub",
    "streams",
    "balance",
    "jobs",
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the argument parser with every block's subcommands (or just block ``only``).

    Parsing ``dsys kv put ...`` needs only the kv block's commands, and importing every
    block's servers would cost each CLI call a few hundred milliseconds.
    """
    parser = argparse.ArgumentParser(
        prog="dsys",
        description="dsys: distributed-systems building blocks (sharding, Raft KV, "
        "rate limiting, pub/sub, streams, load balancing, circuit breakers).",
    )
    parser.add_argument("--version", action="version", version=f"dsys {dsys.__version__}")
    parser.add_argument(
        "--log-json", action="store_true", help="log JSON lines (or set DSYS_LOG_FORMAT=json)"
    )
    parser.add_argument(
        "--log-level", default=None, help="debug, info, warning, error (default: info)"
    )
    sub = parser.add_subparsers(dest="block", metavar="<block>")
    for block in BLOCKS if only is None else (only,):
        try:
            module = importlib.import_module(f"dsys.{block}.cli")
        except ModuleNotFoundError as exc:
            if exc.name in (f"dsys.{block}", f"dsys.{block}.cli"):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dsys`` console script; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    block = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(block if block in BLOCKS else None)
    args = parser.parse_args(args_list)
    configure_logging(json=True if args.log_json else None, level=args.log_level)
    func = getattr(args, "func", None)
    if func is None:
        # `dsys` or `dsys <block>` without a verb: show the relevant help.
        target = getattr(args, "block_parser", None) or parser
        target.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except DsysError as exc:
        print(f"dsys: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
