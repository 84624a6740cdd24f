"""Start the whole chat system as real processes on loopback, and stop it.

:class:`ChatCluster` runs, each as its own process, the way a user would:

* ``dsys kv serve`` x 3 (Raft KV: accounts, rooms, members, markers, presence, servers)
* ``dsys streams serve`` x 1 or 3 (the ``CHAT`` stream: per-room history)
* ``dsys pubsub serve`` x 1 or more (routes between them: fan-out between servers)
* ``dsys ratelimit serve`` x 1 (the per-user post and log-in limits of every chat server)
* ``python -m examples.chat.server`` x 2 (the chat servers)
* ``dsys lb serve`` (the only address clients know; proxies the WebSockets)

Used by ``python -m examples.chat``, the tests and the load test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from dsys.testing.procs import LOOPBACK, free_port, stop_process, wait_healthy

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    """One process of the cluster."""

    name: str
    kind: str  # kv, streams, broker, ratelimit, chat or lb
    addr: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class ChatCluster:
    """The processes of one chat deployment (see the module docstring).

    Args:
        chat_servers: how many chat server processes.
        stream_nodes: 1 or 3 stream servers.
        brokers: pub/sub brokers (routed into one cluster when more than one).
        fsync: ``always`` (durable) or ``none`` (faster; for load tests).
        password_cost: argon2 cost of the chat servers (``fast`` in tests).
        post_rate: posts per second per user the chat servers allow.
    """

    chat_servers: int = 2
    stream_nodes: int = 1
    brokers: int = 1
    kv_nodes: int = 3
    fsync: str = "always"
    password_cost: str = "default"
    post_rate: float = 20.0
    post_burst: int = 40
    log_level: str = "warning"
    verbose: bool = False
    procs: dict[str, Proc] = field(default_factory=dict)
    secret: str = field(default_factory=lambda: secrets.token_hex(32))

    def __post_init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dsys-chat-"))

    # -- addresses ------------------------------------------------------------------

    def addrs(self, kind: str) -> list[str]:
        """Addresses of the processes of one kind (kv, streams, broker, ratelimit, chat, lb)."""
        return [p.addr for p in self.procs.values() if p.kind == kind]

    def names(self, kind: str) -> list[str]:
        return [n for n, p in self.procs.items() if p.kind == kind]

    @property
    def url(self) -> str:
        """The load balancer: the one address clients use."""
        return f"http://{self.procs['lb'].addr}"

    # -- processes --------------------------------------------------------------------

    def _spawn(self, p: Proc, env: dict[str, str] | None = None) -> None:
        p.log = self.dir / f"{p.name}.log"
        out = open(p.log, "ab")  # noqa: SIM115 (the child keeps it)
        p.proc = subprocess.Popen(
            p.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DSYS_LOG_LEVEL": self.log_level, **(env or {})},
            cwd=REPO,
            start_new_session=True,
        )
        out.close()
        self.procs[p.name] = p

    def _say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def start(self) -> ChatCluster:
        py = sys.executable
        try:
            kv = {f"kv{i + 1}": f"{LOOPBACK}:{free_port()}" for i in range(self.kv_nodes)}
            for name, addr in kv.items():
                peers = [a for o, pa in kv.items() if o != name for a in ("--peer", f"{o}={pa}")]
                self._spawn(Proc(name, "kv", addr, [py, "-m", "dsys", "kv", "serve", "--id", name,
                    "--listen", addr, "--data-dir", str(self.dir / name), "--fsync", self.fsync,
                    *peers]))  # fmt: skip
            st = {f"streams{i + 1}": f"{LOOPBACK}:{free_port()}" for i in range(self.stream_nodes)}
            for name, addr in st.items():
                peers = [a for o, pa in st.items() if o != name for a in ("--peer", f"{o}={pa}")]
                self._spawn(Proc(name, "streams", addr, [py, "-m", "dsys", "streams", "serve",
                    "--id", name, "--listen", addr, "--data-dir", str(self.dir / name),
                    "--fsync", self.fsync, *peers]))  # fmt: skip
            br = {f"broker{i + 1}": f"{LOOPBACK}:{free_port()}" for i in range(self.brokers)}
            for name, addr in br.items():
                routes = [a for o, pa in br.items() if o != name for a in ("--route", pa)]
                self._spawn(Proc(name, "broker", addr, [py, "-m", "dsys", "pubsub", "serve",
                    "--listen", addr, *routes]))  # fmt: skip
            rl = f"{LOOPBACK}:{free_port()}"
            self._spawn(Proc("ratelimit1", "ratelimit", rl,
                             [py, "-m", "dsys", "ratelimit", "serve", "--listen", rl]))  # fmt: skip
            for p in list(self.procs.values()):
                wait_healthy(p.addr, timeout=20)
            self._say(
                f"  KV store (Raft, {self.kv_nodes} nodes): {', '.join(kv.values())}\n"
                f"  stream cluster ({self.stream_nodes} node(s)): {', '.join(st.values())}\n"
                f"  pub/sub broker(s): {', '.join(br.values())}\n"
                f"  rate-limit node: {rl}"
            )
            for i in range(self.chat_servers):
                self.start_chat_server(f"s{i + 1}")
            for i in range(self.chat_servers):
                wait_healthy(self.procs[f"s{i + 1}"].addr, timeout=30)
            lb = f"{LOOPBACK}:{free_port()}"
            backends = [a for s in self.addrs("chat") for a in ("--backend", f"http://{s}")]
            self._spawn(Proc("lb", "lb", lb, [py, "-m", "dsys", "lb", "serve", "--listen", lb,
                "--strategy", "least-outstanding", "--health-interval", "0.5",
                "--eject-after", "1", "--ejection-time", "1",
                "--max-connections", "20000", *backends]))  # fmt: skip
            wait_healthy(f"{lb}/_dsys", timeout=20)
            self._say(
                f"  chat servers: {', '.join(self.addrs('chat'))}\n  load balancer: http://{lb}"
            )
        except BaseException:
            self.stop()
            raise
        return self

    def start_chat_server(self, name: str) -> Proc:
        """Start (or restart) chat server ``name``."""
        old = self.procs.get(name)
        addr = old.addr if old is not None else f"{LOOPBACK}:{free_port()}"
        p = Proc(name, "chat", addr, [sys.executable, "-m", "examples.chat.server", "--id", name,
            "--listen", addr, "--kv", ",".join(self.addrs("kv")),
            "--streams", ",".join(self.addrs("streams")),
            "--brokers", ",".join(self.addrs("broker")),
            "--ratelimit", ",".join(self.addrs("ratelimit")),
            "--password-cost", self.password_cost, "--post-rate", str(self.post_rate),
            "--post-burst", str(self.post_burst)])  # fmt: skip
        self._spawn(p, {"DSYS_CHAT_SECRET": self.secret})
        return p

    def leader(self, kind: str) -> str:
        """The name of the Raft leader among the ``kv`` or ``streams`` processes.

        Raises:
            RuntimeError: no leader within 10 s.
        """
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for name in self.names(kind):
                p = self.procs[name]
                if not p.alive:
                    continue
                url = f"http://{p.addr}/healthz"
                with (
                    contextlib.suppress(OSError, ValueError),
                    urllib.request.urlopen(url, timeout=1.0) as r,
                ):
                    if json.loads(r.read()).get("role") == "leader":
                        return name
            time.sleep(0.1)
        raise RuntimeError(f"no {kind} leader")

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` (a crash: no goodbye to anyone)."""
        p = self.procs[name]
        assert p.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.proc.pid, signal.SIGKILL)
        p.proc.wait()

    def restart(self, name: str) -> None:
        """Start a killed process again with the same address and data."""
        p = self.procs[name]
        if p.kind == "chat":
            self.start_chat_server(name)
        else:
            self._spawn(Proc(p.name, p.kind, p.addr, p.argv))
        wait_healthy(p.addr, timeout=30)

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and remove the data directory.

        The load balancer and the chat servers go first: a chat server that stops says
        goodbye to the KV store, which takes a 1 s timeout when the KV store stops too.
        """
        deadline = time.monotonic() + 5
        front = [p for p in self.procs.values() if p.kind in ("lb", "chat")]
        back = [p for p in self.procs.values() if p.kind not in ("lb", "chat")]
        for tier in (front, back):
            for p in tier:
                if p.proc is not None and p.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.proc.pid, signal.SIGTERM)
            for p in tier:
                if p.proc is not None:
                    stop_process(p.proc, timeout=max(0.1, deadline - time.monotonic()))
        shutil.rmtree(self.dir, ignore_errors=True)

    def tail(self, name: str, lines: int = 20) -> str:
        """The end of a process's output (for failure messages)."""
        p = self.procs.get(name)
        if p is None or p.log is None or not p.log.exists():
            return ""
        return "\n".join(p.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ChatCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
