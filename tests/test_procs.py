"""dsys.testing.procs: the helpers tests and benchmarks use to run server processes."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from dsys.testing import procs
from dsys.testing.procs import _first_line, free_port, start_dsys, wait_port


def test_start_dsys_serves_until_stopped() -> None:
    with start_dsys("ratelimit", "serve", "--listen", "127.0.0.1:0", keep_log=True) as node:
        assert node.port > 0 and node.addr == f"127.0.0.1:{node.port}"
        with urllib.request.urlopen(f"http://{node.addr}/healthz", timeout=5) as resp:
            assert resp.status == 200
        log = node.log
        assert log is not None
    assert node.proc.returncode is not None  # stopped on exit
    with pytest.raises(FileNotFoundError):
        open(log).close()  # the log went with the server


def test_a_server_that_cannot_start_is_reported_and_reaped() -> None:
    with pytest.raises(RuntimeError, match="did not print its address"):
        start_dsys("pubsub", "serve", "--listen", "127.0.0.1:99999", timeout=20)


def test_wait_port_gives_up_when_nothing_listens() -> None:
    with pytest.raises(RuntimeError, match="nothing listens"):
        wait_port(free_port(), timeout=0.3)


def test_only_the_first_line_names_the_address() -> None:
    """A second line read in the same chunk (a forwarder naming another server's
    HOST:PORT, say) must not be taken for the server's address."""
    script = "print('listening on 127.0.0.1:1111\\nforwarding to 127.0.0.1:2222', flush=True)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        proc.wait(10)  # both lines are in the pipe before the first read
        assert _first_line(proc, time.monotonic() + 10) == b"listening on 127.0.0.1:1111\n"
    finally:
        assert proc.stdout is not None
        proc.stdout.close()


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    """An outgoing connection's source port cannot take a port handed out but not yet bound."""
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == 200
    assert all(1024 <= p < procs._ephemeral_low() for p in ports)
