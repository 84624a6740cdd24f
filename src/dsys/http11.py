"""Strict sans-I/O HTTP/1.1 message parsing (RFC 9112): bytes in, events out.

Theory of operation
-------------------

A :class:`Parser` owns a :class:`ReceiveBuffer` and turns the bytes fed to it into
events, one per :meth:`Parser.next_event` call, in the shape of h11's readers::

    Request / Response ──> Data* ──> EndOfMessage        (InformationalResponse* first
                                                           for a client's 1xx answers)

``next_event`` returns ``None`` when it needs more bytes. A server-role parser goes on
with the next pipelined request after each :class:`EndOfMessage`; a client-role parser
waits for :meth:`Parser.expect_response` (the request method decides whether a body
follows, e.g. none after ``HEAD``). Nothing here does I/O, reads a clock or logs: the
adapters (:mod:`dsys.kv.fastpath`, :mod:`dsys.balance.fastpath`) feed socket bytes,
serve or hand off what they get, and render answers.

Framing is strict, because a proxy and its backends must agree on where each message
ends (request smuggling lives in the disagreements):

* lines end in CRLF; a bare CR or LF, an obs-fold (a line starting with SP/HTAB),
  whitespace before a field name's colon, or a control byte in a field is an error;
* ``Content-Length`` is 1 to 18 ASCII digits (no sign, no ``0x``, no list), at most
  once; ``Transfer-Encoding`` is a list of tokens with ``chunked`` exactly once and
  last; a message with both is an error, and so is ``Transfer-Encoding`` in HTTP/1.0;
* a request's ``Transfer-Encoding`` must be exactly ``chunked`` (a request's body is
  decoded here, and no other coding is); a response whose last coding is not
  ``chunked`` is read until the connection closes;
* chunk sizes are 1 to 16 hex digits (no sign, no ``0x``, no whitespace before the
  extensions), extensions must parse and are discarded, chunk data ends in CRLF;
* a request has exactly one valid ``Host`` (HTTP/1.1) or at most one (HTTP/1.0);
* heads are bounded (:data:`MAX_HEAD` bytes, :data:`MAX_LINE` per line,
  :data:`MAX_HEADERS` fields), and so are chunk-size lines and trailer sections.

An error raises :class:`~dsys.errors.RemoteProtocolError` whose ``status_hint`` is the
status a server should answer (400, 413, 431, 501, 505); the parser is then unusable
(the connection must be closed, or handed whole to another parser before anything of
it was served). Misuse by the caller (feeding after EOF, asking for a response that
was not requested) raises :class:`~dsys.errors.LocalProtocolError`.

Cost is linear in the bytes received however they are split: the buffer remembers
where the search for the end of a head or line stopped, so a slow client sending one
byte at a time costs no rescans. :attr:`Parser.steps` counts the bytes examined, for
tests that bound the work without timing it.

Events are ``NamedTuple`` s rather than frozen dataclasses: they are built once per
message on the hottest paths of the KV and the proxy, and a tuple is several times
cheaper to create. Header fields are ``(raw_name, name, value)`` triples (as in h11's
``Headers``): the name as sent, lower-cased, and the value without surrounding
whitespace.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from dsys.errors import LocalProtocolError, RemoteProtocolError

MAX_HEAD: Final = 32 * 1024
"""Largest head (request or status line plus fields) accepted, in bytes."""

MAX_LINE: Final = 8190
"""Longest request line or field value accepted, in bytes (aiohttp's limit); field
names are at most 256 bytes."""

MAX_HEADERS: Final = 100
"""Most header (or trailer) fields accepted in one message."""

MAX_CHUNK_LINE: Final = 1024
"""Longest chunk-size line (size and extensions) accepted, in bytes."""

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Lower-cased names of the hop-by-hop fields (RFC 9110 7.6.1), which a proxy drops."""

Header = tuple[bytes, bytes, bytes]
"""One field: ``(raw_name, lower-cased name, value stripped of OWS)``."""

BODY_NONE: Final = "none"
BODY_LENGTH: Final = "length"
BODY_CHUNKED: Final = "chunked"
BODY_UNTIL_CLOSE: Final = "until-close"


class Request(NamedTuple):
    """A request head.

    Attributes:
        method: the method token, as sent (case-sensitive).
        target: the request-target, as sent (ASCII, no whitespace).
        version: ``b"1.1"`` or ``b"1.0"``.
        headers: the fields in order, as :data:`Header` triples.
        content_length: the body length from ``Content-Length``, if given.
        chunked: the body is chunked (``Transfer-Encoding`` ending in ``chunked``).
        keep_alive: the connection may carry another request after this one.
        connection: the lower-cased tokens of ``Connection``.
        host: the ``Host`` value (validated), or ``None`` when absent (HTTP/1.0 only).
        raw: the head's bytes as received, final CRLF CRLF included.
    """

    method: bytes
    target: bytes
    version: bytes
    headers: tuple[Header, ...]
    content_length: int | None
    chunked: bool
    keep_alive: bool
    connection: frozenset[bytes]
    host: bytes | None
    raw: bytes


class InformationalResponse(NamedTuple):
    """A 1xx interim response (e.g. 100 Continue, 103 Early Hints); no body follows.

    Attributes:
        status: 100 to 199 (101 only when :meth:`Parser.expect_response` was told
            the request asked for an upgrade).
        reason: the reason phrase (may be empty).
        headers: the fields in order.
        raw: the head's bytes as received.
    """

    status: int
    reason: bytes
    headers: tuple[Header, ...]
    raw: bytes


class Response(NamedTuple):
    """A final response head (status 200 to 599).

    Attributes:
        status: the status code.
        reason: the reason phrase (may be empty).
        version: ``b"1.1"`` or ``b"1.0"``.
        content_length: the ``Content-Length`` value, if given (for a ``HEAD``, 204 or
            304 answer it describes a body that is not sent).
        body: how the body is framed: :data:`BODY_NONE`, :data:`BODY_LENGTH`,
            :data:`BODY_CHUNKED` or :data:`BODY_UNTIL_CLOSE`.
        keep_alive: the connection may carry another request after this answer.
        connection: the lower-cased tokens of ``Connection``.
        raw: the head's bytes as received (validated field by field).
    """

    status: int
    reason: bytes
    version: bytes
    content_length: int | None
    body: str
    keep_alive: bool
    connection: frozenset[bytes]
    raw: bytes

    @property
    def headers(self) -> tuple[Header, ...]:
        """The fields in order, as :data:`Header` triples.

        Split on demand: a proxy that forwards the head as it came never needs them.
        """
        raw = self.raw
        return tuple(_fields(raw[raw.find(b"\r\n") + 2 : -2], True))


class Data(NamedTuple):
    """Body bytes (de-chunked), in order; never empty."""

    data: bytes


class EndOfMessage(NamedTuple):
    """The end of a message's body, with the chunked trailer fields, if any."""

    trailers: tuple[Header, ...] = ()


class ConnectionClosed(NamedTuple):
    """The peer closed its side between messages (after :meth:`Parser.feed_eof`)."""


Event = Request | InformationalResponse | Response | Data | EndOfMessage | ConnectionClosed
"""What :meth:`Parser.next_event` returns (besides ``None``: need more bytes)."""

END: Final = EndOfMessage()
_new = tuple.__new__  # builds an event without NamedTuple's keyword-handling __new__
"""The :class:`EndOfMessage` without trailers (shared: events are immutable)."""

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TCHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_TOKEN = re.compile(rb"[%s]+\Z" % _TCHAR)
_REQUEST_LINE = re.compile(rb"([%s]+) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])\Z" % _TCHAR)
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\Z")
# Field lines, each with its CRLF: name, colon, then visible bytes, SP, HTAB or obs-text.
# Excludes obs-fold (a line cannot start with SP/HTAB), bare CR/LF, NUL and other CTLs.
_FIELD_LINES = re.compile(
    rb"(?:[%s]{1,256}:[\t\x20-\x7e\x80-\xff]{0,%d}\r\n)*" % (_TCHAR, MAX_LINE)
)
# Over validated lines: the name, and the value without its leading OWS (trailing OWS,
# rare, is stripped in a second step: a lazy regex could be quadratic on long runs).
_FIELD_VALUE = re.compile(rb"[^:]+:[ \t]*([^\r]*)\r\n")
_TRAILING_OWS = re.compile(rb"[ \t]\r\n")
_NAME = re.compile(rb"([^:]+):[^\r]*\r\n")
# The fast paths (Parser._fast_request/_fast_response): a whole response head, and the
# bytes a request head may hold besides CR and LF
# (HTAB, SP, visible ASCII, obs-text), deleted by one ``bytes.translate``.
# The common final response: HTTP/1.x, one Content-Length, no Transfer-Encoding,
# Connection or other hop-by-hop field (the lookahead, case-insensitive, keeps them out
# of the other fields), so that a proxy may forward the head as it came. A name whose
# first letter starts none of those passes the lookahead at once; no field matches both
# kinds of line, so the repeats are possessive (no backtracking). Values are not bounded
# to MAX_LINE here: the fast paths only see heads shorter than that.
_OTHER_FIELD = (
    rb"(?=[^CcKkPpTtUu]|(?!(?i:content-length|transfer-encoding|connection|keep-alive"
    rb"|proxy-authenticate|proxy-connection|te|trailer|upgrade):))"
    rb"[%s]{1,256}:[\t\x20-\x7e\x80-\xff]*\r\n" % _TCHAR
)
_COMMON_RESPONSE = re.compile(
    rb"HTTP/1\.([01]) ([2-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n(?:%s)*+"
    rb"(?i:content-length):[ \t]*+([0-9]{1,18})[ \t]*\r\n(?:%s)*+\r\n"
    % (_OTHER_FIELD, _OTHER_FIELD)
)
_MINOR_VERSIONS = {b"1": b"1.1", b"0": b"1.0"}
_STATUS_CODES = {b"%d" % code: code for code in range(200, 600)}
_HEAD_BYTES = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_FIELD_NAME = re.compile(rb"[%s]{1,256}\Z" % _TCHAR)
# Field names and methods validated before (name -> lower-cased), so that a known one
# costs a dict lookup; bounded, so that a peer sending new names only costs the regex.
_KNOWN_NAMES: dict[bytes, bytes] = {}
_KNOWN_METHODS: set[bytes] = set()
_KNOWN_HOSTS: set[bytes] = set()  # Host values that matched _HOST
# Whole field lines (short ones) split and validated before: a keep-alive client sends
# the same lines again and again (Host, User-Agent, Content-Type...).
_KNOWN_FIELDS: dict[bytes, Header] = {}
_KNOWN_FIELD_MAX = 100  # longest line kept, in bytes
_KNOWN_MAX = 1024
_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding", b"connection", b"host"})
# The fields a response's framing depends on, over the lower-cased field lines.
# (Over a whole head: each field line follows a "\n", and a literal first byte lets the
# regex engine skip ahead instead of trying every position.)
_FRAMING_FIELDS = re.compile(rb"\n(content-length|transfer-encoding|connection):([^\r]*)\r")
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*[%s]+(?:[ \t]*=[ \t]*(?:[%s]+|%s))?)*\Z"
    % (_TCHAR, _TCHAR, _QUOTED)
)
# RFC 9112 3.2 / RFC 3986: uri-host [ ":" port ], host an IP-literal or reg-name/IPv4.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?\Z")
# A field value as rendered: no leading/trailing whitespace, no CR, LF or other CTLs.
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?\Z")
_BARE_CR_LF = re.compile(rb"\r[^\n]|(?<!\r)\n")
_VERSIONS = frozenset({b"1.1", b"1.0"})
_NO_TOKENS: frozenset[bytes] = frozenset()
_CHUNKED = b"chunked"
# Fields that must not appear in a trailer section (RFC 9110 6.5.1: framing, routing).
_NOT_TRAILERS = frozenset({b"content-length", b"transfer-encoding", b"host"})

