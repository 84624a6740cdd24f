"""What the chat servers, the Python client and the tests share: names, frames, tokens.

The wire protocol is JSON text frames over one WebSocket per client (``/ws``). Every
frame is an object with a ``type``. A client speaks first with ``hello`` (its session
token and, after a reconnect, where it was in each room); the server answers
``welcome`` and then the frames below. Anything malformed gets an ``error`` frame with a
``code`` and never reaches another user. Under load the server sends several frames in
one WebSocket message as a JSON array of frames (clients accept both).

=========================  ======================================================
client -> server           server -> client
=========================  ======================================================
hello token                welcome user server
rooms                      rooms [{room, member, unread, last_offset, epoch}]
create / join / leave room joined / left room
dm user                    joined room (the direct-message room of the two users)
sub room offset epoch seq  msg ... (every message after ``offset``), or refetch
send room cid text         ack cid room offset id; the msg comes like any other
history room before_seq    history room messages more
read room offset fully     (stored; the next ``rooms`` shows unread counts)
delivered room epoch       (with ``offsets``: messages received) to their authors:
                           delivered room epoch offsets, the first time another
                           member's client acknowledges them
typing room                typing room user until
presence state             presence user state
members room               members room members [{user, state}]
ping                       pong
=========================  ======================================================
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from dsys.sharding import HashRing

STREAM = "CHAT"
"""The one durable stream holding every room's history (subjects ``chat.room.<room>``)."""

ROOM_SUBJECT = "chat.room.{room}"
LIVE_SUBJECT = "chat.live.{room}"  # pub/sub fan-out of a stored message to every server
TYPING_SUBJECT = "chat.typing.{room}"
PRESENCE_SUBJECT = "chat.presence"
MEMBER_SUBJECT = "chat.member"
OWNER_SUBJECT = "chat.owner.{server}"  # request/reply: post to the room's owner
DELIVERED_SUBJECT = "chat.delivered"  # delivery receipts: [room, epoch, offset, author]...

MAX_FRAME = 16 * 1024
"""Largest client frame accepted (bytes); a larger one is refused with ``too_large``."""
MAX_TEXT = 4000
"""Longest message text (characters)."""
TYPING_SECONDS = 30.0
"""How long a typing indicator lasts unless renewed."""
PRESENCE_TTL = 30.0
"""Seconds a presence lease lives in the KV store without a heartbeat."""
RESUME_LIMIT = 2000
"""Most messages replayed on a resume; a longer gap is answered with ``refetch``."""
RECEIPTS_KEPT = 2000
"""Messages per room a server remembers the author of, to route delivery receipts."""
MAX_RECEIPT_OFFSETS = 500
"""Most offsets in one ``delivered`` frame from a client."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class FrameError(Exception):
    """A client frame that cannot be served; becomes an ``error`` frame."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra

    def frame(self, ref: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "error", "code": self.code, "message": str(self)}
        if ref is not None:
            out["ref"] = ref
        out.update(self.extra)
        return out


def check_name(value: Any, what: str) -> str:
    """A user or room name: 1-32 of ``a-z 0-9 _ -``, starting with a letter or digit."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise FrameError(
            "bad_name", f"{what} must be 1-32 characters of a-z 0-9 _ - (got {value!r:.40})"
        )
    return value


def field(frame: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """``frame[name]`` checked to be of ``kind`` (``bool`` is not an ``int`` here)."""
    if name not in frame:
        if default is ...:
            raise FrameError("bad_frame", f"{frame.get('type')!s:.20} needs {name!r}")
        return default
    value = frame[name]
    if (kind is int and type(value) is not int) or not isinstance(value, kind):
        raise FrameError("bad_frame", f"{name!r} must be {kind.__name__}")
    return value


def room_ring(servers: Any) -> HashRing:
    """The consistent-hash ring of the live chat servers that owns the rooms."""
    return HashRing(sorted(set(servers)))


def room_owner(ring: HashRing, room: str) -> str:
    """The chat server owning ``room`` (it gives the room's messages their offsets)."""
    return ring.get(room)


def dm_room(a: str, b: str) -> str:
    """The direct-message room of two users (the same whoever opens it)."""
    x, y = sorted((a, b))
    return f"dm--{x}--{y}"


def dm_users(room: str) -> tuple[str, str] | None:
    """The two users of a direct-message room, or None for an ordinary room."""
    if not room.startswith("dm--"):
        return None
    parts = room[4:].split("--")
    return (parts[0], parts[1]) if len(parts) == 2 else None


def global_id(ts_ms: int, seq: int) -> str:
    """A time-sortable id of a stored message: its stream timestamp, then its sequence.

    The stream stamps messages with a replicated clock that never goes back and gives
    sequences in append order, so sorting ids as strings sorts messages in time.
    """
    return f"{ts_ms:012x}{seq:012x}"


# -- session tokens -------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_token(secret: bytes, user: str, ttl: float = 7 * 86400, now: float | None = None) -> str:
    """A session token: ``payload.signature`` with an HMAC-SHA256 over the payload."""
    payload = json.dumps({"u": user, "exp": int((now or time.time()) + ttl)}).encode()
    body = _b64(payload)
    sig = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(sig)}"


def verify_token(secret: bytes, token: Any, now: float | None = None) -> str:
    """The user a token was issued to.

    Raises:
        FrameError: ``bad_token`` (forged, malformed or expired).
    """
    if not isinstance(token, str) or token.count(".") != 1 or len(token) > 512:
        raise FrameError("bad_token", "malformed session token")
    body, sig = token.split(".")
    want = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    try:
        given = _unb64(sig)
        payload = json.loads(_unb64(body))
    except ValueError:
        raise FrameError("bad_token", "malformed session token") from None
    if not hmac.compare_digest(want, given):
        raise FrameError("bad_token", "session token signature does not match")
    if not isinstance(payload, dict) or payload.get("exp", 0) < (now or time.time()):
        raise FrameError("bad_token", "session token expired; log in again")
    return check_name(payload.get("u"), "user")


@dataclass(frozen=True, slots=True)
class Stored:
    """A chat message as stored in the stream and sent to clients."""

    room: str
    offset: int
    epoch: str
    seq: int
    id: str
    user: str
    cid: str
    text: str
    ts: int

    def frame(self) -> dict[str, Any]:
        return {
            "type": "msg",
            "room": self.room,
            "offset": self.offset,
            "epoch": self.epoch,
            "seq": self.seq,
            "id": self.id,
            "from": self.user,
            "cid": self.cid,
            "text": self.text,
            "ts": self.ts,
        }

    @classmethod
    def from_frame(cls, f: dict[str, Any]) -> Stored:
        return cls(
            f["room"], f["offset"], f["epoch"], f["seq"], f["id"], f["from"], f["cid"],
            f["text"], f["ts"],
        )  # fmt: skip
