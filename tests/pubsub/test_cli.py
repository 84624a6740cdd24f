from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsys.cli import main
from dsys.errors import ConfigError
from dsys.pubsub.broker import load_tokens


def test_bad_limits_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pubsub", "serve", "--max-payload", "0"]) == 1
    assert "max_payload must be a positive integer" in capsys.readouterr().err


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
