"""The checkout saga as a pure state machine (no I/O, no clock, no randomness).

Theory of operation
-------------------
An order is a small document that the orders service keeps in the Raft KV. Every change
to it goes through :func:`apply`, which takes the order and one event and returns the new
order plus the *commands* the change calls for. The service stores the new order and its
commands (the transactional outbox) in one compare-and-set, then relays the commands to
the durable stream, where the inventory, payment and delivery services consume them and
answer with events. Nothing here awaits, reads a clock or draws a random number, so the
Hypothesis tests can drive it through any order of events, duplicates and failures.

The happy path::

    place --> RESERVING --inventory.reserved--> AUTHORISING --payment.authorised-->
    CONFIRMING --inventory.confirmed--> CONFIRMED --delivery.packed--> PACKED
    --delivery.shipped--> SHIPPED --delivery.delivered--> DELIVERED

and the compensations, one for every failure after a step that needs undoing::

    RESERVING   --inventory.rejected-->       CANCELLED                (nothing to undo)
    AUTHORISING --payment.failed-->           CANCELLED  + inventory.release
    AUTHORISING --inventory.expired-->        (remembered; the payment's answer decides)
                --payment.authorised-->       REFUNDING  + payment.refund
    CONFIRMING  --inventory.confirm_failed--> REFUNDING  + payment.refund + inventory.release
    REFUNDING   --payment.refunded-->         REFUNDED

Final states: DELIVERED, CANCELLED, REFUNDED. Invariants (checked by the tests): an order
charged (``payment.authorised`` seen) ends DELIVERED or REFUNDED; an order that ends
CANCELLED was never charged; a reservation an order no longer needs is released.

Idempotency. Every event carries an id; producers derive it from the order and what
happened (``"o-17:inventory.reserved"``), so a redelivered or twice-published event has
the id of the first one. :func:`apply` records the ids it has seen in the order and
answers a repeat with ``duplicate=True`` and no change. An event that makes no sense in
the current state (a late ``inventory.reserved`` for a cancelled order) is recorded and
answered with the command that undoes its effect, if any, so late events never leak a
reservation or a charge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

RESERVATION_TTL = 300.0
"""Seconds a reservation is held before the inventory releases it (5 minutes)."""


class Status(StrEnum):
    """Where an order is in the saga."""

    RESERVING = "reserving"
    AUTHORISING = "authorising"
    CONFIRMING = "confirming"
    CONFIRMED = "confirmed"
    PACKED = "packed"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    REFUNDING = "refunding"
    REFUNDED = "refunded"
    CANCELLED = "cancelled"


FINAL = frozenset({Status.DELIVERED, Status.CANCELLED, Status.REFUNDED})
"""States an order never leaves."""

_STAGES = (Status.CONFIRMED, Status.PACKED, Status.SHIPPED, Status.DELIVERED)
_STAGE_OF = {
    "delivery.packed": Status.PACKED,
    "delivery.shipped": Status.SHIPPED,
    "delivery.delivered": Status.DELIVERED,
}

EVENT_KINDS = frozenset(
    {
        "inventory.reserved",
        "inventory.rejected",
        "inventory.expired",
        "inventory.confirmed",
        "inventory.confirm_failed",
        "payment.authorised",
        "payment.failed",
        "payment.refunded",
        *_STAGE_OF,
    }
)
"""Events the saga consumes."""

COMMAND_KINDS = frozenset(
    {
        "inventory.reserve",
        "inventory.confirm",
        "inventory.release",
        "payment.authorise",
        "payment.refund",
        "delivery.schedule",
    }
)
"""Commands the saga emits (each consumed by one service)."""


@dataclass(frozen=True, slots=True)
class Item:
    """``qty`` units of one product at ``price`` cents each."""

    product: str
    qty: int
    price: int

    def __post_init__(self) -> None:
        if not self.product or self.qty < 1 or self.price < 0:
            raise ValueError(f"bad order line {self!r}")


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to an order (input of :func:`apply`).

    Attributes:
        id: unique per happening; a redelivery or re-publication keeps it.
        kind: one of :data:`EVENT_KINDS`.
        order: the order id.
        reason: why it failed, for failures.
    """

    id: str
    kind: str
    order: str
    reason: str = ""

    def to_plain(self) -> dict[str, str]:
        """JSON-able form."""
        return {"id": self.id, "kind": self.kind, "order": self.order, "reason": self.reason}

    @classmethod
    def from_plain(cls, d: Mapping[str, Any]) -> Event:
        """Parse :meth:`to_plain` output.

        Raises:
            ValueError: a field is missing or of the wrong type, or the kind is unknown.
        """
        try:
            ev = cls(str(d["id"]), str(d["kind"]), str(d["order"]), str(d.get("reason", "")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad event {d!r}") from exc
        if ev.kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {ev.kind!r}")
        return ev


def event(order: str, kind: str, reason: str = "") -> Event:
    """The event ``kind`` of ``order``, with the deterministic id producers use."""
    return Event(id=f"{order}:{kind}", kind=kind, order=order, reason=reason)


@dataclass(frozen=True, slots=True)
class Command:
    """Work for another service, published through the outbox.

    Attributes:
        id: unique per command and order (the stream's deduplication id).
        kind: one of :data:`COMMAND_KINDS`.
        order: the order id.
        user: who placed it.
        items: the order lines.
        amount: total in cents.
    """

    id: str
    kind: str
    order: str
    user: str
    items: tuple[Item, ...]
    amount: int

    def to_plain(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "id": self.id,
            "kind": self.kind,
            "order": self.order,
            "user": self.user,
            "items": [[i.product, i.qty, i.price] for i in self.items],
            "amount": self.amount,
        }

    @classmethod
    def from_plain(cls, d: Mapping[str, Any]) -> Command:
        """Parse :meth:`to_plain` output.

        Raises:
            ValueError: a field is missing or of the wrong type.
        """
        try:
            items = tuple(Item(str(p), int(q), int(c)) for p, q, c in d["items"])
            cmd = cls(str(d["id"]), str(d["kind"]), str(d["order"]), str(d["user"]), items,
                      int(d["amount"]))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad command {d!r}") from exc
        if cmd.kind not in COMMAND_KINDS:
            raise ValueError(f"unknown command kind {cmd.kind!r}")
        return cmd


@dataclass(frozen=True, slots=True)
class Order:
    """One order's saga state.

    Attributes:
        seen: ids of the events applied or skipped (the deduplication record).
        charged: the payment was authorised (money taken).
        refunded: the charge was given back.
        reservation_lost: the inventory let the reservation expire before confirmation.
        history: the statuses it went through, in order.
    """

    id: str
    user: str
    items: tuple[Item, ...]
    status: Status = Status.RESERVING
    seen: frozenset[str] = frozenset()
    charged: bool = False
    refunded: bool = False
    reservation_lost: bool = False
    reason: str = ""
    history: tuple[Status, ...] = (Status.RESERVING,)
    commands_issued: int = 0

    @property
    def amount(self) -> int:
        """The total in cents."""
        return sum(i.qty * i.price for i in self.items)

    @property
    def final(self) -> bool:
        """It has reached a state it never leaves."""
        return self.status in FINAL

    def to_plain(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "id": self.id,
            "user": self.user,
            "items": [[i.product, i.qty, i.price] for i in self.items],
            "status": self.status.value,
            "seen": sorted(self.seen),
            "charged": self.charged,
            "refunded": self.refunded,
            "reservation_lost": self.reservation_lost,
            "reason": self.reason,
            "history": [s.value for s in self.history],
            "commands_issued": self.commands_issued,
            "amount": self.amount,
        }

    @classmethod
    def from_plain(cls, d: Mapping[str, Any]) -> Order:
        """Parse :meth:`to_plain` output."""
        return cls(
            id=d["id"],
            user=d["user"],
            items=tuple(Item(p, q, c) for p, q, c in d["items"]),
            status=Status(d["status"]),
            seen=frozenset(d["seen"]),
            charged=d["charged"],
            refunded=d["refunded"],
            reservation_lost=d["reservation_lost"],
            reason=d["reason"],
            history=tuple(Status(s) for s in d["history"]),
            commands_issued=d["commands_issued"],
        )


@dataclass(frozen=True, slots=True)
class Step:
    """What :func:`apply` decided.

    Attributes:
        order: the order after the event (the same object when nothing changed).
        commands: to publish (through the outbox), in order.
        duplicate: the event was seen before and skipped.
        ignored: the event had no effect in the order's state (recorded as seen).
    """

    order: Order
    commands: tuple[Command, ...] = field(default=())
    duplicate: bool = False
    ignored: bool = False


def place(order_id: str, user: str, items: Sequence[Item]) -> Step:
    """Start the saga for a new order: ask the inventory to reserve its lines.

    Raises:
        ValueError: no lines, or one product twice.
    """
    if not items:
        raise ValueError("an order needs at least one line")
    if len({i.product for i in items}) != len(items):
        raise ValueError("each product may appear once per order")
    order = Order(id=order_id, user=user, items=tuple(items))
    return _emit(order, "inventory.reserve")


def apply(order: Order, ev: Event) -> Step:
    """Apply one event to ``order`` (see the module docstring for the transitions).

    Raises:
        ValueError: the event is about another order.
    """
    if ev.order != order.id:
        raise ValueError(f"event {ev.id} is for order {ev.order}, not {order.id}")
    if ev.id in order.seen:
        return Step(order, duplicate=True)
    o = replace(order, seen=order.seen | {ev.id})
    s, k = o.status, ev.kind

    if k == "payment.authorised":
        o = replace(o, charged=True)
        if s is Status.AUTHORISING and not o.reservation_lost:
            return _emit(_to(o, Status.CONFIRMING), "inventory.confirm")
        if s in (Status.AUTHORISING, Status.CANCELLED):  # nothing to sell it against
            o = replace(o, reason=o.reason or "reservation expired before payment")
            return _emit(_to(o, Status.REFUNDING), "payment.refund")
        return Step(o, ignored=True)  # already charged: a second answer changes nothing
    if k == "payment.refunded":
        o = replace(o, refunded=True)
        if s is Status.REFUNDING:
            return Step(_to(o, Status.REFUNDED))
        return Step(o, ignored=True)
    if k == "inventory.reserved":
        if s is Status.RESERVING:
            return _emit(_to(o, Status.AUTHORISING), "payment.authorise")
        if s in (Status.CANCELLED, Status.REFUNDING, Status.REFUNDED):
            return _emit(o, "inventory.release", ignored=True)  # a late reservation
        return Step(o, ignored=True)

    if s is Status.RESERVING:
        if k == "inventory.rejected":
            return Step(_to(replace(o, reason=ev.reason or "out of stock"), Status.CANCELLED))
        if k == "inventory.expired":  # reserved, then expired before we heard of it
            return Step(o, ignored=True)
    elif s is Status.AUTHORISING:
        if k == "payment.failed":
            o = replace(o, reason=ev.reason or "payment declined")
            return _emit(_to(o, Status.CANCELLED), "inventory.release")
        if k == "inventory.expired":
            return Step(replace(o, reservation_lost=True))
    elif s is Status.CONFIRMING:
        if k == "inventory.confirmed":
            return _emit(_to(o, Status.CONFIRMED), "delivery.schedule")
        if k == "inventory.confirm_failed":
            o = replace(o, reason=ev.reason or "reservation expired", reservation_lost=True)
            return _emit(_to(o, Status.REFUNDING), "payment.refund", "inventory.release")
    elif s in _STAGES and k in _STAGE_OF:
        target = _STAGE_OF[k]
        if _STAGES.index(target) > _STAGES.index(s):  # stages only move forward
            return Step(_to(o, target))
    return Step(o, ignored=True)


def _to(o: Order, status: Status) -> Order:
    return replace(o, status=status, history=(*o.history, status))


def _emit(o: Order, *kinds: str, ignored: bool = False) -> Step:
    cmds = tuple(
        Command(f"{o.id}:{kind}:{o.commands_issued + n}", kind, o.id, o.user, o.items, o.amount)
        for n, kind in enumerate(kinds)
    )
    return Step(replace(o, commands_issued=o.commands_issued + len(kinds)), cmds, ignored=ignored)


__all__ = [
    "COMMAND_KINDS",
    "EVENT_KINDS",
    "FINAL",
    "RESERVATION_TTL",
    "Command",
    "Event",
    "Item",
    "Order",
    "Status",
    "Step",
    "apply",
    "event",
    "place",
]
