"""The raw Raft peer stream: length-prefixed msgpack frames over one TCP connection.

What :class:`~dsys.raft.node.PeerTransport` sends over when the peer serves it (a KV
server with its fast path): cheaper per message than a WebSocket (no reader task, no
queue, no WS framing or masking), on the same port as the HTTP API.

The connection starts as HTTP/1.1 (:func:`handshake`)::

    GET /raft/v1/raw HTTP/1.1
    Host: ...
    Connection: Upgrade
    Upgrade: dsys-raft/1
    X-Dsys-From: <our id>
    X-Dsys-Cluster-Token: <token>          (when the cluster has one)

and the server answers ``101 Switching Protocols`` (then raw frames), ``403`` (wrong
token or unknown peer; closed) or, when it does not know the path (an older version, a
server without the fast path), aiohttp's ``404``: the sender then falls back to the
WebSocket. After the switch the client sends frames, a 4-byte big-endian length and
that many bytes of a msgpack list of messages (at most :data:`MAX_FRAME`). The server
never sends anything but, before it closes the connection over a bad frame, one frame of
UTF-8 text saying why.

The pure parts (:class:`FrameDecoder`, :func:`frame`, :func:`parse_handshake`) do no
I/O; :class:`RawPeerStream` (server) and :class:`RawPeerLink` (client) are the thin
asyncio protocols around them.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from dsys.errors import RemoteProtocolError

if TYPE_CHECKING:
    from dsys.raft.node import RaftNode

RAW_PATH = "/raft/v1/raw"
"""Request-target of the upgrade to the raw peer stream."""

UPGRADE_TOKEN = b"dsys-raft/1"
"""The ``Upgrade`` protocol token of the raw peer stream."""

MAX_FRAME = 64 * 1024 * 1024
"""Largest frame body accepted (a snapshot travels in one message): as ``MAX_PEER_BODY``."""

MAX_HANDSHAKE = 16 * 1024
"""Largest handshake answer head the client reads."""

_LEN = struct.Struct(">I")
_pack_len = _LEN.pack
_unpack_len = _LEN.unpack_from

SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: dsys-raft/1\r\n\r\n"
)


def frame(body: bytes) -> bytes:
    """One frame: the 4-byte big-endian length of ``body``, then ``body``."""
    return _pack_len(len(body)) + body


def handshake(host: str, node_id: str, token: str | None) -> bytes:
    """The client's upgrade request."""
    fields = f"X-Dsys-Cluster-Token: {token}\r\n" if token else ""
    return (
        f"GET {RAW_PATH} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
        f"Upgrade: dsys-raft/1\r\nX-Dsys-From: {node_id}\r\n{fields}\r\n"
    ).encode()


def refusal(status: int, reason: str) -> bytes:
    """An HTTP error answer to the upgrade (the connection closes after it)."""
    body = reason.encode("utf-8", "replace")
    phrase = {400: b"Bad Request", 403: b"Forbidden", 503: b"Service Unavailable"}
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (status, phrase.get(status, b"Error"), len(body), body)
    )


def parse_handshake(buf: bytes) -> tuple[int, bytes, int] | None:
    """The status of the server's answer head in ``buf``: ``(status, body_so_far, end)``.

    ``end`` is where the head ends (frames, if any, follow a 101 from there); ``None``
    while the head is incomplete.

    Raises:
        RemoteProtocolError: not an HTTP/1.x status line, or a head over
            :data:`MAX_HANDSHAKE` bytes.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HANDSHAKE:
            raise RemoteProtocolError("peer's upgrade answer head is too long")
        return None
    line = buf[: buf.find(b"\r\n")]
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise RemoteProtocolError(f"peer answered the upgrade with {line[:80]!r}")
    return int(parts[1]), buf[end + 4 :], end + 4


class FrameDecoder:
    """Splits a byte stream into frame bodies (sans-I/O).

    Args:
        max_frame: largest body accepted; a longer announced length raises at once,
            before its bytes are buffered.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held that do not make a whole frame yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """The frames ``data`` completes, in order.

        Raises:
            RemoteProtocolError: a frame announces more than ``max_frame`` bytes.
        """
        buf = self._buf
        if not buf and len(data) >= 4:
            # The common case: exactly one whole frame per read, no copy into the buffer.
            n = _unpack_len(data)[0]
            if n > self.max_frame:
                raise RemoteProtocolError(f"frame of {n} bytes exceeds {self.max_frame}")
            if len(data) == n + 4:
                return [data[4:]]
        buf += data
        out: list[bytes] = []
        pos = 0
        size = len(buf)
        while size - pos >= 4:
            n = _unpack_len(buf, pos)[0]
            if n > self.max_frame:
                raise RemoteProtocolError(f"frame of {n} bytes exceeds {self.max_frame}")
            if size - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out


