"""The fast path's chunked-framing scanner, fed arbitrary splits of valid and broken bodies."""

from __future__ import annotations

import itertools
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.balance.fastpath import _UpstreamConn


def _encode(chunks: list[bytes], trailers: list[bytes], ext: bool) -> bytes:
    out = b""
    for c in chunks:
        size = f"{len(c):x}".encode()
        out += size + (b";name=value" if ext else b"") + b"\r\n" + c + b"\r\n"
    out += b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    return out


def _scan(pieces: list[bytes]) -> tuple[int, int]:
    """Feed pieces; return (index of the piece where the message ended, offset in it)."""
    conn = _UpstreamConn(cast(Any, None), "http://x:1")
    for i, piece in enumerate(pieces):
        end = conn._scan_chunked(piece)
        if end != -1:
            return i, end
    return -1, -1


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=6),
    trailers=st.lists(st.sampled_from([b"X-Checksum: abc", b"Expires: 0"]), max_size=2),
    ext=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
    tail=st.binary(max_size=20),
)
def test_scanner_finds_the_exact_end_of_a_chunked_body_however_it_is_split(
    chunks: list[bytes], trailers: list[bytes], ext: bool, cuts: list[int], tail: bytes
) -> None:
    body = _encode(chunks, trailers, ext)
    data = body + tail  # bytes after the message must not be taken as part of it
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    i, end = _scan(pieces)
    assert i >= 0, "end of message not found"
    consumed = sum(len(p) for p in pieces[:i]) + end
    assert consumed == len(body)


@settings(max_examples=100, deadline=None)
@given(
    good=st.lists(st.binary(min_size=1, max_size=50), max_size=3),
    token=st.text(alphabet="ghijklmnopqrstuvwxyz -+", min_size=1, max_size=10),
)
def test_scanner_reports_broken_framing(good: list[bytes], token: str) -> None:
    # A size line that is not hexadecimal is broken framing: reported, never a hang.
    data = _encode(good, [], False)[: -len(b"0\r\n\r\n")] + token.encode() + b"\r\n"
    assert _scan([data]) == (0, -2)


def test_scanner_bounds_an_endless_size_line() -> None:
    assert _scan([b"1" * 5000]) == (0, -2)
