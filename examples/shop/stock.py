"""One product's stock with reservations that expire (pure: no I/O, time is an argument).

Theory of operation
-------------------
The inventory service keeps one document per product in the Raft KV (``stock/<product>``)
and changes it only with compare-and-set: read it with its revision, compute the new
document here, write it back if the revision is unchanged, else read again and retry. So
two checkouts racing for the last unit cannot both win: one CAS fails and its retry sees
the unit gone. A reservation and the stock it holds are in the same document, so there is
no moment where one is written and the other is not.

Document: ``on_hand`` units in the warehouse (sold units leave it), ``held`` reservations
``order -> [qty, expires_at]``, and ``done`` (what became of each order's reservation, so a
repeated command gets the same answer). ``available = on_hand - sum(held)`` never goes
below zero: nothing is ever oversold.

    reserve --> held --confirm (before expiry)--> sold (on_hand -= qty)
                 |--release / expire--> released | expired
    sold --release (the order was refunded)--> restocked (on_hand += qty)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DONE_KEPT = 500
"""Finished orders remembered per product (enough to answer any redelivered command)."""


@dataclass(slots=True)
class Stock:
    """A product's stock document (mutable; copy it with :meth:`from_plain`)."""

    product: str
    on_hand: int
    held: dict[str, tuple[int, float]] = field(default_factory=dict)
    done: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def available(self) -> int:
        """Units that may still be reserved."""
        return self.on_hand - sum(q for q, _ in self.held.values())

    def reserve(self, order: str, qty: int, *, now: float, ttl: float) -> str:
        """Hold ``qty`` units for ``order`` until ``now + ttl``.

        Returns ``"reserved"`` (also when already held for it), or the reason it was
        refused: ``"out of stock"``, or what became of an earlier reservation.
        """
        if qty < 1:
            return "bad quantity"
        if order in self.held:
            return "reserved"
        if order in self.done:
            return f"reservation {self.done[order][0]}"
        if self.available < qty:
            return "out of stock"
        self.held[order] = (qty, now + ttl)
        return "reserved"

    def confirm(self, order: str, *, now: float) -> str:
        """Make ``order``'s reservation a sale: ``"confirmed"`` or why not."""
        if order in self.done:
            state = self.done[order][0]
            return "confirmed" if state == "sold" else f"reservation {state}"
        if order not in self.held:
            return "no reservation"
        qty, expires = self.held.pop(order)
        if expires <= now:
            self._finish(order, "expired", qty)
            return "reservation expired"
        self.on_hand -= qty
        self._finish(order, "sold", qty)
        return "confirmed"

    def release(self, order: str) -> str:
        """Give back what ``order`` holds or bought (a compensation; idempotent)."""
        if order in self.held:
            qty, _ = self.held.pop(order)
            self._finish(order, "released", qty)
            return "released"
        state, qty = self.done.get(order, ("", 0))
        if state == "sold":
            self.on_hand += qty
            self._finish(order, "restocked", qty)
            return "restocked"
        if not state:
            self._finish(order, "released", 0)  # a reserve arriving later is refused
        return "nothing held"

    def expire(self, *, now: float) -> list[str]:
        """Drop the reservations due by ``now``; returns their orders."""
        gone = [o for o, (_, expires) in self.held.items() if expires <= now]
        for o in gone:
            qty, _ = self.held.pop(o)
            self._finish(o, "expired", qty)
        return gone

    def next_expiry(self) -> float | None:
        """When the next reservation is due (None: none held)."""
        return min((e for _, e in self.held.values()), default=None)

    def _finish(self, order: str, state: str, qty: int) -> None:
        self.done.pop(order, None)
        self.done[order] = (state, qty)
        while len(self.done) > DONE_KEPT:
            del self.done[next(iter(self.done))]
        assert self.available >= 0, f"oversold {self.product}: {self.to_plain()}"

    def to_plain(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "product": self.product,
            "on_hand": self.on_hand,
            "held": {o: list(v) for o, v in self.held.items()},
            "done": {o: list(v) for o, v in self.done.items()},
        }

    @classmethod
    def from_plain(cls, d: dict[str, Any]) -> Stock:
        """Parse :meth:`to_plain` output (a fresh copy)."""
        return cls(
            product=d["product"],
            on_hand=int(d["on_hand"]),
            held={o: (int(q), float(e)) for o, (q, e) in d["held"].items()},
            done={o: (str(s), int(q)) for o, (s, q) in d["done"].items()},
        )
