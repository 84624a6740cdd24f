from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsys import codec
from dsys.errors import ConfigError, LocalProtocolError, RemoteProtocolError

mc = codec.MessageCodec(max_size=1024)


@mc.register("entry")
@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    data: bytes


@mc.register("append")
@dataclass(frozen=True, slots=True)
class Append:
    term: int
    leader: str
    entries: list[Entry]
    commit: int | None = None
    tags: tuple[str, ...] = field(default=())


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary() | st.text(),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=5), c, max_size=5),
    max_leaves=20,
)


@given(plain)
def test_plain_values_round_trip(value: object) -> None:
    assert codec.decode(codec.encode(value)) == value


def test_message_round_trip_with_nested_dataclasses() -> None:
    msg = Append(term=3, leader="n1", entries=[Entry(1, b"x"), Entry(3, b"")], tags=("a",))
    assert mc.decode(mc.encode(msg)) == msg


def test_oversized_frames_are_refused_both_ways() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds the limit"):
        mc.encode(Entry(1, b"x" * 2000))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 1024"):
        mc.decode(b"\x00" * 1025)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "empty frame"),
        (b"\xc1", "malformed"),
        (msgpack.packb([1, 2]), "expected a message map"),
        (msgpack.packb({"v": 1}), "no string tag"),
        (msgpack.packb({"t": "nope", "v": 1}), "unknown message tag 'nope'"),
        (msgpack.packb({"t": "entry", "v": 2, "term": 1, "data": b""}), "version 2"),
        (msgpack.packb({"t": "entry", "v": 1, "term": 1}), "missing field 'data'"),
        (msgpack.packb({"t": "entry", "v": 1, "term": 1, "data": b"", "x": 1}), "unknown field"),
        (msgpack.packb({"t": "entry", "v": 1, "term": "1", "data": b""}), "expected int"),
        (msgpack.packb({"t": "entry", "v": 1, "term": True, "data": b""}), "expected int"),
        (msgpack.packb({"t": "entry", "v": 1, "term": 1, "data": b""}) + b"\x00", "trailing"),
        (msgpack.packb({"t": "append", "v": 1, "term": 1, "leader": "a", "entries": [1]}), "map"),
        (msgpack.packb({"t": "entry", "v": 1, "term": 1, "data": msgpack.ExtType(1, b"")}), "ext"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_frames_raise_remote_protocol_error_saying_why(frame: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        mc.decode(frame)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_escape_as_other_exceptions(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        mc.decode(data)


def test_unencodable_and_unregistered_values() -> None:
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        codec.encode(object())

    @dataclass
    class Loose:
        x: int

    with pytest.raises(LocalProtocolError, match="not registered"):
        mc.encode(Loose(1))


def test_registration_errors() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        mc.register("entry")(Entry)
    with pytest.raises(ConfigError, match="not a dataclass"):
        mc.register("x")(int)
