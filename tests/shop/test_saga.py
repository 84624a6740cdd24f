"""The checkout saga and the stock document, driven through random worlds by Hypothesis.

A tiny world in memory: the saga (``examples.shop.saga``), the stock documents
(``examples.shop.stock``) and a payment provider that keeps a ledger. Messages (commands
and events) sit in one bag; Hypothesis picks which one is delivered next, duplicates some,
fails payments, and moves the clock past reservation expiries. Whatever it picks, the
invariants hold at the end.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
from examples.shop.saga import (
    FINAL,
    Command,
    Event,
    Item,
    Order,
    Status,
    apply,
    event,
    place,
)
from examples.shop.stock import Stock
from hypothesis import given, settings
from hypothesis import strategies as st

TTL = 10.0


@dataclass
class World:
    stock: dict[str, Stock]
    orders: dict[str, Order] = field(default_factory=dict)
    bag: list[Command | Event] = field(default_factory=list)
    now: float = 0.0
    charges: Counter[str] = field(default_factory=Counter)
    refunds: Counter[str] = field(default_factory=Counter)
    declined: set[str] = field(default_factory=set)
    applied: int = 0

    def checkout(self, oid: str, items: list[Item]) -> None:
        step = place(oid, "u-" + oid, items)
        self.orders[oid] = step.order
        self.bag.extend(step.commands)

    def deliver(self, msg: Command | Event) -> None:
        if isinstance(msg, Event):
            step = apply(self.orders[msg.order], msg)
            self.orders[msg.order] = step.order
            self.bag.extend(step.commands)
            self.applied += not step.duplicate
            return
        self.bag.extend(self.serve(msg))

    def serve(self, c: Command) -> list[Event]:
        """The inventory, payment and delivery services (as in examples/shop/services.py)."""
        o = c.order
        if c.kind == "inventory.reserve":
            done: list[Item] = []
            for item in c.items:
                answer = self.stock[item.product].reserve(o, item.qty, now=self.now, ttl=TTL)
                if answer != "reserved":
                    for d in done:
                        self.stock[d.product].release(o)
                    return [event(o, "inventory.rejected", answer)]
                done.append(item)
            return [event(o, "inventory.reserved")]
        if c.kind == "inventory.confirm":
            answers = [self.stock[i.product].confirm(o, now=self.now) for i in c.items]
            bad = [a for a in answers if a != "confirmed"]
            if bad:
                for i in c.items:
                    self.stock[i.product].release(o)
                return [event(o, "inventory.confirm_failed", bad[0])]
            return [event(o, "inventory.confirmed")]
        if c.kind == "inventory.release":
            for i in c.items:
                self.stock[i.product].release(o)
            return []
        if c.kind == "payment.authorise":  # idempotency key = order id: one charge at most
            if o in self.declined:
                return [event(o, "payment.failed", "card declined")]
            self.charges[o] = 1
            return [event(o, "payment.authorised")]
        if c.kind == "payment.refund":
            if self.charges[o]:
                self.refunds[o] = 1
            return [event(o, "payment.refunded")]
        if c.kind == "delivery.schedule":
            stages = ("delivery.packed", "delivery.shipped", "delivery.delivered")
            return [event(o, k) for k in stages]
        raise AssertionError(c.kind)

    def expire(self) -> None:
        for s in self.stock.values():
            for o in s.expire(now=self.now):
                self.bag.append(event(o, "inventory.expired"))


def check(world: World, initial: dict[str, int]) -> None:
    sold = Counter[str]()
    for o in world.orders.values():
        assert o.final, f"{o.id} stuck in {o.status}: {o}"
        assert world.charges[o.id] <= 1 and world.refunds[o.id] <= 1
        if world.charges[o.id]:
            assert o.status in (Status.DELIVERED, Status.REFUNDED), o
            assert (o.status is Status.REFUNDED) == bool(world.refunds[o.id]), o
        else:
            assert o.status is Status.CANCELLED, o
        if o.status is Status.DELIVERED:
            for i in o.items:
                sold[i.product] += i.qty
    for p, s in world.stock.items():
        assert not s.held, f"{p}: reservations leaked {s.held}"
        assert s.on_hand == initial[p] - sold[p], f"{p}: on hand {s.on_hand}, sold {sold[p]}"
        assert s.on_hand >= 0


@settings(max_examples=300, deadline=None)
@given(
    stock=st.integers(0, 4),
    orders=st.lists(
        st.tuples(st.integers(1, 2), st.booleans(), st.booleans()), min_size=1, max_size=6
    ),
    choices=st.lists(st.integers(0, 1_000), max_size=400),
    dup_every=st.integers(2, 7),
    expire_every=st.integers(3, 40),
)
def test_any_order_of_events_keeps_the_invariants(
    stock: int,
    orders: list[tuple[int, bool, bool]],
    choices: list[int],
    dup_every: int,
    expire_every: int,
) -> None:
    initial = {"sock": stock, "hat": 2}
    world = World({p: Stock(p, n) for p, n in initial.items()})
    for n, (qty, declined, with_hat) in enumerate(orders):
        items = [Item("sock", qty, 500)] + ([Item("hat", 1, 900)] if with_hat else [])
        world.checkout(f"o{n}", items)
        if declined:
            world.declined.add(f"o{n}")
    for steps, pick in enumerate(choices, 1):
        if not world.bag:
            break
        msg = world.bag[pick % len(world.bag)]
        if pick % dup_every:  # else it stays in the bag: delivered again later
            world.bag.remove(msg)
        world.deliver(msg)
        if steps % expire_every == 0:
            world.now += TTL  # every reservation held now expires
            world.expire()
    # let the rest happen in order; no reservation may be left to the expiry safety net
    while world.bag:
        world.deliver(world.bag.pop(0))
    check(world, initial)


@pytest.mark.parametrize("n,k", [(5, 3), (3, 5), (4, 4), (6, 0)], ids=str)
def test_n_checkouts_of_stock_k_sell_min_n_k_when_nothing_fails(n: int, k: int) -> None:
    world = World({"sock": Stock("sock", k)})
    for i in range(n):
        world.checkout(f"o{i}", [Item("sock", 1, 500)])
    while world.bag:
        world.deliver(world.bag.pop(0))
    check(world, {"sock": k})
    statuses = Counter(o.status for o in world.orders.values())
    assert statuses == Counter({Status.DELIVERED: min(n, k), Status.CANCELLED: n - min(n, k)})
    assert sum(world.charges.values()) == min(n, k)


def test_a_duplicate_event_is_skipped() -> None:
    step = place("o1", "alice", [Item("sock", 1, 500)])
    ev = event("o1", "inventory.reserved")
    first = apply(step.order, ev)
    again = apply(first.order, ev)
    assert [c.kind for c in first.commands] == ["payment.authorise"]
    assert again.duplicate and again.commands == () and again.order is first.order


def test_expiry_during_payment_refunds_instead_of_selling() -> None:
    o = place("o1", "alice", [Item("sock", 1, 500)]).order
    o = apply(o, event("o1", "inventory.reserved")).order
    o = apply(o, event("o1", "inventory.expired")).order
    step = apply(o, event("o1", "payment.authorised"))
    assert step.order.status is Status.REFUNDING
    assert [c.kind for c in step.commands] == ["payment.refund"]
    done = apply(step.order, event("o1", "payment.refunded")).order
    assert done.status is Status.REFUNDED and done.charged and done.refunded and done.final


def test_a_late_reservation_for_a_cancelled_order_is_released() -> None:
    o = place("o1", "alice", [Item("sock", 1, 500)]).order
    o = apply(o, event("o1", "inventory.reserved")).order
    o = apply(o, event("o1", "payment.failed", "card declined")).order
    assert o.status is Status.CANCELLED and o.reason == "card declined"
    step = apply(o, Event("o1:inventory.reserved#2", "inventory.reserved", "o1"))
    assert step.ignored and [c.kind for c in step.commands] == ["inventory.release"]


def test_orders_and_commands_round_trip_through_plain_data() -> None:
    step = place("o1", "alice", [Item("sock", 2, 500), Item("hat", 1, 900)])
    assert Order.from_plain(step.order.to_plain()) == step.order
    assert Command.from_plain(step.commands[0].to_plain()) == step.commands[0]
    ev = event("o1", "payment.failed", "no")
    assert Event.from_plain(ev.to_plain()) == ev
    with pytest.raises(ValueError):
        Event.from_plain({"id": "x", "kind": "bogus", "order": "o1"})
    with pytest.raises(ValueError):
        place("o1", "alice", [])
    assert {s for s in Status if s in FINAL} == {
        Status.DELIVERED,
        Status.CANCELLED,
        Status.REFUNDED,
    }


def test_stock_never_goes_below_zero_and_expired_reservations_free_units() -> None:
    s = Stock("sock", 2)
    assert s.reserve("a", 2, now=0, ttl=5) == "reserved"
    assert s.reserve("b", 1, now=1, ttl=5) == "out of stock"
    assert s.expire(now=5) == ["a"]
    assert s.reserve("b", 1, now=6, ttl=5) == "reserved"
    assert s.confirm("a", now=6) == "reservation expired"
    assert s.confirm("b", now=7) == "confirmed" and s.on_hand == 1
    assert s.confirm("b", now=8) == "confirmed" and s.on_hand == 1  # idempotent
    assert s.release("b") == "restocked" and s.on_hand == 2
    assert Stock.from_plain(s.to_plain()) == s


@pytest.mark.parametrize("module", ["saga.py", "stock.py"])
def test_the_cores_are_pure(module: str) -> None:
    """saga.py and stock.py import no I/O, clock or asyncio (STYLE.md's pure cores)."""
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "shop" / module
    tree = ast.parse(path.read_text())
    imported = {
        (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    forbidden = {"asyncio", "aiohttp", "time", "random", "socket", "dsys"}  # nor any adapter
    assert not {m.split(".")[0] for m in imported} & forbidden, imported