# parser states
_HEAD = 0  # waiting for a head
_LENGTH = 1  # Content-Length body, self._left bytes to go
_CHUNK_SIZE = 2  # waiting for a chunk-size line
_CHUNK_DATA = 3  # inside a chunk, self._left bytes to go
_CHUNK_CRLF = 4  # the CRLF after a chunk's data
_TRAILERS = 5  # the trailer section after the last chunk
_UNTIL_CLOSE = 6  # the body ends when the connection does
_IDLE = 7  # client role: no response expected yet
_ERROR = 8  # a protocol error was raised; nothing more is parsed
_CLOSED = 9  # ConnectionClosed was returned
_EOM = 10  # the body is complete: EndOfMessage is next


def _fail(message: str, status: int = 400) -> RemoteProtocolError:
    return RemoteProtocolError(message, status_hint=status)


class ReceiveBuffer:
    """Bytes received and not parsed yet, with the search position kept between feeds.

    ``maybe_extract_*`` remove what they return; a search that fails remembers where
    it stopped, so the next one examines only the bytes that came since (minus a few
    for a delimiter split across feeds). :attr:`steps` counts the bytes examined.
    """

    __slots__ = ("_data", "_search", "steps")

    def __init__(self) -> None:
        self._data = bytearray()
        self._search = 0  # no delimiter starts before this offset
        self.steps = 0

    def __iadd__(self, data: bytes) -> ReceiveBuffer:
        self._data += data
        return self

    def __len__(self) -> int:
        return len(self._data)

    def __bytes__(self) -> bytes:
        return bytes(self._data)

    def first_byte(self) -> int:
        """The first buffered byte (the buffer must not be empty)."""
        return self._data[0]

    def startswith(self, prefix: bytes) -> bool:
        """Whether the buffered bytes start with ``prefix``."""
        return self._data.startswith(prefix)

    def find(self, delimiter: bytes) -> int:
        """Offset just past the first ``delimiter``, or -1; remembers a failed search.

        Raises:
            RemoteProtocolError: a bare CR or LF came before any ``delimiter`` (CRLF
                sequences): the line cannot end well, so why wait for more.
        """
        data = self._data
        start = self._search
        end = data.find(delimiter, start)
        if end < 0:
            n = len(data)
            self.steps += 2 * (n - start)
            if _BARE_CR_LF.search(data, start) is not None:
                raise _fail("bare CR or LF (lines must end in CRLF)")
            self._search = max(0, n - len(delimiter) + 1)
            return -1
        self.steps += end + len(delimiter) - start
        return end + len(delimiter)

    def extract(self, n: int) -> bytes:
        """Remove and return the first ``n`` bytes (all of them if fewer)."""
        data = self._data
        if n >= len(data):
            out = bytes(data)
            data.clear()
        else:
            out = bytes(data[:n])
            del data[:n]  # O(1) amortized: bytearray moves its start instead
        self._search = 0
        self.steps += len(out)
        return out

    def peek(self, n: int) -> bytes:
        """The first ``n`` bytes, left in place."""
        self.steps += n
        return bytes(self._data[:n])

    def clear(self) -> bytes:
        """Remove and return everything."""
        return self.extract(len(self._data))


