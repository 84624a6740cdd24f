from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import dsys
from dsys.cli import build_parser, main


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


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# Blocks merged so far whose CLI is reviewed; add each block here as it lands.
@pytest.mark.parametrize("block", ["shard", "kv", "ratelimit", "pubsub", "streams", "lb"])
def test_every_level_of_help_says_what_it_does(block: str) -> None:
    parser = _subparsers(build_parser())[block]
    assert parser.description, f"`dsys {block} --help` has no description"
    for verb, sub in _subparsers(parser).items():
        assert sub.description, f"`dsys {block} {verb} --help` has no description"
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"`dsys {block} {verb}`: {action.dest} has no help"
