"""Fixtures starting real backend and proxy processes on free loopback ports."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
BACKEND = HERE / "backend.py"


@dataclass
class Proc:
    """A started process and the JSON line it printed when ready."""

    proc: subprocess.Popen[bytes]
    info: dict[str, object]
    stderr_path: Path

    @property
    def port(self) -> int:
        return int(self.info["port"])  # type: ignore[call-overload]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def rss_peak_kib(self) -> int:
        """Peak resident memory (VmHWM) of the process in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc status")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def _start(cmd: list[str], stderr_path: Path, env: dict[str, str] | None = None) -> Proc:
    err = stderr_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    err.close()
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout=30):
            proc.kill()
            raise AssertionError(f"{cmd} did not start: {stderr_path.read_text()}")
        line = proc.stdout.readline()
    finally:
        sel.close()
    if not line:
        proc.wait(timeout=10)
        raise AssertionError(f"{cmd} exited: {stderr_path.read_text()}")
    return Proc(proc, json.loads(line), stderr_path)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    """Every process started by a test; all killed at teardown."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
def backend(procs: list[Proc], tmp_path: Path) -> Callable[..., Proc]:
    """Start ``tests/balance/backend.py`` as a subprocess: ``backend("b1", delay_ms=0)``.

    ``keepalive`` sets how long the backend keeps an idle connection open.
    """

    def start(name: str, delay_ms: float = 0.0, keepalive: float = 75.0) -> Proc:
        cmd = [sys.executable, str(BACKEND), "--name", name, "--delay-ms", str(delay_ms)]
        cmd += ["--keepalive", str(keepalive)]
        p = _start(cmd, tmp_path / f"{name}.err")
        procs.append(p)
        return p

    return start


@pytest.fixture
def proxy(procs: list[Proc], tmp_path: Path) -> Callable[..., Proc]:
    """Start ``dsys lb serve`` over the given backend URLs: ``proxy([url, ...], *extra)``."""
    counter = [0]

    def start(backends: list[str], *extra: str) -> Proc:
        counter[0] += 1
        cmd = [sys.executable, "-m", "dsys", "lb", "serve", "--listen", "127.0.0.1:0"]
        for url in backends:
            cmd += ["--backend", url]
        cmd += list(extra)
        env = dict(os.environ, DSYS_LOG_LEVEL="warning")
        p = _start(cmd, tmp_path / f"proxy{counter[0]}.err", env=env)
        procs.append(p)
        return p

    return start


@pytest.fixture(scope="module")
def shared_lb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """One backend named "m" behind one proxy, shared by a module's stateless tests."""
    tmp = tmp_path_factory.mktemp("shared")
    started: list[Proc] = []
    try:
        b = _start(
            [sys.executable, str(BACKEND), "--name", "m"],
            tmp / "m.err",
        )
        started.append(b)
        cmd = [sys.executable, "-m", "dsys", "lb", "serve", "--listen", "127.0.0.1:0"]
        cmd += ["--backend", b.url, "--no-health-check"]
        env = dict(os.environ, DSYS_LOG_LEVEL="warning")
        lb = _start(cmd, tmp / "proxy.err", env=env)
        started.append(lb)
        yield lb
    finally:
        for p in started:
            p.kill()


def terminate(p: Proc) -> int:
    """Send SIGTERM and wait (bounded) for the exit code."""
    p.proc.send_signal(signal.SIGTERM)
    return p.proc.wait(timeout=30)
