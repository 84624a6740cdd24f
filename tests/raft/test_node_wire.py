"""The peer wire format: round trips, and hostile lists never reach the core."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsys.errors import RemoteProtocolError
from dsys.raft.messages import (
    AppendRequest,
    AppendResponse,
    Entry,
    Heartbeat,
    HeartbeatResponse,
    VoteRequest,
    decode_batch,
    encode_batch,
)
from dsys.raft.node import check_message, from_wire, to_wire

MESSAGES = [
    AppendRequest(
        src="n1",
        dst="n2",
        term=3,
        prev_index=4,
        prev_term=2,
        commit=4,
        entries=(
            Entry(term=3, index=5, kind=0, data=b"x"),
            Entry(term=3, index=6, kind=2, data=b""),
        ),
    ),
    AppendResponse(src="n2", dst="n1", term=3, success=False, match_index=0, reject_index=4),
    Heartbeat(src="n1", dst="n2", term=3, commit=6, ctx=9),
    HeartbeatResponse(src="n2", dst="n1", term=3, ctx=9),
    VoteRequest(src="n3", dst="n1", term=4, pre_vote=True, last_log_index=6, last_log_term=3),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Any) -> None:
    assert check_message(from_wire(to_wire(msg))) == msg


scalars = st.one_of(
    st.integers(-3, 10), st.text(max_size=3), st.binary(max_size=3), st.booleans(), st.none()
)
junk = st.recursive(scalars, lambda c: st.lists(c, max_size=9), max_leaves=30)


@given(tag=st.sampled_from(["A", "a", "H", "h", "x"]), rest=st.lists(junk, max_size=9))
def test_hostile_lists_are_refused_cleanly(tag: str, rest: list[Any]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        check_message(from_wire([tag, *rest]))


def test_semantic_garbage_is_refused() -> None:
    bad = [
        ["A", "n1", "n2", 3, 4, 2, 4, [[3, 9, 0, b"x"]]],  # not contiguous
        ["A", "n1", "n2", 3, 4, 2, 4, [[7, 5, 0, b"x"]]],  # entry term beyond message term
        ["A", "n1", "n2", 3, 4, 2, 4, [[3, 5, 7, b"x"]]],  # unknown kind
        ["A", "n1", "n2", 3, 4, 2, 4, [[3, 5, 1, b"junk"]]],  # undecodable config
        ["H", "n1", "n2", -1, 0, 0],  # negative term
        ["a", "n1", "n2", 1, 1, 0, 0, 0, 0],  # success must be a bool
    ]
    for v in bad:
        with pytest.raises(RemoteProtocolError):
            check_message(from_wire(v))


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_batch_entries_round_trip(commands: list[bytes]) -> None:
    assert decode_batch(encode_batch(commands)) == commands


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"\x91\x01", b"\x81\xa1a\xc4\x00", b"\x92\xc4\x00\xa1x", b"\xc4\x00"]
)
def test_a_malformed_batch_entry_is_refused(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_batch(data)
