"""``dsys streams ...``: run stream servers and publish, subscribe and inspect.

::

    dsys streams serve --id n1 --listen 127.0.0.1:7501 --peer n2=127.0.0.1:7502 \\
                       --peer n3=127.0.0.1:7503 --data-dir ./n1 [--fsync always|none]
    dsys streams cluster --nodes 3               # local cluster on 7501.. in a temp dir
    dsys streams add ORDERS --subject 'orders.>' [--max-msgs N] [--retention workqueue]
    dsys streams ls
    dsys streams info ORDERS [--consumers]
    dsys streams pub orders.eu.1 'hello' [--msg-id ID] [--header k=v]
    dsys streams sub ORDERS [--consumer NAME] [--count N] [--deliver all|new|last]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from typing import Any

from dsys.clitools import parse_peers, run_local_cluster
from dsys.errors import ConfigError
from dsys.observability import parse_listen

_CLUSTER_ENV = "DSYS_STREAMS_CLUSTER"


def register(subparsers: Any) -> None:
    """Add the ``streams`` block and its verbs to the ``dsys`` parser."""
    streams = subparsers.add_parser(
        "streams",
        help="durable Raft-replicated streams with consumers",
        description="Run servers of durable, Raft-replicated message streams (or a local "
        "cluster), and create streams, publish, consume and inspect from the command line.",
    )
    streams.set_defaults(block_parser=streams)
    verbs = streams.add_subparsers(dest="verb", metavar="<verb>")

    serve = verbs.add_parser(
        "serve",
        help="run one stream server (a Raft replica)",
        description="Run one stream server: a Raft replica with a write-ahead log in "
        "--data-dir, the HTTP API and /v1/ws channel, /healthz and /metrics.",
    )
    serve.add_argument("--id", required=True, help="this node's id, e.g. n1")
    serve.add_argument("--listen", default="127.0.0.1:7501", help="HOST:PORT to serve on")
    serve.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="ID=HOST:PORT",
        help="another member of the cluster (repeat for each)",
    )
    serve.add_argument("--data-dir", required=True, help="directory for the WAL and snapshots")
    serve.add_argument(
        "--fsync",
        choices=("always", "none"),
        default="always",
        help="always (default; group commit) or none (UNSAFE: a crash can lose "
        "acknowledged messages; for benchmarks only)",
    )
    serve.add_argument(
        "--token", default=os.environ.get("DSYS_STREAMS_TOKEN"), help="cluster token for peer RPC"
    )
    serve.add_argument("--tick", type=float, default=0.03, help="seconds per Raft tick")
    serve.add_argument(
        "--snapshot-every", type=int, default=10_000, help="applied entries between snapshots"
    )
    serve.add_argument(
        "--max-stream-bytes",
        type=int,
        default=1 << 30,
        help="largest max_bytes a stream may have (bounds memory; default 1 GiB)",
    )
    serve.set_defaults(func=_serve)

    cluster = verbs.add_parser(
        "cluster",
        help="start a local cluster for trying it out",
        description="Start N local stream servers on consecutive ports (7501.. by default) "
        "as child processes; Ctrl-C stops them all.",
    )
    cluster.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    cluster.add_argument("--base-port", type=int, default=7501, help="first port (default 7501)")
    cluster.add_argument("--data-dir", default=None, help="directory (default: a temp dir)")
    cluster.add_argument(
        "--fsync", choices=("always", "none"), default="always", help="always (default) or none"
    )
    cluster.set_defaults(func=_cluster)

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = verbs.add_parser(
            name, help=help_text, description=help_text[0].upper() + help_text[1:] + "."
        )
        p.add_argument(
            "--cluster",
            default=os.environ.get(_CLUSTER_ENV, "127.0.0.1:7501"),
            help=f"comma-separated HOST:PORT list of servers (or ${_CLUSTER_ENV})",
        )
        p.add_argument("--timeout", type=float, default=10.0, help="seconds, retries included")
        p.set_defaults(func=_client_command, command=name)
        return p

    add = client_parser("add", "create a stream (or update it with --update)")
    add.add_argument("name", help="stream name (A-Z a-z 0-9 _ -)")
    add.add_argument(
        "--subject", action="append", default=[], help="subject pattern captured (repeat)"
    )
    add.add_argument(
        "--retention",
        choices=("limits", "workqueue"),
        default="limits",
        help="limits (keep until a limit drops them) or workqueue (delete once acked)",
    )
    add.add_argument("--max-msgs", type=int, default=0, help="most messages kept (0 = no limit)")
    add.add_argument("--max-bytes", type=int, default=None, help="most bytes kept")
    add.add_argument("--max-age", type=float, default=0, help="seconds a message is kept")
    add.add_argument("--discard", choices=("old", "new"), default="old", help="at a limit")
    add.add_argument("--update", action="store_true", help="change an existing stream")

    client_parser("ls", "list the streams with their message counts")

    info = client_parser("info", "show a stream's configuration and state")
    info.add_argument("name", help="stream name")
    info.add_argument("--consumers", action="store_true", help="also show its consumers")

    pub = client_parser("pub", "publish one message (or --count of them)")
    pub.add_argument("subject", help="the message's subject, e.g. orders.eu.1")
    pub.add_argument("data", help="payload (UTF-8 text; '-' reads stdin)")
    pub.add_argument("--msg-id", default="", help="deduplication id")
    pub.add_argument("--header", action="append", default=[], metavar="K=V", help="a header")
    pub.add_argument("--count", type=int, default=1, help="publish this many copies")

    sub = client_parser("sub", "consume messages and print them (acknowledging each)")
    sub.add_argument("stream", help="stream name")
    sub.add_argument(
        "--consumer", default="", help="durable consumer (created if missing; default ephemeral)"
    )
    sub.add_argument(
        "--deliver",
        choices=("all", "new", "last"),
        default="all",
        help="where a new consumer starts (default all)",
    )
    sub.add_argument("--filter", default="", help="only subjects matching this pattern")
    sub.add_argument("--count", type=int, default=0, help="stop after N messages (0 = never)")
    sub.add_argument("--no-ack", action="store_true", help="print without acknowledging")


def _serve(args: argparse.Namespace) -> int:
    from dsys.streams.server import StreamServerConfig, serve

    host, port = parse_listen(args.listen, default_port=7501)
    config = StreamServerConfig(
        id=args.id,
        host=host,
        port=port,
        peers=parse_peers(args.peer),
        data_dir=args.data_dir,
        fsync=args.fsync == "always",
        token=args.token,
        tick_interval=args.tick,
        snapshot_every=args.snapshot_every,
        max_stream_bytes=args.max_stream_bytes,
    )
    if not config.fsync:
        print(
            "dsys streams: WARNING --fsync none is UNSAFE: acknowledged messages can be lost "
            "on a crash",
            file=sys.stderr,
        )
    return asyncio.run(serve(config))


def _cluster(args: argparse.Namespace) -> int:
    def banner(base: str, servers: list[str]) -> str:
        endpoints = ",".join(servers)
        return (
            f"dsys streams cluster: {len(servers)} nodes, data in {base}\n"
            f"  servers: {endpoints}\n"
            f"  try:     dsys streams add ORDERS --subject 'orders.>' --cluster {endpoints}\n"
            f"           curl -L -X POST --data-binary hi http://{servers[0]}/v1/pub/orders.1\n"
            f"           dsys streams sub ORDERS --count 1 --cluster {endpoints}\n"
            f"  Ctrl-C stops the cluster."
        )

    return run_local_cluster(
        "streams",
        nodes=args.nodes,
        base_port=args.base_port,
        data_dir=args.data_dir,
        extra_args=["--fsync", args.fsync],
        banner=banner,
    )


def _client_command(args: argparse.Namespace) -> int:
    return asyncio.run(_client_async(args))


async def _client_async(args: argparse.Namespace) -> int:
    from dsys.streams.client import StreamClient
    from dsys.streams.fsm import ConsumerConfig, InvalidCommand, StreamConfig

    async with StreamClient(args.cluster, timeout=args.timeout) as c:
        try:
            if args.command == "add":
                cfg: dict[str, Any] = {
                    "name": args.name,
                    "subjects": tuple(args.subject),
                    "retention": args.retention,
                    "max_msgs": args.max_msgs,
                    "max_age_ms": int(args.max_age * 1000),
                    "discard": args.discard,
                }
                if args.max_bytes is not None:
                    cfg["max_bytes"] = args.max_bytes
                info = await c.add_stream(StreamConfig(**cfg), update=args.update)
                print(json.dumps(info, indent=2))
                return 0
            if args.command == "ls":
                for name in await c.streams():
                    st = await c.stream_info(name) or {}
                    subjects = ",".join(st.get("config", {}).get("subjects", [])) or "-"
                    print(f"{name:24} {st.get('messages', 0):>10} msgs  {subjects}")
                return 0
            if args.command == "info":
                found = await c.stream_info(args.name)
                if found is None:
                    print(f"dsys: no stream {args.name!r}", file=sys.stderr)
                    return 1
                if args.consumers:
                    found["consumer_info"] = [
                        await c.consumer_info(args.name, n) for n in await c.consumers(args.name)
                    ]
                print(json.dumps(found, indent=2))
                return 0
        except InvalidCommand as exc:
            raise ConfigError(str(exc)) from None
        if args.command == "pub":
            data = sys.stdin.buffer.read() if args.data == "-" else args.data.encode()
            headers = {}
            for h in args.header:
                k, sep, v = h.partition("=")
                if not sep or not k:
                    raise ConfigError(f"--header must look like K=V, got {h!r}")
                headers[k] = v
            if not 1 <= args.count <= 10_000_000:
                raise ConfigError("--count must be between 1 and 10000000")
            if args.count == 1:
                ack = await c.publish(args.subject, data, headers=headers, msg_id=args.msg_id)
                print(
                    json.dumps({"stream": ack.stream, "seq": ack.seq, "duplicate": ack.duplicate})
                )
                return 0
            done = 0
            step = max(1, args.count // 20)
            while done < args.count:
                n = min(500, args.count - done)
                await asyncio.gather(
                    *[c.publish(args.subject, data, headers=headers) for _ in range(n)]
                )
                done += n
                if done % step < n or done == args.count:
                    print(f"\rpublished {done}/{args.count}", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            return 0
        # sub
        name = args.consumer or f"cli-{uuid.uuid4().hex[:12]}"
        await c.add_consumer(
            args.stream,
            ConsumerConfig(
                name=name,
                durable=bool(args.consumer),
                deliver_policy=args.deliver,
                filter_subject=args.filter,
                ack_policy="none" if args.no_ack else "explicit",
            ),
        )
        seen = 0
        while not args.count or seen < args.count:
            batch = min(100, args.count - seen) if args.count else 100
            for m in await c.fetch(args.stream, name, batch=batch, expires=1.0):
                text = m.data.decode("utf-8", "backslashreplace")
                print(f"[{m.seq}] {m.subject}: {text}", flush=True)
                if not args.no_ack:
                    await m.ack()
                seen += 1
        return 0


__all__ = ["register"]
