"""dsys.aiotools.loop_factory: which event loop ``--loop`` names."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from dsys.aiotools import loop_factory


def test_asyncio_is_the_default_and_unknown_names_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DSYS_LOOP", raising=False)
    assert loop_factory() is None
    assert loop_factory("asyncio") is None
    with pytest.raises(ValueError, match="unknown event loop"):
        loop_factory("trio")
    monkeypatch.setenv("DSYS_LOOP", "nope")
    with pytest.raises(ValueError, match="unknown event loop"):
        loop_factory()


def test_uvloop_when_installed() -> None:
    if importlib.util.find_spec("uvloop") is None:
        assert loop_factory("auto") is None
        with pytest.raises(ValueError, match="dsys\\[fast\\]"):
            loop_factory("uvloop")
        return
    factory = loop_factory("auto")
    assert factory is not None and factory is loop_factory("uvloop")
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(asyncio.sleep(0, "ran")) == "ran"
        assert "uvloop" in type(runner.get_loop()).__module__
