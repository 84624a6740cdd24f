"""The raw peer stream's framing and handshake parsing (sans-I/O)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsys.errors import RemoteProtocolError
from dsys.raft.peerwire import FrameDecoder, frame, handshake, parse_handshake


@given(
    bodies=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=10),
)
def test_frames_come_out_whole_and_in_order_however_the_bytes_are_cut(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(frame(b) for b in bodies)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = FrameDecoder(max_frame=1000)
    got: list[bytes] = []
    for a, b in itertools.pairwise(points):
        got += dec.feed(stream[a:b])
    assert got == bodies
    assert dec.buffered == 0


def test_an_oversized_frame_is_refused_before_its_bytes_arrive() -> None:
    dec = FrameDecoder(max_frame=100)
    assert dec.feed(frame(b"x" * 100)) == [b"x" * 100]
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        dec.feed((101).to_bytes(4, "big"))
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        dec.feed(frame(b"ok") + b"\xff\xff")  # split header of a 4 GB frame
        dec.feed(b"\xff\xff")


def test_handshake_answers_parse() -> None:
    assert b"X-Dsys-Cluster-Token: t\r\n" in handshake("h:1", "n1", "t")
    assert b"Token" not in handshake("h:1", "n1", None)
    assert parse_handshake(b"HTTP/1.1 101 Switching") is None
    got = parse_handshake(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n\0\0")
    assert got is not None and got[0] == 101 and got[1] == b"\0\0"
    got = parse_handshake(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nnope")
    assert got is not None and got[0] == 404
    with pytest.raises(RemoteProtocolError):
        parse_handshake(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(RemoteProtocolError, match="too long"):
        parse_handshake(b"HTTP/1.1 200 OK\r\n" + b"x" * 20_000)
