"""The chaos run of the chat load test, small: kill -9 a chat server, a pub/sub broker,
the KV leader and the stream leader in turn under load; then every client's log must
hold every acknowledged message of its room once, in order (slow: a dozen processes)."""

from __future__ import annotations

import re

import pytest
from examples.chat import loadtest


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_chaos_run_loses_duplicates_and_reorders_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--connections", "60", "--rooms", "6", "--seconds", "20", "--rate", "2", "--chaos"]
    code = loadtest.main(argv)
    out = capsys.readouterr().out
    kills = re.findall(r"chaos: +[\d.]+ s kill -9 (.+?) (\S+)$", out, re.M)
    assert [k[0] for k in kills] == [
        "a chat server", "a pub/sub broker", "the kv leader", "the streams leader",
    ], out  # fmt: skip
    assert kills[3][1].startswith("streams")
    assert "acked messages lost / duplicated / out of order | 0 / 0 / 0" in out, out
    assert code == 0, out
