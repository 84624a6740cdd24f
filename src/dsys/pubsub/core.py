"""BrokerState: the pure core of the pub/sub broker.

Theory of operation
-------------------

The broker has *connections*. A connection is a client (it subscribes and publishes),
an outbound route (a link we dialled to a peer broker: we forward messages on it and
the peer tells us its interest), or an inbound route (a peer dialled us: we tell it our
interest and it forwards messages to us). Every connection owns one outbound FIFO of
entries that its adapter's writer task drains with :meth:`BrokerState.take`; nothing
else ever waits on a connection, so one stalled reader cannot hold up another or the
publisher.

Subscriptions live in a :class:`~dsys.pubsub.subjects.SubjectIndex`. Publishing a
subject computes a *plan* once (cached until the next subscription change): the plain
subscribers, the queue groups (members by group name, across every matching pattern, as
NATS groups them), the routes with plain interest and the routes with queue-group
interest. Then:

* each plain subscriber gets the message;
* each queue group gets it once: one member is chosen (round robin or random) among
  the local members and the routes that reported interest for that group; a route
  chosen for a group is told the group's name so that the peer picks one local member;
* each route with plain interest, or chosen for a group, gets the message once.

A message that arrived *from* a route is delivered only to local subscribers (plain ones,
plus one member of each group the sender named): it is never forwarded again. Brokers
form a full mesh, so one hop reaches everyone; this is what rules out loops and
duplicates.

Interest is aggregated: a route learns ``rsub pattern [queue]`` when the first local
subscription on (pattern, queue) appears and ``runsub`` when the last one goes. Replies
(subjects under ``_INBOX.``) go to every peer whatever the interest: a requester's inbox
subscription and its request travel on different links, so the responder's broker may
receive the request before it hears of the inbox.

Backpressure
~~~~~~~~~~~~

Each subscription has a bound on queued messages and each connection a bound on queued
bytes. When a message does not fit, the subscription's policy decides::

    drop_newest   the new message is discarded
    drop_oldest   the subscription's oldest queued messages are discarded until it fits
                  (if other subscriptions hold the bytes, the new one is discarded)
    disconnect    the connection is marked for closing ("slow consumer")

Every drop is counted. Dropped entries are unlinked from their subscription at once and
from the connection FIFO lazily; the FIFO is compacted when dead entries outnumber live
ones, so memory stays proportional to the bounds.

Control frames (pong, error, interest updates) share the FIFO so they keep their order
relative to messages (a ``pong`` means every earlier message has been written). A client
that lets more than ``max_control_frames`` of them pile up is disconnected.

This module is pure: the adapter (``dsys.pubsub.broker``) does all I/O.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from dsys.errors import BadInputError, ConfigError
from dsys.pubsub.subjects import (
    SubjectIndex,
    covers,
    matches,
    validate_pattern,
    validate_subject,
)

Frame = dict[str, object]
"""A protocol frame as a plain map, ready for msgpack or JSON."""

INBOX_PREFIX = "_INBOX."
"""Subjects under this prefix are reply inboxes; brokers forward them to every peer."""

_ENTRY_OVERHEAD = 48  # bytes charged per queued message on top of its contents


class SlowConsumerPolicy(enum.Enum):
    """What happens when a subscriber's bounded queue is full."""

    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    DISCONNECT = "disconnect"


class ConnKind(enum.Enum):
    """The role of a connection."""

    CLIENT = "client"
    ROUTE_OUT = "route_out"
    ROUTE_IN = "route_in"


class QueueChoice(enum.Enum):
    """How one member of a queue group is chosen for a message."""

    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


