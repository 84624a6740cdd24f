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
a page of a scan       200 ``[{"key", "revision"}, ...]`` + ``Link:    ``"ok"`` + ``items``,
                       <...&after=K>; rel="next"`` if there is more  ``more``, ``next``
not the leader         307 + ``Location`` (503 if none is known)    ``"not_leader"``
wrong range (multi)    421 ``{"error": "key_not_in_range" or         ``"wrong_range"``
                       "epoch_not_match", "ranges", "map_version"}``
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
import urllib.parse
from typing import Any, NamedTuple

from dsys.errors import (
    BadInputError,
    ConflictError,
    DsysError,
    EpochNotMatchError,
    NotLeaderError,
    RangeError,
    RemoteProtocolError,
    RequestTimeout,
    UnavailableError,
)
from dsys.kv.fsm import Delete, KeyValue, Put, Result, validate_key

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
_new = tuple.__new__  # builds an Answer without NamedTuple's keyword-handling __new__


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


MAX_SCAN_LIMIT = 10_000
"""Most keys one scan answers; ``after=`` (the last key of a page) continues from there."""


class ScanRequest(NamedTuple):
    """A checked scan: keys under ``prefix`` after ``after`` (None: from the start)."""

    prefix: str
    limit: int
    after: str | None = None


class ScanPage(NamedTuple):
    """One page of a scan.

    Attributes:
        items: the keys of the page, in key order.
        more: keys under the prefix follow the page.
        next: the ``after`` that continues (the page's last key), or None at the end.
    """

    items: list[KeyValue]
    more: bool
    next: str | None


def scan_request(prefix: object, limit: object, after: object = None) -> ScanRequest:
    """Check the fields of a scan (query parameters or a WebSocket request).

    Raises:
        BadInputError: the prefix is not a string, the limit not an integer in
            ``1..MAX_SCAN_LIMIT``, or ``after`` (the cursor) not a key under the prefix.
    """
    if not isinstance(prefix, str):
        raise BadInputError(f"prefix must be a string, got {type(prefix).__name__}")
    if type(limit) is not int or not 0 < limit <= MAX_SCAN_LIMIT:
        raise BadInputError(f"limit must be an integer in 1..{MAX_SCAN_LIMIT}, got {limit!r}")
    if after is not None:
        try:
            validate_key(after)
        except BadInputError as exc:
            raise BadInputError(f"bad cursor: after: {exc}") from None
        assert isinstance(after, str)
        if not after.startswith(prefix):
            raise BadInputError(
                f"bad cursor: after={after!r} is not a key under prefix {prefix!r} "
                "(pass the 'next' of the previous page of the same scan)"
            )
    return ScanRequest(prefix, limit, after)


def scan_page(req: ScanRequest, found: list[KeyValue]) -> ScanPage:
    """The page answering ``req`` from ``found``: up to ``req.limit + 1`` keys read for it
    (one more than the page tells whether there is more)."""
    items = found[: req.limit]
    more = len(found) > req.limit
    return ScanPage(items, more, items[-1].key if more and items else None)


def scan_answer(req: ScanRequest, page: ScanPage, path: str = "/v1/kv") -> Answer:
    """The HTTP answer to a scan: the page as a JSON list (as before cursors) and, when
    more keys follow, ``Link: <path?prefix=P&limit=L&after=K>; rel="next"`` (RFC 8288)."""
    body = json.dumps([{"key": kv.key, "revision": kv.mod_revision} for kv in page.items])
    after: Fields = ()
    if page.next is not None:
        q = urllib.parse.urlencode({"prefix": req.prefix, "limit": req.limit, "after": page.next})
        after = ((b"Link", f'<{path}?{q}>; rel="next"'.encode()),)
    return Answer(200, JSON, body.encode(), after=after)


def ws_scan_answer(rid: int, page: ScanPage, revision: int) -> dict[str, Any]:
    """The WebSocket answer to scan request ``rid`` (``next`` continues it when ``more``)."""
    return {
        "id": rid,
        "status": "ok",
        "items": [[kv.key, kv.mod_revision] for kv in page.items],
        "revision": revision,
        "more": page.more,
        "next": page.next,
    }