class RawPeerStream(asyncio.Protocol):
    """Server side of one peer's raw stream: frames go to ``node``'s inbox.

    A malformed frame (undecodable, insane, wrong ``src``/``dst``, too long) is counted
    in ``dsys_raft_peer_frames_refused_total``, logged, answered with one text frame
    saying why, and the connection is closed (the peer reconnects); the server stays up.
    """

    __slots__ = ("decoder", "node", "src", "transport")

    def __init__(self, node: RaftNode, src: str) -> None:
        self.node = node
        self.src = src
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.node._raw_streams.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.node._raw_streams.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        node = self.node
        try:
            bodies = self.decoder.feed(data)
            for body in bodies:
                if self.src not in node.transport.peers:
                    raise RemoteProtocolError(f"unknown peer {self.src!r}")
                node._receive_batch(node._decode_batch(body, self.src))
        except RemoteProtocolError as exc:
            self.refuse(str(exc))

    def refuse(self, why: str) -> None:
        """Count and log a bad frame, tell the peer why, close the connection."""
        node = self.node
        node._m_refused.inc()
        node.log.warning("peer_frame_refused", src=self.src, error=why)
        self.close(why)

    def close(self, why: str) -> None:
        """Close the connection after one text frame with ``why``."""
        t = self.transport
        if t is not None:
            self.transport = None
            t.write(frame(why.encode("utf-8", "replace")[:1024]))
            t.close()


class RawPeerLink(asyncio.Protocol):
    """Client side of one raw stream to a peer: the handshake, then frames out.

    ``done`` resolves with the handshake's status (101: switched); ``on_lost`` is called
    once when an established stream ends, with the peer's last words if it sent any.
    """

    def __init__(self, on_lost: Callable[[RawPeerLink, str], None]) -> None:
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._head = b""
        self.open = False
        self.paused = False
        self.paused_at = 0.0
        self._said = FrameDecoder(max_frame=64 * 1024)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.open:
            try:
                said = self._said.feed(data)
            except RemoteProtocolError:
                said = [b"(unreadable close frame)"]
            if said and self.transport is not None:
                self.transport.close()
                self._lost(said[0].decode("utf-8", "replace"))
            return
        if self.done.done():
            return
        self._head += data
        try:
            got = parse_handshake(self._head)
        except RemoteProtocolError as exc:
            self.done.set_exception(exc)
            return
        if got is None:
            return
        status, rest, _ = got
        self._head = b""
        if status == 101:
            self.open = True
            if rest:
                self.data_received(rest)
        self.done.set_result((status, rest))

    def pause_writing(self) -> None:
        self.paused = True
        self.paused_at = asyncio.get_running_loop().time()

    def resume_writing(self) -> None:
        self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.done.done():
            self.done.set_exception(ConnectionError(str(exc) if exc else "peer closed"))
        self._lost(str(exc) if exc else "")

    def _lost(self, why: str) -> None:
        if self.open:
            self.open = False
            self.on_lost(self, why)

    def close(self) -> None:
        """Close the connection (no callback)."""
        self.open = False
        if self.transport is not None:
            self.transport.close()
            self.transport = None


__all__ = [
    "MAX_FRAME",
    "RAW_PATH",
    "UPGRADE_TOKEN",
    "FrameDecoder",
    "RawPeerLink",
    "RawPeerStream",
    "frame",
    "handshake",
    "parse_handshake",
    "refusal",
]
