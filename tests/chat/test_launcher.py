"""Smoke test of ``python -m examples.chat --seconds N`` (what ``make demo`` calls)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from examples.chat.cluster import REPO


@pytest.mark.slow  # make demo's test runs the chat transcript too; this adds -m (14 s)
@pytest.mark.timeout(120)
def test_launcher_runs_the_transcript_and_stops_everything() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "examples.chat", "--seconds", "0"],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "KV store (Raft, 3 nodes)" in text and "load balancer: http://127.0.0.1:" in text
    assert "-- kill -9 chat server" in text
    assert "alice saw offsets [1, 2, 3, 4, 5, 6], bob [1, 2, 3, 4, 5, 6]" in text
    assert "nothing missed, nothing twice: True" in text
    assert "stopped every process" in text