def json_body(kind: str, message: str, **extra: object) -> bytes:
    """The bytes of ``{"error": kind, "message": message, ...}`` (as ``json_error`` sends)."""
    return json.dumps({"error": kind, "message": message, **extra}).encode()


def _error(status: int, kind: str, message: str, *, after: Fields = (), **extra: object) -> Answer:
    return Answer(status, JSON, json_body(kind, message, **extra), after=after)


def write_answer(cmd: Put | Delete, result: Result) -> Answer:
    """The answer to a put or delete that was applied (or refused by the state machine)."""
    if result.ok:  # the bytes json_response({"revision": n}) makes, without json.dumps
        # (tuple.__new__: NamedTuple's own __new__, with defaults, is a Python call)
        return _new(Answer, (200, JSON, b'{"revision": %d}' % result.revision, (), (), False))
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
    if isinstance(exc, RangeError):
        return range_error_answer(exc)
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


def range_error_answer(exc: RangeError) -> Answer:
    """421 Misdirected Request naming the ranges the node knows, so the client refreshes
    its range map and retries (``error`` says which: a key in no local range, or a stale
    epoch)."""
    kind = "epoch_not_match" if isinstance(exc, EpochNotMatchError) else "key_not_in_range"
    return _error(
        421,
        kind,
        str(exc),
        ranges=[r.to_plain() for r in exc.ranges],
        map_version=exc.map_version,
    )


def ws_write_command(op: object, req: dict[str, Any], now_ms: int) -> Put | Delete:
    """The command of a WebSocket ``put``/``del`` request, stamped with ``now_ms``.

    Raises:
        BadInputError: a field is missing or of the wrong type.
    """
    key = validate_key(req.get("key"))
    if_revision = req.get("if_revision")
    # exact types (a bool is not an integer here): the leader applies this very
    # command, followers what decoding its bytes gives, and the two must agree
    if if_revision is not None and (type(if_revision) is not int or if_revision < 0):
        raise BadInputError("if_revision must be a non-negative integer")
    cid, seq = req.get("cid", ""), req.get("seq", 0)
    if type(cid) is not str or type(seq) is not int or len(cid) > MAX_CLIENT_ID:
        raise BadInputError("cid must be a short string and seq an integer")
    if op == "put":
        value, ttl = req.get("value"), req.get("ttl_ms", 0)
        if type(value) is not bytes or len(value) > MAX_VALUE_BYTES:
            raise BadInputError(f"value must be bytes of at most {MAX_VALUE_BYTES}")
        if type(ttl) is not int or ttl < 0:
            raise BadInputError("ttl_ms must be a non-negative integer")
        return Put(
            key=key,
            value=value,
            if_revision=if_revision,
            ttl_ms=ttl,
            now_ms=now_ms,
            client_id=cid,
            seq=seq,
        )
    if op != "del":
        raise BadInputError(f"unknown write op {op!r}")
    return Delete(key=key, if_revision=if_revision, now_ms=now_ms, client_id=cid, seq=seq)


def ws_range_answer(rid: int, exc: RangeError) -> dict[str, Any]:
    """The WebSocket answer to a request that reached the wrong range (multi-Raft)."""
    kind = "epoch_not_match" if isinstance(exc, EpochNotMatchError) else "key_not_in_range"
    return {
        "id": rid,
        "status": "wrong_range",
        "error": kind,
        "message": str(exc),
        "ranges": [r.to_plain() for r in exc.ranges],
        "map_version": exc.map_version,
    }


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
    if isinstance(exc, RangeError):
        return "wrong_range"
    if isinstance(exc, (BadInputError, ConflictError)):
        return "bad_request"
    return "unavailable"


__all__ = [
    "JSON",
    "MAX_CLIENT_ID",
    "MAX_SCAN_LIMIT",
    "MAX_VALUE_BYTES",
    "OCTETS",
    "Answer",
    "ScanPage",
    "ScanRequest",
    "error_answer",
    "json_body",
    "opt_int",
    "range_error_answer",
    "read_answer",
    "retry_after",
    "scan_answer",
    "scan_page",
    "scan_request",
    "session_fields",
    "write_answer",
    "ws_error_status",
    "ws_range_answer",
    "ws_scan_answer",
    "ws_write_answer",
    "ws_write_command",
]
