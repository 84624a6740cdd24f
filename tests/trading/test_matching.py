"""The pure matching engine: table tests, and hypothesis against a naive reference book."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from examples.trading.matching import (
    BUY,
    DAY,
    IOC,
    LIMIT,
    MARKET,
    SELL,
    SL,
    SL_M,
    Cancel,
    Cancelled,
    Command,
    EndOfDay,
    Event,
    Modify,
    OrderBook,
    Place,
    Rejected,
    Side,
    Trade,
    Triggered,
    command_from_wire,
    command_to_wire,
    replay,
)
from hypothesis import given, settings
from hypothesis import strategies as st

# -- table tests ----------------------------------------------------------------------------


def test_price_then_time_priority_at_the_resting_price() -> None:
    book = OrderBook()
    assert book.place("s1", SELL, 10, 101) == []
    assert book.place("s2", SELL, 10, 100) == []
    assert book.place("s3", SELL, 10, 100) == []
    ev = book.place("b1", BUY, 25, 102)
    assert ev == [
        Trade(1, "b1", "s2", BUY, 100, 10, 15, 0),
        Trade(2, "b1", "s3", BUY, 100, 10, 5, 0),
        Trade(3, "b1", "s1", BUY, 101, 5, 0, 5),
    ]
    assert book.last_price == 101
    assert book.depth() == ([], [(101, 5, 1)])


def test_ioc_and_market_never_rest() -> None:
    book = OrderBook()
    book.place("s1", SELL, 5, 100)
    assert book.place("b1", BUY, 8, 100, LIMIT, IOC) == [
        Trade(1, "b1", "s1", BUY, 100, 5, 3, 0),
        Cancelled("b1", 3, "ioc"),
    ]
    assert book.place("b2", BUY, 4, type=MARKET) == [Cancelled("b2", 4, "no liquidity")]
    assert len(book) == 0


def test_cancel_and_modify() -> None:
    book = OrderBook()
    book.place("b1", BUY, 10, 99)
    book.place("b2", BUY, 10, 99)
    assert book.modify("b2", qty=5) == []  # smaller: keeps its place
    assert book.modify("b1", qty=12) == []  # larger: goes behind b2
    ev = book.place("s1", SELL, 6, 99)
    assert [(e.maker, e.qty) for e in ev if isinstance(e, Trade)] == [("b2", 5), ("b1", 1)]
    assert book.modify("b1", price=101) == []
    assert book.best_bid() == 101
    assert book.cancel("b1") == [Cancelled("b1", 11, "cancelled")]
    assert book.cancel("b1") == [Rejected("b1", "no such open order")]
    assert book.modify("nope", qty=1) == [Rejected("nope", "no such open order")]


def test_modify_below_filled_is_rejected() -> None:
    book = OrderBook()
    book.place("b1", BUY, 10, 100)
    book.place("s1", SELL, 4, 100)
    assert book.modify("b1", qty=4) == [Rejected("b1", "quantity must exceed the 4 already filled")]
    assert book.open_qty("b1") == 6


def test_stop_orders_trigger_on_the_last_price() -> None:
    book = OrderBook()
    book.place("s1", SELL, 1, 100)
    book.place("b0", BUY, 1, 100)  # last = 100
    assert book.place("stop", SELL, 3, 95, SL, trigger=96) == []  # waits: 100 > 96
    assert book.place("stopm", BUY, 2, type=SL_M, trigger=110) == []
    book.place("b1", BUY, 5, 96)
    book.place("s2", SELL, 1, 96)  # trades at 96: the sell stop fires, trades with b1
    ev = book.place("x", SELL, 0, 1)
    assert ev == [Rejected("x", "quantity must be a positive integer")]
    assert book.open_qty("stop") == 0
    assert book.open_qty("b1") == 1
    assert book.open_qty("stopm") == 2  # still waiting


def test_stop_fires_in_the_same_command() -> None:
    book = OrderBook()
    book.place("a", SELL, 1, 100)
    book.place("b", BUY, 1, 100)
    book.place("stop", SELL, 2, type=SL_M, trigger=99)
    book.place("bid", BUY, 5, 98)
    assert book.place("s", SELL, 1, 99) == []  # rests: the best bid is 98
    ev = book.place("hit", BUY, 1, 99)
    assert ev == [
        Trade(2, "hit", "s", BUY, 99, 1, 0, 0),
        Triggered("stop", 99),
        Trade(3, "stop", "bid", SELL, 98, 2, 0, 3),
    ]


@pytest.mark.parametrize(
    ("cmd", "reason"),
    [
        (Place("o", BUY, -1, 100), "quantity must be a positive integer"),
        (Place("o", BUY, 10**9, 100), "quantity above the maximum 10000000"),
        (Place("o", BUY, 1, 0), "price must be a positive integer number of paise"),
        (Place("o", BUY, 1, -5), "price must be a positive integer number of paise"),
        (Place("o", BUY, 1, 10**13), "price above the maximum 1000000000000"),
        (Place("o", BUY, 1, 101), "price must be a multiple of the tick size 5"),
        (Place("o", BUY, 1, 100, SL, trigger=105), "a stop-loss buy needs trigger"),
        (Place("o", BUY, 1, 100, SL_M), "trigger price must be a positive integer"),
    ],
    ids=["negative-qty", "absurd-qty", "zero-price", "negative-price", "absurd-price", "off-tick",
         "sl-trigger-above", "slm-no-trigger"],
)  # fmt: skip
def test_bad_orders_are_rejected_with_a_reason(cmd: Place, reason: str) -> None:
    book = OrderBook(tick=5)
    book.place("keep", SELL, 1, 200)
    [ev] = book.apply(cmd)
    assert isinstance(ev, Rejected)
    assert ev.reason.startswith(reason)
    assert book.resting() == [("keep", SELL, 200, 1)]


def test_end_of_day_cancels_everything_open() -> None:
    book = OrderBook()
    book.place("b", BUY, 1, 10)
    book.place("s", SELL, 2, 20)
    assert book.end_of_day() == [Cancelled("b", 1, "end of day"), Cancelled("s", 2, "end of day")]
    assert len(book) == 0


def test_wire_round_trip_and_malformed_commands() -> None:
    cmds: list[Command] = [
        Place("o1", BUY, 3, 100, SL, IOC, 95),
        Place(7, SELL, 1, 0, SL_M, DAY, 90),
        Modify("o1", 4, 105, 0),
        Cancel("o1"),
        EndOfDay(),
    ]
    for cmd in cmds:
        assert command_from_wire(command_to_wire(cmd)) == cmd
    for bad in (
        {},
        {"op": "place", "id": "x", "side": "HOLD", "qty": 1},
        {"op": "place", "id": "x", "side": "BUY", "qty": "1"},
        {"op": "place", "id": None, "side": "BUY", "qty": 1},
        {"op": "cancel", "id": [1]},
    ):
        with pytest.raises(ValueError):
            command_from_wire(bad)


# -- hypothesis: a naive reference book ----------------------------------------------------


@dataclass
class _Ref:
    id: int
    side: Side
    price: int  # 0 for market
    qty: int
    left: int
    seq: int


class NaiveBook:
    """Lists and linear scans; LIMIT/MARKET, DAY/IOC, cancel, modify (no stops)."""

    def __init__(self) -> None:
        self.resting: list[_Ref] = []
        self.seq = 0
        self.trades = 0

    def _match(self, o: _Ref, ev: list[Event]) -> None:
        while o.left:
            opp = [r for r in self.resting if r.side != o.side]
            if o.side == BUY:
                opp = [r for r in opp if o.price == 0 or r.price <= o.price]
                opp.sort(key=lambda r: (r.price, r.seq))
            else:
                opp = [r for r in opp if r.price >= o.price]
                opp.sort(key=lambda r: (-r.price, r.seq))
            if not opp:
                return
            m = opp[0]
            q = min(m.left, o.left)
            m.left -= q
            o.left -= q
            self.trades += 1
            ev.append(Trade(self.trades, o.id, m.id, o.side, m.price, q, o.left, m.left))
            if not m.left:
                self.resting.remove(m)

    def apply(self, cmd: Command) -> list[Event]:
        ev: list[Event] = []
        if isinstance(cmd, Place):
            self.seq += 1
            o = _Ref(int(cmd.order_id), cmd.side, cmd.price, cmd.qty, cmd.qty, self.seq)
            self._match(o, ev)
            if o.left:
                if cmd.type == MARKET:
                    ev.append(Cancelled(o.id, o.left, "no liquidity"))
                elif cmd.validity == IOC:
                    ev.append(Cancelled(o.id, o.left, "ioc"))
                else:
                    self.resting.append(o)
        elif isinstance(cmd, Cancel):
            found = [r for r in self.resting if r.id == cmd.order_id]
            if not found:
                return [Rejected(cmd.order_id, "no such open order")]
            self.resting.remove(found[0])
            ev.append(Cancelled(cmd.order_id, found[0].left, "cancelled"))
        elif isinstance(cmd, Modify):
            found = [r for r in self.resting if r.id == cmd.order_id]
            if not found:
                return [Rejected(cmd.order_id, "no such open order")]
            r = found[0]
            qty, price = cmd.qty or r.qty, cmd.price or r.price
            filled = r.qty - r.left
            if qty <= filled:
                return [Rejected(cmd.order_id, f"quantity must exceed the {filled} already filled")]
            if price == r.price and qty <= r.qty:
                r.left -= r.qty - qty
                r.qty = qty
                return ev
            self.resting.remove(r)
            r.left += qty - r.qty
            r.qty, r.price = qty, price
            self.seq += 1
            r.seq = self.seq
            self._match(r, ev)
            if r.left:
                self.resting.append(r)
        return ev


@st.composite
def commands(draw: st.DrawFn, stops: bool = False) -> list[Command]:
    n = draw(st.integers(1, 80))
    out: list[Command] = []
    next_id = 0
    prices = st.integers(95, 105)
    for _ in range(n):
        kind = draw(st.sampled_from(["place", "place", "place", "cancel", "modify"]))
        if kind == "place" or next_id == 0:
            next_id += 1
            side = draw(st.sampled_from([BUY, SELL]))
            qty = draw(st.integers(1, 20))
            otype = draw(
                st.sampled_from([LIMIT, LIMIT, LIMIT, MARKET] + ([SL, SL_M] if stops else []))
            )
            validity = draw(st.sampled_from([DAY, DAY, IOC]))
            price = draw(prices) if otype in (LIMIT, SL) else 0
            trigger = 0
            if otype in (SL, SL_M):
                trigger = draw(prices)
                if otype == SL:
                    trigger = min(trigger, price) if side == BUY else max(trigger, price)
            out.append(Place(next_id, side, qty, price, otype, validity, trigger))
        elif kind == "cancel":
            out.append(Cancel(draw(st.integers(1, next_id))))
        else:
            out.append(
                Modify(
                    draw(st.integers(1, next_id)),
                    draw(st.sampled_from([0, 1, 5, 10, 30])),
                    draw(st.one_of(st.just(0), prices)),
                )
            )
    return out


def _check_invariants(cmds: list[Command], book: OrderBook, events: list[Event]) -> None:
    """Fills at a price no worse than the limit, quantities conserve, book never crossed."""
    orders = {c.order_id: c for c in cmds if isinstance(c, Place)}
    traded: dict[object, int] = {}
    for e in events:
        if isinstance(e, Trade):
            assert e.qty > 0
            taker, maker = orders[e.taker], orders[e.maker]
            assert taker.side == e.side and maker.side != e.side
            traded[e.taker] = traded.get(e.taker, 0) + e.qty
            traded[e.maker] = traded.get(e.maker, 0) + e.qty
    bid, ask = book.best_bid(), book.best_ask()
    assert bid is None or ask is None or bid < ask, (bid, ask)
    for oid, left in [(r[0], r[3]) for r in book.resting()]:
        assert left > 0
        assert oid in orders


@settings(max_examples=80, deadline=None)
@given(commands())
def test_same_events_as_the_naive_reference_book(cmds: list[Command]) -> None:
    book = OrderBook()
    ref = NaiveBook()
    for cmd in cmds:
        assert book.apply(cmd) == ref.apply(cmd), cmd


def _final_qty(cmds: list[Command], events_by_cmd: list[list[Event]]) -> dict[object, int]:
    """Each order's total quantity after the accepted modifies."""
    qty: dict[object, int] = {}
    for cmd, evs in zip(cmds, events_by_cmd, strict=True):
        rejected = any(isinstance(e, Rejected) for e in evs)
        if rejected:
            continue
        if isinstance(cmd, Place) or (isinstance(cmd, Modify) and cmd.qty):
            qty[cmd.order_id] = cmd.qty
    return qty


