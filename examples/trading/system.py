"""Start the whole trading system as real processes on loopback, and stop it.

::

    with TradingSystem(instruments=500) as ts:
        print(ts.api_url, ts.ticker_url)

Processes, in start order: a pub/sub broker (``dsys pubsub serve``), a Raft KV node
(``dsys kv serve``), a stream server (``dsys streams serve``), the matchers, the feed
(with its market maker), the ticker gateways and a ``dsys lb serve`` in front of them,
and the broker API (which also serves the web page).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from dsys.testing.procs import (
    ServerProcess,
    free_port,
    start_dsys,
    start_module,
    stop_process,
    wait_healthy,
    wait_port,
)

PKG = __package__ or "examples.trading"
START_TIMEOUT = 90.0  # seconds a service may take to come up (generous: shared machines)


class TradingSystem:
    """Every process of the trading example (a context manager that stops them all).

    Args:
        instruments: how many instruments the feed simulates (the issue asks for 500+).
        matchers: matcher processes (instruments spread by a consistent-hash ring).
        tickers: ticker gateways behind the load balancer.
        secret: the HMAC key for tokens.
        feed_args: extra arguments for the feed (e.g. ``["--interval", "0.5"]``).
        api_args: extra arguments for the broker API.
        kv_nodes: Raft KV replicas (3 tolerates the loss of one, e.g. its leader).
    """

    def __init__(
        self,
        *,
        instruments: int = 500,
        matchers: int = 2,
        tickers: int = 2,
        secret: str = "trading-example",
        feed_args: list[str] | None = None,
        api_args: list[str] | None = None,
        log_level: str = "warning",
        kv_nodes: int = 1,
    ) -> None:
        self.n_instruments = instruments
        self.matcher_ids = [f"m{i + 1}" for i in range(matchers)]
        self.n_tickers = tickers
        self.secret = secret
        self.feed_args = feed_args or []
        self.api_args = api_args or []
        self.log_level = log_level
        self.kv_nodes = kv_nodes
        self.kv_procs: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        self.dir = tempfile.mkdtemp(prefix="dsys-trading-")
        self.raw: list[subprocess.Popen[bytes]] = []
        self.servers: dict[str, ServerProcess] = {}
        self.pubsub = self.kv = self.streams = self.lb = ""

    # -- addresses -------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://{self.servers['api'].addr}"

    @property
    def ticker_url(self) -> str:
        return f"ws://{self.lb}/ws"

    def matcher_addr(self, node_id: str) -> str:
        return self.servers[f"matcher-{node_id}"].addr

    # -- starting --------------------------------------------------------------------------

    def _dsys_at_port(self, *args: str) -> str:
        """A dsys server given an explicit port (kv, streams, lb print no parseable line)."""
        port = free_port()
        argv = [a.replace("{port}", str(port)) for a in args]
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsys", *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "DSYS_LOG_LEVEL": self.log_level},
            start_new_session=True,
        )
        self.raw.append(proc)
        return f"127.0.0.1:{port}"

    def _start_kv(self, kv_dir: str) -> str:
        ids = [f"n{i + 1}" for i in range(self.kv_nodes)]
        addrs = {i: f"127.0.0.1:{free_port()}" for i in ids}
        for node in ids:
            peers = [a for o in ids if o != node for a in ("--peer", f"{o}={addrs[o]}")]
            proc = subprocess.Popen(
                [sys.executable, "-m", "dsys", "kv", "serve", "--id", node,
                 "--listen", addrs[node], "--data-dir", os.path.join(kv_dir, node), *peers],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "DSYS_LOG_LEVEL": self.log_level},
                start_new_session=True,
            )  # fmt: skip
            self.raw.append(proc)
            self.kv_procs[node] = (addrs[node], proc)
        return ",".join(addrs.values())

    def kv_leader(self) -> str | None:
        """The id of the KV node that says it is the leader (None if none answers so)."""
        for node, (addr, proc) in self.kv_procs.items():
            if proc.poll() is not None:
                continue
            try:
                with urllib.request.urlopen(f"http://{addr}/v1/status", timeout=1) as r:
                    if json.loads(r.read()).get("role") == "leader":
                        return node
            except (OSError, ValueError):
                continue
        return None

    def kill9_kv(self, node: str) -> None:
        """SIGKILL KV node ``node`` (it stays down)."""
        _, proc = self.kv_procs[node]
        proc.kill()
        proc.wait()

    def start_matcher(self, node_id: str) -> ServerProcess:
        """Start (or restart) matcher ``node_id``."""
        s = start_module(
            f"{PKG}.matcher", "--id", node_id, "--matchers", ",".join(self.matcher_ids),
            "--streams", self.streams, "--pubsub", self.pubsub,
            "--instruments", str(self.n_instruments), log_level=self.log_level,
            timeout=START_TIMEOUT, keep_log=True,
        )  # fmt: skip
        self.servers[f"matcher-{node_id}"] = s
        return s

    def start(self) -> TradingSystem:
        try:
            ps = start_dsys(
                "pubsub",
                "serve",
                "--listen",
                "127.0.0.1:0",
                log_level=self.log_level,
                timeout=START_TIMEOUT,
            )
            self.servers["pubsub"] = ps
            self.pubsub = ps.addr
            kv_dir, st_dir = os.path.join(self.dir, "kv"), os.path.join(self.dir, "streams")
            self.kv = self._start_kv(kv_dir)
            self.streams = self._dsys_at_port(
                "streams", "serve", "--id", "s1", "--listen", "127.0.0.1:{port}",
                "--data-dir", st_dir,
            )  # fmt: skip
            for addr in self.kv.split(","):
                wait_healthy(addr, timeout=START_TIMEOUT)
            wait_healthy(self.streams, timeout=START_TIMEOUT)
            with ThreadPoolExecutor(max_workers=8) as pool:  # they start independently
                jobs = [pool.submit(self.start_matcher, m) for m in self.matcher_ids]
                feed = pool.submit(
                    start_module,
                    f"{PKG}.feed",
                    "--streams",
                    self.streams,
                    "--pubsub",
                    self.pubsub,
                    "--instruments",
                    str(self.n_instruments),
                    *self.feed_args,
                    log_level=self.log_level,
                    timeout=START_TIMEOUT,
                    keep_log=True,
                )
                tickers = [
                    pool.submit(
                        start_module,
                        f"{PKG}.ticker",
                        "--pubsub",
                        self.pubsub,
                        "--instruments",
                        str(self.n_instruments),
                        log_level=self.log_level,
                        timeout=START_TIMEOUT,
                    )
                    for _ in range(self.n_tickers)
                ]
                for j in jobs:
                    j.result()
                self.servers["feed"] = feed.result()
                backends = []
                for i, t in enumerate(tickers):
                    self.servers[f"ticker-{i + 1}"] = t.result()
                    backends += ["--backend", f"http://{t.result().addr}"]
            self.lb = self._dsys_at_port(
                "lb", "serve", "--listen", "127.0.0.1:{port}", "--strategy", "least-outstanding",
                *backends,
            )  # fmt: skip
            wait_port(int(self.lb.rsplit(":", 1)[1]), timeout=START_TIMEOUT)
            self.servers["api"] = start_module(
                f"{PKG}.api", "--kv", self.kv, "--streams", self.streams, "--pubsub", self.pubsub,
                "--ticker-url", self.ticker_url, "--instruments", str(self.n_instruments),
                "--secret", self.secret, *self.api_args, log_level=self.log_level,
                timeout=START_TIMEOUT, keep_log=True,
            )  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def kill9(self, name: str) -> None:
        """SIGKILL one of the started services (``matcher-m1``, ``ticker-1`` ...)."""
        s = self.servers.pop(name)
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait()
        s.stop()

    def stop(self) -> None:
        """SIGTERM to every process at once, then wait for each (SIGKILL after 5 s)."""
        procs = [s.proc for s in self.servers.values()] + self.raw
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        for s in self.servers.values():
            with contextlib.suppress(Exception):
                s.stop(timeout=5)
        for p in self.raw:
            with contextlib.suppress(Exception):
                stop_process(p, timeout=5)
        self.servers.clear()
        self.raw.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TradingSystem:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
