"""Instructions per request of the proxy and KV fast paths, counted by callgrind.

CPU time on a shared machine mostly measures the neighbours; instructions do not. This
drives the fast paths' protocol callbacks in-process for two source trees, under
``valgrind --tool=callgrind``, twice with different request counts, and prints the
difference per request (start-up cancels out):

* proxy: no sockets; a client request in, the upstream request out, a backend answer
  in, the client answer out;
* kv: a ``wrk``-shaped PUT in, its answer out, over a stand-in for the KV server whose
  ``submit_write`` answers at once with one fixed result (so the row counts the HTTP
  work of a put: parsing, the command, the answer; not Raft, not the state machine).

Run::

    git worktree add /tmp/before bad08a0
    .venv/bin/python benchmarks/fastpath_instructions.py --before /tmp/before/src
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
PUT = (
    b"PUT /v1/kv/h%d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 16\r\n\r\n0123456789abcdef"
)
BODY = b'{"backend": "b0", "path": "/"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\nDate: Thu, 03 Dec 2026 12:00:00 GMT\r\n"
    b"Server: Python/3.11 aiohttp/3.9.5\r\n\r\n" % len(BODY)
) + BODY


class _Transport:
    """Just enough of an asyncio transport: keeps what is written."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise RuntimeError("the fast path closed a keep-alive connection")

    def abort(self) -> None:
        raise RuntimeError("the fast path aborted a connection")


async def _loop(n: int) -> None:
    from dsys.balance import fastpath
    from dsys.balance.proxy import LoadBalancer, ProxyConfig

    endpoint = "http://127.0.0.1:9999"
    fast = fastpath.FastPath(LoadBalancer(ProxyConfig(backends=(endpoint,))), lambda: None)
    up = fastpath._UpstreamConn(fast, endpoint)
    up_t = _Transport()
    up.connection_made(up_t)  # type: ignore[arg-type]
    fast.checkin(up)
    client = fast.protocol()
    client_t = _Transport()
    client.connection_made(client_t)  # type: ignore[arg-type]
    for _ in range(n):
        client.data_received(REQUEST)
        up.data_received(RESPONSE)
    if n and not (up_t.out[-1].startswith(b"GET / ") and client_t.out[-1].endswith(BODY)):
        raise SystemExit("the fast path did not forward the request and its answer")


class _KVServer:
    """What the KV fast path calls on its server, answering every write at once."""

    def __init__(self) -> None:
        from dsys.kv.fsm import KVStateMachine, Put

        self.result = KVStateMachine().apply_command(Put(key="h0", value=b"x"))

    def submit_write(self, cmd: Any, done: Any) -> None:
        done(self.result, None)

    def _count(self, op: str, status: Any, started: float) -> None:
        pass


async def _kv_loop(n: int) -> None:
    from dsys.kv import fastpath

    fast = fastpath.KVFastPath(_KVServer(), lambda: None)  # type: ignore[arg-type]
    conn = fast.protocol()
    t = _Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    puts = [PUT % (i % 1000) for i in range(1000)]
    for i in range(n):
        conn.data_received(puts[i % 1000])
    if n and not (len(t.out) == n and t.out[-1].startswith(b"HTTP/1.1 200 OK\r\n")):
        raise SystemExit("the KV fast path did not answer every put")


def _instructions(src: str, n: int, what: str) -> int:
    env = dict(os.environ, PYTHONPATH=src, PYTHONHASHSEED="0")
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    cmd += [sys.executable, __file__, "--child", str(n), "--only", what]
    err = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stderr
    m = re.search(r"Collected : (\d+)", err)
    if m is None:
        raise SystemExit(f"no callgrind total:\n{err[-2000:]}")
    return int(m.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="src/ directory of the older tree")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--only", choices=["proxy", "kv"], default=None)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        asyncio.run(_kv_loop(args.child) if args.only == "kv" else _loop(args.child))
        return 0
    trees = {"after (this checkout)": str(Path(__file__).resolve().parent.parent / "src")}
    if args.before:
        trees = {"before": str(Path(args.before).resolve()), **trees}
    n = args.requests
    for what in ("proxy", "kv") if args.only is None else (args.only,):
        for name, src in trees.items():
            per = (_instructions(src, 2 * n, what) - _instructions(src, n, what)) / n
            unit = "proxied request" if what == "proxy" else "KV put"
            print(f"{name}: {per:,.0f} instructions per {unit}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
