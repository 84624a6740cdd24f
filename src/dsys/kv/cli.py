"""``dsys kv ...``: run a KV server or a local cluster, and talk to one.

::

    dsys kv serve --id n1 --listen 127.0.0.1:7101 --peer n2=127.0.0.1:7102 \\
                  --peer n3=127.0.0.1:7103 --data-dir ./n1 [--fsync always|none] [--token T]
    dsys kv cluster --nodes 3                 # local cluster on 7101.. in a temp dir
    dsys kv put KEY VALUE --cluster 127.0.0.1:7101,127.0.0.1:7102
    dsys kv get KEY --cluster ...
    dsys kv del KEY --cluster ...
    dsys kv status --cluster ...
    dsys kv watch PREFIX [--start-revision R] --cluster ...   # one JSON line per change
    dsys kv watch PREFIX --sharded [--cursor C] --cluster ...  # on a multi-Raft cluster
    dsys kv multi-serve --id n1 --listen ... --peer ... --data-dir ./n1   # multi-Raft node
    dsys kv ranges --cluster ...              # the range map of a multi-Raft cluster
    dsys kv split RANGE_ID KEY --cluster ...  # split a range (multi-Raft)
    dsys kv merge LEFT RIGHT --cluster ...    # merge range RIGHT into LEFT (multi-Raft)
    dsys kv move RANGE_ID FROM TO --cluster ...  # move a range's replica between nodes
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from typing import Any

from dsys.aiotools import LOOPS, loop_factory
from dsys.clitools import parse_peers, run_local_cluster
from dsys.errors import CompactedError, ConfigError
from dsys.kv.fsm import HISTORY_EVENTS, WatchEvent
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
        "--watch-history",
        type=int,
        default=HISTORY_EVENTS,
        metavar="EVENTS",
        help=f"change events kept for watchers (default {HISTORY_EVENTS}); a watch "
        "starting before them gets a 'compacted' error",
    )
    serve.add_argument(
        "--no-fast-path",
        dest="fast_path",
        action="store_false",
        help="serve the HTTP API through aiohttp only (no protocol-level fast path)",
    )
    serve.add_argument(
        "--loop",
        choices=LOOPS,
        default=os.environ.get("DSYS_LOOP", "asyncio"),
        help="event loop: asyncio (default; $DSYS_LOOP), uvloop (the optional dsys[fast] "
        "extra; measured no faster here, see docs/benchmarks.md) or auto (uvloop when "
        "installed)",
    )
    serve.set_defaults(func=_serve)

    multi = verbs.add_parser(
        "multi-serve",
        help="run one node of the multi-Raft KV (many ranges, one Raft group each)",
        description="Run one node of the multi-Raft KV: a replica of the metadata range and "
        "of the data ranges placed on it, one shared WAL for all ranges under --data-dir, one peer "
        "connection per other node for all ranges, the /v1/kv and /v1/ranges HTTP API.",
    )
    multi.add_argument("--id", required=True, help="this node's id, e.g. n1")
    multi.add_argument("--listen", default="127.0.0.1:7101", help="HOST:PORT to serve on")
    multi.add_argument(
        "--peer", action="append", default=[], metavar="ID=HOST:PORT", help="another node"
    )
    multi.add_argument("--data-dir", required=True, help="directory of the ranges' WALs")
    multi.add_argument(
        "--fsync", choices=("always", "none"), default="always", help="none is UNSAFE"
    )
    multi.add_argument(
        "--wal",
        choices=("shared", "per-range"),
        default="shared",
        help="one WAL for all ranges with group commit (default), or one WAL per range",
    )
    multi.add_argument("--token", default=os.environ.get("DSYS_KV_TOKEN"), help="cluster token")
    multi.add_argument("--tick", type=float, default=0.03, help="seconds per Raft tick")
    multi.add_argument("--election-tick", type=int, default=10, help="ticks before an election")
    multi.add_argument(
        "--snapshot-every", type=int, default=10_000, help="applied entries between snapshots"
    )
    multi.add_argument(
        "--balance-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between leader-balancing checks (0 = no balancing)",
    )
    multi.add_argument(
        "--split-keys",
        type=int,
        default=0,
        metavar="N",
        help="split a range at its middle key once it holds N keys (0 = manual splits only)",
    )
    multi.add_argument(
        "--split-qps",
        type=float,
        default=3000.0,
        metavar="QPS",
        help="split a range served above QPS requests/s over --split-qps-window (0 = off)",
    )
    multi.add_argument(
        "--split-qps-window", type=float, default=10.0, metavar="SECONDS", help="load window"
    )
    multi.add_argument(
        "--merge-keys",
        type=int,
        default=10_000,
        metavar="N",
        help="merge cold neighbours holding fewer than N keys together (0 = manual merges only)",
    )
    multi.add_argument(
        "--merge-qps", type=float, default=10.0, help="requests/s below which a range is cold"
    )
    multi.add_argument(
        "--merge-cold-for", type=float, default=30.0, help="seconds cold before a merge"
    )
    multi.add_argument(
        "--merge-after-split",
        type=float,
        default=60.0,
        help="seconds after a split or merge of a range before it may merge",
    )
    multi.add_argument(
        "--quiet-ticks",
        type=int,
        default=0,
        metavar="N",
        help="idle groups stop heartbeating after N ticks without writes (0 = off)",
    )
    multi.add_argument(
        "--initial-replicas",
        default="",
        metavar="ID,ID,...",
        help="nodes holding the first range of a new cluster (default: every node)",
    )
    multi.add_argument(
        "--placement-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds between rounds of the placement loop that moves replicas and "
        "leaders between nodes (0 = off; replaces the leader balancer when on)",
    )
    multi.add_argument(
        "--move-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds a replica move may take before it is given up (its learner removed)",
    )
    multi.add_argument(
        "--down-after",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="with --placement-interval: a node silent this long is down, and its replicas "
        "are replaced on live nodes (default 300, as CockroachDB's time_until_store_dead)",
    )
    multi.set_defaults(func=_multi_serve)

    for name, help_text in (
        ("ranges", "print the range map of a multi-Raft cluster, with each range's leader"),
        ("split", "split a range of a multi-Raft cluster at a key"),
        ("merge", "merge a range of a multi-Raft cluster into its left neighbour"),
        ("move", "move a range's replica from one node to another (multi-Raft)"),
    ):
        p = verbs.add_parser(name, help=help_text, description=help_text.capitalize() + ".")
        p.add_argument(
            "--cluster",
            default=os.environ.get("DSYS_KV_CLUSTER", "127.0.0.1:7101"),
            help="comma-separated HOST:PORT list of nodes",
        )
        p.add_argument("--timeout", type=float, default=10.0, help="seconds, retries included")
        if name == "ranges":
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        elif name == "merge":
            p.add_argument("left", type=int, help="the range that stays (the left one)")
            p.add_argument("right", type=int, help="its right neighbour, merged into it")
            p.add_argument("--token", default=os.environ.get("DSYS_KV_TOKEN"), help="token")
        elif name == "split":
            p.add_argument("range_id", type=int, help="the range to split")
            p.add_argument("key", help="first key of the new (right) range")
            p.add_argument("--token", default=os.environ.get("DSYS_KV_TOKEN"), help="token")
        else:
            p.add_argument("range_id", type=int, help="the range whose replica moves")
            p.add_argument("src", metavar="FROM", help="node id that gives its replica up")
            p.add_argument("dst", metavar="TO", help="node id that gets the replica")
            p.add_argument("--token", default=os.environ.get("DSYS_KV_TOKEN"), help="token")
        p.set_defaults(func=_ranges_command, command=name)

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

    watch = verbs.add_parser(
        "watch",
        help="print every change under a prefix as it happens",
        description="Print every change (put, delete, expire) of keys starting with PREFIX, "
        'one JSON line each: {"revision", "type", "key", "value" (UTF-8) or '
        '"value_b64"}. Any server may serve the watch; when it goes away the watch '
        "resumes on another from the last revision printed + 1, without gaps or "
        "duplicates. Exits 2 when the start revision was compacted (refetch, then watch "
        "from a newer revision). Ctrl-C stops.",
    )
    watch.add_argument(
        "prefix", nargs="?", default="", help="only keys starting with this (default: all)"
    )
    watch.add_argument(
        "--start-revision",
        type=int,
        default=None,
        metavar="R",
        help="first revision to print (default: the next change); earlier changes are "
        "replayed from the servers' change history",
    )
    watch.add_argument(
        "--count",
        type=int,
        default=None,
        metavar="N",
        help="exit after printing N changes (default: run until interrupted)",
    )
    watch.add_argument(
        "--cluster",
        default=os.environ.get("DSYS_KV_CLUSTER", "127.0.0.1:7101"),
        help="comma-separated HOST:PORT list of servers",
    )
    watch.add_argument(
        "--sharded",
        action="store_true",
        help="the cluster is a multi-Raft one (dsys kv multi-serve): each line also has "
        'the "range" that served it and the "cursor" after it',
    )
    watch.add_argument(
        "--cursor",
        default=None,
        metavar="C",
        help="with --sharded: resume after the event whose cursor this is",
    )
    watch.set_defaults(func=_watch)


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
        watch_history=args.watch_history,
    )
    if not config.fsync:
        print(
            "dsys kv: WARNING --fsync none is UNSAFE: acknowledged writes can be lost on a crash",
            file=sys.stderr,
        )
    try:
        factory = loop_factory(args.loop)
    except ValueError as exc:
        print(f"dsys kv: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(config))


def _multi_serve(args: argparse.Namespace) -> int:
    from dsys.kv.multi import MultiConfig, serve_multi
    from dsys.kv.placement import PlacementRules

    host, port = parse_listen(args.listen, default_port=7101)
    config = MultiConfig(
        id=args.id,
        host=host,
        port=port,
        peers=parse_peers(args.peer),
        data_dir=args.data_dir,
        fsync=args.fsync == "always",
        wal=args.wal,
        token=args.token,
        tick_interval=args.tick,
        election_tick=args.election_tick,
        snapshot_every=args.snapshot_every,
        balance_interval=args.balance_interval or None,
        split_keys=args.split_keys or None,
        split_qps=args.split_qps or None,
        split_qps_window=args.split_qps_window,
        merge_keys=args.merge_keys or None,
        merge_qps=args.merge_qps,
        merge_cold_for=args.merge_cold_for,
        merge_after_split=args.merge_after_split,
        quiet_ticks=args.quiet_ticks or None,
        initial_replicas=tuple(n for n in args.initial_replicas.split(",") if n) or None,
        placement_interval=args.placement_interval or None,
        placement_rules=PlacementRules(down_after=args.down_after),
        move_timeout=args.move_timeout,
    )
    return asyncio.run(serve_multi(config))


def _ranges_command(args: argparse.Namespace) -> int:
    return asyncio.run(_ranges_async(args))


async def _ranges_async(args: argparse.Namespace) -> int:
    from dsys.kv.sharded import ShardedKVClient

    endpoints = [e for e in args.cluster.split(",") if e.strip()]
    async with ShardedKVClient(
        endpoints, timeout=args.timeout, token=getattr(args, "token", None)
    ) as kv:
        if args.command == "split":
            left, right = await kv.split(args.range_id, args.key)
            print(
                json.dumps(
                    {"left": _range_row(left.to_plain()), "right": _range_row(right.to_plain())}
                )
            )
            return 0
        if args.command == "merge":
            merged = await kv.merge(args.left, args.right)
            print(json.dumps({"merged": _range_row(merged.to_plain())}))
            return 0
        if args.command == "move":
            desc = await kv.move(args.range_id, args.src, args.dst)
            print(json.dumps({"range": _range_row(desc.to_plain())}))
            return 0
        m = await kv.refresh()
        leaders = await kv.range_leaders()
        moves, nodes = await _cluster_status(kv.nodes)
        if args.json:
            print(
                json.dumps(
                    {
                        "version": m.version,
                        "ranges": [
                            {**_range_row(r.to_plain()), "leader": leaders.get(r.range_id)}
                            for r in m
                        ],
                        "moves": moves,
                        "nodes": nodes,
                    },
                    indent=2,
                )
            )
            return 0
        print(f"range map version {m.version}, {len(m)} ranges")
        print(f"{'RANGE':>5}  {'START':<16} {'END':<16} {'EPOCH':<9} {'REPLICAS':<16} LEADER")
        for r in m:
            end = "+inf" if r.end is None else repr(r.end)
            epoch = f"{r.epoch.conf_ver},{r.epoch.version}"
            print(
                f"{r.range_id:>5}  {r.start!r:<16} {end:<16} {epoch:<9} "
                f"{','.join(r.replicas):<16} {leaders.get(r.range_id) or '-'}"
            )
        for mv in moves:
            match, last = mv.get("learner_match"), mv.get("last_index")
            caught = f", learner at {match}/{last}" if match is not None else ""
            print(
                f"move of range {mv['range_id']}: {mv['from']} -> {mv['to']}, "
                f"step {mv['step']}{caught} (driven by {mv['node']})"
            )
        for n in nodes:
            if n["state"] == "down":
                print(f"node {n['id']} ({n['addr']}): down, its replicas move to live nodes")
            elif n["state"] != "up":
                print(f"node {n['id']} ({n['addr']}): {n['state']}")
        return 0


async def _cluster_status(
    nodes: dict[str, str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The replica moves in progress (as the nodes driving them report them) and each
    node's state: ``up``, ``unreachable`` (it did not answer us) or ``down`` (the
    metadata leader's placement loop found it silent for ``--down-after`` seconds and
    replaces its replicas)."""
    import aiohttp

    out: list[dict[str, Any]] = []
    answered: set[str] = set()
    down: set[str] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as s:
        for node_id, addr in sorted(nodes.items()):
            try:
                async with s.get(f"http://{addr}/v1/status") as r:
                    data = await r.json()
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                continue
            if not isinstance(data, dict):
                continue
            answered.add(node_id)
            placement = data.get("placement")
            if isinstance(placement, dict) and placement.get("metadata_leader"):
                down.update(n for n in placement.get("down", []) if isinstance(n, str))
            for mv in data.get("moves", []):
                if isinstance(mv, dict):
                    out.append({**mv, "node": node_id})
    states = []
    for node_id, addr in sorted(nodes.items()):
        state = "down" if node_id in down else "up" if node_id in answered else "unreachable"
        states.append({"id": node_id, "addr": addr, "state": state})
    return out, states


