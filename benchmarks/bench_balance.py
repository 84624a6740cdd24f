"""Benchmark: dsys's reverse proxy (``dsys lb serve``) against nginx, same backends, same run.

Three aiohttp backend processes (``tests/balance/backend.py``) sit behind both
proxies; wrk (``-t1 -c50``) drives load, alternating dsys and nginx rounds so both
see the same machine noise. Two scenarios:

1. equal backends: requests/s, p50 and p99 through dsys (p2c-ewma) and nginx
   (round robin), plus one backend hit directly for reference;
2. one of the three backends slowed by 50 ms: p99 through dsys p2c-ewma against
   nginx round robin.

Run: ``.venv/bin/python benchmarks/bench_balance.py [--quick] [--duration S] [--rounds N]``.
Needs ``wrk`` and ``nginx`` on PATH (Debian: ``apt-get install wrk nginx``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dsys.testing.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "tests" / "balance" / "backend.py"


def start(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Start a process that prints one JSON line with its port; return (proc, port)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    ready = sel.select(timeout=30)
    sel.close()
    if not ready:
        proc.kill()
        raise SystemExit(f"{cmd[:4]} did not start")
    return proc, int(json.loads(proc.stdout.readline())["port"])


_HTTP_LOCATION = """\
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"""


def start_nginx(
    tmp: Path,
    name: str,
    ports: list[int],
    *,
    location: str = _HTTP_LOCATION,
    keepalive: int | None = 128,
) -> tuple[subprocess.Popen[bytes], int]:
    """Run nginx (one worker, round robin over ``ports``) in the foreground.

    ``location`` holds the directives after ``proxy_pass``/``proxy_http_version``
    (default: upstream keep-alive with ``keepalive`` idle connections).
    """
    port = free_port()
    d = tmp / name
    (d / "logs").mkdir(parents=True)
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in ports)
    pool = f"\n    keepalive {keepalive};" if keepalive else ""
    (d / "nginx.conf").write_text(
        f"""
worker_processes 1;
error_log {d}/logs/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream backends {{
{servers}{pool}
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
{location}
    }}
  }}
}}
"""
    )
    proc = subprocess.Popen(
        ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc, port


def wait_port(port: int) -> None:
    import socket
    import time

    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(port: int, duration: float, connections: int = 50) -> dict[str, float]:
    """One wrk round: req/s, p50/p90/p99 (ms) and the non-2xx/socket error count."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)\s*$", out, re.M).group(1))  # type: ignore[union-attr]
    p90 = _ms(re.search(r"^\s+90%\s+(\S+)\s*$", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)\s*$", out, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in errs.groups()) if errs else 0)
    return {"rps": rps, "p50": p50, "p90": p90, "p99": p99, "errors": errors}


def median_of(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round per contender")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per contender")
    parser.add_argument("--uvloop", action="store_true", help="run the dsys proxy on uvloop")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 2.0, 1
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench_balance: {tool} is not installed (apt-get install {tool})")
            return 1
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ, DSYS_LOG_LEVEL="warning")
    py = sys.executable
    try:
        backends = []
        for i, delay in enumerate((0, 0, 0, 50)):
            p, port = start([py, str(BACKEND), "--name", f"b{i}", "--delay-ms", str(delay)])
            procs.append(p)
            backends.append(port)
        equal, slowed = backends[:3], [backends[0], backends[1], backends[3]]

        def dsys_proxy(ports: list[int], strategy: str) -> int:
            cmd = [py, "-m", "dsys", "lb", "serve", "--listen", "127.0.0.1:0"]
            cmd += ["--strategy", strategy, "--seed", "1"]
            if args.uvloop:
                cmd.append("--uvloop")
            for port in ports:
                cmd += ["--backend", f"http://127.0.0.1:{port}"]
            p, port = start(cmd, env=env)
            procs.append(p)
            return port

        tmp = Path(tempfile.mkdtemp(prefix="dsys-bench-balance-"))
        ng_equal = start_nginx(tmp, "equal", equal)
        ng_slow = start_nginx(tmp, "slow", slowed)
        procs += [ng_equal[0], ng_slow[0]]
        contenders = {
            "equal": [
                ("dsys p2c-ewma", dsys_proxy(equal, "p2c-ewma")),
                ("nginx round robin", ng_equal[1]),
            ],
            "slow": [
                ("dsys p2c-ewma", dsys_proxy(slowed, "p2c-ewma")),
                ("nginx round robin", ng_slow[1]),
            ],
        }
        for _, port in contenders["equal"] + contenders["slow"]:
            wrk(port, 1.0)  # warm up connections and caches
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        direct = [wrk(equal[0], args.duration)]
        for scenario, pair in contenders.items():
            for _ in range(args.rounds):
                for name, port in pair:
                    results.setdefault((scenario, name), []).append(wrk(port, args.duration))
        direct_m = median_of(direct)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    print(
        f"\nwrk -t1 -c50 -d{args.duration:g}s, {args.rounds} rounds each, "
        "medians; three aiohttp backends\n"
    )
    print("| scenario | proxy | req/s | p50 ms | p90 ms | p99 ms | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(
        f"| equal | one backend direct | {direct_m['rps']:,.0f} | {direct_m['p50']:.2f} "
        f"| {direct_m['p90']:.2f} | {direct_m['p99']:.2f} | {direct_m['errors']:.0f} |"
    )
    med = {k: median_of(v) for k, v in results.items()}
    for (scenario, name), m in med.items():
        label = "equal" if scenario == "equal" else "one backend +50 ms"
        print(
            f"| {label} | {name} | {m['rps']:,.0f} | {m['p50']:.2f} | {m['p90']:.2f} "
            f"| {m['p99']:.2f} | {m['errors']:.0f} |"
        )
    d_eq, n_eq = med[("equal", "dsys p2c-ewma")], med[("equal", "nginx round robin")]
    d_sl, n_sl = med[("slow", "dsys p2c-ewma")], med[("slow", "nginx round robin")]
    print()
    print(
        f"throughput dsys/nginx (equal backends): {d_eq['rps'] / n_eq['rps']:.2f}x (goal >= 0.5x)"
    )
    print(
        f"p99 with one slow backend: dsys {d_sl['p99']:.1f} ms vs nginx {n_sl['p99']:.1f} ms "
        f"(dsys/nginx {d_sl['p99'] / n_sl['p99']:.2f}x, goal < 1)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
