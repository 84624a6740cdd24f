"""Smoke test of ``python -m examples.shop --seconds N``: starts, visits, stops everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # make demo's test runs the shop too; this adds the -m entry (18 s)
def test_python_m_examples_shop_runs_a_visit_and_stops() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "examples.shop", "--seconds", "1", "--kv-nodes", "1",
         "--stream-nodes", "1"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "storefront: http://127.0.0.1:" in text
    assert "-> delivered in" in text
    assert "a declined card -> cancelled (card declined)" in text
    assert "qty -3 -> 400 bad_item" in text
    assert text.rstrip().endswith("every process stopped")