def _range_row(plain: list[Any]) -> dict[str, Any]:
    rid, start, end, conf_ver, version, replicas = plain
    return {
        "range_id": rid,
        "start": start,
        "end": end,
        "conf_ver": conf_ver,
        "version": version,
        "replicas": replicas,
    }


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


def _watch(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_watch_async(args))
    except KeyboardInterrupt:
        return 130


async def _watch_async(args: argparse.Namespace) -> int:
    from dsys.kv.client import KVClient

    if args.start_revision is not None and args.start_revision < 0:
        raise ConfigError("--start-revision must be >= 0")
    endpoints = [e for e in args.cluster.split(",") if e.strip()]
    if args.sharded:
        return await _watch_sharded(args, endpoints)
    if args.cursor is not None:
        raise ConfigError("--cursor needs --sharded")
    printed = 0
    async with KVClient(endpoints) as kv:
        try:
            async with kv.watch(args.prefix, start_revision=args.start_revision) as changes:
                print(
                    f"watching {args.prefix!r} from revision {changes.next_revision}",
                    file=sys.stderr,
                    flush=True,
                )
                async for ev in changes:
                    print(json.dumps(_event_line(ev), ensure_ascii=False), flush=True)
                    printed += 1
                    if args.count is not None and printed >= args.count:
                        break
        except CompactedError as exc:
            print(f"dsys: {exc}", file=sys.stderr)
            return 2
    return 0