@dataclass(frozen=True, slots=True, kw_only=True)
class Permissions:
    """Which subjects a token may publish to and subscribe to.

    ``None`` allows everything; a tuple of patterns allows only what they match (for
    publish) or cover (for subscribe). An empty tuple allows nothing.

    Request/reply needs ``_INBOX.>``: requesters subscribe to it, responders publish to it.
    """

    publish: tuple[str, ...] | None = None
    subscribe: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("publish", "subscribe"):
            allowed = getattr(self, name)
            if allowed is None:
                continue
            if not isinstance(allowed, tuple):
                raise ConfigError(f"permissions.{name} must be a tuple of patterns or None")
            for pattern in allowed:
                try:
                    validate_pattern(pattern)
                except BadInputError as exc:
                    raise ConfigError(f"permissions.{name}: {exc}") from None

    def may_publish(self, subject: str) -> bool:
        """Whether publishing to ``subject`` is allowed."""
        return self.publish is None or any(matches(p, subject) for p in self.publish)

    def may_subscribe(self, pattern: str) -> bool:
        """Whether subscribing to ``pattern`` is allowed."""
        return self.subscribe is None or any(covers(p, pattern) for p in self.subscribe)


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerLimits:
    """Bounds the broker enforces on every connection.

    Attributes:
        max_payload: largest message payload accepted, in bytes.
        max_subs_per_connection: subscriptions one client connection may hold.
        max_pending_bytes: bytes queued towards one client before its slow-consumer
            policy applies.
        max_pending_msgs: default bound on messages queued for one subscription.
        max_control_frames: pongs/errors queued towards a client before it is cut off.
        route_max_pending_bytes: bytes queued towards one peer broker before new
            messages for it are dropped (and counted).
        queue_choice: how a queue-group member is picked.
    """

    max_payload: int = 1024 * 1024
    max_subs_per_connection: int = 10_000
    max_pending_bytes: int = 8 * 1024 * 1024
    max_pending_msgs: int = 65_536
    max_control_frames: int = 1024
    route_max_pending_bytes: int = 64 * 1024 * 1024
    queue_choice: QueueChoice = QueueChoice.ROUND_ROBIN

    def __post_init__(self) -> None:
        for name in (
            "max_payload",
            "max_subs_per_connection",
            "max_pending_bytes",
            "max_pending_msgs",
            "max_control_frames",
            "route_max_pending_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.queue_choice, QueueChoice):
            raise ConfigError(f"queue_choice must be a QueueChoice, got {self.queue_choice!r}")


class Message:
    """One published message as the broker holds it (shared by every recipient).

    ``tail`` caches the msgpack encoding of the fields every recipient shares, so the
    write path encodes a message once however many subscribers it has.
    """

    __slots__ = ("data", "reply", "rtail", "size", "subject", "tail")

    def __init__(self, subject: str, data: bytes, reply: str | None) -> None:
        self.subject = subject
        self.data = data
        self.reply = reply
        self.size = len(subject) + len(data) + (len(reply) if reply else 0) + _ENTRY_OVERHEAD
        self.tail: bytes | None = None
        self.rtail: bytes | None = None


# A queue entry is a list, the cheapest mutable record in CPython:
#   [sub, msg]           a message for a client subscription
#   [sub, msg, queues]   a message for a route (queue groups the peer must serve)
#   [None, frame]        a control frame
# A dropped entry has its second slot set to None and is skipped by take().
_Entry = list[Any]

_MSG_HEAD = b"\x84" + msgpack.packb("op") + msgpack.packb("msg") + msgpack.packb("sid")
_MSG_HEAD_REPLY = b"\x85" + _MSG_HEAD[1:]
_RMSG_HEAD = b"\x85" + msgpack.packb("op") + msgpack.packb("rmsg") + msgpack.packb("queues")


class Subscription:
    """A subscription held by a connection (or a route's pseudo-subscription)."""

    __slots__ = (
        "conn",
        "delivered",
        "dropped",
        "max_msgs",
        "pattern",
        "pending",
        "policy",
        "queue",
        "sid",
        "sid_packed",
    )

    def __init__(
        self,
        conn: Connection,
        sid: int,
        pattern: str,
        queue: str | None,
        policy: SlowConsumerPolicy,
        max_msgs: int,
    ) -> None:
        self.conn = conn
        self.sid = sid
        self.sid_packed: bytes = msgpack.packb(sid)
        self.pattern = pattern
        self.queue = queue
        self.policy = policy
        self.max_msgs = max_msgs
        # invariant: every entry here is alive and also in conn.fifo, in the same order
        self.pending: deque[_Entry] = deque()
        self.delivered = 0
        self.dropped = 0

    def __repr__(self) -> str:
        return f"Subscription(conn={self.conn.id}, sid={self.sid}, pattern={self.pattern!r})"


class Connection:
    """One connection's subscriptions, outbound FIFO and accounting."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "closing",
        "control_count",
        "dead",
        "fifo",
        "id",
        "interest",
        "kind",
        "max_pending_bytes",
        "msgs_in",
        "msgs_out",
        "name",
        "pending_bytes",
        "permissions",
        "route_sub",
        "subs",
    )

    def __init__(
        self,
        conn_id: int,
        kind: ConnKind,
        permissions: Permissions | None,
        max_pending_bytes: int,
        name: str,
    ) -> None:
        self.id = conn_id
        self.kind = kind
        self.name = name
        self.permissions = permissions
        self.subs: dict[int, Subscription] = {}
        self.fifo: deque[_Entry] = deque()
        self.dead = 0  # dropped entries still sitting in fifo
        self.pending_bytes = 0  # invariant: sum of sizes of live message entries in fifo
        self.control_count = 0
        self.max_pending_bytes = max_pending_bytes
        self.closing: str | None = None
        # ROUTE_OUT: the peer's interest we hold in the remote index
        self.interest: set[tuple[str, str | None]] = set()
        self.route_sub: Subscription | None = None
        self.msgs_in = 0
        self.msgs_out = 0
        self.bytes_in = 0  # payload bytes
        self.bytes_out = 0


@dataclass(slots=True)
class Effects:
    """What the adapter must do after one or more core calls.

    Attributes:
        wake: connections whose FIFO got entries (wake their writers).
        disconnect: connections to close, with the reason to tell them.
    """

    wake: set[int] = field(default_factory=set)
    disconnect: dict[int, str] = field(default_factory=dict)


@dataclass(slots=True)
class BrokerStats:
    """Counters the adapter exports as metrics."""

    msgs_in: int = 0
    bytes_in: int = 0
    msgs_out: int = 0
    bytes_out: int = 0
    drops: dict[str, int] = field(
        default_factory=lambda: {p.value: 0 for p in SlowConsumerPolicy if p.value != "disconnect"}
    )
    slow_consumer_disconnects: int = 0
    route_drops: int = 0
    no_member: int = 0


class _Plan:
    __slots__ = ("groups", "plain", "route_groups", "route_plain")

    def __init__(self) -> None:
        self.plain: list[Subscription] = []
        self.groups: dict[str, list[Subscription]] = {}
        self.route_plain: list[Connection] = []
        self.route_groups: dict[str, list[Connection]] = {}


class BrokerState:
    """Subscriptions, routes and outbound queues of one broker; pure and synchronous.

    Args:
        limits: bounds applied to every connection.
        rng: randomness for ``QueueChoice.RANDOM`` (seed it in tests).
    """

    def __init__(self, limits: BrokerLimits | None = None, *, rng: random.Random | None = None):
        self.limits = limits or BrokerLimits()
        self._rng = rng or random.Random()
        self._conns: dict[int, Connection] = {}
        self._local: SubjectIndex[Subscription] = SubjectIndex(cache_size=0)
        self._remote: SubjectIndex[tuple[Connection, str | None]] = SubjectIndex(cache_size=0)
        self._interest: dict[tuple[str, str | None], int] = {}
        self._plans: dict[str, _Plan] = {}
        self._valid: dict[str, bool] = {}
        self._rr: dict[str, int] = {}
        self.stats = BrokerStats()

    # -- connections -------------------------------------------------------------

    def open(
        self,
        conn_id: int,
        *,
        kind: ConnKind = ConnKind.CLIENT,
        permissions: Permissions | None = None,
        name: str = "",
    ) -> Connection:
        """Register a new connection.

        Raises:
            AssertionError: ``conn_id`` is already open (an adapter bug).
        """
        assert conn_id not in self._conns, f"connection {conn_id} is already open"
        limit = (
            self.limits.route_max_pending_bytes
            if kind is ConnKind.ROUTE_OUT
            else self.limits.max_pending_bytes
        )
        conn = Connection(conn_id, kind, permissions, limit, name)
        if kind is ConnKind.ROUTE_OUT:
            conn.route_sub = Subscription(
                conn, 0, ">", None, SlowConsumerPolicy.DROP_NEWEST, 1 << 62
            )
        self._conns[conn_id] = conn
        if kind is ConnKind.ROUTE_OUT:
            self._plans.clear()
        return conn

    def connection(self, conn_id: int) -> Connection:
        """The open connection ``conn_id`` (KeyError if it is not open)."""
        return self._conns[conn_id]

    def connections(self) -> Iterator[Connection]:
        """Every open connection."""
        return iter(self._conns.values())

    def set_permissions(self, conn_id: int, permissions: Permissions | None) -> None:
        """Set a client's permissions (after it authenticated)."""
        self._conns[conn_id].permissions = permissions

    def become_route_in(self, conn_id: int, fx: Effects, *, name: str = "") -> None:
        """Turn a fresh client connection into an inbound route and send it our interest.

        Raises:
            BadInputError: the connection already has subscriptions.
        """
        conn = self._conns[conn_id]
        if conn.subs:
            raise BadInputError("a route must announce itself before subscribing")
        conn.kind = ConnKind.ROUTE_IN
        conn.name = name
        conn.max_pending_bytes = self.limits.route_max_pending_bytes
        for pattern, queue in self._interest:
            self._control(conn, _interest_frame("rsub", pattern, queue), fx)

    def close(self, conn_id: int, fx: Effects) -> None:
        """Forget a connection: its subscriptions, its interest and its queue."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        conn.closing = conn.closing or "closed"
        for sub in list(conn.subs.values()):
            self._drop_sub(conn, sub, fx)
        for pattern, queue in conn.interest:
            self._remote.remove(pattern, (conn, queue))
        conn.interest.clear()
        if conn.kind is ConnKind.ROUTE_OUT:
            self._plans.clear()
        conn.fifo.clear()
        conn.pending_bytes = 0
        fx.wake.discard(conn_id)
        fx.disconnect.pop(conn_id, None)

    # -- subscriptions -----------------------------------------------------------

    def subscribe(
        self,
        conn_id: int,
        sid: object,
        pattern: object,
        fx: Effects,
        *,
        queue: object = None,
        policy: SlowConsumerPolicy = SlowConsumerPolicy.DROP_OLDEST,
        max_msgs: object = None,
    ) -> Subscription:
        """Add subscription ``sid`` of a client on ``pattern`` (optionally in a queue group).

        Raises:
            BadInputError: bad sid, pattern or queue name, sid already in use, too many
                subscriptions, or no permission to subscribe to ``pattern``.
        """
        conn = self._conns[conn_id]
        if conn.kind is not ConnKind.CLIENT:
            raise BadInputError("routes cannot subscribe")
        if not isinstance(sid, int) or isinstance(sid, bool) or sid < 0 or sid >= 1 << 53:
            raise BadInputError(f"sid must be a non-negative integer, got {sid!r}")
        validate_pattern(pattern)
        assert isinstance(pattern, str)
        if queue is not None:
            queue = _validate_queue(queue)
        if max_msgs is None:
            bound = self.limits.max_pending_msgs
        elif not isinstance(max_msgs, int) or isinstance(max_msgs, bool) or max_msgs <= 0:
            raise BadInputError(f"max_pending must be a positive integer, got {max_msgs!r}")
        else:
            bound = min(max_msgs, self.limits.max_pending_msgs)
        if sid in conn.subs:
            raise BadInputError(f"sid {sid} is already in use on this connection")
        if len(conn.subs) >= self.limits.max_subs_per_connection:
            raise BadInputError(
                f"too many subscriptions: the limit is {self.limits.max_subs_per_connection}"
            )
        if conn.permissions is not None and not conn.permissions.may_subscribe(pattern):
            raise BadInputError(f"permission denied: subscribe to {pattern!r}")
        sub = Subscription(conn, sid, pattern, queue, policy, bound)
        conn.subs[sid] = sub
        self._local.insert(pattern, sub)
        self._plans.clear()
        key = (pattern, queue)
        count = self._interest.get(key, 0) + 1
        self._interest[key] = count
        if count == 1:
            self._broadcast_interest("rsub", pattern, queue, fx)
        return sub

    def unsubscribe(self, conn_id: int, sid: object, fx: Effects) -> None:
        """Remove subscription ``sid``; messages still queued for it are discarded.

        Raises:
            BadInputError: no subscription ``sid`` on this connection.
        """
        conn = self._conns[conn_id]
        sub = conn.subs.get(sid) if isinstance(sid, int) and not isinstance(sid, bool) else None
        if sub is None:
            raise BadInputError(f"no subscription with sid {sid!r}")
        self._drop_sub(conn, sub, fx)

    def _drop_sub(self, conn: Connection, sub: Subscription, fx: Effects) -> None:
        del conn.subs[sub.sid]
        self._local.remove(sub.pattern, sub)
        self._plans.clear()
        for entry in sub.pending:
            conn.pending_bytes -= entry[1].size
            entry[1] = None
            conn.dead += 1
        sub.pending.clear()
        self._maybe_compact(conn)
        key = (sub.pattern, sub.queue)
        count = self._interest[key] - 1
        if count:
            self._interest[key] = count
        else:
            del self._interest[key]
            self._broadcast_interest("runsub", sub.pattern, sub.queue, fx)

    def _broadcast_interest(self, op: str, pattern: str, queue: str | None, fx: Effects) -> None:
        for conn in self._conns.values():
            if conn.kind is ConnKind.ROUTE_IN:
                self._control(conn, _interest_frame(op, pattern, queue), fx)

    def route_interest(self, conn_id: int, pattern: object, queue: object, *, add: bool) -> None:
        """Record that the peer behind outbound route ``conn_id`` gained/lost interest.

        Raises:
            BadInputError: the pattern or queue is malformed, or the connection is not
                an outbound route.
        """
        conn = self._conns[conn_id]
        if conn.kind is not ConnKind.ROUTE_OUT:
            raise BadInputError("interest updates are only accepted on routes")
        validate_pattern(pattern)
        assert isinstance(pattern, str)
        if queue is not None:
            queue = _validate_queue(queue)
        key = (pattern, queue)
        if add:
            if key not in conn.interest:
                conn.interest.add(key)
                self._remote.insert(pattern, (conn, queue))
                self._plans.clear()
        elif key in conn.interest:
            conn.interest.discard(key)
            self._remote.remove(pattern, (conn, queue))
            self._plans.clear()

    # -- publishing --------------------------------------------------------------

    def check_subject(self, subject: object, what: str = "subject") -> str:
        """Validate a publish (or reply) subject, with a bounded cache of known-good ones.

        Raises:
            BadInputError: the subject is malformed.
        """
        if isinstance(subject, str) and subject in self._valid:
            return subject
        try:
            validate_subject(subject)
        except BadInputError as exc:
            raise BadInputError(str(exc).replace("subject", what, 1)) from None
        assert isinstance(subject, str)
        if len(self._valid) >= 65_536:
            self._valid.clear()
        self._valid[subject] = True
        return subject

    def publish(
        self,
        conn_id: int,
        subject: object,
        data: object,
        reply: object,
        fx: Effects,
    ) -> int:
        """Publish from a client: validate, check permission, deliver and forward.

        Returns:
            how many local subscribers and routes the message was queued for.

        Raises:
            BadInputError: malformed subject/reply/data, payload over ``max_payload``, or
                no permission to publish to ``subject``.
        """
        conn = self._conns[conn_id]
        if not isinstance(data, bytes):
            raise BadInputError(f"data must be bytes, got {type(data).__name__}")
        if len(data) > self.limits.max_payload:
            raise BadInputError(
                f"payload of {len(data)} bytes exceeds max_payload {self.limits.max_payload}"
            )
        subj = self.check_subject(subject)
        rep = None if reply is None else self.check_subject(reply, "reply subject")
        perms = conn.permissions
        if perms is not None and not perms.may_publish(subj):
            raise BadInputError(f"permission denied: publish to {subj!r}")
        conn.msgs_in += 1
        return self.inject(Message(subj, data, rep), fx)

    def inject(self, msg: Message, fx: Effects) -> int:
        """Deliver an already validated message published locally (also forwards it)."""
        stats = self.stats
        stats.msgs_in += 1
        stats.bytes_in += len(msg.data)
        plan = self._plans.get(msg.subject)
        if plan is None:
            plan = self._plan(msg.subject)
        n = 0
        size = msg.size
        wake = fx.wake
        for sub in plan.plain:
            # The common case inline: the subscriber keeps up.
            conn = sub.conn
            pending = sub.pending
            if (
                conn.closing is None
                and len(pending) < sub.max_msgs
                and conn.pending_bytes + size <= conn.max_pending_bytes
            ):
                entry = [sub, msg]
                pending.append(entry)
                conn.fifo.append(entry)
                conn.pending_bytes += size
                wake.add(conn.id)
                n += 1
            else:
                n += self._enqueue(sub, msg, fx)
        picked: dict[Connection, list[str]] | None = None
        if plan.groups or plan.route_groups:
            for name in plan.groups.keys() | plan.route_groups.keys():
                local = plan.groups.get(name, ())
                remote = plan.route_groups.get(name, ())
                i = self._pick(name, len(local) + len(remote))
                if i < len(local):
                    n += self._enqueue(local[i], msg, fx)
                else:
                    if picked is None:
                        picked = {}
                    picked.setdefault(remote[i - len(local)], []).append(name)
        if plan.route_plain or picked:
            for route in plan.route_plain:
                queues = picked.pop(route, ()) if picked else ()
                n += self._enqueue_route(route, msg, tuple(queues), fx)
            if picked:
                for route, names in picked.items():
                    n += self._enqueue_route(route, msg, tuple(names), fx)
        return n

    def deliver_from_route(
        self,
        conn_id: int,
        subject: object,
        data: object,
        reply: object,
        queues: object,
        fx: Effects,
    ) -> int:
        """Deliver a message a peer forwarded: local plain subscribers, plus one member
        of each named queue group. Never forwarded again.

        Raises:
            BadInputError: malformed fields.
        """
        conn = self._conns[conn_id]
        if conn.kind is not ConnKind.ROUTE_IN:
            raise BadInputError("forwarded messages are only accepted from routes")
        if not isinstance(data, bytes):
            raise BadInputError(f"data must be bytes, got {type(data).__name__}")
        if not isinstance(queues, list | tuple) or not all(isinstance(q, str) for q in queues):
            raise BadInputError("queues must be a list of strings")
        subj = self.check_subject(subject)
        rep = None if reply is None else self.check_subject(reply, "reply subject")
        conn.msgs_in += 1
        conn.bytes_in += len(data)
        msg = Message(subj, data, rep)
        stats = self.stats
        stats.msgs_in += 1
        stats.bytes_in += len(data)
        plan = self._plans.get(subj)
        if plan is None:
            plan = self._plan(subj)
        n = 0
        for sub in plan.plain:
            n += self._enqueue(sub, msg, fx)
        for name in queues:
            members = plan.groups.get(name)
            if members:
                n += self._enqueue(members[self._pick(name, len(members))], msg, fx)
            else:
                stats.no_member += 1
        return n

    def _pick(self, name: str, count: int) -> int:
        if self.limits.queue_choice is QueueChoice.RANDOM:
            return self._rng.randrange(count)
        rr = self._rr
        i = rr.get(name, 0)
        if i == 0 and len(rr) >= 65_536:
            rr.clear()  # bound the counters kept for group names that came and went
        rr[name] = i + 1
        return i % count

    def _plan(self, subject: str) -> _Plan:
        plan = _Plan()
        for sub in self._local.match(subject):
            if sub.queue is None:
                plan.plain.append(sub)
            else:
                plan.groups.setdefault(sub.queue, []).append(sub)
        seen: set[Connection] = set()
        if subject.startswith(INBOX_PREFIX):
            # Replies go to every peer: the requester's inbox interest travels on another
            # link than the request, so the responder's broker may not know it yet.
            for conn in self._conns.values():
                if conn.kind is ConnKind.ROUTE_OUT:
                    seen.add(conn)
                    plan.route_plain.append(conn)
        for route, queue in self._remote.match(subject):
            if queue is None:
                if route not in seen:
                    seen.add(route)
                    plan.route_plain.append(route)
            else:
                members = plan.route_groups.setdefault(queue, [])
                if route not in members:
                    members.append(route)
        if len(self._plans) >= 16_384:
            self._plans.clear()
        self._plans[subject] = plan
        return plan

    def _enqueue(self, sub: Subscription, msg: Message, fx: Effects) -> int:
        conn = sub.conn
        if conn.closing is not None:
            return 0
        size = msg.size
        pending = sub.pending
        if len(pending) >= sub.max_msgs or conn.pending_bytes + size > conn.max_pending_bytes:
            policy = sub.policy
            if policy is SlowConsumerPolicy.DISCONNECT:
                self._slow_disconnect(conn, fx)
                return 0
            if policy is SlowConsumerPolicy.DROP_OLDEST:
                drops = self.stats.drops
                while pending and (
                    len(pending) >= sub.max_msgs
                    or conn.pending_bytes + size > conn.max_pending_bytes
                ):
                    old = pending.popleft()
                    conn.pending_bytes -= old[1].size
                    old[1] = None
                    conn.dead += 1
                    sub.dropped += 1
                    drops["drop_oldest"] += 1
                self._maybe_compact(conn)
                if (
                    conn.pending_bytes + size > conn.max_pending_bytes
                    or len(pending) >= sub.max_msgs
                ):
                    sub.dropped += 1
                    drops["drop_oldest"] += 1
                    return 0
            else:
                sub.dropped += 1
                self.stats.drops["drop_newest"] += 1
                return 0
        entry = [sub, msg]
        pending.append(entry)
        conn.fifo.append(entry)
        conn.pending_bytes += size
        fx.wake.add(conn.id)
        return 1

    def _enqueue_route(
        self, route: Connection, msg: Message, queues: tuple[str, ...], fx: Effects
    ) -> int:
        if route.closing is not None:
            return 0
        size = msg.size
        if route.pending_bytes + size > route.max_pending_bytes:
            self.stats.route_drops += 1
            return 0
        sub = route.route_sub
        assert sub is not None, f"route {route.id} has no pseudo-subscription"
        entry = [sub, msg, queues]
        sub.pending.append(entry)
        route.fifo.append(entry)
        route.pending_bytes += size
        fx.wake.add(route.id)
        return 1

    def _slow_disconnect(self, conn: Connection, fx: Effects) -> None:
        conn.closing = "slow consumer: pending messages exceeded the bound"
        fx.disconnect[conn.id] = conn.closing
        self.stats.slow_consumer_disconnects += 1
        # Free the queued payloads now; the adapter closes the socket.
        for sub in conn.subs.values():
            for entry in sub.pending:
                entry[1] = None
            sub.pending.clear()
        conn.fifo.clear()
        conn.dead = 0
        conn.pending_bytes = 0

    def _maybe_compact(self, conn: Connection) -> None:
        if conn.dead > 64 and conn.dead * 2 > len(conn.fifo):
            conn.fifo = deque(e for e in conn.fifo if e[1] is not None)
            conn.dead = 0

    # -- control frames ----------------------------------------------------------

    def control(self, conn_id: int, frame: Frame, fx: Effects) -> None:
        """Queue a control frame (pong, error ...) behind the messages already queued."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            self._control(conn, frame, fx)

    def _control(self, conn: Connection, frame: Frame, fx: Effects) -> None:
        if conn.closing is not None:
            return
        if conn.kind is ConnKind.CLIENT and conn.control_count >= self.limits.max_control_frames:
            conn.closing = "too many unread control frames (the client is not reading)"
            fx.disconnect[conn.id] = conn.closing
            return
        conn.control_count += 1
        conn.fifo.append([None, frame])
        fx.wake.add(conn.id)

    # -- the write path ----------------------------------------------------------

    def take(self, conn_id: int, *, max_items: int = 512, max_bytes: int = 1 << 20) -> list[Frame]:
        """Pop up to ``max_items`` frames (about ``max_bytes``) for the writer to send.

        Returns an empty list when nothing is queued or the connection is gone.
        """
        out: list[Frame] = []
        for entry in self._pop(conn_id, max_items, max_bytes):
            sub, payload = entry[0], entry[1]
            if sub is None:
                out.append(payload)
            elif len(entry) == 3:
                out.append(
                    {
                        "op": "rmsg",
                        "queues": list(entry[2]),
                        "subject": payload.subject,
                        "data": payload.data,
                        "reply": payload.reply,
                    }
                )
            else:
                frame: Frame = {
                    "op": "msg",
                    "sid": sub.sid,
                    "subject": payload.subject,
                    "data": payload.data,
                }
                if payload.reply is not None:
                    frame["reply"] = payload.reply
                out.append(frame)
        return out

    def take_packed(
        self, conn_id: int, *, max_items: int = 512, max_bytes: int = 1 << 20
    ) -> bytes | None:
        """Like :meth:`take`, but already msgpack-encoded: one map, or an array of maps.

        Each message's shared fields are encoded once (cached on the message), so
        fanning one message out to many subscribers costs a byte concatenation each.
        Returns ``None`` when nothing is queued.
        """
        entries = self._pop(conn_id, max_items, max_bytes)
        if not entries:
            return None
        parts: list[bytes] = []
        append = parts.append
        packb = msgpack.packb
        for entry in entries:
            sub, payload = entry[0], entry[1]
            if sub is None:
                append(packb(payload, use_bin_type=True))
                continue
            if len(entry) == 3:
                rtail = payload.rtail
                if rtail is None:
                    rtail = payload.rtail = packb(
                        {"subject": payload.subject, "data": payload.data, "reply": payload.reply},
                        use_bin_type=True,
                    )[1:]
                append(_RMSG_HEAD + packb(list(entry[2])) + rtail)
                continue
            tail = payload.tail
            if tail is None:
                fields: dict[str, object] = {"subject": payload.subject, "data": payload.data}
                if payload.reply is not None:
                    fields["reply"] = payload.reply
                tail = payload.tail = packb(fields, use_bin_type=True)[1:]
            head = _MSG_HEAD if payload.reply is None else _MSG_HEAD_REPLY
            append(head + sub.sid_packed + tail)
        if len(parts) == 1:
            return parts[0]
        n = len(parts)
        header = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
        assert n < 65536, f"batch of {n} frames is too large"
        return header + b"".join(parts)

    def _pop(self, conn_id: int, max_items: int, max_bytes: int) -> list[_Entry]:
        conn = self._conns.get(conn_id)
        if conn is None or conn.closing is not None:
            return []
        fifo = conn.fifo
        out: list[_Entry] = []
        nbytes = sent = data_bytes = 0
        while fifo and len(out) < max_items and nbytes < max_bytes:
            entry = fifo.popleft()
            sub, payload = entry[0], entry[1]
            if payload is None:
                conn.dead -= 1
                continue
            if sub is None:
                conn.control_count -= 1
                out.append(entry)
                continue
            first = sub.pending.popleft()
            assert first is entry, f"subscription {sub!r} queue out of order"
            size = payload.size
            conn.pending_bytes -= size
            nbytes += size
            sub.delivered += 1
            sent += 1
            data_bytes += len(payload.data)
            out.append(entry)
        conn.msgs_out += sent
        conn.bytes_out += data_bytes
        self.stats.msgs_out += sent
        self.stats.bytes_out += data_bytes
        return out

    # -- introspection -----------------------------------------------------------

    def subscription_count(self) -> int:
        """How many client subscriptions exist."""
        return len(self._local)

    def interest(self) -> Mapping[tuple[str, str | None], int]:
        """Local interest: (pattern, queue) -> number of local subscriptions."""
        return dict(self._interest)

    def remote_interest(self, conn_id: int) -> frozenset[tuple[str, str | None]]:
        """The interest the peer behind outbound route ``conn_id`` reported."""
        return frozenset(self._conns[conn_id].interest)


def _interest_frame(op: str, pattern: str, queue: str | None) -> Frame:
    frame: Frame = {"op": op, "subject": pattern}
    if queue is not None:
        frame["queue"] = queue
    return frame


def _validate_queue(queue: object) -> str:
    if not isinstance(queue, str) or not queue or len(queue) > 128:
        raise BadInputError(f"queue group must be a non-empty string of <= 128 chars: {queue!r}")
    if any(c in queue for c in " \t\r\n\x00*>"):
        raise BadInputError(f"queue group {queue!r} contains whitespace or a wildcard")
    return queue


__all__ = [
    "INBOX_PREFIX",
    "BrokerLimits",
    "BrokerState",
    "BrokerStats",
    "ConnKind",
    "Connection",
    "Effects",
    "Frame",
    "Message",
    "Permissions",
    "QueueChoice",
    "SlowConsumerPolicy",
    "Subscription",
]
