from __future__ import annotations

import re
import subprocess
import sys

import pytest

from dsys.errors import ConfigError
from dsys.sharding import HashRing, RendezvousHash, jump_hash
from dsys.sharding.cli import parse_nodes


def dsys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsys", "shard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_the_verbs() -> None:
    out = dsys("--help")
    assert out.returncode == 0
    assert "locate" in out.stdout and "rebalance" in out.stdout


def test_locate_prints_the_same_owners_as_the_library() -> None:
    out = dsys("locate", "--nodes", "a=2,b,c", "--replicas", "2", "user:1", "user:2")
    assert out.returncode == 0, out.stderr
    ring = HashRing({"a": 2, "b": 1, "c": 1})
    assert out.stdout.splitlines() == [
        f"user:1\t{','.join(ring.get_n('user:1', 2))}",
        f"user:2\t{','.join(ring.get_n('user:2', 2))}",
    ]


def test_locate_with_other_algorithms() -> None:
    out = dsys("locate", "--nodes", "a,b,c", "--algo", "rendezvous", "k1")
    assert out.stdout == f"k1\t{RendezvousHash(['a', 'b', 'c']).get('k1')}\n"
    out = dsys("locate", "--nodes", "a,b,c", "--algo", "jump", "k1")
    assert out.stdout == f"k1\t{'abc'[jump_hash('k1', 3)]}\n"
    out = dsys("locate", "--nodes", "a,b,c", "--mode", "ketama", "k1")
    assert out.stdout == f"k1\t{HashRing(['a', 'b', 'c'], mode='ketama').get('k1')}\n"


def test_rebalance_reports_fraction_loads_and_moves() -> None:
    out = dsys("rebalance", "--nodes", "a,b,c", "--add", "d", "--keys", "250000", "--show", "3")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    match = re.search(r"moved keys \(primary changed\): [\d,]+ of 250,000 = ([\d.]+)%", text)
    assert match, text
    assert 15.0 < float(match.group(1)) < 35.0  # ideal 25%
    assert "(ideal 25.00%)" in text
    assert re.search(r"keys per node after: +a=\d+ .* d=\d+", text)
    assert text.count("copy to d from") == 3
    assert "250,000/250,000 keys" in out.stderr  # progress on long runs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["locate", "--nodes", "a,a", "k"], "listed twice"),
        (["locate", "--nodes", "a=x", "k"], "must be a number"),
        (["locate", "--nodes", "a=-1", "k"], "must be positive"),
        (["locate", "--nodes", "a,b", "--replicas", "3", "k"], "more than the 2 nodes"),
        (["rebalance", "--nodes", "a,b"], "nothing changes"),
        (["rebalance", "--nodes", "a,b", "--add", "a"], "already in --nodes"),
        (["rebalance", "--nodes", "a,b", "--remove", "z"], "not in --nodes"),
        (["rebalance", "--nodes", "a,b", "--remove", "a", "--replicas", "2"], "replicas"),
    ],
)
def test_bad_input_exits_1_with_a_message(args: list[str], message: str) -> None:
    out = dsys(*args)
    assert out.returncode == 1
    assert out.stderr.startswith("dsys: error:") and message in out.stderr


def test_argparse_rejects_bad_numbers() -> None:
    out = dsys("rebalance", "--nodes", "a", "--add", "b", "--keys", "0")
    assert out.returncode == 2 and "positive integer" in out.stderr


def test_parse_nodes() -> None:
    assert parse_nodes("a, b=2.5 ,c") == {"a": 1.0, "b": 2.5, "c": 1.0}
    with pytest.raises(ConfigError, match="empty node name"):
        parse_nodes("a,,b")
