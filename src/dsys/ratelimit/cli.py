"""``dsys ratelimit serve|check``: run a limiter node, or ask a store for decisions.

``dsys ratelimit serve --listen 127.0.0.1:7401 [--token T]`` serves ``/v1/hit``,
``/healthz`` and ``/metrics`` until SIGINT/SIGTERM, printing one line
``listening on http://HOST:PORT`` on stdout once bound (port 0 picks a free port).

``dsys ratelimit check --store URL --rate R [--per S] [--burst B] KEY [--count N]``
sends ``N`` hits and prints one JSON decision per line; the exit code is 0 when the
last one was allowed and 3 when it was refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from dsys.observability import get_logger, parse_listen, run_app
from dsys.ratelimit.limiter import Limiter, store_from_url
from dsys.ratelimit.server import LimiterServer, ServerConfig

REFUSED_EXIT = 3


def register(subparsers: Any) -> None:
    """Add ``ratelimit serve`` and ``ratelimit check`` to the ``dsys`` parser."""
    parser = subparsers.add_parser(
        "ratelimit",
        help="rate limiting: limiter nodes, checks",
        description="Rate limiting (dsys.ratelimit): run a limiter node for ClusterStore "
        "clients, or ask any store for decisions.",
    )
    parser.set_defaults(block_parser=parser)
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>")

    serve = verbs.add_parser(
        "serve",
        help="run a limiter node for ClusterStore clients",
        description="Run a limiter node: POST /v1/hit (msgpack), /healthz and /metrics, "
        "until SIGINT/SIGTERM; prints 'listening on http://HOST:PORT' once bound.",
    )
    serve.add_argument("--listen", default="127.0.0.1:7401", help="HOST:PORT (default %(default)s)")
    serve.add_argument(
        "--token",
        default=os.environ.get("DSYS_RATELIMIT_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (or set DSYS_RATELIMIT_TOKEN)",
    )
    serve.add_argument("--max-keys", type=int, default=1_000_000, help="keys kept per policy")
    serve.add_argument("--max-body", type=int, default=64 * 1024, help="largest body, bytes")
    serve.set_defaults(func=_serve)

    check = verbs.add_parser(
        "check",
        help="send hits for a key and print the decisions",
        description="Send --count hits for KEY through a store and print one JSON decision "
        "per line; exit 0 when the last was allowed, 3 when refused.",
    )
    check.add_argument("key", help="the key to spend tokens for")
    check.add_argument(
        "--store",
        default="memory://",
        help="memory://, redis://HOST:PORT/DB or dsys://HOST:PORT,...",
    )
    check.add_argument("--rate", type=float, required=True, help="tokens per --per seconds")
    check.add_argument("--per", type=float, default=1.0, help="period in seconds (default 1)")
    check.add_argument(
        "--burst", type=int, default=None, help="token-bucket capacity (default: ceil(rate))"
    )
    check.add_argument("--cost", type=int, default=1, help="tokens per hit (default 1)")
    check.add_argument("--count", type=int, default=1, help="hits to send (1..100000)")
    check.add_argument(
        "--algorithm",
        default="token_bucket",
        choices=["token_bucket", "sliding_window", "fixed_window"],
        help="limiting algorithm (default %(default)s)",
    )
    check.set_defaults(func=_check)


def _serve(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen, default_port=7401)
    server = LimiterServer(
        ServerConfig(max_keys=args.max_keys, max_body=args.max_body, token=args.token or None)
    )
    log = get_logger("ratelimit.server")

    def started(bound: int) -> None:
        print(f"listening on http://{host}:{bound}", flush=True)
        log.info("serving", host=host, port=bound, token=bool(args.token))

    asyncio.run(run_app(server.app(), host, port, on_started=started))
    return 0


def _check(args: argparse.Namespace) -> int:
    from dsys.errors import ConfigError

    if not 1 <= args.count <= 100_000:
        raise ConfigError(f"--count must be in 1..100000, got {args.count}")

    async def run() -> bool:
        limiter = Limiter(
            args.rate,
            args.per,
            args.burst,
            store=store_from_url(args.store),
            algorithm=args.algorithm,
            on_store_error="closed",
        )
        allowed = False
        try:
            for _ in range(args.count):
                d = await limiter.hit(args.key, args.cost)
                allowed = d.allowed
                print(
                    json.dumps(
                        {
                            "key": args.key,
                            "allowed": d.allowed,
                            "remaining": d.remaining,
                            "retry_after": round(d.retry_after, 6),
                            "reset": round(d.reset, 6),
                        }
                    )
                )
            if limiter.store_errors:
                print(f"dsys: {limiter.store_errors} store error(s)", file=sys.stderr)
        finally:
            await limiter.close()
        return allowed

    return 0 if asyncio.run(run()) else REFUSED_EXIT


__all__ = ["register"]
