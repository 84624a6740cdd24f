"""Start and stop real server processes for tests and benchmarks.

Tests and benchmarks run dsys servers the way users do, as ``python -m dsys <block>
serve --listen 127.0.0.1:0`` subprocesses, next to peers such as ``redis-server``.
This module is the one place that starts them, waits until they serve and stops them::

    from dsys.testing.procs import start_dsys

    with start_dsys("ratelimit", "serve", "--listen", "127.0.0.1:0") as node:
        store = ClusterStore([node.addr])
        ...

A dsys ``serve`` verb prints one line ending in ``HOST:PORT`` on stdout once bound (port
0 lets the OS choose); :func:`start_dsys` reads it, waits for ``GET /healthz`` to answer
200, and hands back a :class:`ServerProcess`. Every wait is bounded; a server that does
not come up is killed and reported with what it printed.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from types import TracebackType

LOOPBACK = "127.0.0.1"
_PORT_AT_END = re.compile(rb":(\d+)\s*$")


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux), or 32768."""
    with (
        contextlib.suppress(OSError, ValueError),
        open("/proc/sys/net/ipv4/ip_local_port_range") as f,
    ):
        return int(f.read().split()[0])
    return 32768


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (for servers that need one given).

    Chosen below the kernel's ephemeral range, so the source port of some outgoing
    connection cannot take it between now and the server's bind (with many ports handed
    out before their servers start, that happened: "address already in use"), and never
    the same port twice in one process.
    """
    low = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(max(1024, low - 20_000), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded range: let the kernel choose
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    _HANDED_OUT.add(port)
    return port


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop ``proc``: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@dataclass
class ServerProcess:
    """A server running in a subprocess; a context manager that stops it on exit.

    Attributes:
        proc: the process (send it signals to simulate crashes).
        port: the port it listens on.
        host: the address it listens on.
        log: the file its stderr goes to, when kept (removed by :meth:`stop`).
    """

    proc: subprocess.Popen[bytes]
    port: int
    host: str = LOOPBACK
    log: str | None = None

    @property
    def addr(self) -> str:
        """``HOST:PORT`` of the server."""
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout``) and remove its log."""
        stop_process(self.proc, timeout)
        if self.log is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.log)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_port(
    port: int,
    *,
    host: str = LOOPBACK,
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until something accepts TCP connections on ``host:port``.

    Raises:
        RuntimeError: nothing listened within ``timeout`` seconds, or ``proc`` exited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:g} s")


def wait_healthy(addr: str, *, timeout: float = 10.0) -> None:
    """Wait until ``GET http://ADDR/healthz`` answers 200.

    Raises:
        RuntimeError: no 200 within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{addr}/healthz", timeout=1.0) as resp:
                if resp.status == 200:
                    return
                last = f"status {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"http://{addr}/healthz did not answer 200 within {timeout:g} s ({last})")


def _first_line(proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    """The first line the process prints (only it: a second line may come in the same read,
    and its ``HOST:PORT`` would be taken for the server's)."""
    assert proc.stdout is not None, "stdout must be a pipe"
    line = b""
    while b"\n" not in line and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                break  # the process closed stdout (it exited)
            line += chunk
    first, newline, _ = line.partition(b"\n")
    return first + newline


def start_dsys(
    *args: str,
    timeout: float = 20.0,
    log_level: str = "warning",
    keep_log: bool = False,
    health: bool = True,
) -> ServerProcess:
    """Run ``python -m dsys ARGS`` (a ``serve`` verb) and wait until it serves.

    Args:
        args: the command line after ``dsys``, e.g. ``("pubsub", "serve", "--listen",
            "127.0.0.1:0")``.
        timeout: seconds the server may take to print its address and become healthy.
        log_level: the server's ``DSYS_LOG_LEVEL``.
        keep_log: write its stderr to a temporary file (``ServerProcess.log``) instead
            of discarding it.
        health: also wait for ``/healthz`` to answer 200.

    Raises:
        RuntimeError: the server did not print its address or become healthy in time
            (it is stopped first).
    """
    return start_module(
        "dsys", *args, timeout=timeout, log_level=log_level, keep_log=keep_log, health=health
    )


def start_module(
    module: str,
    *args: str,
    timeout: float = 20.0,
    log_level: str = "warning",
    keep_log: bool = False,
    health: bool = True,
) -> ServerProcess:
    """Run ``python -m MODULE ARGS`` and wait until it serves, as :func:`start_dsys` does.

    For servers that are not ``dsys`` verbs (an example app's services, say): the module
    must print one line ending in ``HOST:PORT`` once bound, and answer ``GET /healthz``
    (unless ``health`` is false).

    Raises:
        RuntimeError: the server did not print its address or become healthy in time.
    """
    log: str | None = None
    stderr: int | object = subprocess.DEVNULL
    label = args[0] if module == "dsys" and args else module.rsplit(".", 1)[-1]
    if keep_log:
        fd, log = tempfile.mkstemp(prefix=f"dsys-{label}-", suffix=".log")
        stderr = fd
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=stderr,  # type: ignore[arg-type]
            env={**os.environ, "DSYS_LOG_LEVEL": log_level},
        )
    finally:
        if isinstance(stderr, int) and stderr != subprocess.DEVNULL:
            os.close(stderr)
    server = ServerProcess(proc, 0, LOOPBACK, log)
    deadline = time.monotonic() + timeout
    try:
        line = _first_line(proc, deadline)
        m = _PORT_AT_END.search(line)
        if m is None:
            raise RuntimeError(
                f"`python -m {module} {' '.join(args)}` did not print its address: {line!r}"
                + (f"; see {log}" if log else "")
            )
        server.port = int(m.group(1))
        host = line.rsplit(b":", 1)[0].split()[-1].removeprefix(b"http://").decode()
        server.host = host if host not in ("0.0.0.0", "::", "") else LOOPBACK
        if health:
            wait_healthy(server.addr, timeout=max(0.1, deadline - time.monotonic()))
    except BaseException:
        stop_process(proc)  # keep the log for the error message
        raise
    return server


def start_redis(executable: str = "redis-server", *, timeout: float = 10.0) -> ServerProcess:
    """Run a throwaway ``redis-server`` (no persistence) on a free loopback port.

    Raises:
        FileNotFoundError: ``executable`` is not installed.
        RuntimeError: it did not answer ``PING`` within ``timeout`` seconds.
    """
    port = free_port()
    proc = subprocess.Popen(
        [executable, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    try:
        while not _redis_ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    except BaseException:
        stop_process(proc)
        raise
    return ServerProcess(proc, port)


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


__all__ = [
    "LOOPBACK",
    "ServerProcess",
    "free_port",
    "start_dsys",
    "start_module",
    "start_redis",
    "stop_process",
    "wait_healthy",
    "wait_port",
]