def _fields(block: bytes, valid: bool = False, trailers: bool = False) -> list[Header]:
    """Validate field lines (each ending in CRLF; ``valid``: already done) and split them."""
    if not block:
        return []
    if not valid and _FIELD_LINES.fullmatch(block) is None:
        _check_fields(block, trailers)  # raises, saying why
    # C passes only (no Python loop per field): names as sent, lower-cased, values
    raws = _NAME.findall(block)
    if len(raws) > MAX_HEADERS:
        raise _fail(f"more than {MAX_HEADERS} fields", 431)
    values = _FIELD_VALUE.findall(block)
    if _TRAILING_OWS.search(block) is not None:  # rare: strip trailing OWS too
        values = [v.rstrip(b" \t") for v in values]
    return list(zip(raws, _NAME.findall(block.lower()), values, strict=True))


def _framing_fields(block: bytes, head: bytes) -> list[Header]:
    """Validate field lines like :func:`_fields`; return only the framing fields.

    ``block`` is the field lines of ``head``, the whole head.
    """
    if not block:
        return []
    _check_fields(block, False)
    if block.count(b"\r\n") > MAX_HEADERS:
        raise _fail(f"more than {MAX_HEADERS} fields", 431)
    return [(n, n, v.strip(b" \t")) for n, v in _FRAMING_FIELDS.findall(head.lower())]


