"""The matching engine: a price-time priority limit order book per instrument (pure, no I/O).

Theory of operation
-------------------
A :class:`OrderBook` holds one instrument. Prices are integers in ticks of the currency's
smallest unit (paise), quantities are integers. Each side keeps a sorted list of the
prices that have resting orders (bisect; a price band keeps it to a few thousand levels,
where a plain list beats a tree) and a dict ``price -> {order_id: order}``; a Python dict
keeps insertion order, so the first entry of a level is the oldest order there (time
priority), and cancelling is a dict deletion.

An incoming order first *matches*: a buy takes the lowest asks while they are at or below
its limit (a sell the highest bids at or above), always at the *resting* order's price,
oldest first within a level. What is left then *rests* (LIMIT, DAY) or is cancelled (IOC,
or MARKET with no more liquidity). Stop orders (SL, SL-M) wait outside the book until the
last traded price reaches their trigger (buy: ``last >= trigger``; sell: ``last <=
trigger``); then an SL enters as a LIMIT order and an SL-M as a MARKET order, in trigger
order (then arrival order), and may trigger further stops.

The book is a deterministic function of its inputs: applying the same commands
(:class:`Place`, :class:`Modify`, :class:`Cancel`, :class:`EndOfDay`) in the same order
gives the same events, trade numbers included. :func:`replay` does exactly that; a matcher
rebuilds its books after a crash by replaying its order stream.

Every call returns the events it caused, in order:

- :class:`Trade`: ``qty`` traded between the incoming ``taker`` and the resting ``maker``
  at ``price``; ``taker_left`` / ``maker_left`` say what each still has open;
- :class:`Cancelled`: the order left the book unfilled for ``left`` (reasons
  ``"cancelled"``, ``"ioc"``, ``"no liquidity"``, ``"end of day"``);
- :class:`Rejected`: the command was refused (``reason`` says why), nothing changed;
- :class:`Triggered`: a stop order's trigger was reached; it now trades or rests.

An order with no event in the answer (a LIMIT order that rested, a stop order that waits)
is open.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping
from enum import IntEnum
from typing import NamedTuple

OrderId = int | str


class Side(IntEnum):
    """Which side of the book an order is on."""

    BUY = 0
    SELL = 1


class OrderType(IntEnum):
    """How an order is priced (Kite's names, with SL-M spelled ``SL_M``)."""

    MARKET = 0
    LIMIT = 1
    SL = 2
    SL_M = 3


class Validity(IntEnum):
    """How long an order may rest: the trading day, or not at all (immediate or cancel)."""

    DAY = 0
    IOC = 1


BUY, SELL = Side.BUY, Side.SELL
MARKET, LIMIT, SL, SL_M = OrderType.MARKET, OrderType.LIMIT, OrderType.SL, OrderType.SL_M
DAY, IOC = Validity.DAY, Validity.IOC


# -- events --------------------------------------------------------------------------------


class Trade(NamedTuple):
    """``qty`` changed hands at ``price`` between the incoming order and a resting one.

    ``no`` numbers the book's trades from 1 (the same on every replay); ``side`` is the
    taker's side.
    """

    no: int
    taker: OrderId
    maker: OrderId
    side: Side
    price: int
    qty: int
    taker_left: int
    maker_left: int


class Cancelled(NamedTuple):
    """``order_id`` left the book with ``left`` unfilled, for ``reason``."""

    order_id: OrderId
    left: int
    reason: str


class Rejected(NamedTuple):
    """The command about ``order_id`` was refused; nothing changed."""

    order_id: OrderId
    reason: str


class Triggered(NamedTuple):
    """The stop order ``order_id`` was triggered at last traded price ``price``."""

    order_id: OrderId
    price: int


Event = Trade | Cancelled | Rejected | Triggered


# -- commands (the input log) -----------------------------------------------------------------


class Place(NamedTuple):
    """A new order. ``price`` is the limit (LIMIT, SL); ``trigger`` the stop (SL, SL-M)."""

    order_id: OrderId
    side: Side
    qty: int
    price: int = 0
    type: OrderType = LIMIT
    validity: Validity = DAY
    trigger: int = 0


class Modify(NamedTuple):
    """Change an open order: total quantity ``qty``, ``price`` and ``trigger`` (0 keeps)."""

    order_id: OrderId
    qty: int = 0
    price: int = 0
    trigger: int = 0


class Cancel(NamedTuple):
    """Cancel an open order."""

    order_id: OrderId


class EndOfDay(NamedTuple):
    """The session closes: every DAY order still open is cancelled."""


Command = Place | Modify | Cancel | EndOfDay


class _Order:
    """A live order: resting in the book, or a stop order waiting for its trigger."""

    __slots__ = (
        "id",
        "left",
        "pending",
        "price",
        "qty",
        "seq",
        "side",
        "trigger",
        "type",
        "validity",
    )

    def __init__(
        self,
        id: OrderId,
        side: Side,
        qty: int,
        price: int,
        type: OrderType,
        validity: Validity,
        trigger: int,
        seq: int,
    ) -> None:
        self.id = id
        self.side = side
        self.qty = qty  # total ordered; invariant: 0 < left <= qty
        self.left = qty
        self.price = price
        self.type = type
        self.validity = validity
        self.trigger = trigger
        self.seq = seq
        self.pending = False  # a stop order waiting for its trigger (not in the book)


_NO_EVENTS: list[Event] = []


class OrderBook:
    """A limit order book for one instrument.

    Args:
        tick: prices must be multiples of this (5 paise = 0.05 rupees, as on NSE).
        max_qty: the largest quantity one order may have.
        max_price: the highest price accepted (anything above is absurd, not a typo to fill).
    """

    def __init__(
        self, *, tick: int = 1, max_qty: int = 10_000_000, max_price: int = 10**12
    ) -> None:
        if tick <= 0 or max_qty <= 0 or max_price <= 0:
            raise ValueError("tick, max_qty and max_price must be positive")
        self.tick = tick
        self.max_qty = max_qty
        self.max_price = max_price
        self.last_price = 0  # the last traded price (0 before any trade)
        self.trades = 0  # trades so far; the next trade is number trades + 1
        self._seq = 0
        self._orders: dict[OrderId, _Order] = {}
        self._bids: dict[int, dict[OrderId, _Order]] = {}
        self._asks: dict[int, dict[OrderId, _Order]] = {}
        self._bid_prices: list[int] = []  # ascending: the best bid is the last
        self._ask_prices: list[int] = []  # ascending: the best ask is the first
        self._buy_stops: dict[int, dict[OrderId, _Order]] = {}
        self._sell_stops: dict[int, dict[OrderId, _Order]] = {}
        self._buy_triggers: list[int] = []  # ascending; they fire from the lowest up
        self._sell_triggers: list[int] = []  # ascending; they fire from the highest down

    # -- queries ------------------------------------------------------------------------

    def __len__(self) -> int:
        """Open orders (resting or waiting stops)."""
        return len(self._orders)

    def __contains__(self, order_id: object) -> bool:
        return order_id in self._orders

    def best_bid(self) -> int | None:
        """The highest resting buy price, or None."""
        return self._bid_prices[-1] if self._bid_prices else None

    def best_ask(self) -> int | None:
        """The lowest resting sell price, or None."""
        return self._ask_prices[0] if self._ask_prices else None

    def open_qty(self, order_id: OrderId) -> int:
        """What ``order_id`` still has open (0 when it is not open)."""
        o = self._orders.get(order_id)
        return o.left if o is not None else 0

    def depth(
        self, levels: int = 5
    ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """The best ``levels`` price levels per side as ``(price, qty, orders)``, best first."""
        bids = [
            (p, sum(o.left for o in self._bids[p].values()), len(self._bids[p]))
            for p in reversed(self._bid_prices[-levels:])
        ]
        asks = [
            (p, sum(o.left for o in self._asks[p].values()), len(self._asks[p]))
            for p in self._ask_prices[:levels]
        ]
        return bids, asks

    def resting(self) -> list[tuple[OrderId, Side, int, int]]:
        """Every resting order as ``(order_id, side, price, left)``, in priority order."""
        out = [
            (o.id, o.side, o.price, o.left)
            for p in reversed(self._bid_prices)
            for o in self._bids[p].values()
        ]
        out += [
            (o.id, o.side, o.price, o.left)
            for p in self._ask_prices
            for o in self._asks[p].values()
        ]
        return out

    # -- commands -----------------------------------------------------------------------

    def apply(self, cmd: Command) -> list[Event]:
        """Apply one command of the input log and return its events."""
        if type(cmd) is Place:
            return self.place(*cmd)
        if type(cmd) is Cancel:
            return self.cancel(cmd.order_id)
        if type(cmd) is Modify:
            return self.modify(*cmd)
        if type(cmd) is EndOfDay:
            return self.end_of_day()
        raise TypeError(f"not a command: {cmd!r}")

    def place(
        self,
        order_id: OrderId,
        side: Side,
        qty: int,
        price: int = 0,
        type: OrderType = LIMIT,
        validity: Validity = DAY,
        trigger: int = 0,
    ) -> list[Event]:
        """Place a new order; see the module docstring for what happens."""
        if not (  # the common case, checked inline (for speed); else the slow path says why
            type == LIMIT
            and qty.__class__ is int
            and 0 < qty <= self.max_qty
            and price.__class__ is int
            and 0 < price <= self.max_price
            and not price % self.tick
            and order_id not in self._orders
            and side in (BUY, SELL)
            and validity in (DAY, IOC)
        ):
            reason = self._invalid(order_id, side, qty, price, type, validity, trigger)
            if reason:
                return [Rejected(order_id, reason)]
        self._seq += 1
        o = _Order(order_id, side, qty, price, type, validity, trigger, self._seq)
        if type >= SL:
            last = self.last_price
            if not last or (last < trigger if side == BUY else last > trigger):
                self._orders[order_id] = o
                self._add_stop(o)
                return _NO_EVENTS
            ev: list[Event] = [Triggered(order_id, last)]
            o.type = LIMIT if type == SL else MARKET
        else:
            ev = []
        self._execute(o, ev)
        return ev

    def cancel(self, order_id: OrderId) -> list[Event]:
        """Cancel an open order."""
        o = self._orders.pop(order_id, None)
        if o is None:
            return [Rejected(order_id, "no such open order")]
        if o.pending:
            self._remove_stop(o)
        else:
            self._unrest(o)
        return [Cancelled(order_id, o.left, "cancelled")]

    def modify(
        self, order_id: OrderId, qty: int = 0, price: int = 0, trigger: int = 0
    ) -> list[Event]:
        """Change an open order's total quantity, price or trigger (0 keeps the current one).

        Lowering the quantity of a resting order keeps its place in the queue; a new price
        or a larger quantity sends it to the back (and it may trade at once).
        """
        o = self._orders.get(order_id)
        if o is None:
            return [Rejected(order_id, "no such open order")]
        if (  # the common "move": a new valid price, same quantity (checked inline, for speed)
            not qty
            and not trigger
            and not o.pending
            and o.type == LIMIT
            and price != o.price
            and type(price) is int
            and 0 < price <= self.max_price
            and not price % self.tick
        ):
            if o.side == BUY:
                levels, prices = self._bids, self._bid_prices
            else:
                levels, prices = self._asks, self._ask_prices
            level = levels[o.price]
            del level[order_id]
            if not level:
                del levels[o.price]
                del prices[bisect_left(prices, o.price)]
            o.price = price
            self._seq += 1
            o.seq = self._seq
            ev: list[Event] = []
            self._execute(o, ev)
            return ev
        qty = qty or o.qty
        price = price or o.price
        trigger = trigger or o.trigger
        filled = o.qty - o.left
        if qty <= filled:
            return [Rejected(order_id, f"quantity must exceed the {filled} already filled")]
        if qty > self.max_qty:
            return [Rejected(order_id, f"quantity above the maximum {self.max_qty}")]
        if o.type != MARKET and price != o.price:
            reason = self._bad_price(price, "price")
            if reason:
                return [Rejected(order_id, reason)]
        if o.pending:  # a waiting stop has nothing filled: place it again, if valid
            del self._orders[order_id]
            reason = self._invalid(order_id, o.side, qty, price, o.type, o.validity, trigger)
            if reason:
                self._orders[order_id] = o
                return [Rejected(order_id, reason)]
            self._remove_stop(o)
            return self.place(order_id, o.side, qty, price, o.type, o.validity, trigger)
        if price == o.price and qty <= o.qty:
            o.left -= o.qty - qty  # keeps time priority
            o.qty = qty
            return _NO_EVENTS
        self._unrest(o)
        o.left += qty - o.qty
        o.qty = qty
        o.price = price
        self._seq += 1
        o.seq = self._seq
        ev = []
        self._execute(o, ev)
        return ev

    def end_of_day(self) -> list[Event]:
        """Cancel every open DAY order (IOC orders never stay open), oldest first."""
        ev: list[Event] = []
        for o in sorted(self._orders.values(), key=lambda o: o.seq):
            self.cancel(o.id)
            ev.append(Cancelled(o.id, o.left, "end of day"))
        return ev

    # -- internals ----------------------------------------------------------------------

    def _bad_price(self, price: int, what: str) -> str:
        if type(price) is not int or price <= 0:
            return f"{what} must be a positive integer number of paise"
        if price > self.max_price:
            return f"{what} above the maximum {self.max_price}"
        if price % self.tick:
            return f"{what} must be a multiple of the tick size {self.tick}"
        return ""

    def _invalid(
        self,
        order_id: OrderId,
        side: Side,
        qty: int,
        price: int,
        type: OrderType,
        validity: Validity,
        trigger: int,
    ) -> str:
        if order_id in self._orders:
            return "duplicate order id"
        if side != BUY and side != SELL:
            return "side must be BUY or SELL"
        if not isinstance(qty, int) or qty <= 0:
            return "quantity must be a positive integer"
        if qty > self.max_qty:
            return f"quantity above the maximum {self.max_qty}"
        if type in (LIMIT, SL):
            reason = self._bad_price(price, "price")
            if reason:
                return reason
        elif type != MARKET and type != SL_M:
            return "unknown order type"
        if type >= SL:
            reason = self._bad_price(trigger, "trigger price")
            if reason:
                return reason
            if type == SL and (trigger > price if side == BUY else trigger < price):
                return "a stop-loss buy needs trigger <= price (a sell, trigger >= price)"
        if validity != DAY and validity != IOC:
            return "validity must be DAY or IOC"
        return ""

    def _execute(self, o: _Order, ev: list[Event]) -> None:
        """Match ``o``, then rest or cancel what is left, then fire any triggered stops."""
        before = self.trades
        self._match(o, ev)
        if o.left:
            if o.type == MARKET:
                ev.append(Cancelled(o.id, o.left, "no liquidity"))
                self._orders.pop(o.id, None)
            elif o.validity == IOC:
                ev.append(Cancelled(o.id, o.left, "ioc"))
                self._orders.pop(o.id, None)
            else:
                self._orders[o.id] = o
                if o.side == BUY:
                    level = self._bids.get(o.price)
                    if level is None:
                        self._bids[o.price] = {o.id: o}
                        insort(self._bid_prices, o.price)
                    else:
                        level[o.id] = o
                else:
                    level = self._asks.get(o.price)
                    if level is None:
                        self._asks[o.price] = {o.id: o}
                        insort(self._ask_prices, o.price)
                    else:
                        level[o.id] = o
        else:
            self._orders.pop(o.id, None)
        if self.trades != before and (self._buy_triggers or self._sell_triggers):
            self._fire_stops(ev)

    def _match(self, o: _Order, ev: list[Event]) -> None:
        left = o.left
        side = o.side
        oid = o.id
        orders = self._orders
        n = self.trades
        if side == BUY:
            prices = self._ask_prices
            levels = self._asks
            limit = o.price if o.type == LIMIT else self.max_price
            while left and prices:
                p = prices[0]
                if p > limit:
                    break
                level = levels[p]
                while left and level:
                    m = level[next(iter(level))]
                    q = m.left if m.left < left else left
                    left -= q
                    m.left -= q
                    n += 1
                    ev.append(Trade(n, oid, m.id, side, p, q, left, m.left))
                    if not m.left:
                        del level[m.id]
                        del orders[m.id]
                if not level:
                    del levels[p]
                    prices.pop(0)
        else:
            prices = self._bid_prices
            levels = self._bids
            limit = o.price if o.type == LIMIT else 0
            while left and prices:
                p = prices[-1]
                if p < limit:
                    break
                level = levels[p]
                while left and level:
                    m = level[next(iter(level))]
                    q = m.left if m.left < left else left
                    left -= q
                    m.left -= q
                    n += 1
                    ev.append(Trade(n, oid, m.id, side, p, q, left, m.left))
                    if not m.left:
                        del level[m.id]
                        del orders[m.id]
                if not level:
                    del levels[p]
                    prices.pop()
        if n != self.trades:
            self.trades = n
            self.last_price = ev[-1].price  # type: ignore[union-attr]
        o.left = left

    def _unrest(self, o: _Order) -> None:
        if o.side == BUY:
            levels, prices = self._bids, self._bid_prices
        else:
            levels, prices = self._asks, self._ask_prices
        level = levels[o.price]
        del level[o.id]
        if not level:
            del levels[o.price]
            del prices[bisect_left(prices, o.price)]

    def _add_stop(self, o: _Order) -> None:
        o.pending = True
        stops, triggers = (
            (self._buy_stops, self._buy_triggers)
            if o.side == BUY
            else (self._sell_stops, self._sell_triggers)
        )
        level = stops.get(o.trigger)
        if level is None:
            stops[o.trigger] = {o.id: o}
            insort(triggers, o.trigger)
        else:
            level[o.id] = o

    def _remove_stop(self, o: _Order) -> None:
        o.pending = False
        stops, triggers = (
            (self._buy_stops, self._buy_triggers)
            if o.side == BUY
            else (self._sell_stops, self._sell_triggers)
        )
        level = stops[o.trigger]
        del level[o.id]
        if not level:
            del stops[o.trigger]
            del triggers[bisect_left(triggers, o.trigger)]

    def _next_triggered(self) -> _Order | None:
        last = self.last_price
        buy = (
            self._buy_triggers[0] if self._buy_triggers and self._buy_triggers[0] <= last else None
        )
        sell = (
            self._sell_triggers[-1]
            if self._sell_triggers and self._sell_triggers[-1] >= last
            else None
        )
        if buy is None and sell is None:
            return None
        b = next(iter(self._buy_stops[buy].values())) if buy is not None else None
        s = next(iter(self._sell_stops[sell].values())) if sell is not None else None
        if b is None or (s is not None and s.seq < b.seq):
            return s
        return b

    def _fire_stops(self, ev: list[Event]) -> None:
        while True:
            o = self._next_triggered()
            if o is None:
                return
            self._remove_stop(o)
            del self._orders[o.id]
            ev.append(Triggered(o.id, self.last_price))
            o.type = LIMIT if o.type == SL else MARKET
            self._seq += 1
            o.seq = self._seq
            self._execute(o, ev)


def replay(commands: Iterable[Command], **book_options: int) -> tuple[OrderBook, list[Event]]:
    """Apply ``commands`` to a fresh book; return the book and every event in order."""
    book = OrderBook(**book_options)
    events: list[Event] = []
    for cmd in commands:
        events.extend(book.apply(cmd))
    return book, events


# -- wire form of commands and events (JSON-friendly dicts) ----------------------------------

_SIDES = {"BUY": BUY, "SELL": SELL}
_TYPES = {"MARKET": MARKET, "LIMIT": LIMIT, "SL": SL, "SL-M": SL_M}
_VALIDITIES = {"DAY": DAY, "IOC": IOC}


def command_to_wire(cmd: Command) -> dict[str, object]:
    """A command as a JSON-friendly dict (the order stream's message body)."""
    if isinstance(cmd, Place):
        return {
            "op": "place",
            "id": cmd.order_id,
            "side": cmd.side.name,
            "qty": cmd.qty,
            "price": cmd.price,
            "type": "SL-M" if cmd.type == SL_M else cmd.type.name,
            "validity": cmd.validity.name,
            "trigger": cmd.trigger,
        }
    if isinstance(cmd, Modify):
        return {
            "op": "modify",
            "id": cmd.order_id,
            "qty": cmd.qty,
            "price": cmd.price,
            "trigger": cmd.trigger,
        }
    if isinstance(cmd, Cancel):
        return {"op": "cancel", "id": cmd.order_id}
    return {"op": "eod"}


def _int(d: Mapping[str, object], key: str, default: int | None = None) -> int:
    v = d.get(key, default)
    if type(v) is not int:
        raise ValueError(f"{key} must be an integer, got {v!r}")
    return v


def command_from_wire(d: Mapping[str, object]) -> Command:
    """Parse :func:`command_to_wire`'s form back.

    Raises:
        ValueError: the dict is not a well-formed command (ranges are the book's business).
    """
    op = d.get("op")
    if op == "eod":
        return EndOfDay()
    oid = d.get("id")
    if not isinstance(oid, int | str) or isinstance(oid, bool):
        raise ValueError("id must be a string or an integer")
    if op == "cancel":
        return Cancel(oid)
    if op == "modify":
        return Modify(oid, _int(d, "qty", 0), _int(d, "price", 0), _int(d, "trigger", 0))
    if op == "place":
        try:
            side = _SIDES[str(d.get("side"))]
            otype = _TYPES[str(d.get("type", "LIMIT"))]
            validity = _VALIDITIES[str(d.get("validity", "DAY"))]
        except KeyError as exc:
            raise ValueError(f"unknown value {exc.args[0]!r}") from None
        return Place(
            oid, side, _int(d, "qty"), _int(d, "price", 0), otype, validity, _int(d, "trigger", 0)
        )
    raise ValueError(f"unknown op {op!r}")


def event_to_wire(ev: Event) -> dict[str, object]:
    """An event as a JSON-friendly dict."""
    if isinstance(ev, Trade):
        return {"ev": "trade", **ev._asdict(), "side": ev.side.name}
    if isinstance(ev, Cancelled):
        return {"ev": "cancelled", **ev._asdict()}
    if isinstance(ev, Rejected):
        return {"ev": "rejected", **ev._asdict()}
    return {"ev": "triggered", **ev._asdict()}


__all__ = [
    "BUY",
    "DAY",
    "IOC",
    "LIMIT",
    "MARKET",
    "SELL",
    "SL",
    "SL_M",
    "Cancel",
    "Cancelled",
    "Command",
    "EndOfDay",
    "Event",
    "Modify",
    "OrderBook",
    "OrderId",
    "OrderType",
    "Place",
    "Rejected",
    "Side",
    "Trade",
    "Triggered",
    "Validity",
    "command_from_wire",
    "command_to_wire",
    "event_to_wire",
    "replay",
]