async def _watch_sharded(args: argparse.Namespace, endpoints: list[str]) -> int:
    from dsys.kv.sharded import ShardedKVClient

    printed = 0
    async with ShardedKVClient(endpoints) as kv:
        try:
            watch = kv.watch(args.prefix, start_revision=args.start_revision, cursor=args.cursor)
            async with watch as changes:
                print(f"watching {args.prefix!r} on a multi-Raft cluster", file=sys.stderr)
                async for ev in changes:
                    line = _event_line(WatchEvent(ev.revision, ev.type, ev.key, ev.value))
                    line["range"] = ev.range_id
                    line["cursor"] = ev.cursor
                    print(json.dumps(line, ensure_ascii=False), flush=True)
                    printed += 1
                    if args.count is not None and printed >= args.count:
                        break
        except CompactedError as exc:
            print(f"dsys: {exc}", file=sys.stderr)
            return 2
    return 0


def _event_line(ev: WatchEvent) -> dict[str, Any]:
    line: dict[str, Any] = {"revision": ev.revision, "type": ev.type, "key": ev.key}
    if ev.value is not None:
        try:
            line["value"] = ev.value.decode("utf-8")
        except UnicodeDecodeError:
            line["value_b64"] = base64.b64encode(ev.value).decode("ascii")
    return line


__all__ = ["register"]
