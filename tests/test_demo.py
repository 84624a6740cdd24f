"""Smoke test of `make demo`: the showcase runs end to end and says what it showed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def test_demo_runs_end_to_end() -> None:
    env = {**os.environ, "DSYS_DEMO_ANY_PORT": "1"}
    out = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=180, env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "queue group: {'worker-0': 10, 'worker-1': 10, 'worker-2': 10}" in text
    assert "cas orders/1 again -> ConflictError" in text
    assert "all acknowledged writes present: True" in text
    assert "consumer resumed at seq 41 on the new leader" in text
    assert "acked floor 100; processed twice: 0" in text
    assert "next 200 requests -> statuses {200: 200}" in text
    assert "breaker: closed -> open" in text
    assert "after recovery: {'ok': 10}" in text
    assert "every process stopped" in text
