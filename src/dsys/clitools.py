"""Helpers shared by the blocks' command lines: peer lists and local clusters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from dsys.errors import ConfigError
from dsys.observability import parse_listen


def parse_peers(values: Sequence[str]) -> dict[str, str]:
    """Parse repeated ``--peer ID=HOST:PORT`` options into ``{id: "host:port"}``.

    Raises:
        ConfigError: an option is not ``ID=HOST:PORT``.
    """
    peers: dict[str, str] = {}
    for v in values:
        node, sep, addr = v.partition("=")
        if not sep or not node or not addr:
            raise ConfigError(f"--peer must look like ID=HOST:PORT, got {v!r}")
        host, port = parse_listen(addr)
        if port == 0:
            raise ConfigError(f"--peer {v!r} needs a port")
        peers[node] = f"{host}:{port}"
    return peers


def raise_interrupt(signum: int, frame: object) -> None:
    """A signal handler that turns SIGTERM into ``KeyboardInterrupt``."""
    raise KeyboardInterrupt


def run_local_cluster(
    block: str,
    *,
    nodes: int,
    base_port: int,
    data_dir: str | None,
    extra_args: Sequence[str] = (),
    banner: Callable[[str, list[str]], str],
) -> int:
    """Run ``dsys <block> serve`` for ``nodes`` replicas on consecutive loopback ports.

    The servers are child processes; Ctrl-C (or SIGTERM) stops them all. Returns 0 after
    Ctrl-C, 1 when a server exited on its own.

    Args:
        banner: given the data directory and the servers' ``host:port`` list, the text
            printed once they are started.
    """
    if not 1 <= nodes <= 9:
        raise ConfigError("--nodes must be between 1 and 9")
    base = data_dir or tempfile.mkdtemp(prefix=f"dsys-{block}-")
    ids = [f"n{i + 1}" for i in range(nodes)]
    addrs = {i: f"127.0.0.1:{base_port + k}" for k, i in enumerate(ids)}
    procs: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, raise_interrupt)  # stop the servers on SIGTERM too
    try:
        for i in ids:
            cmd = [sys.executable, "-m", "dsys", block, "serve", "--id", i, "--listen", addrs[i]]
            cmd += ["--data-dir", os.path.join(base, i), *extra_args]
            cmd += [f"--peer={j}={a}" for j, a in addrs.items() if j != i]
            procs.append(subprocess.Popen(cmd))
        print(banner(base, list(addrs.values())), flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print(f"dsys {block} cluster: a server exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


__all__ = ["parse_peers", "raise_interrupt", "run_local_cluster"]
