from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsys.errors import ConfigError
from dsys.pubsub.broker import load_tokens


def test_bad_limits_are_reported_not_raised() -> None:
    # A real process: calling dsys.cli.main here would point structlog at pytest's
    # captured stderr for every later test.
    out = subprocess.run(
        [sys.executable, "-m", "dsys", "pubsub", "serve", "--max-payload", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "max_payload must be a positive integer" in out.stderr


def test_token_file_is_loaded_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "tokens.json"
    good.write_text(json.dumps({"tokens": {"a": {"publish": ["x.>"]}, "b": {}}}))
    tokens = load_tokens(str(good))
    assert tokens["a"].may_publish("x.y") and not tokens["a"].may_publish("y")
    assert tokens["b"].may_subscribe(">")
    bad_files = [
        {"tokens": []},
        {"tokens": {"a": {"publish": "x"}}},
        {"tokens": {"a": {"subscribe": ["a..b"]}}},
    ]
    for bad in bad_files:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError):
            load_tokens(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        load_tokens(str(tmp_path / "missing.json"))
