from __future__ import annotations

import subprocess
import sys

import pytest

import dsys
from dsys.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"dsys {dsys.__version__}"


def test_help_lists_blocks_and_bare_call_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: dsys" in capsys.readouterr().out


def test_console_script_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dsys", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("dsys ")
