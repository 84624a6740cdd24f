"""Instructions per proxied request of the proxy fast path, counted by callgrind.

CPU time on a shared machine mostly measures the neighbours; instructions do not. This
drives the fast path's protocol callbacks in-process (no sockets: a client request in,
the upstream request out, a backend answer in, the client answer out) for two source
trees, under ``valgrind --tool=callgrind``, twice with different request counts, and
prints the difference per request (start-up cancels out).

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


def _instructions(src: str, n: int) -> int:
    env = dict(os.environ, PYTHONPATH=src, PYTHONHASHSEED="0")
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    cmd += [sys.executable, __file__, "--child", str(n)]
    err = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stderr
    m = re.search(r"Collected : (\d+)", err)
    if m is None:
        raise SystemExit(f"no callgrind total:\n{err[-2000:]}")
    return int(m.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="src/ directory of the older tree")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        asyncio.run(_loop(args.child))
        return 0
    trees = {"after (this checkout)": str(Path(__file__).resolve().parent.parent / "src")}
    if args.before:
        trees = {"before": str(Path(args.before).resolve()), **trees}
    n = args.requests
    for name, src in trees.items():
        per = (_instructions(src, 2 * n) - _instructions(src, n)) / n
        print(f"{name}: {per:,.0f} instructions per proxied request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
