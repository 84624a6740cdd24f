"""`dsys ratelimit check|serve` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

from dsys.cli import main


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures structlog to write to the captured stderr: undo that after."""
    yield
    structlog.reset_defaults()


def _dsys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsys", "ratelimit", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_prints_decisions_and_exit_code_says_refused() -> None:
    out = _dsys("check", "alice", "--rate", "2", "--per", "60", "--count", "3")
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["allowed"] for x in lines] == [True, True, False]
    assert lines[-1]["retry_after"] == pytest.approx(30.0, abs=0.1)
    assert out.returncode == 3


def test_check_with_an_unknown_store_url_fails_clearly() -> None:
    out = _dsys("check", "k", "--rate", "1", "--store", "ftp://x")
    assert out.returncode == 1
    assert "unknown store URL scheme 'ftp'" in out.stderr


def test_check_with_a_bad_rate_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ratelimit", "check", "k", "--rate", "-3"]) == 1
    assert "rate must be a positive" in capsys.readouterr().err


def test_bare_block_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ratelimit"]) == 2
    assert "serve" in capsys.readouterr().out
