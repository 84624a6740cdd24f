"""Where one put's time goes: a per-stage trace of the Raft write path.

Starts 3 KV replicas as real processes (``dsys kv serve --fsync always``) with
``DSYS_RAFT_TRACE`` set (see :mod:`dsys.raft.trace`: every replica records
``perf_counter_ns`` timestamps per log index), sends sequential puts over one HTTP/1.1
keep-alive connection to the leader, stops the replicas (SIGTERM: they write their
trace files) and prints, per stage, the median and p99 over the measured puts:

========================  ==========================================================
receive                   client sends the request -> leader queues the proposal
append                    proposal queued -> appended to the leader's log (index known)
leader fsync              the leader's persist of the Ready holding the entry
replicate                 leader's sender writes the AppendRequest -> follower reads it
follower fsync            that follower's persist of the entry
follower answer           follower's persist done -> leader reads its AppendResponse
commit                    quorum durable (last of: leader fsync, first answer) -> commit
apply                     commit -> entry applied and the proposal answered
answer                    answered -> the client has read the HTTP response
========================  ==========================================================

"first follower" is the one whose answer reached the leader first (the one that made
the quorum). A second table gives each event's median time since the client sent the
request (the critical path, overlaps included). Only the client-side latency is
printed for a tree without the trace hooks.

    .venv/bin/python benchmarks/trace_put.py                 # 2,000 puts
    .venv/bin/python benchmarks/trace_put.py --puts 500 --tree /tmp/raft-before
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

VALUE = b"v" * 16


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    """3 ``dsys kv serve`` processes; ``tree``: run that checkout's ``src`` instead."""

    def __init__(self, base: Path, *, tree: Path | None, trace_dir: Path | None) -> None:
        self.ids = ["n1", "n2", "n3"]
        self.addrs = {i: f"127.0.0.1:{p}" for i, p in zip(self.ids, free_ports(3), strict=True)}
        self.base = base
        self.env = dict(os.environ)
        self.env.pop("DSYS_RAFT_TRACE", None)
        if tree is not None:
            self.env["PYTHONPATH"] = str(tree / "src")
        if trace_dir is not None:
            self.env["DSYS_RAFT_TRACE"] = str(trace_dir)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for i in self.ids:
            cmd = [sys.executable, "-m", "dsys", "--log-level", "warning", "kv", "serve"]
            cmd += ["--id", i, "--listen", self.addrs[i], "--fsync", "always"]
            cmd += ["--data-dir", str(self.base / i)]
            cmd += [f"--peer={j}={a}" for j, a in self.addrs.items() if j != i]
            self.procs[i] = subprocess.Popen(
                cmd,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )

    def leader(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, addr in self.addrs.items():
                try:
                    with urllib.request.urlopen(f"http://{addr}/v1/status", timeout=1) as r:
                        st = json.load(r)
                    if st["role"] == "leader" and st["applied_index"] >= 1:
                        return i
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("no leader")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, sig)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def add_env_arg(parser: argparse.ArgumentParser) -> None:
    """``--env LABEL:NAME=VALUE`` (repeatable): an environment variable for one tree's
    servers."""
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="LABEL:NAME=VALUE",
        help="an environment variable for one tree's servers, e.g. now-asyncio:DSYS_LOOP=asyncio",
    )


def env_by_label(values: list[str]) -> dict[str, dict[str, str]]:
    """The ``--env`` values as {tree label: {name: value}}."""
    extra: dict[str, dict[str, str]] = {}
    for e in values:
        label, _, kv = e.partition(":")
        name, _, value = kv.partition("=")
        extra.setdefault(label, {})[name] = value
    return extra


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sequential_puts(addr: str, n: int) -> list[tuple[int, int]]:
    """``n`` PUTs, one at a time, over one keep-alive connection: (sent, answered) ns."""
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out: list[tuple[int, int]] = []
    buf = b""
    for k in range(n):
        req = (
            f"PUT /v1/kv/t{k % 1000} HTTP/1.1\r\nHost: {addr}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(VALUE)}\r\n\r\n"
        ).encode() + VALUE
        t0 = time.perf_counter_ns()
        sock.sendall(req)
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                head = buf[:head_end].lower()
                i = head.find(b"content-length:")
                length = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
                total = head_end + 4 + length
                if len(buf) >= total:
                    status = buf[9:12]
                    buf = buf[total:]
                    break
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            buf += chunk
        t1 = time.perf_counter_ns()
        if status != b"200":
            raise RuntimeError(f"put answered {status!r}")
        out.append((t0, t1))
    sock.close()
    return out


Events = dict[str, dict[tuple[int, str], int]]


def load_trace(path: Path) -> tuple[Events, list[int]]:
    """Per stage: (index, peer) -> first time; and the enqueue times in order."""
    ev: Events = defaultdict(dict)
    enq: list[int] = []
    for line in path.read_text().splitlines():
        stage, index, peer, t = json.loads(line)
        if stage == "enqueue":
            enq.append(t)
        else:
            ev[stage].setdefault((index, peer), t)
    return ev, enq


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


STAGES = [
    "receive",
    "append",
    "leader fsync",
    "replicate",
    "follower fsync",
    "follower answer",
    "commit",
    "apply",
    "answer",
]


