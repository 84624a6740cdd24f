"""Benchmark: CPU the proxy spends per WebSocket message, dsys splice vs dsys frames vs nginx.

Two aiohttp backends (``tests/balance/backend.py``, ``/ws`` echoes text as
``echo:<text>``) sit behind three proxies started side by side: ``dsys lb serve
--ws-mode splice``, ``dsys lb serve --ws-mode frames`` and nginx (one worker,
``proxy_http_version 1.1`` with ``Upgrade``/``Connection`` forwarded). Each round opens
``--connections`` WebSockets through one proxy and has each echo small text messages
one at a time for ``--seconds``; the proxy's CPU time (user + system, from
``/proc/<pid>/stat``, nginx's worker included) is divided by the messages it carried
(each echo is two: one each way). Rounds alternate the order of the proxies so that all
see the same machine noise; the table gives medians.

Run: ``.venv/bin/python benchmarks/bench_ws_proxy.py [--rounds 3] [--seconds 4]
[--connections 200] [--uvloop]``. Needs ``nginx`` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_balance import BACKEND, start, start_nginx

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and of its direct children (nginx's worker)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry))
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


_WS_LOCATION = """\
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 3600s;"""


async def load(port: int, connections: int, seconds: float) -> int:
    """Open ``connections`` WebSockets, echo one message at a time on each; return the
    number of echoes completed in ``seconds`` (after all are open)."""
    done = 0
    stop = asyncio.Event()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True)
    ) as s:
        socks = [
            await s.ws_connect(f"http://127.0.0.1:{port}/ws", protocols=("chat",))
            for _ in range(connections)
        ]
        for ws in socks:
            await ws.receive_str()  # the welcome

        async def echo(ws: aiohttp.ClientWebSocketResponse) -> None:
            nonlocal done
            while not stop.is_set():
                await ws.send_str("0123456789abcdef0123456789abcdef")
                await ws.receive_str()
                done += 1

        tasks = [asyncio.create_task(echo(ws)) for ws in socks]
        await asyncio.sleep(seconds)
        stop.set()
        counted = done
        await asyncio.gather(*tasks, return_exceptions=True)
        for ws in socks:
            await ws.close()
    return counted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--uvloop", action="store_true", help="run the dsys proxies on uvloop")
    args = parser.parse_args()
    if shutil.which("nginx") is None:
        print("nginx is not on PATH", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ, DSYS_LOG_LEVEL="warning")
    try:
        ports = []
        for name in ("b1", "b2"):
            p, port = start([sys.executable, str(BACKEND), "--name", name])
            procs.append(p)
            ports.append(port)
        proxies: dict[str, tuple[int, int]] = {}  # name -> (pid, port)
        for mode in ("splice", "frames"):
            cmd = [sys.executable, "-m", "dsys", "lb", "serve", "--listen", "127.0.0.1:0"]
            cmd += ["--no-health-check", "--ws-mode", mode, "--max-connections", "20000"]
            cmd += [a for port in ports for a in ("--backend", f"http://127.0.0.1:{port}")]
            if args.uvloop:
                cmd.append("--uvloop")
            p, port = start(cmd, env=env)
            procs.append(p)
            proxies[f"dsys {mode}"] = (p.pid, port)
        with tempfile.TemporaryDirectory() as tmp:
            ng, ng_port = start_nginx(
                Path(tmp), "nginx", ports, location=_WS_LOCATION, keepalive=None
            )
            procs.append(ng)
            proxies["nginx"] = (ng.pid, ng_port)
            results: dict[str, list[tuple[float, float]]] = {n: [] for n in proxies}
            names = list(proxies)
            for r in range(args.rounds):
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    pid, port = proxies[name]
                    before = cpu_seconds(pid)
                    t0 = time.monotonic()
                    echoes = asyncio.run(load(port, args.connections, args.seconds))
                    cpu = cpu_seconds(pid) - before
                    wall = time.monotonic() - t0
                    messages = 2 * echoes
                    # CPU covers opening and closing the sockets too: a small share.
                    results[name].append((messages / args.seconds, cpu * 1e6 / messages))
                    print(
                        f"round {r + 1} {name:12s} {messages / args.seconds:9.0f} msg/s  "
                        f"proxy CPU {cpu:6.2f} s in {wall:4.1f} s  "
                        f"{cpu * 1e6 / messages:7.1f} ms per 1,000 messages",
                        flush=True,
                    )
            print()
            print("| proxy | messages/s through it | proxy CPU ms per 1,000 messages |")
            print("|---|---:|---:|")
            for name, rows in results.items():
                rate = statistics.median(r[0] for r in rows)
                per = statistics.median(r[1] for r in rows)
                print(f"| {name} | {rate:,.0f} | {per:.1f} |")
            print(f"\nload average: {os.getloadavg()}")
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
