"""The replicated stream state machine (pure: no I/O, no clock, no asyncio).

Theory of operation
-------------------
A *stream* is an append-only log of messages (subject, headers, bytes payload, sequence,
timestamp) that captures the subjects matching its patterns. A *consumer* is a cursor
into one stream plus the set of messages delivered but not yet acknowledged. Both live in
one :class:`StreamStateMachine` that every Raft replica applies the same commands to, in
the same order; nothing here reads a clock or a random source, so every replica reaches
the same state, and a consumer's acknowledged floor survives a leader failover.

* **Time.** The leader stamps every command with its wall-clock ``now_ms``; the state
  machine keeps ``clock_ms = max(clock_ms, now_ms)``. Ack deadlines, the dedup window,
  ``max_age`` and ephemeral consumers' inactivity all compare against that replicated
  clock, never a replica's own. The server proposes a :class:`Tick` now and then so that
  idle streams age out too.
* **Publish** appends after the checks: the subject is captured by the stream, the
  payload fits, a message id seen within ``duplicate_window_ms`` answers the first
  sequence (``duplicate=True``) instead of appending, and ``expected_last_seq`` (optimistic
  concurrency) must equal the stream's last sequence. Then the retention limits are
  applied (``max_msgs``, ``max_bytes``, ``max_age``; ``discard="old"`` drops the oldest,
  ``"new"`` refuses the publish).
* **Delivery is a replicated decision.** A :class:`Fetch` asks for up to ``batch``
  messages for one worker of a consumer. It first hands out *due* pending messages (ack
  deadline passed, or nak delay over), then new ones from the cursor, at most
  ``max_ack_pending`` unacknowledged at a time. Every delivery is a pending entry
  ``(deliveries, deadline, worker)``. A message due again after ``max_deliver``
  deliveries is moved to the dead-letter stream with the reason instead.
* **Acks** name the delivery they answer, ``(seq, deliveries)``: an ack of a message that
  has since been redelivered (the worker was too slow) is ``stale`` and changes nothing,
  so a stale worker can never complete what another now holds. ``nak`` makes the message
  due after a delay, ``progress`` extends the deadline, ``term`` dead-letters it now.
  With ``ack_policy="all"`` an ack covers every pending message up to its sequence; with
  ``"none"`` nothing is pending. On a work-queue stream an acked message is deleted.

Delivery states of one message for one consumer::

    available --Fetch--> pending(n=1) --ack--> acked (deleted on a work-queue stream)
                            |   ^  |--nak(delay) / deadline passes--> due --Fetch--> pending(n+1)
                            |   '--progress (deadline extended)
                            '--term, or due with n >= max_deliver--> dead-letter stream

* **Snapshots** encode everything (streams, messages, dedup tables, consumers) as msgpack;
  the Raft node snapshots and compacts its log, so disk use is bounded by the retention
  limits plus the snapshot interval.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeGuard, cast

from sortedcontainers import SortedDict

from dsys.codec import decode, encode
from dsys.errors import RemoteProtocolError
from dsys.pubsub.subjects import matches, validate_pattern, validate_subject

MAX_COMMAND_BYTES = 16 * 1024 * 1024
"""Largest encoded command accepted."""

SNAPSHOT_MAX_BYTES = 4 << 30
"""Largest snapshot encoded or decoded."""

MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
"""Upper bound of any stream's ``max_msg_size``."""

MAX_HEADERS_BYTES = 64 * 1024
"""Largest total size of one message's header names and values."""

MAX_HEADERS = 64
"""Most headers on one message."""

MAX_BATCH = 10_000
"""Most messages one fetch may ask for."""

MAX_DEDUP_IDS = 250_000
"""Most message ids a stream remembers for deduplication: past it the oldest id is
forgotten before its window ends (JetStream bounds the table only by time; at 10,000
msg/s a 2-minute window would hold 1.2 million ids)."""

MAX_STREAMS = 1_000
MAX_CONSUMERS = 10_000
"""Most consumers on one stream."""

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
"""A stream's ``max_bytes`` when none is given (every stream is bounded in memory)."""

NOT_BEFORE_HEADER = "dsys-not-before"
"""A message with this header (milliseconds since the epoch, decimal) is not delivered
before that replicated-clock time (delayed and scheduled jobs use it)."""

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RETENTION = ("limits", "workqueue")
_DISCARD = ("old", "new")
_DELIVER = ("all", "new", "last", "by_start_seq", "by_start_time")
_ACK = ("explicit", "all", "none")
_ACK_KINDS = ("ack", "nak", "progress", "term")


class InvalidCommand(Exception):
    """A command's fields are missing, of the wrong type or out of range."""


