"""What every trading service agrees on: instruments, subjects, tick and packet formats.

Prices are integers in paise everywhere (1 rupee = 100 paise), quantities integers.

Subjects (dsys pub/sub, not durable): ``ticks.<exchange>.<symbol>`` (the feed's simulated
market, msgpack :func:`encode_tick`), ``depth.<exchange>.<symbol>`` (a matcher's book after
each change). Streams (dsys streams, durable): ``ORDERS`` captures ``orders.<symbol>``
(commands in :mod:`.matching`'s wire form), ``RESULTS`` captures ``results.<symbol>``
(one message per order command: the events it caused).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import msgpack

from dsys.sharding import HashRing

EXCHANGE = "NSE"
TICK_SIZE = 5  # paise
ORDERS_STREAM = "ORDERS"
RESULTS_STREAM = "RESULTS"

_NAMES = [
    "RELIANCE", "TCS", "HDFCBANK", "INFY", "ICICIBANK", "HINDUNILVR", "ITC", "SBIN",
    "BHARTIARTL", "KOTAKBANK", "LT", "AXISBANK", "ASIANPAINT", "MARUTI", "TITAN",
    "BAJFINANCE", "WIPRO", "ULTRACEMCO", "NESTLEIND", "SUNPHARMA",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Instrument:
    """One tradable instrument: Kite-style numeric ``token``, ``symbol``, opening price."""

    token: int
    symbol: str
    exchange: str
    open: int


def instruments(count: int = 500, seed: int = 16) -> list[Instrument]:
    """The same ``count`` instruments in every process (seeded)."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        symbol = _NAMES[i] if i < len(_NAMES) else f"STK{i:04d}"
        price = rnd.randrange(5_000, 500_000) // TICK_SIZE * TICK_SIZE  # 50 to 5,000 rupees
        out.append(Instrument(token=100_000 + i * 7, symbol=symbol, exchange=EXCHANGE, open=price))
    return out


def owner_ring(matchers: list[str]) -> HashRing:
    """The consistent-hash ring that assigns instruments to matcher processes."""
    return HashRing(matchers)


def owner(ring: HashRing, symbol: str) -> str:
    """The matcher that owns ``symbol``."""
    return ring.get(symbol)


@dataclass(slots=True)
class Quote:
    """The market state of one instrument, as the ticker sends it (paise, shares)."""

    token: int
    ltp: int
    last_qty: int = 0
    avg_price: int = 0
    volume: int = 0
    buy_qty: int = 0
    sell_qty: int = 0
    open: int = 0
    high: int = 0
    low: int = 0
    close: int = 0
    ts: int = 0  # exchange timestamp, seconds


def encode_tick(q: Quote) -> bytes:
    """A quote as the feed publishes it."""
    data: bytes = msgpack.packb(
        [q.token, q.ltp, q.last_qty, q.avg_price, q.volume, q.buy_qty, q.sell_qty,
         q.open, q.high, q.low, q.close, q.ts]
    )  # fmt: skip
    return data


def decode_tick(data: bytes) -> Quote:
    """:func:`encode_tick` reversed.

    Raises:
        ValueError: not a tick.
    """
    try:
        fields = msgpack.unpackb(data)
        return Quote(*fields)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a tick: {exc}") from None


# -- Kite-style binary packets ----------------------------------------------------------------
# A message: int16 number of packets, then per packet int16 length + packet, big-endian.
# ltp (8 bytes): token, ltp. quote (44): token, ltp, last qty, avg price, volume, buy qty,
# sell qty, open, high, low, close. full (184): quote + last trade time, oi, oi high, oi
# low, exchange timestamp + 10 depth entries (5 bids, then 5 asks) of qty int32, price
# int32, orders int16, 2 bytes padding.

MODES = ("ltp", "quote", "full")
_LTP = struct.Struct(">ii")
_QUOTE = struct.Struct(">11i")
_FULL_TAIL = struct.Struct(">5i")
_DEPTH = struct.Struct(">iih2x")
EMPTY_DEPTH: tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]] = ([], [])


def pack_quote(
    q: Quote,
    mode: str,
    depth: tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]] = EMPTY_DEPTH,
) -> bytes:
    """One packet of ``mode`` for ``q``; ``depth`` is ``(bids, asks)`` of (price, qty, orders)."""
    if mode == "ltp":
        return _LTP.pack(q.token, q.ltp)
    body = _QUOTE.pack(
        q.token, q.ltp, q.last_qty, q.avg_price, q.volume, q.buy_qty, q.sell_qty,
        q.open, q.high, q.low, q.close,
    )  # fmt: skip
    if mode == "quote":
        return body
    body += _FULL_TAIL.pack(q.ts, 0, 0, 0, q.ts)
    for side in depth:
        levels = list(side[:5]) + [(0, 0, 0)] * (5 - min(5, len(side)))
        for price, qty, orders in levels:
            body += _DEPTH.pack(qty, price, orders)
    return body


def pack_message(packets: list[bytes]) -> bytes:
    """Packets framed as one binary WebSocket message."""
    out = [struct.pack(">h", len(packets))]
    for p in packets:
        out.append(struct.pack(">h", len(p)))
        out.append(p)
    return b"".join(out)


def unpack_message(data: bytes) -> list[dict[str, object]]:
    """Parse a binary ticker message (for clients and tests); prices stay in paise."""
    (n,) = struct.unpack_from(">h", data, 0)
    off = 2
    out: list[dict[str, object]] = []
    for _ in range(n):
        (size,) = struct.unpack_from(">h", data, off)
        off += 2
        p = data[off : off + size]
        off += size
        token, ltp = _LTP.unpack_from(p, 0)
        tick: dict[str, object] = {"instrument_token": token, "last_price": ltp, "mode": "ltp"}
        if size >= _QUOTE.size:
            f = _QUOTE.unpack_from(p, 0)
            tick.update(
                mode="quote", last_quantity=f[2], average_price=f[3], volume=f[4],
                buy_quantity=f[5], sell_quantity=f[6],
                ohlc={"open": f[7], "high": f[8], "low": f[9], "close": f[10]},
            )  # fmt: skip
        if size >= 184:
            tick["mode"] = "full"
            levels = [_DEPTH.unpack_from(p, 64 + i * 12) for i in range(10)]
            tick["depth"] = {
                "buy": [{"quantity": q, "price": pr, "orders": o} for q, pr, o in levels[:5]],
                "sell": [{"quantity": q, "price": pr, "orders": o} for q, pr, o in levels[5:]],
            }
        out.append(tick)
    return out


__all__ = [
    "EXCHANGE",
    "MODES",
    "ORDERS_STREAM",
    "RESULTS_STREAM",
    "TICK_SIZE",
    "Instrument",
    "Quote",
    "decode_tick",
    "encode_tick",
    "instruments",
    "owner",
    "owner_ring",
    "pack_message",
    "pack_quote",
    "unpack_message",
]
