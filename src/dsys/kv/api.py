"""The KV client API's rules: limits, request fields, and the answer table.

What each outcome of a put, get or delete is on the wire, in one pure table for every
way a client reaches the store, so they cannot drift:

* the aiohttp handlers of :mod:`dsys.kv.server` turn an :class:`Answer` into a
  ``web.Response``;
* the protocol-level fast path (:mod:`dsys.kv.fastpath`) renders the same
  :class:`Answer` into bytes itself (with aiohttp's header order, ``Date`` and ``Server``);
* the WebSocket channel sends the :func:`ws_write_answer` / :func:`ws_error_status` forms.

=====================  ==========================================  ====================
outcome                HTTP                                        WebSocket ``status``
=====================  ==========================================  ====================
write applied          200 ``{"revision": N}``                     ``"ok"``
CAS revision mismatch  409 ``{"error": "conflict", "revision": R}``  ``"conflict"``
delete of a missing    404 ``{"error": "not_found"}``               ``"not_found"``
other refusal          400 ``{"error": status}``                    ``status``
read of a key          200 raw value + ``X-Dsys-Revision``          ``"ok"``
read of a missing key  404 ``{"error": "not_found"}``               ``"not_found"``
not the leader         307 + ``Location`` (503 if none is known)    ``"not_leader"``
bad input              400 (or the error's ``status_hint``)         ``"bad_request"``
conflict error         409                                          ``"bad_request"``
unavailable            503 + ``Retry-After`` when known             ``"unavailable"``
timeout                504                                          ``"unavailable"``
other ``DsysError``    500 ``{"error": ClassName}``                 ``"unavailable"``
anything else (a bug)  500 text, connection closed                  ``"unavailable"``
=====================  ==========================================  ====================

Pure: no I/O, no clock; the adapters resolve the leader's URL before asking.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from dsys.errors import (
    BadInputError,
    ConflictError,
    DsysError,
    NotLeaderError,
    RemoteProtocolError,
    RequestTimeout,
    UnavailableError,
)
from dsys.kv.fsm import Delete, KeyValue, Put, Result

MAX_VALUE_BYTES = 1024 * 1024
"""Largest value accepted (1 MiB); larger bodies get 413."""

MAX_CLIENT_ID = 128
"""Longest ``X-Dsys-Client-Id`` (or WebSocket ``cid``) accepted."""

JSON = b"application/json; charset=utf-8"
"""The ``Content-Type`` of every JSON answer (what ``web.json_response`` sends)."""

OCTETS = b"application/octet-stream"
"""The ``Content-Type`` of a value read."""

TEXT = b"text/plain; charset=utf-8"

Fields = tuple[tuple[bytes, bytes], ...]


class Answer(NamedTuple):
    """One HTTP answer, before ``Content-Length``, ``Date`` and ``Server`` are added.

    Attributes:
        status: the HTTP status.
        content_type: the ``Content-Type`` value.
        body: the body.
        before: fields sent before ``Content-Type`` (aiohttp's order for ``headers=``).
        after: fields sent after it (aiohttp's order for headers set on the response).
        close: the connection must close after this answer (a server bug).
    """

    status: int
    content_type: bytes
    body: bytes
    before: Fields = ()
    after: Fields = ()
    close: bool = False


def opt_int(value: str | None, name: str, *, minimum: int = 0) -> int | None:
    """An optional integer request field (query parameter or header); ``None`` if absent.

    Raises:
        BadInputError: not an integer (as ``int()`` reads it), or below ``minimum``.
    """
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError:
        raise BadInputError(f"{name} must be an integer, got {value!r}") from None
    if n < minimum:
        raise BadInputError(f"{name} must be >= {minimum}, got {n}")
    return n


def session_fields(client_id: str | None, seq: str | None) -> tuple[str, int]:
    """``(client_id, seq)`` of a write from its ``X-Dsys-Client-Id``/``X-Dsys-Seq`` values.

    ``("", 0)`` without a client id (no exactly-once session).

    Raises:
        BadInputError: the client id is too long, or the sequence number is missing or
            not a positive integer.
    """
    if not client_id:
        return "", 0
    if len(client_id) > MAX_CLIENT_ID:
        raise BadInputError(f"X-Dsys-Client-Id is longer than {MAX_CLIENT_ID} characters")
    n = opt_int(seq, "X-Dsys-Seq", minimum=1)
    if n is None:
        raise BadInputError("X-Dsys-Seq is required with X-Dsys-Client-Id")
    return client_id, n


def json_body(kind: str, message: str, **extra: object) -> bytes:
    """The bytes of ``{"error": kind, "message": message, ...}`` (as ``json_error`` sends)."""
    return json.dumps({"error": kind, "message": message, **extra}).encode()


def _error(status: int, kind: str, message: str, *, after: Fields = (), **extra: object) -> Answer:
    return Answer(status, JSON, json_body(kind, message, **extra), after=after)


def write_answer(cmd: Put | Delete, result: Result) -> Answer:
    """The answer to a put or delete that was applied (or refused by the state machine)."""
    if result.ok:  # the bytes json_response({"revision": n}) makes, without json.dumps
        return Answer(200, JSON, b'{"revision": %d}' % result.revision)
    if result.status == "conflict":
        return _error(
            409,
            "conflict",
            f"revision of {cmd.key!r} is {result.key_revision}, not {cmd.if_revision}",
            revision=result.key_revision,
        )
    if result.status == "not_found":
        return _error(404, "not_found", f"key {cmd.key!r} does not exist")
    return _error(400, result.status, f"write refused: {result.status}")


def read_answer(key: str, kv: KeyValue | None) -> Answer:
    """The answer to a read of ``key`` (``kv`` is what the store holds, if anything)."""
    if kv is None:
        return _error(404, "not_found", f"key {key!r} does not exist")
    return Answer(200, OCTETS, kv.value, before=((b"X-Dsys-Revision", b"%d" % kv.mod_revision),))


def retry_after(seconds: float | None) -> bytes:
    """A ``Retry-After`` value: whole seconds, at least 1 (1 when unknown)."""
    return b"%d" % max(1, round(seconds or 1))


def error_answer(exc: BaseException, target: bytes, leader_url: str | None) -> Answer:
    """The answer to a request that failed with ``exc``.

    Args:
        exc: what the request raised.
        target: the request-target (path and query), for a redirect's ``Location``.
        leader_url: the leader's base URL (``http://host:port``) when ``exc`` is a
            :class:`~dsys.errors.NotLeaderError` and the leader is known.
    """
    if isinstance(exc, NotLeaderError):
        if leader_url:
            location = leader_url.rstrip("/").encode() + target
            return _error(
                307, "not_leader", str(exc), after=((b"Location", location),), leader=leader_url
            )
        return _error(
            503,
            "no_leader",
            str(exc) or "no leader is known",
            after=((b"Retry-After", retry_after(exc.retry_after)),),
        )
    if isinstance(exc, BadInputError):
        status = exc.status_hint if isinstance(exc, RemoteProtocolError) else 400
        return _error(status, "bad_request", str(exc))
    if isinstance(exc, ConflictError):
        return _error(409, "conflict", str(exc))
    if isinstance(exc, UnavailableError):
        after: Fields = ()
        if exc.retry_after is not None:
            after = ((b"Retry-After", retry_after(exc.retry_after)),)
        return _error(503, "unavailable", str(exc), after=after)
    if isinstance(exc, RequestTimeout):
        return _error(504, "timeout", str(exc))
    if isinstance(exc, DsysError):  # e.g. LocalProtocolError: our bug, not the client's
        return _error(500, type(exc).__name__, str(exc))
    body = b"500 Internal Server Error\n\nServer got itself in trouble"
    return Answer(500, TEXT, body, close=True)


def ws_write_answer(rid: int, result: Result) -> dict[str, Any]:
    """The WebSocket answer to put/del request ``rid`` whose command was applied."""
    return {
        "id": rid,
        "status": result.status,
        "revision": result.revision,
        "key_revision": result.key_revision,
    }


def ws_error_status(exc: BaseException) -> str:
    """The WebSocket ``status`` of a request that failed with ``exc``.

    ``"unavailable"`` covers timeouts, closed servers, lost leadership and bugs alike:
    the outcome of a write is unknown, and a retry with the same ``seq`` is safe.
    """
    if isinstance(exc, NotLeaderError):
        return "not_leader"
    if isinstance(exc, (BadInputError, ConflictError)):
        return "bad_request"
    return "unavailable"


__all__ = [
    "JSON",
    "MAX_CLIENT_ID",
    "MAX_VALUE_BYTES",
    "OCTETS",
    "Answer",
    "error_answer",
    "json_body",
    "opt_int",
    "read_answer",
    "retry_after",
    "session_fields",
    "write_answer",
    "ws_error_status",
    "ws_write_answer",
]
