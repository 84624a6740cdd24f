"""`dsys lb serve` refuses bad settings with a clear message (no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--backend", "ftp://x"], 2, "bad endpoint URL"),
        (["--backend", "http://127.0.0.1:1,weight=0"], 1, "weight"),
        (["--strategy", "fastest"], 2, "invalid choice"),
        (["--max-tries", "0"], 1, "max_tries"),
        (["--health-interval", "0"], 1, "interval"),
        (["--eject-after", "0"], 1, "consecutive_errors"),
        (["--listen", "127.0.0.1:99999"], 1, "out of range"),
    ],
    ids=["scheme", "weight", "strategy", "tries", "interval", "eject", "port"],
)
def test_bad_settings_exit_with_a_message(args: list[str], code: int, message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dsys", "lb", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == code, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
