"""``dsys kv ...``: run a KV server or a local cluster, and talk to one.

::

    dsys kv serve --id n1 --listen 127.0.0.1:7101 --peer n2=127.0.0.1:7102 \\
                  --peer n3=127.0.0.1:7103 --data-dir ./n1 [--fsync always|none] [--token T]
    dsys kv cluster --nodes 3                 # local cluster on 7101.. in a temp dir
    dsys kv put KEY VALUE --cluster 127.0.0.1:7101,127.0.0.1:7102
    dsys kv get KEY --cluster ...
    dsys kv del KEY --cluster ...
    dsys kv status --cluster ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from dsys.clitools import parse_peers, run_local_cluster
from dsys.errors import ConfigError
from dsys.observability import parse_listen


def register(subparsers: Any) -> None:
    """Add the ``kv`` block and its verbs to the ``dsys`` parser."""
    kv = subparsers.add_parser(
        "kv",
        help="Raft-replicated key-value store",
        description="Run servers of a Raft-replicated key-value store (or a local cluster) "
        "and read, write and administer it from the command line.",
    )
    kv.set_defaults(block_parser=kv)
    verbs = kv.add_subparsers(dest="verb", metavar="<verb>")

    serve = verbs.add_parser(
        "serve",
        help="run one KV server (a Raft replica)",
        description="Run one KV server: a Raft replica with a write-ahead log in --data-dir, "
        "the client HTTP API and /v1/ws channel, /healthz and /metrics.",
    )
    serve.add_argument("--id", required=True, help="this node's id, e.g. n1")
    serve.add_argument("--listen", default="127.0.0.1:7101", help="HOST:PORT to serve on")
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
        "acknowledged writes; for benchmarks only)",
    )
    serve.add_argument("--token", default=os.environ.get("DSYS_KV_TOKEN"), help="cluster token")
    serve.add_argument("--tick", type=float, default=0.03, help="seconds per Raft tick")
    serve.add_argument(
        "--election-tick", type=int, default=10, help="ticks without a leader before an election"
    )
    serve.add_argument(
        "--snapshot-every", type=int, default=10_000, help="applied entries between snapshots"
    )
    serve.add_argument(
        "--join",
        action="store_true",
        help="join an existing cluster (add it first with `dsys kv member add`)",
    )
    serve.add_argument(
        "--no-fast-path",
        dest="fast_path",
        action="store_false",
        help="serve the HTTP API through aiohttp only (no protocol-level fast path)",
    )
    serve.set_defaults(func=_serve)

    member = verbs.add_parser(
        "member",
        help="membership: list, add (learner), promote, remove",
        description="List the members, add a node as a learner, promote a learner to voter, "
        "or remove a node (one change at a time).",
    )
    member.add_argument("action", choices=("list", "add", "promote", "remove"), help="what to do")
    member.add_argument("node_id", nargs="?", help="the member's id")
    member.add_argument("addr", nargs="?", help="HOST:PORT of the new member (for add)")
    member.add_argument(
        "--cluster",
        default=os.environ.get("DSYS_KV_CLUSTER", "127.0.0.1:7101"),
        help="comma-separated HOST:PORT list of servers",
    )
    member.add_argument("--token", default=os.environ.get("DSYS_KV_TOKEN"), help="cluster token")
    member.set_defaults(func=_member)

    cluster = verbs.add_parser(
        "cluster",
        help="start a local cluster for trying it out",
        description="Start N local KV servers on consecutive ports (7101.. by default) as "
        "child processes; Ctrl-C stops them all.",
    )
    cluster.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    cluster.add_argument("--base-port", type=int, default=7101, help="first port (default 7101)")
    cluster.add_argument("--data-dir", default=None, help="directory (default: a temp dir)")
    cluster.add_argument(
        "--fsync",
        choices=("always", "none"),
        default="always",
        help="always (default) or none (UNSAFE, for benchmarks)",
    )
    cluster.set_defaults(func=_cluster)

    for name, help_text in (
        ("get", "read a key"),
        ("put", "write a key"),
        ("del", "delete a key"),
        ("status", "show each server's status"),
    ):
        p = verbs.add_parser(name, help=help_text, description=help_text.capitalize() + ".")
        p.add_argument(
            "--cluster",
            default=os.environ.get("DSYS_KV_CLUSTER", "127.0.0.1:7101"),
            help="comma-separated HOST:PORT list of servers",
        )
        p.add_argument("--timeout", type=float, default=10.0, help="seconds, retries included")
        if name != "status":
            p.add_argument("key", help="the key (UTF-8 text)")
        if name == "put":
            p.add_argument("value", help="the value (UTF-8 text; '-' reads stdin)")
            p.add_argument("--if-revision", type=int, default=None, help="compare-and-set")
            p.add_argument("--ttl", type=float, default=None, help="expire after SECONDS")
        if name == "get":
            p.add_argument("--stale", action="store_true", help="read any server's local state")
        p.set_defaults(func=_client_command, command=name)


def _serve(args: argparse.Namespace) -> int:
    from dsys.kv.server import ServerConfig, serve

    host, port = parse_listen(args.listen, default_port=7101)
    config = ServerConfig(
        id=args.id,
        host=host,
        port=port,
        peers=parse_peers(args.peer),
        data_dir=args.data_dir,
        fsync=args.fsync == "always",
        token=args.token,
        tick_interval=args.tick,
        election_tick=args.election_tick,
        snapshot_every=args.snapshot_every,
        join=args.join,
        fast_path=args.fast_path,
    )
    if not config.fsync:
        print(
            "dsys kv: WARNING --fsync none is UNSAFE: acknowledged writes can be lost on a crash",
            file=sys.stderr,
        )
    return asyncio.run(serve(config))


def _cluster(args: argparse.Namespace) -> int:
    def banner(base: str, servers: list[str]) -> str:
        endpoints = ",".join(servers)
        return (
            f"dsys kv cluster: {len(servers)} nodes, data in {base}\n"
            f"  servers: {endpoints}\n"
            f"  try:     curl -L -X PUT --data-binary hello http://{servers[0]}/v1/kv/greeting\n"
            f"           curl -L http://{servers[0]}/v1/kv/greeting\n"
            f"           dsys kv status --cluster {endpoints}\n"
            f"  Ctrl-C stops the cluster."
        )

    return run_local_cluster(
        "kv",
        nodes=args.nodes,
        base_port=args.base_port,
        data_dir=args.data_dir,
        extra_args=["--fsync", args.fsync],
        banner=banner,
    )


def _member(args: argparse.Namespace) -> int:
    return asyncio.run(_member_async(args))


async def _member_async(args: argparse.Namespace) -> int:
    import aiohttp

    if args.action != "list" and not args.node_id:
        raise ConfigError(f"`dsys kv member {args.action}` needs a node id")
    if args.action == "add" and not args.addr:
        raise ConfigError("`dsys kv member add ID HOST:PORT` needs the new member's address")
    headers = {"X-Dsys-Cluster-Token": args.token} if args.token else {}
    last = ""
    async with aiohttp.ClientSession(
        headers=headers, timeout=aiohttp.ClientTimeout(total=15)
    ) as http:
        for ep in [e.strip() for e in args.cluster.split(",") if e.strip()]:
            base = f"http://{ep}/v1/admin/members"
            try:
                if args.action == "list":
                    req = http.get(base)
                elif args.action == "add":
                    req = http.post(base, json={"id": args.node_id, "addr": args.addr})
                elif args.action == "promote":
                    req = http.post(f"{base}/{args.node_id}/promote")
                else:
                    req = http.delete(f"{base}/{args.node_id}")
                async with req as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        print(json.dumps(json.loads(text), indent=2))
                        return 0
                    last = f"{ep}: HTTP {resp.status}: {text}"
                    if resp.status < 500:
                        break
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = f"{ep}: {exc}"
    print(f"dsys: error: {last}", file=sys.stderr)
    return 1


def _client_command(args: argparse.Namespace) -> int:
    return asyncio.run(_client_async(args))


async def _client_async(args: argparse.Namespace) -> int:
    from dsys.kv.client import KVClient

    endpoints = [e for e in args.cluster.split(",") if e.strip()]
    async with KVClient(endpoints, timeout=args.timeout) as kv:
        if args.command == "status":
            out: dict[str, Any] = {}
            for ep in kv.endpoints:
                try:
                    out[ep] = await kv.status(ep)
                except Exception as exc:  # one server down must not hide the others
                    out[ep] = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(out, indent=2))
            return 0
        if args.command == "get":
            got = await kv.get(args.key, stale=args.stale)
            if got is None:
                print(f"dsys: key {args.key!r} not found", file=sys.stderr)
                return 1
            sys.stdout.buffer.write(got.value + b"\n")
            print(f"revision {got.revision}", file=sys.stderr)
            return 0
        if args.command == "put":
            value = sys.stdin.buffer.read() if args.value == "-" else args.value.encode()
            if args.if_revision is not None:
                rev = await kv.cas(args.key, value, revision=args.if_revision)
            else:
                rev = await kv.put(args.key, value, ttl=args.ttl)
            print(json.dumps({"revision": rev}))
            return 0
        rev_del = await kv.delete(args.key)
        if rev_del is None:
            print(f"dsys: key {args.key!r} not found", file=sys.stderr)
            return 1
        print(json.dumps({"revision": rev_del}))
        return 0


__all__ = ["register"]