def validate_name(name: object, what: str = "stream name") -> str:
    """Check a stream or consumer name: 1 to 64 of ``A-Z a-z 0-9 _ -``.

    Raises:
        InvalidCommand: the name is not acceptable.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidCommand(f"{what} must be 1-64 characters of A-Z a-z 0-9 _ -, got {name!r}")
    return name


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidCommand(message)


def _is_int(v: object) -> TypeGuard[int]:
    return type(v) is int


# -- configuration -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamConfig:
    """What a stream captures and how much of it it keeps.

    Attributes:
        name: the stream's name (``A-Z a-z 0-9 _ -``, at most 64).
        subjects: subject patterns captured (``orders.>``); may be empty for a stream
            only published to by name (a dead-letter stream).
        retention: ``"limits"`` (keep until a limit drops it) or ``"workqueue"`` (a
            message is deleted once acknowledged).
        max_msgs: most messages kept (0 = no count limit).
        max_bytes: most payload + header bytes kept (every stream is bounded).
        max_age_ms: messages older than this are dropped (0 = no age limit).
        max_msg_size: largest payload accepted.
        discard: when a limit is reached, drop the ``"old"``-est messages or refuse
            ``"new"`` ones.
        duplicate_window_ms: how long a message id is remembered for deduplication
            (and at most the last :data:`MAX_DEDUP_IDS` ids).
        dead_letter: stream that receives messages a consumer gave up on ("" = the
            stream ``<name>-dlq``, created on first use).
    """

    name: str
    subjects: tuple[str, ...] = ()
    retention: str = "limits"
    max_msgs: int = 0
    max_bytes: int = DEFAULT_MAX_BYTES
    max_age_ms: int = 0
    max_msg_size: int = 1024 * 1024
    discard: str = "old"
    duplicate_window_ms: int = 120_000
    dead_letter: str = ""

    def __post_init__(self) -> None:
        validate_name(self.name)
        _check(
            isinstance(self.subjects, tuple) and len(self.subjects) <= 64,
            "subjects must be a list of at most 64 patterns",
        )
        for p in self.subjects:
            try:
                validate_pattern(p)
            except ValueError as exc:
                raise InvalidCommand(str(exc)) from None
        _check(len(set(self.subjects)) == len(self.subjects), "subjects repeat a pattern")
        _check(self.retention in _RETENTION, f"retention must be one of {_RETENTION}")
        _check(self.discard in _DISCARD, f"discard must be one of {_DISCARD}")
        for name in ("max_msgs", "max_age_ms", "duplicate_window_ms"):
            v = getattr(self, name)
            _check(_is_int(v) and 0 <= v <= 1 << 53, f"{name} must be an integer >= 0")
        _check(
            _is_int(self.max_bytes) and 0 < self.max_bytes <= 1 << 40,
            "max_bytes must be an integer between 1 and 2**40",
        )
        _check(
            _is_int(self.max_msg_size) and 0 < self.max_msg_size <= MAX_PAYLOAD_BYTES,
            f"max_msg_size must be between 1 and {MAX_PAYLOAD_BYTES}",
        )
        if self.dead_letter:
            validate_name(self.dead_letter, "dead_letter")
            _check(self.dead_letter != self.name, "a stream cannot be its own dead-letter stream")

    @property
    def dead_letter_stream(self) -> str:
        """The name of the stream that receives this stream's dead letters."""
        return self.dead_letter or f"{self.name}-dlq"[:64]

    def to_plain(self) -> dict[str, Any]:
        """JSON/msgpack-able form."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["subjects"] = list(self.subjects)
        return d

    @classmethod
    def from_plain(cls, value: object) -> StreamConfig:
        """Build from :meth:`to_plain` output (or a user's JSON), checking every field.

        Raises:
            InvalidCommand: unknown fields, wrong types or values out of range.
        """
        return cast(StreamConfig, _from_plain(cls, value, {"subjects": tuple}))


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerConfig:
    """How a consumer reads its stream.

    Attributes:
        name: the consumer's name; durable consumers are kept until deleted.
        durable: False = ephemeral, deleted after ``inactive_threshold_ms`` unused.
        filter_subject: only messages matching this pattern ("" = all).
        deliver_policy: where a new consumer starts: ``"all"``, ``"new"``, ``"last"``,
            ``"by_start_seq"`` (``opt_start_seq``) or ``"by_start_time"``
            (``opt_start_time_ms``).
        ack_policy: ``"explicit"`` (each message), ``"all"`` (an ack covers everything
            pending up to it) or ``"none"`` (delivered = done).
        ack_wait_ms: how long a delivery may stay unacknowledged before redelivery.
        max_deliver: deliveries before a message goes to the dead-letter stream (0 =
            unlimited).
        max_ack_pending: most delivered-but-unacknowledged messages (flow control).
        inactive_threshold_ms: an ephemeral consumer unused this long is deleted.
    """

    name: str
    durable: bool = True
    filter_subject: str = ""
    deliver_policy: str = "all"
    opt_start_seq: int = 0
    opt_start_time_ms: int = 0
    ack_policy: str = "explicit"
    ack_wait_ms: int = 30_000
    max_deliver: int = 0
    max_ack_pending: int = 1_000
    inactive_threshold_ms: int = 5_000

    def __post_init__(self) -> None:
        validate_name(self.name, "consumer name")
        _check(type(self.durable) is bool, "durable must be a boolean")
        if self.filter_subject:
            try:
                validate_pattern(self.filter_subject)
            except ValueError as exc:
                raise InvalidCommand(str(exc)) from None
        _check(self.deliver_policy in _DELIVER, f"deliver_policy must be one of {_DELIVER}")
        _check(self.ack_policy in _ACK, f"ack_policy must be one of {_ACK}")
        for name in ("opt_start_seq", "opt_start_time_ms", "max_deliver"):
            v = getattr(self, name)
            _check(_is_int(v) and 0 <= v <= 1 << 53, f"{name} must be an integer >= 0")
        _check(
            _is_int(self.ack_wait_ms) and 1 <= self.ack_wait_ms <= 86_400_000,
            "ack_wait_ms must be between 1 and 86400000 (a day)",
        )
        _check(
            _is_int(self.max_ack_pending) and 1 <= self.max_ack_pending <= 1_000_000,
            "max_ack_pending must be between 1 and 1000000",
        )
        _check(
            _is_int(self.inactive_threshold_ms)
            and 1 <= self.inactive_threshold_ms <= 86_400_000 * 30,
            "inactive_threshold_ms must be between 1 and 30 days",
        )
        if self.deliver_policy == "by_start_seq":
            _check(self.opt_start_seq >= 1, "by_start_seq needs opt_start_seq >= 1")

    def to_plain(self) -> dict[str, Any]:
        """JSON/msgpack-able form."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_plain(cls, value: object) -> ConsumerConfig:
        """Build from :meth:`to_plain` output (or a user's JSON), checking every field.

        Raises:
            InvalidCommand: unknown fields, wrong types or values out of range.
        """
        return cast(ConsumerConfig, _from_plain(cls, value, {}))


def _from_plain(cls: Any, value: object, convert: Mapping[str, Callable[[Any], Any]]) -> Any:
    if not isinstance(value, dict):
        raise InvalidCommand(f"{cls.__name__} must be a map")
    names = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in value if k not in names)
    if unknown:
        raise InvalidCommand(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    kwargs = dict(value)
    for k, conv in convert.items():
        if k in kwargs:
            if not isinstance(kwargs[k], (list, tuple)):
                raise InvalidCommand(f"{k} must be a list")
            kwargs[k] = conv(kwargs[k])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InvalidCommand(f"bad {cls.__name__}: {exc}") from None


# -- messages, deliveries and results ---------------------------------------------------


@dataclass(slots=True)
class Message:
    """One stored message.

    Attributes:
        seq: its sequence in the stream (1, 2, ...; gaps where messages were deleted).
        ts_ms: the replicated-clock time it was stored.
    """

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes
    ts_ms: int

    @property
    def size(self) -> int:
        """Bytes counted against ``max_bytes``."""
        return _msg_size(self.subject, self.headers, self.data)

    def to_plain(self) -> list[Any]:
        """Compact list form."""
        return [self.seq, self.subject, self.headers, self.data, self.ts_ms]


def _msg_size(subject: str, headers: Mapping[str, str], data: bytes) -> int:
    return len(data) + len(subject) + sum(len(k) + len(v) for k, v in headers.items())


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message handed to a worker: ack it with ``(seq, deliveries)``.

    Attributes:
        deliveries: how many times this message was delivered to this consumer,
            this time included; an ack must name it.
        pending: unacknowledged messages of the consumer after this fetch.
    """

    message: Message
    deliveries: int


@dataclass(slots=True)
class PubAck:
    """A publish committed (or was a duplicate of one that did)."""

    stream: str
    seq: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Fetched:
    """The deliveries a fetch produced (possibly none) and the consumer's pending count."""

    deliveries: list[Delivery]
    pending: int


@dataclass(frozen=True, slots=True)
class AckResult:
    """One answer per acknowledged delivery: ``ok``, ``stale`` or ``not_pending``."""

    statuses: list[str]


@dataclass(frozen=True, slots=True)
class Done:
    """A command that changes configuration or deletes things succeeded."""

    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Error:
    """A command was refused; nothing changed.

    Attributes:
        code: ``not_found``, ``exists``, ``conflict`` (expected-last-sequence or a
            config clash), ``full`` (a limit with ``discard="new"``), ``too_large`` or
            ``invalid``.
    """

    code: str
    message: str
    info: dict[str, Any] = field(default_factory=dict)


Outcome = PubAck | Fetched | AckResult | Done | Error
"""What applying a command returns."""


# -- commands ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    """Append a message to ``stream`` (or, when "", the stream capturing ``subject``)."""

    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    stream: str = ""
    msg_id: str = ""
    expected_last_seq: int | None = None
    now_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AddStream:
    """Create a stream, or update it when ``update`` (only limits may change)."""

    config: StreamConfig
    update: bool = False
    now_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteStream:
    """Delete a stream with its messages and consumers."""

    stream: str
    now_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Purge:
    """Delete a stream's messages (all, or those matching ``subject``) below ``upto_seq``."""

    stream: str
    subject: str = ""
    upto_seq: int = 0
    now_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteMessage:
    """Delete one message by sequence."""

    stream: str
    seq: int
    now_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AddConsumer:
    """Create a consumer on ``stream`` (an identical existing one is fine)."""

    stream: str
    config: ConsumerConfig
    now_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteConsumer:
    """Delete a consumer and its pending list."""

    stream: str
    consumer: str
    now_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetch:
    """Deliver up to ``batch`` messages of a consumer to ``worker``."""

    stream: str
    consumer: str
    batch: int
    worker: str = ""
    now_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """Answer deliveries: ``acks`` is a list of ``(seq, deliveries)``.

    Attributes:
        kind: ``ack``, ``nak`` (redeliver after ``delay_ms``), ``progress`` (extend
            the deadline by ``ack_wait``) or ``term`` (dead-letter it now).
        reason: for ``term``, why (kept on the dead letter).
    """

    stream: str
    consumer: str
    acks: tuple[tuple[int, int], ...]
    kind: str = "ack"
    delay_ms: int = 0
    reason: str = ""
    now_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """Hand pending deliveries idle for ``min_idle_ms`` to ``worker`` (XAUTOCLAIM)."""

    stream: str
    consumer: str
    worker: str
    min_idle_ms: int
    count: int
    now_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """Make every delivery held by ``worker`` due now (its connection went away)."""

    stream: str
    consumer: str
    worker: str
    now_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """Advance the replicated clock: age out messages, dedup ids and idle consumers."""

    now_ms: int


Command = (
    Publish
    | AddStream
    | DeleteStream
    | Purge
    | DeleteMessage
    | AddConsumer
    | DeleteConsumer
    | Fetch
    | Ack
    | Claim
    | Release
    | Tick
)
"""A state-machine command."""

_TAGS: dict[type[Any], int] = {
    Publish: 1,
    AddStream: 2,
    DeleteStream: 3,
    Purge: 4,
    DeleteMessage: 5,
    AddConsumer: 6,
    DeleteConsumer: 7,
    Fetch: 8,
    Ack: 9,
    Claim: 10,
    Release: 11,
    Tick: 12,
}
_BY_TAG = {tag: cls for cls, tag in _TAGS.items()}
_FIELDS = {cls: fields(cls) for cls in _TAGS}


def encode_command(cmd: Command) -> bytes:
    """Encode a command as a msgpack list ``[tag, field, ...]`` (one log entry's data)."""
    if type(cmd) is Publish:  # the hot path, without dataclasses.fields()
        plain: list[Any] = [
            1,
            cmd.subject,
            cmd.data,
            cmd.headers,
            cmd.stream,
            cmd.msg_id,
            cmd.expected_last_seq,
            cmd.now_ms,
        ]
        return encode(plain, max_size=MAX_COMMAND_BYTES)
    plain = [_TAGS[type(cmd)]]
    for f in fields(cmd):
        v = getattr(cmd, f.name)
        if isinstance(v, (StreamConfig, ConsumerConfig)):
            v = v.to_plain()
        elif isinstance(v, tuple):
            v = [list(x) if isinstance(x, tuple) else x for x in v]
        plain.append(v)
    return encode(plain, max_size=MAX_COMMAND_BYTES)


def decode_command(data: bytes) -> Command:
    """Decode :func:`encode_command` output, checking every field.

    Raises:
        RemoteProtocolError: malformed bytes.
        InvalidCommand: well-formed but invalid fields.
    """
    v = decode(data, max_size=MAX_COMMAND_BYTES)
    if not isinstance(v, list) or not v or v[0] not in _BY_TAG:
        raise RemoteProtocolError("a stream command must be a list starting with a known tag")
    cls = _BY_TAG[v[0]]
    fs = _FIELDS[cls]
    if len(v) != len(fs) + 1:
        raise RemoteProtocolError(f"{cls.__name__} needs {len(fs)} fields, got {len(v) - 1}")
    kwargs = {f.name: val for f, val in zip(fs, v[1:], strict=True)}
    return build_command(cls, kwargs)


def build_command(cls: type[Any], kwargs: dict[str, Any]) -> Command:
    """Build and check a command of class ``cls`` from plain field values.

    This is where every command's field types are checked, for commands decoded from
    the log and for requests from clients alike.

    Raises:
        InvalidCommand: a field is missing, of the wrong type or out of range.
    """
    if cls is Publish:
        return _build_publish(kwargs)
    kw = dict(kwargs)
    now = kw.get("now_ms", 0)
    _check(_is_int(now) and now >= 0, "now_ms must be an integer >= 0")
    if "stream" in kw:
        validate_name(kw["stream"])
    if "consumer" in kw:
        validate_name(kw["consumer"], "consumer name")
    if cls is AddStream:
        cfg = kw.get("config")
        kw["config"] = cfg if isinstance(cfg, StreamConfig) else StreamConfig.from_plain(cfg)
        _check(type(kw.get("update", False)) is bool, "update must be a boolean")
    elif cls is AddConsumer:
        cfg = kw.get("config")
        kw["config"] = cfg if isinstance(cfg, ConsumerConfig) else ConsumerConfig.from_plain(cfg)
    elif cls is Purge:
        subject = kw.get("subject", "")
        _check(type(subject) is str, "subject must be a string")
        if subject:
            try:
                validate_pattern(subject)
            except ValueError as exc:
                raise InvalidCommand(str(exc)) from None
        upto = kw.get("upto_seq", 0)
        _check(_is_int(upto) and upto >= 0, "upto_seq must be an integer >= 0")
    elif cls is DeleteMessage:
        _check(_is_int(kw.get("seq")) and kw["seq"] >= 1, "seq must be an integer >= 1")
    elif cls is Fetch:
        b = kw.get("batch")
        _check(_is_int(b) and 1 <= b <= MAX_BATCH, f"batch must be between 1 and {MAX_BATCH}")
        _check(_check_worker(kw.get("worker", "")), "worker must be a string of <= 128")
    elif cls is Ack:
        acks: Any = kw.get("acks")
        _check(
            isinstance(acks, (list, tuple)) and 1 <= len(acks) <= MAX_BATCH,
            f"acks must be a list of 1 to {MAX_BATCH} [seq, deliveries] pairs",
        )
        pairs = []
        for a in acks or ():
            _check(
                isinstance(a, (list, tuple))
                and len(a) == 2
                and _is_int(a[0])
                and _is_int(a[1])
                and a[0] >= 1
                and a[1] >= 0,
                "each ack must be [seq >= 1, deliveries >= 0]",
            )
            pairs.append((a[0], a[1]))
        kw["acks"] = tuple(pairs)
        _check(kw.get("kind", "ack") in _ACK_KINDS, f"kind must be one of {_ACK_KINDS}")
        d = kw.get("delay_ms", 0)
        _check(_is_int(d) and 0 <= d <= 86_400_000 * 30, "delay_ms must be 0..30 days")
        r = kw.get("reason", "")
        _check(type(r) is str and len(r) <= 1024, "reason must be a string of <= 1024")
    elif cls is Claim:
        _check(_check_worker(kw.get("worker")), "worker must be a string of <= 128")
        m = kw.get("min_idle_ms")
        _check(_is_int(m) and m >= 0, "min_idle_ms must be an integer >= 0")
        c = kw.get("count")
        _check(_is_int(c) and 1 <= c <= MAX_BATCH, f"count must be between 1 and {MAX_BATCH}")
    elif cls is Release:
        _check(_check_worker(kw.get("worker")), "worker must be a string of <= 128")
    try:
        cmd: Command = cls(**kw)
    except TypeError as exc:
        raise InvalidCommand(f"bad {cls.__name__}: {exc}") from None
    return cmd


_PUBLISH_FIELDS = frozenset(
    ("subject", "data", "headers", "stream", "msg_id", "expected_last_seq", "now_ms")
)
_GOOD_SUBJECTS: dict[str, None] = {}  # subjects that passed validate_subject (bounded)


def _build_publish(kw: Mapping[str, Any]) -> Publish:
    """:func:`build_command` for ``Publish``, the hot path (every publish, on every replica)."""
    if not _PUBLISH_FIELDS.issuperset(kw):
        unknown = ", ".join(sorted(map(str, set(kw) - _PUBLISH_FIELDS)))
        raise InvalidCommand(f"bad Publish: unexpected field(s) {unknown}")
    now = kw.get("now_ms", 0)
    if type(now) is not int or now < 0:
        raise InvalidCommand("now_ms must be an integer >= 0")
    stream = kw.get("stream", "")
    if stream != "":
        validate_name(stream)
    subject = kw.get("subject")
    if type(subject) is not str or subject not in _GOOD_SUBJECTS:
        try:
            validate_subject(subject)
        except ValueError as exc:
            raise InvalidCommand(str(exc)) from None
        subject = cast(str, subject)
        if len(_GOOD_SUBJECTS) >= 10_000:
            _GOOD_SUBJECTS.clear()
        _GOOD_SUBJECTS[subject] = None
    data = kw.get("data")
    if type(data) is not bytes:
        raise InvalidCommand("data must be bytes")
    headers = kw.get("headers", {})
    if type(headers) is not dict or headers:
        headers = check_headers(headers)
    msg_id = kw.get("msg_id", "")
    if type(msg_id) is not str or len(msg_id) > 256:
        raise InvalidCommand("msg_id must be a string of <= 256")
    els = kw.get("expected_last_seq")
    if els is not None and (type(els) is not int or els < 0):
        raise InvalidCommand("expected_last_seq must be >= 0")
    return Publish(
        subject=subject,
        data=data,
        headers=headers,
        stream=stream,
        msg_id=msg_id,
        expected_last_seq=els,
        now_ms=now,
    )


def _check_worker(w: object) -> bool:
    return type(w) is str and len(w) <= 128


def check_headers(headers: object) -> dict[str, str]:
    """Check message headers: a map of at most 64 string names to string values.

    Raises:
        InvalidCommand: wrong types, too many, or too large in total.
    """
    if not isinstance(headers, dict):
        raise InvalidCommand("headers must be a map of strings to strings")
    _check(len(headers) <= MAX_HEADERS, f"at most {MAX_HEADERS} headers")
    total = 0
    for k, v in headers.items():
        _check(
            type(k) is str and type(v) is str and 0 < len(k) <= 256,
            "header names must be non-empty strings (<= 256) and values strings",
        )
        total += len(k) + len(v)
    _check(total <= MAX_HEADERS_BYTES, f"headers are larger than {MAX_HEADERS_BYTES} bytes")
    return headers


# -- state --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    deliveries: int  # 0 = not delivered yet (held back by a not-before header)
    delivered_ms: int
    deadline_ms: int
    worker: str
    token: int  # matches the timer heap entry that is current


@dataclass(slots=True)
class ConsumerState:
    """A consumer's replicated state (see the module docstring).

    Attributes:
        next_seq: the next stream sequence not yet considered for a first delivery.
        ack_floor: every message up to this sequence is acknowledged (or gone).
    """

    config: ConsumerConfig
    created_ms: int
    next_seq: int
    ack_floor: int
    last_active_ms: int
    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    dead_lettered: int = 0
    pending: dict[int, _Pending] = field(default_factory=dict)
    timers: list[tuple[int, int, int]] = field(default_factory=list)  # (deadline, seq, token)
    in_flight: int = 0  # pending entries with deliveries > 0
    _token: int = 0

    def _set(self, seq: int, p: _Pending) -> None:
        self._token += 1
        p.token = self._token
        old = self.pending.get(seq)
        if old is not None and old.deliveries > 0:
            self.in_flight -= 1
        self.pending[seq] = p
        if p.deliveries > 0:
            self.in_flight += 1
        heapq.heappush(self.timers, (p.deadline_ms, seq, p.token))

    def _drop(self, seq: int) -> _Pending | None:
        p = self.pending.pop(seq, None)
        if p is not None and p.deliveries > 0:
            self.in_flight -= 1
        return p

    def _advance_floor(self, last_seq: int) -> None:
        # invariant: ``pending`` is in sequence order (entries are added as the cursor
        # moves forward and updated in place), so its first key is its smallest
        floor = next(iter(self.pending)) - 1 if self.pending else self.next_seq - 1
        self.ack_floor = max(self.ack_floor, min(floor, last_seq))

    def info(self, now_ms: int, stream: _Stream) -> dict[str, Any]:
        """A JSON-able summary."""
        return {
            "stream": stream.config.name,
            "name": self.config.name,
            "config": self.config.to_plain(),
            "created_ms": self.created_ms,
            "next_seq": self.next_seq,
            "ack_floor": self.ack_floor,
            "num_ack_pending": self.in_flight,
            "num_waiting_delayed": len(self.pending) - self.in_flight,
            "num_pending": stream.count_from(self.next_seq, self.config.filter_subject),
            "delivered": self.delivered,
            "redelivered": self.redelivered,
            "acked": self.acked,
            "dead_lettered": self.dead_lettered,
            "idle_ms": max(0, now_ms - self.last_active_ms),
        }


class _Stream:
    def __init__(self, config: StreamConfig, created_ms: int) -> None:
        self.config = config
        self.created_ms = created_ms
        self.msgs: SortedDict = SortedDict()  # seq -> Message
        self.bytes = 0
        self.last_seq = 0
        self.last_ts_ms = 0
        self.dedup: dict[str, tuple[int, int]] = {}  # msg_id -> (seq, ts_ms), by time
        self.consumers: dict[str, ConsumerState] = {}

    @property
    def first_seq(self) -> int:
        return int(self.msgs.keys()[0]) if self.msgs else self.last_seq + 1

    def count_from(self, seq: int, pattern: str) -> int:
        keys = self.msgs.keys()
        start: int = self.msgs.bisect_left(seq)
        if not pattern:
            return len(keys) - start
        # bounded: counting a filtered backlog costs one pass over it
        return sum(1 for s in keys[start:] if matches(pattern, self.msgs[s].subject))

    def remove(self, seq: int) -> Message | None:
        m: Message | None = self.msgs.pop(seq, None)
        if m is not None:
            self.bytes -= m.size
        return m

    def info(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "config": self.config.to_plain(),
            "created_ms": self.created_ms,
            "messages": len(self.msgs),
            "bytes": self.bytes,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_ts_ms": self.last_ts_ms,
            "consumers": len(self.consumers),
        }


def patterns_overlap(a: str, b: str) -> bool:
    """Whether some subject matches both (valid) patterns."""
    at, bt = a.split("."), b.split(".")
    for i in range(max(len(at), len(bt))):
        x = at[i] if i < len(at) else None
        y = bt[i] if i < len(bt) else None
        if x == ">" or y == ">":
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != y and x != "*" and y != "*":
            return False
    return True


class StreamStateMachine:
    """Every stream and consumer of one Raft group, as every replica applies them.

    ``apply(data)`` returns an :data:`Outcome`; reads (``info``, ``get``, ``read``,
    ``pending``) look at the local state and are linearizable after a read barrier.
    """

    def __init__(self) -> None:
        self.clock_ms = 0
        self._streams: dict[str, _Stream] = {}
        self._route_cache: dict[str, str | None] = {}
        self.on_publish: Callable[[str, int], None] | None = None
        """Called after a message is appended (stream, seq): wakes waiting consumers."""

    # -- the Raft state-machine protocol -------------------------------------------------

    def apply(self, data: bytes) -> Outcome:
        """Decode and apply one committed command.

        A command that cannot be decoded is a replicated no-op answered ``invalid``
        (every replica decides the same), so a bad entry never wedges the log.
        """
        try:
            cmd = decode_command(data)
        except (RemoteProtocolError, InvalidCommand) as exc:
            return Error("invalid", str(exc))
        return self.apply_command(cmd)

    def apply_command(self, cmd: Command) -> Outcome:
        """Apply one decoded (and checked) command."""
        if cmd.now_ms > self.clock_ms:
            self.clock_ms = cmd.now_ms
        if isinstance(cmd, Publish):
            return self._publish(cmd)
        if isinstance(cmd, Fetch):
            return self._fetch(cmd)
        if isinstance(cmd, Ack):
            return self._ack(cmd)
        if isinstance(cmd, Tick):
            self._tick()
            return Done()
        if isinstance(cmd, AddStream):
            return self._add_stream(cmd)
        if isinstance(cmd, AddConsumer):
            return self._add_consumer(cmd)
        st = self._streams.get(cmd.stream)
        if st is None:
            return Error("not_found", f"no stream {cmd.stream!r}")
        if isinstance(cmd, DeleteStream):
            del self._streams[cmd.stream]
            self._route_cache.clear()
            return Done()
        if isinstance(cmd, Purge):
            return self._purge(st, cmd)
        if isinstance(cmd, DeleteMessage):
            if st.remove(cmd.seq) is None:
                return Error("not_found", f"stream {cmd.stream!r} has no message {cmd.seq}")
            return Done()
        con = st.consumers.get(cmd.consumer)
        if con is None:
            return Error("not_found", f"stream {cmd.stream!r} has no consumer {cmd.consumer!r}")
        con.last_active_ms = self.clock_ms
        if isinstance(cmd, DeleteConsumer):
            del st.consumers[cmd.consumer]
            return Done()
        if isinstance(cmd, Claim):
            return self._claim(st, con, cmd)
        assert isinstance(cmd, Release), cmd
        n = 0
        for seq, p in list(con.pending.items()):
            if p.worker == cmd.worker and p.deliveries > 0:
                con._set(seq, replace(p, deadline_ms=self.clock_ms))
                n += 1
        return Done({"released": n})

    # -- publish ---------------------------------------------------------------------------

    def stream_for(self, subject: str) -> str | None:
        """The stream capturing ``subject`` (None = none)."""
        if subject in self._route_cache:
            return self._route_cache[subject]
        found = None
        for st in self._streams.values():
            if any(matches(p, subject) for p in st.config.subjects):
                found = st.config.name
                break
        if len(self._route_cache) > 10_000:
            self._route_cache.clear()
        self._route_cache[subject] = found
        return found

    def _publish(self, cmd: Publish) -> Outcome:
        name = cmd.stream or self.stream_for(cmd.subject)
        if name is None:
            return Error("not_found", f"no stream captures subject {cmd.subject!r}")
        st = self._streams.get(name)
        if st is None:
            return Error("not_found", f"no stream {name!r}")
        cfg = st.config
        if cmd.stream and cfg.subjects and not any(matches(p, cmd.subject) for p in cfg.subjects):
            return Error("invalid", f"stream {name!r} does not capture subject {cmd.subject!r}")
        if len(cmd.data) > cfg.max_msg_size:
            return Error(
                "too_large",
                f"payload is {len(cmd.data)} bytes; stream {name!r} takes at most "
                f"{cfg.max_msg_size}",
            )
        self._expire_dedup(st)
        if cmd.msg_id:
            seen = st.dedup.get(cmd.msg_id)
            if seen is not None:
                return PubAck(name, seen[0], duplicate=True)
        if cmd.expected_last_seq is not None and cmd.expected_last_seq != st.last_seq:
            return Error(
                "conflict",
                f"stream {name!r} last sequence is {st.last_seq}, not {cmd.expected_last_seq}",
                {"last_seq": st.last_seq},
            )
        size = _msg_size(cmd.subject, cmd.headers, cmd.data)
        self._age_out(st)
        if cfg.discard == "new" and (
            (cfg.max_msgs and len(st.msgs) >= cfg.max_msgs) or st.bytes + size > cfg.max_bytes
        ):
            return Error("full", f"stream {name!r} is full (discard policy 'new')")
        if size > cfg.max_bytes:
            return Error("too_large", f"message is larger than stream {name!r} max_bytes")
        st.last_seq += 1
        st.last_ts_ms = self.clock_ms
        msg = Message(st.last_seq, cmd.subject, cmd.headers, cmd.data, self.clock_ms)
        st.msgs[msg.seq] = msg
        st.bytes += size
        if cmd.msg_id:
            if len(st.dedup) >= MAX_DEDUP_IDS:  # bounded by count too: forget the oldest
                del st.dedup[next(iter(st.dedup))]
            st.dedup[cmd.msg_id] = (msg.seq, self.clock_ms)
        while (cfg.max_msgs and len(st.msgs) > cfg.max_msgs) or st.bytes > cfg.max_bytes:
            st.remove(st.msgs.keys()[0])
        if self.on_publish is not None:
            self.on_publish(name, msg.seq)
        return PubAck(name, msg.seq)

    def _expire_dedup(self, st: _Stream) -> None:
        horizon = self.clock_ms - st.config.duplicate_window_ms
        while st.dedup:
            k = next(iter(st.dedup))
            if st.dedup[k][1] > horizon:
                break
            del st.dedup[k]

    def _age_out(self, st: _Stream) -> None:
        if not st.config.max_age_ms:
            return
        horizon = self.clock_ms - st.config.max_age_ms
        while st.msgs:
            first: Message = st.msgs.values()[0]
            if first.ts_ms > horizon:
                break
            st.remove(first.seq)

    def _tick(self) -> None:
        for st in list(self._streams.values()):
            self._age_out(st)
            self._expire_dedup(st)
            for name, con in list(st.consumers.items()):
                idle = self.clock_ms - con.last_active_ms
                if not con.config.durable and idle >= con.config.inactive_threshold_ms:
                    del st.consumers[name]

    # -- streams and consumers -------------------------------------------------------------

    def _add_stream(self, cmd: AddStream) -> Outcome:
        cfg = cmd.config
        existing = self._streams.get(cfg.name)
        if existing is not None and not cmd.update:
            if existing.config == cfg:
                return Done(existing.info())
            return Error("exists", f"stream {cfg.name!r} exists with another configuration")
        if existing is None and cmd.update:
            return Error("not_found", f"no stream {cfg.name!r}")
        if existing is None and len(self._streams) >= MAX_STREAMS:
            return Error("full", f"at most {MAX_STREAMS} streams")
        for other in self._streams.values():
            if other.config.name == cfg.name:
                continue
            for p in cfg.subjects:
                for q in other.config.subjects:
                    if patterns_overlap(p, q):
                        return Error(
                            "conflict",
                            f"subjects {p!r} overlap {q!r} of stream {other.config.name!r}",
                        )
        if existing is not None:
            if existing.config.retention != cfg.retention:
                return Error("invalid", "a stream's retention cannot change")
            existing.config = cfg
            while (cfg.max_msgs and len(existing.msgs) > cfg.max_msgs) or (
                existing.bytes > cfg.max_bytes
            ):
                existing.remove(existing.msgs.keys()[0])
            self._age_out(existing)
            self._route_cache.clear()
            return Done(existing.info())
        st = _Stream(cfg, self.clock_ms)
        self._streams[cfg.name] = st
        self._route_cache.clear()
        return Done(st.info())

    def _add_consumer(self, cmd: AddConsumer) -> Outcome:
        st = self._streams.get(cmd.stream)
        if st is None:
            return Error("not_found", f"no stream {cmd.stream!r}")
        cfg = cmd.config
        existing = st.consumers.get(cfg.name)
        if existing is not None:
            if existing.config == cfg:
                existing.last_active_ms = self.clock_ms
                return Done(existing.info(self.clock_ms, st))
            return Error("exists", f"consumer {cfg.name!r} exists with another configuration")
        if len(st.consumers) >= MAX_CONSUMERS:
            return Error("full", f"at most {MAX_CONSUMERS} consumers per stream")
        if cfg.deliver_policy == "all":
            start = st.first_seq
        elif cfg.deliver_policy == "new":
            start = st.last_seq + 1
        elif cfg.deliver_policy == "last":
            start = self._last_matching(st, cfg.filter_subject)
        elif cfg.deliver_policy == "by_start_seq":
            start = max(cfg.opt_start_seq, st.first_seq)
        else:
            start = st.last_seq + 1
            for m in st.msgs.values():
                if m.ts_ms >= cfg.opt_start_time_ms:
                    start = m.seq
                    break
        con = ConsumerState(
            config=cfg,
            created_ms=self.clock_ms,
            next_seq=start,
            ack_floor=start - 1,
            last_active_ms=self.clock_ms,
        )
        st.consumers[cfg.name] = con
        return Done(con.info(self.clock_ms, st))

    @staticmethod
    def _last_matching(st: _Stream, pattern: str) -> int:
        for seq in reversed(st.msgs.keys()):
            if not pattern or matches(pattern, st.msgs[seq].subject):
                return int(seq)
        return st.last_seq + 1

    def _purge(self, st: _Stream, cmd: Purge) -> Outcome:
        upto = cmd.upto_seq or st.last_seq + 1
        victims = [
            seq
            for seq in st.msgs.irange(maximum=upto - 1)
            if not cmd.subject or matches(cmd.subject, st.msgs[seq].subject)
        ]
        for seq in victims:
            st.remove(seq)
        return Done({"purged": len(victims)})

    # -- delivery --------------------------------------------------------------------------

    def _fetch(self, cmd: Fetch) -> Outcome:
        st = self._streams.get(cmd.stream)
        if st is None:
            return Error("not_found", f"no stream {cmd.stream!r}")
        con = st.consumers.get(cmd.consumer)
        if con is None:
            return Error("not_found", f"stream {cmd.stream!r} has no consumer {cmd.consumer!r}")
        now = self.clock_ms
        con.last_active_ms = now
        self._age_out(st)
        cfg = con.config
        out: list[Delivery] = []
        # 1. due pending: redeliveries, nak'd messages, delayed messages whose time came
        while con.timers and con.timers[0][0] <= now and len(out) < cmd.batch:
            _, seq, token = con.timers[0]
            p = con.pending.get(seq)
            if p is None or p.token != token:  # superseded timer
                heapq.heappop(con.timers)
                continue
            msg = st.msgs.get(seq)
            if msg is None:  # dropped by a limit meanwhile
                heapq.heappop(con.timers)
                con._drop(seq)
                continue
            if p.deliveries == 0 and con.in_flight >= cfg.max_ack_pending:
                break
            heapq.heappop(con.timers)
            if cfg.max_deliver and p.deliveries >= cfg.max_deliver:
                self._dead_letter(st, con, msg, p.deliveries, "max_deliver")
                continue
            out.append(self._deliver(con, msg, p.deliveries + 1, cmd.worker))
        # 2. new messages from the cursor
        keys = st.msgs.keys()
        i = st.msgs.bisect_left(con.next_seq)
        while len(out) < cmd.batch and con.in_flight < cfg.max_ack_pending and i < len(keys):
            seq = int(keys[i])
            i += 1
            con.next_seq = seq + 1
            msg = st.msgs[seq]
            if cfg.filter_subject and not matches(cfg.filter_subject, msg.subject):
                continue
            not_before = _not_before(msg)
            if not_before > now and cfg.ack_policy != "none":
                con._set(seq, _Pending(0, 0, not_before, "", 0))
                continue
            out.append(self._deliver(con, msg, 1, cmd.worker))
        if i >= len(keys):
            con.next_seq = max(con.next_seq, st.last_seq + 1)
        con._advance_floor(st.last_seq)
        return Fetched(out, con.in_flight)

    def _deliver(self, con: ConsumerState, msg: Message, n: int, worker: str) -> Delivery:
        con.delivered += 1
        if n > 1:
            con.redelivered += 1
        if con.config.ack_policy != "none":
            deadline = self.clock_ms + con.config.ack_wait_ms
            con._set(msg.seq, _Pending(n, self.clock_ms, deadline, worker, 0))
        return Delivery(msg, n)

    def _dead_letter(
        self, st: _Stream, con: ConsumerState, msg: Message, deliveries: int, reason: str
    ) -> None:
        con._drop(msg.seq)
        con.dead_lettered += 1
        dlq_name = st.config.dead_letter_stream
        dlq = self._streams.get(dlq_name)
        if dlq is None:
            dlq = _Stream(StreamConfig(name=dlq_name, max_msgs=100_000), self.clock_ms)
            self._streams[dlq_name] = dlq
        headers = dict(msg.headers)
        headers.update(
            {
                "dsys-dlq-reason": reason,
                "dsys-dlq-stream": st.config.name,
                "dsys-dlq-seq": str(msg.seq),
                "dsys-dlq-consumer": con.config.name,
                "dsys-dlq-deliveries": str(deliveries),
            }
        )
        # a dead letter is stored whatever the dead-letter stream's subjects are
        self._append_raw(dlq, msg.subject, headers, msg.data)
        if st.config.retention == "workqueue":
            st.remove(msg.seq)

    def _append_raw(self, st: _Stream, subject: str, headers: dict[str, str], data: bytes) -> None:
        st.last_seq += 1
        st.last_ts_ms = self.clock_ms
        m = Message(st.last_seq, subject, headers, data, self.clock_ms)
        st.msgs[m.seq] = m
        st.bytes += m.size
        cfg = st.config
        while (cfg.max_msgs and len(st.msgs) > cfg.max_msgs) or st.bytes > cfg.max_bytes:
            st.remove(st.msgs.keys()[0])
        if self.on_publish is not None:
            self.on_publish(cfg.name, m.seq)

    def _ack(self, cmd: Ack) -> Outcome:
        st = self._streams.get(cmd.stream)
        if st is None:
            return Error("not_found", f"no stream {cmd.stream!r}")
        con = st.consumers.get(cmd.consumer)
        if con is None:
            return Error("not_found", f"stream {cmd.stream!r} has no consumer {cmd.consumer!r}")
        now = self.clock_ms
        con.last_active_ms = now
        statuses: list[str] = []
        for seq, deliveries in cmd.acks:
            p = con.pending.get(seq)
            if p is None or p.deliveries == 0:
                statuses.append("not_pending")
                continue
            if deliveries and deliveries != p.deliveries:
                statuses.append("stale")
                continue
            statuses.append("ok")
            if cmd.kind == "ack":
                if con.config.ack_policy == "all":
                    for s in [s for s, q in con.pending.items() if s <= seq and q.deliveries]:
                        self._acked(st, con, s)
                else:
                    self._acked(st, con, seq)
            elif cmd.kind == "nak":
                con._set(seq, replace(p, deadline_ms=now + cmd.delay_ms))
            elif cmd.kind == "progress":
                con._set(seq, replace(p, deadline_ms=now + con.config.ack_wait_ms))
            else:
                msg = st.msgs.get(seq)
                if msg is None:
                    con._drop(seq)
                else:
                    reason = f"terminated: {cmd.reason}" if cmd.reason else "terminated"
                    self._dead_letter(st, con, msg, p.deliveries, reason)
        con._advance_floor(st.last_seq)
        return AckResult(statuses)

    def _acked(self, st: _Stream, con: ConsumerState, seq: int) -> None:
        con._drop(seq)
        con.acked += 1
        if st.config.retention == "workqueue":
            st.remove(seq)

    def _claim(self, st: _Stream, con: ConsumerState, cmd: Claim) -> Outcome:
        now = self.clock_ms
        out: list[Delivery] = []
        for seq, p in list(con.pending.items()):
            if len(out) >= cmd.count:
                break
            if p.deliveries == 0 or now - p.delivered_ms < cmd.min_idle_ms:
                continue
            msg = st.msgs.get(seq)
            if msg is None:
                con._drop(seq)
                continue
            out.append(self._deliver(con, msg, p.deliveries + 1, cmd.worker))
        return Fetched(out, con.in_flight)

    # -- reads (local state) ---------------------------------------------------------------

    def streams(self) -> list[str]:
        """Names of every stream, sorted."""
        return sorted(self._streams)

    def stream_info(self, name: str) -> dict[str, Any] | None:
        """A stream's configuration and state (None = no such stream)."""
        st = self._streams.get(name)
        return None if st is None else st.info()

    def consumers(self, stream: str) -> list[str] | None:
        """Names of a stream's consumers, sorted (None = no such stream)."""
        st = self._streams.get(stream)
        return None if st is None else sorted(st.consumers)

    def consumer_info(self, stream: str, consumer: str) -> dict[str, Any] | None:
        """A consumer's configuration and state (None = no such stream or consumer)."""
        st = self._streams.get(stream)
        con = None if st is None else st.consumers.get(consumer)
        if st is None or con is None:
            return None
        return con.info(self.clock_ms, st)

    def get(self, stream: str, seq: int) -> Message | None:
        """One message by sequence (None = no such stream or message)."""
        st = self._streams.get(stream)
        return None if st is None else st.msgs.get(seq)

    def last(self, stream: str, subject: str = "") -> Message | None:
        """The last message (matching ``subject`` pattern, when given)."""
        st = self._streams.get(stream)
        if st is None:
            return None
        m: Message | None = st.msgs.get(self._last_matching(st, subject))
        return m

    def read(
        self,
        stream: str,
        *,
        start_seq: int = 0,
        limit: int = 100,
        subject: str = "",
        reverse: bool = False,
    ) -> list[Message] | None:
        """Up to ``limit`` messages from ``start_seq`` on (or down, with ``reverse``).

        ``reverse`` with ``start_seq=0`` reads from the last message backwards; a
        ``subject`` pattern filters. None = no such stream.
        """
        st = self._streams.get(stream)
        if st is None:
            return None
        if reverse:
            top = start_seq if start_seq else st.last_seq
            it = st.msgs.irange(maximum=top, reverse=True)
        else:
            it = st.msgs.irange(minimum=start_seq)
        out: list[Message] = []
        for seq in it:
            m: Message = st.msgs[seq]
            if subject and not matches(subject, m.subject):
                continue
            out.append(m)
            if len(out) >= limit:
                break
        return out

    def pending(self, stream: str, consumer: str, limit: int = 1000) -> list[dict[str, Any]] | None:
        """A consumer's delivered-but-unacknowledged messages with their idle times."""
        st = self._streams.get(stream)
        con = None if st is None else st.consumers.get(consumer)
        if st is None or con is None:
            return None
        out = []
        for seq in sorted(con.pending)[:limit]:
            p = con.pending[seq]
            out.append(
                {
                    "seq": seq,
                    "deliveries": p.deliveries,
                    "worker": p.worker,
                    "idle_ms": max(0, self.clock_ms - p.delivered_ms) if p.deliveries else 0,
                    "due_in_ms": p.deadline_ms - self.clock_ms,
                }
            )
        return out

    def has_work(self, stream: str, consumer: str, now_ms: int) -> bool:
        """Whether a fetch for this consumer would deliver something (a cheap local guess).

        The server proposes a fetch only then, so idle pollers do not fill the log.
        """
        st = self._streams.get(stream)
        con = None if st is None else st.consumers.get(consumer)
        if st is None or con is None:
            return True  # let the fetch answer not_found
        now = max(now_ms, self.clock_ms)
        if con.timers and con.timers[0][0] <= now:
            return True
        if con.in_flight >= con.config.max_ack_pending:
            return False
        return bool(st.msgs) and con.next_seq <= st.last_seq

    def next_due_ms(self, stream: str, consumer: str) -> int | None:
        """The earliest pending deadline of a consumer (None = none)."""
        st = self._streams.get(stream)
        con = None if st is None else st.consumers.get(consumer)
        if con is None:
            return None
        while con.timers:
            deadline, seq, token = con.timers[0]
            p = con.pending.get(seq)
            if p is not None and p.token == token:
                return deadline
            heapq.heappop(con.timers)
        return None

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Encode the whole state as msgpack."""
        value = {
            "clock": self.clock_ms,
            "streams": [
                {
                    "config": st.config.to_plain(),
                    "created": st.created_ms,
                    "last_seq": st.last_seq,
                    "last_ts": st.last_ts_ms,
                    "msgs": [m.to_plain() for m in st.msgs.values()],
                    "dedup": [[k, s, t] for k, (s, t) in st.dedup.items()],
                    "consumers": [_consumer_plain(c) for c in st.consumers.values()],
                }
                for st in self._streams.values()
            ],
        }
        return encode(value, max_size=SNAPSHOT_MAX_BYTES)

    def restore(self, data: bytes) -> None:
        """Replace the whole state by a :meth:`snapshot`.

        Raises:
            RemoteProtocolError: the snapshot is malformed.
        """
        value = decode(data, max_size=SNAPSHOT_MAX_BYTES)
        try:
            streams: dict[str, _Stream] = {}
            for sv in value["streams"]:
                st = _Stream(StreamConfig.from_plain(sv["config"]), int(sv["created"]))
                st.last_seq, st.last_ts_ms = int(sv["last_seq"]), int(sv["last_ts"])
                for seq, subject, headers, payload, ts in sv["msgs"]:
                    m = Message(int(seq), str(subject), dict(headers), bytes(payload), int(ts))
                    st.msgs[m.seq] = m
                    st.bytes += m.size
                st.dedup = {str(k): (int(s), int(t)) for k, s, t in sv["dedup"]}
                for cv in sv["consumers"]:
                    con = _consumer_from_plain(cv)
                    st.consumers[con.config.name] = con
                streams[st.config.name] = st
            clock = int(value["clock"])
        except (KeyError, TypeError, ValueError, InvalidCommand) as exc:
            raise RemoteProtocolError(f"malformed stream snapshot: {exc}") from exc
        self._streams, self.clock_ms = streams, clock
        self._route_cache.clear()


def _not_before(msg: Message) -> int:
    v = msg.headers.get(NOT_BEFORE_HEADER)
    if v is None or not v.isdigit() or len(v) > 16:
        return 0
    return int(v)


def _consumer_plain(c: ConsumerState) -> dict[str, Any]:
    return {
        "config": c.config.to_plain(),
        "created": c.created_ms,
        "next": c.next_seq,
        "floor": c.ack_floor,
        "active": c.last_active_ms,
        "counts": [c.delivered, c.redelivered, c.acked, c.dead_lettered],
        "pending": [
            [seq, p.deliveries, p.delivered_ms, p.deadline_ms, p.worker]
            for seq, p in sorted(c.pending.items())
        ],
    }


def _consumer_from_plain(v: Any) -> ConsumerState:
    con = ConsumerState(
        config=ConsumerConfig.from_plain(v["config"]),
        created_ms=int(v["created"]),
        next_seq=int(v["next"]),
        ack_floor=int(v["floor"]),
        last_active_ms=int(v["active"]),
    )
    con.delivered, con.redelivered, con.acked, con.dead_lettered = (int(x) for x in v["counts"])
    for seq, n, delivered, deadline, worker in v["pending"]:
        con._set(int(seq), _Pending(int(n), int(delivered), int(deadline), str(worker), 0))
    return con


__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_DEDUP_IDS",
    "NOT_BEFORE_HEADER",
    "Ack",
    "AckResult",
    "AddConsumer",
    "AddStream",
    "Claim",
    "Command",
    "ConsumerConfig",
    "ConsumerState",
    "DeleteConsumer",
    "DeleteMessage",
    "DeleteStream",
    "Delivery",
    "Done",
    "Error",
    "Fetch",
    "Fetched",
    "InvalidCommand",
    "Message",
    "Outcome",
    "PubAck",
    "Publish",
    "Purge",
    "Release",
    "StreamConfig",
    "StreamStateMachine",
    "Tick",
    "build_command",
    "check_headers",
    "decode_command",
    "encode_command",
    "patterns_overlap",
    "validate_name",
]