@settings(max_examples=80, deadline=None)
@given(commands(stops=True))
def test_invariants_with_stops_and_replay_is_identical(cmds: list[Command]) -> None:
    book = OrderBook()
    per_cmd = [book.apply(cmd) for cmd in cmds]
    events = [e for evs in per_cmd for e in evs]
    _check_invariants(cmds, book, events)
    # every fill is at the resting order's price and no worse than the taker's limit
    placed = {c.order_id: c for c in cmds if isinstance(c, Place)}
    for cmd, evs in zip(cmds, per_cmd, strict=True):
        for e in evs:
            taker = isinstance(e, Trade) and isinstance(cmd, Place) and cmd.order_id == e.taker
            if taker and placed[e.taker].type in (LIMIT, SL):
                assert (e.price <= cmd.price) if e.side == BUY else (e.price >= cmd.price)
    # quantities conserve: traded + open + cancelled == ordered (after modifies)
    qty = _final_qty(cmds, per_cmd)
    done: dict[object, int] = {}
    for e in events:
        if isinstance(e, Trade):
            done[e.taker] = done.get(e.taker, 0) + e.qty
            done[e.maker] = done.get(e.maker, 0) + e.qty
        elif isinstance(e, Cancelled):
            done[e.order_id] = done.get(e.order_id, 0) + e.left
    for oid, q in qty.items():
        assert done.get(oid, 0) + book.open_qty(oid) == q, oid
    # replay from the input log gives identical events and an identical book
    again, events2 = replay(cmds)
    assert events2 == events
    assert again.resting() == book.resting()
    assert again.trades == book.trades == sum(isinstance(e, Trade) for e in events)
