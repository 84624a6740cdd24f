"""``dsys pubsub``: run a broker, publish and subscribe from the shell."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from dsys.errors import ConfigError
from dsys.observability import parse_listen
from dsys.pubsub.broker import Broker, BrokerConfig, load_tokens
from dsys.pubsub.client import Client
from dsys.pubsub.core import BrokerLimits, QueueChoice


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dsys pubsub serve|pub|sub``."""
    block = subparsers.add_parser(
        "pubsub",
        help="pub/sub broker with wildcard subjects",
        description="Pub/sub (dsys.pubsub): run a broker (alone or in a cluster), publish "
        "and subscribe from the shell.",
    )
    block.set_defaults(block_parser=block)
    verbs = block.add_subparsers(dest="verb", metavar="<verb>")

    serve = verbs.add_parser(
        "serve",
        help="run a broker",
        description="Run a broker: WebSocket protocol on /v1/ws, POST /v1/publish/SUBJECT, "
        "/healthz and /metrics, until SIGINT/SIGTERM.",
    )
    serve.add_argument("--listen", default="127.0.0.1:7201", help="HOST:PORT (default %(default)s)")
    serve.add_argument(
        "--route", action="append", default=[], metavar="HOST:PORT", help="peer broker (repeat)"
    )
    serve.add_argument(
        "--advertise",
        default=None,
        help="HOST:PORT peers use to dial back (default: the bound address; set it when "
        "listening on 0.0.0.0)",
    )
    serve.add_argument(
        "--auth",
        default=None,
        metavar="FILE",
        help='JSON token file {"tokens": {TOKEN: {"publish": [...], "subscribe": [...]}}}',
    )
    serve.add_argument(
        "--cluster-token",
        default=None,
        help="secret peers must present to open a route (required with --auth and --route)",
    )
    serve.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="PATTERN=HOST:PORT[,HOST:PORT...]",
        help="capture subjects matching PATTERN into the stream cluster at those servers "
        "(repeatable; a stream must capture the subjects)",
    )
    serve.add_argument(
        "--forward-token", default=None, help="pub/sub token the forwarder uses (with --auth)"
    )
    serve.add_argument("--max-payload", type=int, default=1024 * 1024, help="bytes per message")
    serve.add_argument("--max-subs", type=int, default=10_000, help="subscriptions per connection")
    serve.add_argument(
        "--max-pending-bytes", type=int, default=8 * 1024 * 1024, help="queued bytes per client"
    )
    serve.add_argument(
        "--queue-choice",
        choices=[q.value for q in QueueChoice],
        default="round_robin",
        help="how a queue-group member is picked (default %(default)s)",
    )
    serve.set_defaults(func=_serve)

    pub = verbs.add_parser(
        "pub",
        help="publish one message",
        description="Publish one message to SUBJECT and wait until the broker has it.",
    )
    pub.add_argument("subject", help="subject to publish to (no wildcards)")
    pub.add_argument("data", help="payload (UTF-8 text)")
    pub.add_argument("--server", action="append", default=[], help="HOST:PORT (repeatable)")
    pub.add_argument("--token", default=None, help="token, when the broker uses --auth")
    pub.set_defaults(func=_pub)

    sub = verbs.add_parser(
        "sub",
        help="print messages of a subject pattern",
        description="Subscribe to a subject pattern and print each message as "
        "'SUBJECT DATA', one per line.",
    )
    sub.add_argument("subject", help="subject pattern; * matches a token, > the rest")
    sub.add_argument("--queue", default=None, help="queue group")
    sub.add_argument("--count", type=int, default=0, help="exit after N messages (0: never)")
    sub.add_argument("--server", action="append", default=[], help="HOST:PORT (repeatable)")
    sub.add_argument("--token", default=None, help="token, when the broker uses --auth")
    sub.set_defaults(func=_sub)


def _serve(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen, default_port=7201)
    limits = BrokerLimits(
        max_payload=args.max_payload,
        max_subs_per_connection=args.max_subs,
        max_pending_bytes=args.max_pending_bytes,
        queue_choice=QueueChoice(args.queue_choice),
    )
    config = BrokerConfig(
        host=host,
        port=port,
        routes=tuple(args.route),
        advertise=args.advertise,
        tokens=load_tokens(args.auth) if args.auth else None,
        cluster_token=args.cluster_token,
        limits=limits,
        max_frame=max(4 * 1024 * 1024, args.max_payload + 64 * 1024),
    )
    forwards: dict[str, list[str]] = {}
    for spec in args.forward:
        pattern, sep, servers = spec.partition("=")
        if not sep or not pattern or not servers:
            raise ConfigError(f"--forward must look like PATTERN=HOST:PORT[,...], got {spec!r}")
        forwards.setdefault(servers, []).append(pattern)
    asyncio.run(_serve_async(config, forwards, args.forward_token))
    return 0


async def _serve_async(
    config: BrokerConfig,
    forwards: dict[str, list[str]] | None = None,
    forward_token: str | None = None,
) -> None:
    from dsys.streams.bridge import StreamForwarder

    broker = Broker(config)
    try:
        await broker.start()
    except OSError as exc:
        await broker.close()
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
    print(f"dsys pubsub listening on {config.host}:{broker.port}", flush=True)
    forwarders = []
    own = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in own:
        own = f"[{own}]"
    try:
        for servers, patterns in (forwards or {}).items():
            fwd = StreamForwarder(
                [f"{own}:{broker.port}"],
                [s for s in servers.split(",") if s],
                patterns,
                token=forward_token,
            )
            forwarders.append(await fwd.start())
            print(f"dsys pubsub forwarding {patterns} to streams at {servers}", flush=True)
        await _wait_for_signal()
    finally:
        for fwd in forwarders:
            await fwd.close()
        await broker.close()


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _servers(args: argparse.Namespace) -> list[str]:
    return args.server or ["127.0.0.1:7201"]


def _pub(args: argparse.Namespace) -> int:
    async def go() -> None:
        async with Client(_servers(args), token=args.token) as c:
            await c.publish(args.subject, args.data.encode())

    asyncio.run(go())
    return 0


def _sub(args: argparse.Namespace) -> int:
    if args.count < 0:
        raise ConfigError("--count must be >= 0")

    async def go() -> None:
        async with Client(_servers(args), token=args.token) as c:
            seen = 0
            async for msg in await c.subscribe(args.subject, queue=args.queue):
                text = msg.data.decode("utf-8", errors="replace")
                print(f"{msg.subject} {text}", flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    return

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        print("", file=sys.stderr)
    return 0