def _check_fields(block: bytes, trailers: bool) -> None:
    if _FIELD_LINES.fullmatch(block) is None:
        if any(len(line) > MAX_LINE for line in block.split(b"\r\n")):
            raise _fail(f"field line longer than {MAX_LINE} bytes", 431)
        what = "trailer" if trailers else "header"
        raise _fail(f"malformed {what} field line (bare CR/LF, obs-fold, control byte or space)")


def _framing(
    headers: list[Header], version: bytes, request: bool
) -> tuple[int | None, bool | None, frozenset[bytes], bytes | None, int]:
    """``(content_length, chunked, connection, host, hosts)`` from the fields.

    ``chunked`` is None without ``Transfer-Encoding``, False when its last coding is
    not ``chunked`` (a response read until close), True otherwise.
    """
    length: int | None = None
    te: list[bytes] | None = None
    connection = _NO_TOKENS
    host: bytes | None = None
    hosts = 0
    for _, name, value in headers:
        if name == b"content-length":
            if length is not None:
                raise _fail("more than one Content-Length")
            if not value.isdigit() or len(value) > 18:
                raise _fail(f"malformed Content-Length {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            if te is None:
                te = []
            te.append(value)
        elif name == b"connection":
            tokens = {t.strip(b" \t").lower() for t in value.split(b",")}
            tokens.discard(b"")
            connection = connection | tokens if connection else frozenset(tokens)
        elif name == b"host":
            host = value
            hosts += 1
    chunked: bool | None = None
    if te is not None:
        if version == b"1.0":
            raise _fail("Transfer-Encoding in an HTTP/1.0 message")
        if length is not None:
            raise _fail("both Content-Length and Transfer-Encoding")
        codings = [c.strip(b" \t").lower() for c in b",".join(te).split(b",")]
        for c in codings:
            if _TOKEN.match(c) is None:
                raise _fail(f"malformed Transfer-Encoding {b','.join(te)[:60]!r}")
        n_chunked = codings.count(_CHUNKED)
        if n_chunked > 1 or (n_chunked == 1 and codings[-1] != _CHUNKED):
            raise _fail("chunked must be the last transfer coding, and only once")
        chunked = n_chunked == 1
        if request and codings != [_CHUNKED]:
            # RFC 9112 6.1: a coding we do not implement is a 501; as h11 does, a request
            # may only be chunked (its body is ours to decode)
            raise _fail("a request's only transfer coding must be chunked", 501)
    return length, chunked, connection, host, hosts


class Parser:
    """Turns the bytes of one connection into HTTP/1.1 events.

    Args:
        client: parse responses (the client side of the connection) instead of requests.
        max_head: largest head accepted, in bytes.

    Example::

        p = Parser()
        p.feed(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
        p.next_event()  # Request(method=b"GET", target=b"/", ...)
        p.next_event()  # EndOfMessage(trailers=())
        p.next_event()  # None: needs more bytes
    """

    __slots__ = (
        "_buf",
        "_eof",
        "_head_method",
        "_left",
        "_state",
        "_upgrade",
        "client",
        "max_head",
    )

    def __init__(self, *, client: bool = False, max_head: int = MAX_HEAD) -> None:
        self.client = client
        self.max_head = max_head
        self._buf = ReceiveBuffer()
        self._state = _IDLE if client else _HEAD
        self._left = 0
        self._eof = False
        self._head_method = False  # client: the request was a HEAD (no body follows)
        self._upgrade = False  # client: the request asked for a protocol switch

    @property
    def steps(self) -> int:
        """Bytes examined so far (searches, validation, copies): a measure of work."""
        return self._buf.steps

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet turned into events."""
        return len(self._buf._data)

    @property
    def buffer(self) -> bytearray:
        """The buffered bytes themselves, for ``len()`` checks on hot paths (read only:
        changing them corrupts the parse). The same object for the parser's life."""
        return self._buf._data

    @property
    def body_left(self) -> int:
        """Body bytes still to come of a ``Content-Length`` body (0 otherwise)."""
        return self._left if self._state == _LENGTH else 0

    @property
    def idle(self) -> bool:
        """Between messages: no head or body is partly parsed (buffered bytes aside)."""
        return self._state in (_HEAD, _IDLE)

    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer.

        Raises:
            LocalProtocolError: the peer's EOF was already fed.
        """
        if self._eof:
            raise LocalProtocolError("bytes fed after EOF")
        self._buf._data += data

    def feed_eof(self) -> None:
        """The peer closed its side: no more bytes will come."""
        self._eof = True

    def unparsed(self) -> bytes:
        """Remove and return the bytes not turned into events yet (e.g. to hand off)."""
        return self._buf.clear()

    def expect_response(self, method: bytes, *, upgrade: bool = False) -> None:
        """Client role: a request was sent; parse its response (``HEAD``: no body).

        ``upgrade``: the request asked to switch protocols (``Upgrade``), so a ``101``
        may come; it is returned as an :class:`InformationalResponse`, after which the
        bytes are no longer HTTP: take them with :meth:`unparsed` and stop parsing.

        Raises:
            LocalProtocolError: not a client-role parser, or a response is still being
                parsed.
        """
        if not self.client or self._state != _IDLE:
            raise LocalProtocolError("expect_response() needs an idle client-role parser")
        self._head_method = method == b"HEAD"
        self._upgrade = upgrade
        self._state = _HEAD

    def next_event(self) -> Event | None:
        """The next event, or ``None`` when more bytes are needed (or none are expected).

        Raises:
            RemoteProtocolError: the bytes break HTTP/1.1 framing (see the module notes).
        """
        state = self._state
        try:
            if state == _HEAD:
                return self._head()
            if state == _EOM:
                self._state = _IDLE if self.client else _HEAD
                return END
            if state == _LENGTH:
                buf = self._buf
                if not buf._data:
                    if self._eof:
                        raise _fail("connection closed inside a body")
                    return None
                data = buf.extract(self._left)
                self._left -= len(data)
                if self._left == 0:
                    self._state = _EOM
                return _new(Data, (data,))
            if state >= _CHUNK_SIZE and state <= _TRAILERS:
                return self._chunked()
            if state == _UNTIL_CLOSE:
                if len(self._buf):
                    return Data(self._buf.clear())
                if self._eof:
                    return self._end(END)
                return None
            if state == _ERROR:
                raise LocalProtocolError("the parser already reported a protocol error")
            return None  # _IDLE, _CLOSED
        except RemoteProtocolError:
            self._state = _ERROR
            raise

    def take_body(self) -> bytes | None:
        """The rest of a ``Content-Length`` body and the end of its message, in one step.

        What the :class:`Data` events up to :class:`EndOfMessage` would give, for a
        caller that wants the body whole (``b""`` for a message without one).

        Returns:
            The body, or ``None`` (nothing consumed) while part of it is still to come.

        Raises:
            LocalProtocolError: the body is chunked or read until close, or no message
                is being parsed.
        """
        state = self._state
        if state == _EOM:
            self._state = _IDLE if self.client else _HEAD
            return b""
        if state != _LENGTH:
            raise LocalProtocolError("take_body() needs a Content-Length body")
        buf = self._buf
        data = buf._data
        left = self._left
        n = len(data)
        if n < left:
            return None
        self._state = _IDLE if self.client else _HEAD
        self._left = 0
        buf._search = 0
        buf.steps += left
        if n == left:  # ReceiveBuffer.extract, inlined: the body is often all there is
            out = bytes(data)
            data.clear()
            return out
        out = bytes(data[:left])
        del data[:left]
        return out

    def try_request(self, data: bytes) -> tuple[Request, bytes | None] | None:
        """Server role: the common request at the start of ``data``, parsed in one call.

        The entry for a server's ``data_received`` when the parser is between messages
        and holds no bytes: if ``data`` starts with a head in the shape that the parser's
        fast path takes (see :meth:`_fast_request`), returns the :class:`Request` and its
        whole ``Content-Length`` body (``b""`` without one), and buffers what follows
        it, as :meth:`feed` and :meth:`next_event` up to the :class:`EndOfMessage`
        would. The body is ``None`` when it is chunked or not all there: the parser is
        then inside it (go on with :meth:`next_event` or :meth:`take_body`).

        Returns:
            ``None``, having changed nothing, for anything else (a partial, long, odd
            or malformed head, bytes already buffered): :meth:`feed` ``data`` and take
            the general path, which decides (and says what is wrong).
        """
        if self._state != _HEAD or self._buf._data or self.client:
            return None
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > MAX_LINE - 4 or end + 4 > self.max_head:
            return None
        end += 4
        n = len(data)
        head = data if end == n else data[:end]
        try:
            req = self._fast_request(head)
        except RemoteProtocolError:  # (the general rules of an HTTP/1.0 head)
            req = None
        if req is None:
            self._state = _HEAD
            return None
        buf = self._buf
        buf.steps += 3 * end
        if self._state == _EOM:
            self._state = _HEAD
            if end < n:
                buf._data += data[end:]
            return req, b""
        left = self._left
        if self._state == _LENGTH and n - end >= left:
            self._state = _HEAD
            self._left = 0
            buf.steps += left
            stop = end + left
            if stop < n:
                buf._data += data[stop:]
            return req, data[end:stop]
        if end < n:
            buf._data += data[end:]
        return req, None

    def try_response(self, data: bytes) -> tuple[Response, bytes | None] | None:
        """Client role: the common final response at the start of ``data``, in one call.

        As :meth:`try_request`, for a parser told of its request by
        :meth:`expect_response`: a final response head in the fast path's shape (see
        :meth:`_fast_response`) and, when all there, its ``Content-Length`` body. That
        shape has none of the hop-by-hop fields (:data:`HOP_BY_HOP`), so a proxy may
        forward the head as it came.

        Returns:
            ``None``, having changed nothing, for anything else (go the general way).
        """
        if self._state != _HEAD or self._buf._data or not self.client:
            return None
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > MAX_LINE - 4 or end + 4 > self.max_head:
            return None
        end += 4
        n = len(data)
        resp = self._fast_response(data if end == n else data[:end])
        if resp is None:
            return None
        buf = self._buf
        buf.steps += 3 * end
        if self._state == _EOM:
            self._state = _IDLE
            if end < n:
                buf._data += data[end:]
            return resp, b""
        left = self._left
        if n - end >= left:
            self._state = _IDLE
            self._left = 0
            buf.steps += left
            stop = end + left
            if stop < n:
                buf._data += data[stop:]
            return resp, data[end:stop]
        if end < n:
            buf._data += data[end:]
        return resp, None

    def _end(self, event: EndOfMessage) -> EndOfMessage:
        self._state = _IDLE if self.client else _HEAD
        return event

    # ---- heads ------------------------------------------------------------------------

    def _head(self) -> Request | Response | InformationalResponse | ConnectionClosed | None:
        buf = self._buf
        data = buf._data
        if not data:
            if self._eof:
                self._state = _CLOSED
                return ConnectionClosed()
            return None
        end = data.find(b"\r\n\r\n", buf._search)
        if end >= 0:  # the common case: the whole head came at once
            end += 4
            buf.steps += end - buf._search
        else:
            end = buf.find(b"\r\n\r\n")  # remembers where it stopped; finds bare CR/LF
        if end < 0:
            if len(buf) > self.max_head:
                raise _fail(f"head larger than {self.max_head} bytes", 431)
            first = buf.first_byte()
            if (first != 0x48) if self.client else (first not in _TCHARS):  # 0x48: "H"
                raise _fail("not an HTTP/1.1 message")
            if self._eof:
                raise _fail("connection closed inside a head")
            return None
        if end > self.max_head:
            raise _fail(f"head larger than {self.max_head} bytes", 431)
        whole = end == len(data)  # (often: a request without a body)
        head = bytes(data) if whole else bytes(data[:end])
        buf.steps += 2 * end  # the copy and the validation pass
        if end <= MAX_LINE:  # the common case: a few C passes and a dict lookup per field
            fast = self._fast_response(head) if self.client else self._fast_request(head)
            if fast is not None:
                if whole:
                    data.clear()
                else:
                    del data[:end]
                buf._search = 0
                return fast
        # The general path: something is wrong with the head (find what, for the error's
        # message), or it is long, or it is a 1xx answer.
        first = head.find(b"\r\n")
        if first > MAX_LINE:
            raise _fail(f"start line longer than {MAX_LINE} bytes", 414)
        block = head[first + 2 : -2]
        if self.client:
            line = head[:first]
            sl = _STATUS_LINE.match(line)
            if sl is None:
                raise _fail(f"malformed status line {line[:60]!r}")
            version, code, reason = sl.groups()
            event: Request | Response | InformationalResponse = self._response(
                version, code, reason, block, head, None
            )
        else:
            line = head[:first]
            rl = _REQUEST_LINE.match(line)
            if rl is None:
                raise _fail(f"malformed request line {line[:60]!r}")
            method, target, version = rl.groups()
            headers = _fields(block)
            event = self._request(method, target, version, headers, head, headers)
        del data[:end]  # only now: a head that fails stays buffered, for a hand-off
        buf._search = 0
        return event

    def _fast_request(self, head: bytes) -> Request | None:
        """:meth:`_request` of a head of at most :data:`MAX_LINE` bytes in the common
        shape, or ``None``: the general path decides (and says why).

        Whatever this accepts, the general path accepts with the same result (a
        differential test checks it). The bytes are checked by C passes: one
        ``translate`` leaves only the CRs and LFs (and forbidden bytes), which must be
        those of the lines' CRLFs; a field line or name known from an earlier head costs
        a dict lookup, a new name the token regex.
        """
        lines = head.split(b"\r\n")  # ends with b"", b"": the head ends with CRLF CRLF
        n = len(lines)
        if n > MAX_HEADERS + 3 or len(head.translate(None, _HEAD_BYTES)) != 2 * n - 2:
            return None  # a bare CR or LF, a control byte, or too many fields
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            return None
        method, target, version = parts
        if version == b"HTTP/1.1":
            version = b"1.1"
        elif version == b"HTTP/1.0":
            version = b"1.0"
        else:
            return None
        if method not in _KNOWN_METHODS:
            if _TOKEN.match(method) is None:
                return None
            if len(_KNOWN_METHODS) < _KNOWN_MAX:
                _KNOWN_METHODS.add(method)
        if not target or target.find(b"\t") >= 0 or not target.isascii():
            return None  # (the translate pass let HTAB and obs-text through)
        headers: list[Header] = []
        known = _KNOWN_NAMES
        # The common framing inline: one Host, at most one Content-Length (digits).
        host = length = None
        common = True
        known_fields = _KNOWN_FIELDS
        for line in lines[1 : n - 2]:
            field = known_fields.get(line)
            if field is None:
                name, colon, value = line.partition(b":")
                lname = known.get(name)
                if lname is None:
                    if _FIELD_NAME.match(name) is None:
                        return None  # empty, not a token (space before the colon), obs-fold
                    lname = name.lower()
                    if len(known) < _KNOWN_MAX:
                        known[name] = lname
                if not colon:
                    return None
                field = (name, lname, value.strip(b" \t"))
                if len(line) <= _KNOWN_FIELD_MAX and len(known_fields) < _KNOWN_MAX:
                    known_fields[line] = field
            headers.append(field)
            _, lname, value = field
            if lname in _FRAMING_NAMES:
                if lname == b"host" and host is None:
                    host = value
                elif lname == b"content-length" and length is None and value.isdigit():
                    if len(value) > 18:
                        return None
                    length = int(value)
                else:  # Transfer-Encoding, Connection, duplicates: the general rules
                    common = False
        if not common or version != b"1.1":
            return self._request(method, target, version, headers, head, headers)
        if host is None:
            return None
        if host not in _KNOWN_HOSTS:
            if _HOST.match(host) is None:
                return None
            if len(_KNOWN_HOSTS) < _KNOWN_MAX:
                _KNOWN_HOSTS.add(host)
        if length:
            self._state, self._left = _LENGTH, length
        else:
            self._state = _EOM
        return _new(
            Request,
            (method, target, version, tuple(headers), length, False, True, _NO_TOKENS, host, head),
        )

    def _fast_response(self, head: bytes) -> Response | None:
        """:meth:`_response` of a final response head of at most :data:`MAX_LINE`
        bytes in the common shape, or ``None`` (as for :meth:`_fast_request`).

        One regex validates the head and finds its one ``Content-Length`` (and that
        there is no ``Transfer-Encoding``, ``Connection`` or other :data:`HOP_BY_HOP`
        field).
        """
        r = _COMMON_RESPONSE.fullmatch(head)
        if r is None or (len(head) > 4 * MAX_HEADERS and head.count(b"\r\n") > MAX_HEADERS + 2):
            return None  # (a field line takes at least 4 bytes)
        minor, code, reason, value = r.groups()
        length = int(value)
        status = _STATUS_CODES.get(code) or int(code)
        body = BODY_LENGTH
        if self._head_method or status == 204 or status == 304:
            body = BODY_NONE
            self._state = _EOM
        elif length:
            self._state, self._left = _LENGTH, length
        else:
            self._state = _EOM
        return _new(
            Response,
            (
                status,
                reason or b"",
                _MINOR_VERSIONS[minor],
                length,
                body,
                minor == b"1",
                _NO_TOKENS,
                head,
            ),
        )

    def _request(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: list[Header],
        raw: bytes,
        framing: list[Header],
    ) -> Request:
        """The :class:`Request` of a validated head; ``framing``: its fields that
        :func:`_framing` reads (or all of them)."""
        if version not in _VERSIONS:
            raise _fail(f"HTTP version {version.decode()} is not supported")
        length, chunked, connection, host, hosts = _framing(framing, version, True)
        if hosts > 1:
            raise _fail("more than one Host")
        if host is not None and _HOST.match(host) is None:
            raise _fail(f"invalid Host {host[:60]!r}")
        if version == b"1.1":
            if host is None:
                raise _fail("missing Host")
            keep_alive = b"close" not in connection
        else:
            keep_alive = b"keep-alive" in connection and b"close" not in connection
        if chunked:
            self._state, self._left = _CHUNK_SIZE, 0
        elif length:
            self._state, self._left = _LENGTH, length
        else:
            self._state = _EOM
        return _new(
            Request,
            (
                method,
                target,
                version,
                tuple(headers),
                length,
                bool(chunked),
                keep_alive,
                connection,
                host,
                raw,
            ),
        )

    def _response(
        self,
        version: bytes,
        code: bytes,
        reason: bytes | None,
        block: bytes,
        raw: bytes,
        framing: list[Header] | None,
    ) -> Response | InformationalResponse:
        """The event of a response head; ``framing``: its framing fields, if known
        (``None``: validate ``block``, the field lines, and find them)."""
        if version not in _VERSIONS:
            raise _fail(f"HTTP version {version.decode()} is not supported", 505)
        status = int(code)
        if status < 100:
            raise _fail(f"status {status} out of range")
        if status < 200:
            if status == 101 and not self._upgrade:
                raise _fail("101 Switching Protocols was not asked for")
            return InformationalResponse(status, reason or b"", tuple(_fields(block)), raw)
        if framing is None:
            framing = _framing_fields(block, raw)
        length, chunked, connection, _, _ = _framing(framing, version, False)
        if version == b"1.1":
            keep_alive = b"close" not in connection
        else:
            keep_alive = b"keep-alive" in connection and b"close" not in connection
        if self._head_method or status in (204, 304):
            body = BODY_NONE
            self._state = _EOM
        elif chunked:
            body = BODY_CHUNKED
            self._state, self._left = _CHUNK_SIZE, 0
        elif chunked is False or length is None:
            body = BODY_UNTIL_CLOSE
            keep_alive = False
            self._state = _UNTIL_CLOSE
        elif length:
            body = BODY_LENGTH
            self._state, self._left = _LENGTH, length
        else:
            body = BODY_LENGTH
            self._state = _EOM
        return _new(
            Response,
            (status, reason or b"", version, length, body, keep_alive, connection, raw),
        )

    # ---- chunked bodies -----------------------------------------------------------------

    def _chunked(self) -> Data | EndOfMessage | None:
        buf = self._buf
        while True:
            state = self._state
            if state == _CHUNK_DATA:
                if not len(buf):
                    break
                data = buf.extract(self._left)
                self._left -= len(data)
                if self._left == 0:
                    self._state = _CHUNK_CRLF
                return Data(data)
            if state == _CHUNK_CRLF:
                if len(buf) < 2:
                    break
                if buf.peek(2) != b"\r\n":
                    raise _fail("chunk data not followed by CRLF")
                buf.extract(2)
                self._state = _CHUNK_SIZE
                continue
            if state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_CHUNK_LINE:
                        raise _fail(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
                    break
                if end > MAX_CHUNK_LINE:
                    raise _fail(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
                line = buf.extract(end)[:-2]
                m = _CHUNK_LINE.match(line)
                if m is None:
                    raise _fail(f"malformed chunk-size line {line[:40]!r}")
                size = int(m.group(1), 16)
                if size == 0:
                    self._state = _TRAILERS
                    continue
                self._state, self._left = _CHUNK_DATA, size
                continue
            # _TRAILERS: an empty line, or field lines and an empty line
            if len(buf) < 2:
                break
            if buf.startswith(b"\r\n"):
                buf.extract(2)
                return self._end(END)
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.max_head:
                    raise _fail(f"trailer section larger than {self.max_head} bytes", 431)
                break
            block = buf.peek(end)[:-2]
            trailers = _fields(block, False, True)
            for _, name, _ in trailers:
                if name in _NOT_TRAILERS:
                    raise _fail(f"{name.decode()} is not allowed in a trailer section")
            buf.extract(end)
            return self._end(EndOfMessage(tuple(trailers)))
        if self._eof:
            raise _fail("connection closed inside a chunked body")
        return None


def render_head(start_line: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A message head: the start line, ``name: value`` lines, and the blank line.

    Raises:
        LocalProtocolError: a name is not a token, or a value holds CR, LF or NUL
            (or starts or ends with whitespace).
    """
    lines = [start_line]
    for name, value in headers:
        if _TOKEN.match(name) is None:
            raise LocalProtocolError(f"invalid field name {name[:40]!r}")
        if _VALUE.match(value) is None:
            raise LocalProtocolError(f"invalid field value {value[:40]!r}")
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def valid_host(value: bytes) -> bool:
    """Whether ``value`` is a syntactically valid ``Host`` (``uri-host [":" port]``)."""
    return _HOST.match(value) is not None


__all__ = [
    "BODY_CHUNKED",
    "BODY_LENGTH",
    "BODY_NONE",
    "BODY_UNTIL_CLOSE",
    "END",
    "HOP_BY_HOP",
    "MAX_CHUNK_LINE",
    "MAX_HEAD",
    "MAX_HEADERS",
    "MAX_LINE",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "Event",
    "Header",
    "InformationalResponse",
    "Parser",
    "ReceiveBuffer",
    "Request",
    "Response",
    "render_head",
    "valid_host",
]
