"""`python -m examples.trading --seconds N` runs end to end and stops every process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_python_m_examples_trading_runs_briefly() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "examples.trading", "--seconds", "3", "--instruments", "50"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "tick via dsys lb" in text
    assert "at market -> COMPLETE, filled 10" in text
    assert "unknown instrument 'NOPE'" in text
    assert "every process stopped" in text