def analyse(
    leader: str, followers: list[str], trace_dir: Path, puts: list[tuple[int, int]], skip: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    lead_ev, enq = load_trace(trace_dir / f"{leader}.trace")
    fol = {f: load_trace(trace_dir / f"{f}.trace")[0] for f in followers}
    proposes = sorted(i for (i, _p) in lead_ev["propose"])[skip:]
    enq = enq[skip:]  # the warm-up puts
    commits = sorted(i for (i, _p) in lead_ev["commit"])
    if len(enq) != len(puts) or len(proposes) != len(puts):
        raise RuntimeError(
            f"{len(puts)} puts but {len(enq)} enqueues and {len(proposes)} proposals traced"
        )
    stages: dict[str, list[float]] = defaultdict(list)
    offsets: dict[str, list[float]] = defaultdict(list)
    for k in range(len(puts)):
        sent, done = puts[k]
        i = proposes[k]
        L = lead_ev
        t: dict[str, int] = {"client sent": sent, "leader queued": enq[k]}
        t["appended"] = L["propose"][(i, "")]
        t["leader fsync start"] = L["persist_start"][(i, "")]
        t["leader fsync end"] = L["persist_end"][(i, "")]
        acks = {f: L["recv_ack"][(i, f)] for f in followers if (i, f) in L["recv_ack"]}
        first = min(acks, key=lambda f: acks[f])
        F = fol[first]
        t["append sent"] = L["send_append"][(i, first)]
        t["follower got it"] = F["recv_append"][(i, leader)]
        t["follower fsync start"] = F["persist_start"][(i, "")]
        t["follower fsync end"] = F["persist_end"][(i, "")]
        t["follower answer sent"] = F["send_ack"][(i, leader)]
        t["leader got answer"] = acks[first]
        c = commits[bisect.bisect_left(commits, i)]
        t["committed"] = L["commit"][(c, "")]
        t["applying"] = L["apply_start"][(i, "")]
        t["answered"] = L["answered"][(i, "")]
        t["client got answer"] = done
        durable = max(t["leader fsync end"], t["leader got answer"])
        d = {
            "receive": t["leader queued"] - sent,
            "append": t["appended"] - t["leader queued"],
            "leader fsync": t["leader fsync end"] - t["leader fsync start"],
            "replicate": t["follower got it"] - t["append sent"],
            "follower fsync": t["follower fsync end"] - t["follower fsync start"],
            "follower answer": t["leader got answer"] - t["follower fsync end"],
            "commit": t["committed"] - durable,
            "apply": t["answered"] - t["committed"],
            "answer": done - t["answered"],
        }
        for name, v in d.items():
            stages[name].append(v / 1e6)
        for name, v in t.items():
            offsets[name].append((v - sent) / 1e6)
    return stages, offsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--puts", type=int, default=2000, help="measured puts (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="puts before the measured ones")
    parser.add_argument("--tree", type=Path, help="run the replicas from this checkout's src")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trace-put-") as tmp:
        base = Path(tmp)
        trace_dir = base / "trace"
        cluster = Cluster(base, tree=args.tree, trace_dir=trace_dir)
        cluster.start()
        try:
            leader = cluster.leader()
            pids = {i: p.pid for i, p in cluster.procs.items()}
            sequential_puts(cluster.addrs[leader], args.warmup)
            cpu0 = {i: cpu_seconds(pid) for i, pid in pids.items()}
            puts = sequential_puts(cluster.addrs[leader], args.puts)
            cpu = {i: cpu_seconds(pid) - cpu0[i] for i, pid in pids.items()}
        finally:
            cluster.stop()
        lat = [(b - a) / 1e6 for a, b in puts]
        elapsed = (puts[-1][1] - puts[0][0]) / 1e9
        lead_cpu = cpu[leader] / len(puts) * 1e3
        fol_cpu = statistics.mean(cpu[i] for i in cpu if i != leader) / len(puts) * 1e3
        print(
            f"trace_put: 3 replicas, fsync always, {len(lat)} sequential puts (16-byte values) "
            f"over one keep-alive connection{f', tree {args.tree}' if args.tree else ''}\n"
            f"client latency p50 {pct(lat, 0.5):.3f} ms, p99 {pct(lat, 0.99):.3f} ms, "
            f"{len(lat) / elapsed:,.0f} puts/s; CPU per put: leader {lead_cpu:.3f} ms, "
            f"follower {fol_cpu:.3f} ms; load average {os.getloadavg()[0]:.2f}\n"
        )
        if not (trace_dir / f"{leader}.trace").exists():
            print("(no trace files: this tree has no DSYS_RAFT_TRACE hooks)")
            return
        followers = [i for i in cluster.ids if i != leader]
        stages, offsets = analyse(leader, followers, trace_dir, puts, args.warmup)
    print("| stage | p50 ms | p99 ms |")
    print("|---|---:|---:|")
    for name in STAGES:
        print(f"| {name} | {pct(stages[name], 0.5):.3f} | {pct(stages[name], 0.99):.3f} |")
    print(f"| **total (client)** | {pct(lat, 0.5):.3f} | {pct(lat, 0.99):.3f} |")
    print("\n| event | median ms since the client sent |")
    print("|---|---:|")
    for name, vals in sorted(offsets.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"| {name} | {statistics.median(vals):.3f} |")


if __name__ == "__main__":
    main()
