"""The broker: users, the order API, funds and holdings, the portfolio (and the web page).

``python -m examples.trading.api --kv HOST:PORT --streams HOST:PORT --pubsub HOST:PORT``

State lives in the Raft KV, one document per user (``acct/<user>``: cash, reserved cash,
holdings, blocked shares, positions, orders, client tags); every change to it is one
compare-and-set on that key, retried on conflict. So two concurrent orders can never
both spend the same cash or sell the same shares: the second CAS sees the first's
reservation. Passwords are salted argon2 hashes (``user/<name>``); tokens are
``name.expiry.HMAC-SHA256``.

Orders go to the exchange through the durable ``ORDERS`` stream, with a circuit breaker
and retries around the publish; the stream's message id (``<order id>:<op>``) is the
idempotency key, so a retried publish never places an order twice. Results come back on
the ``RESULTS`` stream (a durable consumer, explicit acks, processed in order); a result is
applied to a user's document only if its sequence is above the document's ``applied``
mark, in the same CAS, so a redelivered result is never applied twice.

Order states: ``VALIDATION PENDING`` (funds reserved, sent to the exchange), ``OPEN``,
``TRIGGER PENDING`` (a stop order waiting), ``COMPLETE``, ``CANCELLED``, ``REJECTED``.
MARKET orders are sent as IOC limit orders at the last price plus a 5% protection (and
SL-M as SL), as brokers do, so that the cash to reserve is known.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import argon2
from aiohttp import web

from dsys.errors import (
    BadInputError,
    CircuitOpenError,
    ConflictError,
    NotFoundError,
    UnavailableError,
)
from dsys.kv import KVClient
from dsys.observability import configure_logging, get_logger
from dsys.pubsub import Client, Msg
from dsys.ratelimit import Limiter, MemoryStore
from dsys.resilience import Backoff, CircuitBreaker, Retry
from dsys.streams import ConsumerConfig
from dsys.streams.client import StreamClient

from .market import EXCHANGE, RESULTS_STREAM, TICK_SIZE, decode_tick, instruments
from .matching import Cancel, Modify, Place, command_to_wire
from .matching import OrderType as OT
from .matching import Side as S
from .matching import Validity as V
from .service import ensure_streams, serve

log = get_logger("trading.api")
STATIC = Path(__file__).with_name("static")
START_CASH = 100_000_000  # 10 lakh rupees, in paise
MAX_QTY = 100_000
PROTECTION = 0.05
BAND = 0.20  # limit prices within 20% of the last price
NAME = re.compile(r"^[a-z0-9_]{3,24}$")
DONE = ("COMPLETE", "CANCELLED", "REJECTED")


class ApiError(Exception):
    """An error answered to the client as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


# -- the account document (pure functions) -------------------------------------------------


def new_account() -> dict[str, Any]:
    return {
        "cash": START_CASH,
        "reserved": 0,
        "holdings": {},
        "blocked": {},
        "positions": {},
        "orders": {},
        "tags": {},
        "n": 0,
        "applied": 0,
        "trades": [],
    }


def _release(acct: dict[str, Any], o: dict[str, Any], left: int) -> None:
    """Give back what ``left`` unfilled shares of ``o`` had reserved."""
    if left <= 0:
        return
    if o["side"] == "BUY":
        amount = left * o["limit"]
        acct["reserved"] -= amount
        acct["cash"] += amount
    else:
        sym = o["symbol"]
        acct["blocked"][sym] -= left
        acct["holdings"][sym] = acct["holdings"].get(sym, 0) + left


def apply_result(acct: dict[str, Any], user: str, seq: int, res: dict[str, Any]) -> bool:
    """Apply one RESULTS message to ``user``'s account; False if it was applied before."""
    if seq <= acct["applied"]:
        return False
    acct["applied"] = seq
    orders = acct["orders"]
    mine = f"{user}."
    cmd = res.get("cmd") or {}
    cmd_id = str(cmd.get("id", ""))
    rejected_ids = set()
    for ev in res["events"]:
        kind = ev["ev"]
        if kind == "trade":
            for oid, role in ((ev["taker"], "taker"), (ev["maker"], "maker")):
                o = orders.get(oid) if str(oid).startswith(mine) else None
                if o is None:
                    continue
                q, p, sym = ev["qty"], ev["price"], o["symbol"]
                pos = acct["positions"].setdefault(
                    sym, {"buy_qty": 0, "buy_value": 0, "sell_qty": 0, "sell_value": 0}
                )
                if o["side"] == "BUY":
                    acct["reserved"] -= q * o["limit"]
                    acct["cash"] += q * (o["limit"] - p)
                    acct["holdings"][sym] = acct["holdings"].get(sym, 0) + q
                    pos["buy_qty"] += q
                    pos["buy_value"] += q * p
                else:
                    acct["blocked"][sym] -= q
                    acct["cash"] += q * p
                    pos["sell_qty"] += q
                    pos["sell_value"] += q * p
                o["filled"] += q
                o["value"] += q * p
                o["avg_price"] = o["value"] // o["filled"]
                acct["trades"].append([res["symbol"], ev["no"], oid, o["side"], q, p, role])
                if o["filled"] >= o["qty"]:
                    o["status"] = "COMPLETE"
                    o.pop("prev", None)
        elif kind == "cancelled":
            o = orders.get(ev["order_id"]) if str(ev["order_id"]).startswith(mine) else None
            if o is not None and o["status"] not in DONE:
                _release(acct, o, ev["left"])
                o["status"] = "CANCELLED"
                o["reason"] = ev["reason"]
                o.pop("prev", None)
        elif kind == "rejected" and str(ev["order_id"]).startswith(mine):
            rejected_ids.add(ev["order_id"])
        elif kind == "triggered" and str(ev["order_id"]).startswith(mine):
            o = orders.get(ev["order_id"])
            if o is not None and o["status"] == "TRIGGER PENDING":
                o["status"] = "OPEN"
    o = orders.get(cmd_id) if cmd_id.startswith(mine) else None
    if o is not None:
        op = cmd.get("op")
        if cmd_id in rejected_ids:
            reason = next(
                (e["reason"] for e in res["events"] if e.get("order_id") == cmd_id), "rejected"
            )
            if op == "place" and o["status"] not in DONE:
                _release(acct, o, o["qty"] - o["filled"])
                o["status"], o["reason"] = "REJECTED", reason
            elif op == "modify" and "prev" in o and o["status"] not in DONE:
                _undo_modify(acct, o)
                o["reason"] = f"modify rejected: {reason}"
        elif o["status"] in ("VALIDATION PENDING", "MODIFY PENDING"):
            stop = o["type"] in ("SL", "SL-M") and not any(
                e["ev"] in ("trade", "triggered") and cmd_id in (e.get("taker"), e.get("order_id"))
                for e in res["events"]
            )
            o["status"] = "TRIGGER PENDING" if stop else "OPEN"
            o.pop("prev", None)
    return True


def _undo_modify(acct: dict[str, Any], o: dict[str, Any]) -> None:
    prev = o.pop("prev")
    left_now = o["qty"] - o["filled"]
    left_then = prev["qty"] - o["filled"]
    if o["side"] == "BUY":
        delta = left_then * prev["limit"] - left_now * o["limit"]
        acct["reserved"] += delta
        acct["cash"] -= delta
    else:
        delta = left_then - left_now
        sym = o["symbol"]
        acct["blocked"][sym] += delta
        acct["holdings"][sym] -= delta
    o["qty"], o["price"], o["limit"] = prev["qty"], prev["price"], prev["limit"]
    o["status"] = "OPEN"


# -- the service ---------------------------------------------------------------------------


class Broker:
    def __init__(self, args: argparse.Namespace, kv: KVClient, sc: StreamClient) -> None:
        self.args = args
        self.kv = kv
        self.sc = sc
        self.secret = (
            args.secret or os.environ.get("TRADING_SECRET") or os.urandom(32).hex()
        ).encode()
        # cheap parameters: an example on a laptop; production would use the defaults
        self.hasher = argon2.PasswordHasher(time_cost=2, memory_cost=16 * 1024, parallelism=1)
        self.per_second = Limiter(rate=args.orders_per_second, per=1.0, store=MemoryStore())
        self.per_minute = Limiter(rate=args.orders_per_minute, per=60.0, store=MemoryStore())
        self.breaker = CircuitBreaker(
            "exchange",
            failure_rate_threshold=50,
            window=20,
            minimum_calls=5,
            open_wait=2.0,
            ignore_exceptions=(BadInputError, ConflictError, NotFoundError),
        )
        self.retry = Retry(
            max_attempts=4,
            backoff=Backoff(initial=0.05, maximum=0.5),
            retry_on=(UnavailableError, OSError, TimeoutError),
            abort_on=(CircuitOpenError, BadInputError, ConflictError, NotFoundError),
            name="exchange",
        )
        insts = instruments(args.instruments)
        self.instruments = {i.symbol: i for i in insts}
        self.ltp = {i.symbol: i.open for i in insts}
        self.depth: dict[str, Any] = {}
        self.waiters: dict[str, asyncio.Event] = {}
        self.unsent: dict[str, tuple[str, bytes]] = {}  # msg id -> (subject, data), to resend

    # -- auth ----------------------------------------------------------------------------

    def token_for(self, user: str, ttl: float = 12 * 3600) -> str:
        payload = f"{user}.{int(time.time() + ttl)}"
        sig = hmac.new(self.secret, payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{base64.urlsafe_b64encode(sig).decode().rstrip('=')}"

    def user_of(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() or request.query.get("token", "")
        parts = token.split(".")
        if len(parts) != 3:
            raise ApiError(401, "log in first (Authorization: Bearer <token>)")
        user, expiry, sig = parts
        want = hmac.new(self.secret, f"{user}.{expiry}".encode(), hashlib.sha256).digest()
        got = base64.urlsafe_b64encode(want).decode().rstrip("=")
        if not hmac.compare_digest(got, sig) or not expiry.isdigit() or int(expiry) < time.time():
            raise ApiError(401, "invalid or expired token")
        return user

    async def signup(self, body: dict[str, Any]) -> dict[str, Any]:
        user, password = _credentials(body)
        record = {
            "hash": self.hasher.hash(password),
            "name": str(body.get("name") or user)[:64],
            "email": str(body.get("email") or "")[:128],
            "created": int(time.time()),
        }
        try:
            await self.kv.cas(f"user/{user}", json.dumps(record).encode(), revision=0)
        except ConflictError:
            raise ApiError(409, f"the user name {user!r} is taken") from None
        with contextlib.suppress(ConflictError):
            await self.kv.cas(f"acct/{user}", json.dumps(new_account()).encode(), revision=0)
        return {"user": user, "token": self.token_for(user)}

    async def login(self, body: dict[str, Any]) -> dict[str, Any]:
        user, password = _credentials(body)
        got = await self.kv.get(f"user/{user}")
        try:
            if got is None:
                raise argon2.exceptions.VerifyMismatchError
            self.hasher.verify(json.loads(got.value)["hash"], password)
        except argon2.exceptions.VerificationError:
            raise ApiError(401, "wrong user name or password") from None
        return {"user": user, "token": self.token_for(user)}

    async def profile(self, user: str) -> dict[str, Any]:
        got = await self.kv.get(f"user/{user}")
        if got is None:
            raise ApiError(404, "no such user")
        rec = json.loads(got.value)
        return {"user": user, "name": rec["name"], "email": rec["email"], "created": rec["created"]}

    # -- the account document --------------------------------------------------------------

    async def load(self, user: str) -> tuple[dict[str, Any], int]:
        got = await self.kv.get(f"acct/{user}")
        if got is None:
            return new_account(), 0
        return json.loads(got.value), got.revision

    async def update(self, user: str, change: Any) -> Any:
        """Run ``change(acct)`` and write it back with CAS, again on conflict."""
        for _ in range(100):
            acct, rev = await self.load(user)
            result = change(acct)
            try:
                await self.kv.cas(f"acct/{user}", json.dumps(acct).encode(), revision=rev)
            except ConflictError:
                continue
            return result
        raise ApiError(503, "the account is too busy; try again")

    # -- orders ----------------------------------------------------------------------------

    def rate_limit(self, user: str) -> None:
        for lim, what in (
            (self.per_second, "10 orders a second"),
            (self.per_minute, "200 a minute"),
        ):
            d = lim.hit_sync(user)
            if not d.allowed:
                raise ApiError(429, f"rate limit: {what}", retry_after=round(d.retry_after, 3))

    def validate(self, body: dict[str, Any]) -> dict[str, Any]:
        symbol = body.get("symbol")
        if symbol not in self.instruments:
            raise ApiError(400, f"unknown instrument {symbol!r}")
        side = body.get("side")
        if side not in ("BUY", "SELL"):
            raise ApiError(400, "side must be BUY or SELL")
        otype = body.get("type", "LIMIT")
        if otype not in ("MARKET", "LIMIT", "SL", "SL-M"):
            raise ApiError(400, "type must be MARKET, LIMIT, SL or SL-M")
        validity = body.get("validity", "DAY")
        if validity not in ("DAY", "IOC"):
            raise ApiError(400, "validity must be DAY or IOC")
        qty = body.get("qty")
        if type(qty) is not int or not 0 < qty <= MAX_QTY:
            raise ApiError(400, f"qty must be a whole number from 1 to {MAX_QTY}")
        ltp = self.ltp[symbol]
        lo, hi = int(ltp * (1 - BAND)), int(ltp * (1 + BAND))
        price = body.get("price", 0)
        trigger = body.get("trigger", 0)
        for name, v, needed in (
            ("price", price, otype in ("LIMIT", "SL")),
            ("trigger", trigger, otype in ("SL", "SL-M")),
        ):
            if not needed:
                continue
            if type(v) is not int or v <= 0 or v % TICK_SIZE:
                raise ApiError(
                    400, f"{name} must be a positive number of paise, a multiple of {TICK_SIZE}"
                )
            if not lo <= v <= hi:
                raise ApiError(400, f"{name} {v} is outside today's band {lo}..{hi} paise")
        tag = body.get("tag", "")
        if not isinstance(tag, str) or len(tag) > 40:
            raise ApiError(400, "tag must be a string of at most 40 characters")
        # what goes to the exchange: market orders carry a protection price
        limit = price
        if otype in ("MARKET", "SL-M"):
            ref = ltp if otype == "MARKET" else trigger
            raw = ref * (1 + PROTECTION) if side == "BUY" else ref * (1 - PROTECTION)
            limit = max(TICK_SIZE, int(raw) // TICK_SIZE * TICK_SIZE)
        return {
            "symbol": symbol, "side": side, "type": otype, "validity": validity, "qty": qty,
            "price": price, "trigger": trigger, "limit": limit, "tag": tag,
        }  # fmt: skip

    async def place(self, user: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self.validate(body)
        self.rate_limit(user)

        def reserve(acct: dict[str, Any]) -> tuple[dict[str, Any], bool]:
            tag = spec["tag"]
            if tag and tag in acct["tags"]:
                return acct["orders"][acct["tags"][tag]], False
            sym, qty = spec["symbol"], spec["qty"]
            if spec["side"] == "BUY":
                need = qty * spec["limit"]
                if acct["cash"] < need:
                    raise ApiError(
                        400, f"insufficient funds: need {need} paise, have {acct['cash']}"
                    )
                acct["cash"] -= need
                acct["reserved"] += need
            else:
                have = acct["holdings"].get(sym, 0)
                if have < qty:
                    raise ApiError(400, f"insufficient holdings: have {have} {sym}, selling {qty}")
                acct["holdings"][sym] = have - qty
                acct["blocked"][sym] = acct["blocked"].get(sym, 0) + qty
            acct["n"] += 1
            oid = f"{user}.{acct['n']}"
            o = {
                "order_id": oid, **spec, "status": "VALIDATION PENDING", "filled": 0,
                "value": 0, "avg_price": 0, "reason": "", "placed_at": time.time(),
            }  # fmt: skip
            acct["orders"][oid] = o
            if tag:
                acct["tags"][tag] = oid
            return o, True

        order, new = await self.update(user, reserve)
        if new or order["status"] == "VALIDATION PENDING":
            # a retry with the same tag resends: the first try may have stopped after the
            # reservation (a KV failover, a crash); the message id keeps it to one order
            otype = {"MARKET": OT.LIMIT, "LIMIT": OT.LIMIT, "SL": OT.SL, "SL-M": OT.SL}[
                order["type"]
            ]
            validity = V.IOC if order["type"] == "MARKET" else V[order["validity"]]
            cmd = Place(
                order["order_id"], S[order["side"]], order["qty"], order["limit"], otype,
                validity, order["trigger"],
            )  # fmt: skip
            await self.send(order["order_id"], "place", order["symbol"], cmd)
            order = await self.wait(user, order["order_id"])
        result: dict[str, Any] = order
        return result

    async def modify(self, user: str, oid: str, body: dict[str, Any]) -> dict[str, Any]:
        self.rate_limit(user)
        qty, price = body.get("qty", 0), body.get("price", 0)
        if type(qty) is not int or type(price) is not int or qty < 0 or price < 0:
            raise ApiError(400, "qty and price must be whole non-negative numbers (0 keeps)")

        def change(acct: dict[str, Any]) -> dict[str, Any]:
            o = acct["orders"].get(oid)
            if o is None:
                raise ApiError(404, f"no order {oid}")
            if o["status"] not in ("OPEN", "TRIGGER PENDING") or o["type"] == "MARKET":
                raise ApiError(400, f"order {oid} is {o['status']}; only open limit orders change")
            new_qty, new_price = qty or o["qty"], price or o["price"]
            if new_qty <= o["filled"] or new_qty > MAX_QTY:
                raise ApiError(
                    400, f"qty must be above the {o['filled']} filled, at most {MAX_QTY}"
                )
            if o["type"] in ("LIMIT", "SL"):
                ltp = self.ltp[o["symbol"]]
                if new_price % TICK_SIZE or not ltp * (1 - BAND) <= new_price <= ltp * (1 + BAND):
                    raise ApiError(
                        400, f"price {new_price} is off the tick or outside today's band"
                    )
            new_limit = new_price if o["type"] in ("LIMIT", "SL") else o["limit"]
            left_then, left_now = o["qty"] - o["filled"], new_qty - o["filled"]
            if o["side"] == "BUY":
                delta = left_now * new_limit - left_then * o["limit"]
                if delta > acct["cash"]:
                    raise ApiError(
                        400, f"insufficient funds for the change: need {delta} more paise"
                    )
                acct["cash"] -= delta
                acct["reserved"] += delta
            else:
                delta, sym = left_now - left_then, o["symbol"]
                if delta > acct["holdings"].get(sym, 0):
                    raise ApiError(400, "insufficient holdings for the change")
                acct["holdings"][sym] = acct["holdings"].get(sym, 0) - delta
                acct["blocked"][sym] = acct["blocked"].get(sym, 0) + delta
            o["prev"] = {"qty": o["qty"], "price": o["price"], "limit": o["limit"]}
            o["qty"], o["price"], o["limit"] = new_qty, new_price, new_limit
            o["status"] = "MODIFY PENDING"
            acct["n"] += 1
            o["mods"] = acct["n"]
            return dict(o)

        o = await self.update(user, change)
        cmd = Modify(oid, o["qty"], o["limit"] if o["type"] in ("LIMIT", "SL") else 0)
        await self.send(oid, f"modify{o['mods']}", o["symbol"], cmd)
        return await self.wait(user, oid)

    async def cancel(self, user: str, oid: str) -> dict[str, Any]:
        acct, _ = await self.load(user)
        o = acct["orders"].get(oid)
        if o is None:
            raise ApiError(404, f"no order {oid}")
        if o["status"] in DONE:
            raise ApiError(400, f"order {oid} is already {o['status']}")
        await self.send(oid, f"cancel{int(time.time() * 1000)}", o["symbol"], Cancel(oid))
        return await self.wait(user, oid, done=True)

    async def send(self, oid: str, op: str, symbol: str, cmd: Place | Modify | Cancel) -> None:
        """Publish a command to ORDERS: breaker + retries, the message id as idempotency key."""
        subject, data, msg_id = (
            f"orders.{symbol}",
            json.dumps(command_to_wire(cmd)).encode(),
            f"{oid}:{op}",
        )
        try:
            await self.breaker.call_async(
                self.retry.call_async, self.sc.publish, subject, data, msg_id=msg_id
            )
        except (UnavailableError, OSError, TimeoutError) as exc:
            # keep the reservation: the command is resent (same id) until the exchange has it
            self.unsent[msg_id] = (subject, data)
            log.warning("exchange unavailable; will resend", order=oid, error=str(exc))

    async def resend_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for msg_id, (subject, data) in list(self.unsent.items()):
                try:
                    await self.breaker.call_async(self.sc.publish, subject, data, msg_id=msg_id)
                except (UnavailableError, OSError, TimeoutError):
                    break
                self.unsent.pop(msg_id, None)

    async def wait(
        self, user: str, oid: str, limit: float = 3.0, *, done: bool = False
    ) -> dict[str, Any]:
        """The order once the exchange answered, or finished with ``done`` (at most
        ``limit`` seconds: then as it is)."""
        deadline = time.monotonic() + limit
        while True:
            acct, _ = await self.load(user)
            o: dict[str, Any] = acct["orders"][oid]
            waiting = (
                "VALIDATION PENDING",
                "MODIFY PENDING",
                *(("OPEN", "TRIGGER PENDING") if done else ()),
            )
            if o["status"] not in waiting or time.monotonic() > deadline:
                return o
            ev = self.waiters.setdefault(oid, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), max(0.01, deadline - time.monotonic()))
            self.waiters.pop(oid, None)

    # -- results from the exchange -----------------------------------------------------------

    async def consume_results(self) -> None:
        await ensure_streams(self.sc)
        await self.sc.add_consumer(
            RESULTS_STREAM,
            ConsumerConfig(name="broker", ack_policy="explicit", max_ack_pending=256),
        )
        while True:
            try:
                msgs = await self.sc.fetch(RESULTS_STREAM, "broker", batch=64, expires=1.0)
            except (UnavailableError, OSError) as exc:
                log.warning("results: stream unavailable", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            done: list[tuple[int, int]] = []
            for msg in msgs:
                try:
                    await self.apply(msg.seq, json.loads(msg.data))
                except (UnavailableError, OSError, TimeoutError) as exc:
                    log.warning("results: KV unavailable; redelivered later", error=str(exc))
                    await asyncio.sleep(0.5)
                    break  # unacked: this and the rest of the batch come again, in order
                except Exception:  # a result this code cannot apply: log it, do not stall
                    log.exception("results: cannot apply", seq=msg.seq)
                done.append((msg.seq, msg.deliveries))
            if done:  # one ack (one log entry) for what was applied, not one per result
                with contextlib.suppress(UnavailableError, OSError, TimeoutError):
                    await self.sc.ack(RESULTS_STREAM, "broker", done)

    async def apply(self, seq: int, res: dict[str, Any]) -> None:
        ids = {str((res.get("cmd") or {}).get("id", ""))}
        for ev in res["events"]:
            ids.update(str(ev.get(k, "")) for k in ("taker", "maker", "order_id"))
        users = {i.split(".", 1)[0] for i in ids if "." in i and not i.startswith("mm.")}
        for user in sorted(users):
            await self.update(user, lambda acct, user=user: apply_result(acct, user, seq, res))
        for i in ids:
            ev = self.waiters.get(i)
            if ev is not None:
                ev.set()

    # -- market data for the page ------------------------------------------------------------

    async def on_tick(self, msg: Msg) -> None:
        try:
            q = decode_tick(msg.data)
        except ValueError:
            return
        symbol = msg.subject.rpartition(".")[2]
        if symbol in self.ltp:
            self.ltp[symbol] = q.ltp

    async def on_depth(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError, KeyError):
            d = json.loads(msg.data)
            self.depth[d["symbol"]] = {"bids": d["bids"], "asks": d["asks"]}

    def portfolio(self, acct: dict[str, Any]) -> dict[str, Any]:
        positions = []
        for sym, p in sorted(acct["positions"].items()):
            net = p["buy_qty"] - p["sell_qty"]
            ltp = self.ltp.get(sym, 0)
            pnl = p["sell_value"] - p["buy_value"] + net * ltp
            positions.append({"symbol": sym, "net_qty": net, "ltp": ltp, "pnl": pnl, **p})
        holdings = [
            {"symbol": s, "qty": q, "blocked": acct["blocked"].get(s, 0), "ltp": self.ltp.get(s, 0)}
            for s, q in sorted(acct["holdings"].items())
            if q or acct["blocked"].get(s, 0)
        ]
        return {
            "cash": acct["cash"],
            "reserved": acct["reserved"],
            "holdings": holdings,
            "positions": positions,
            "pnl": sum(p["pnl"] for p in positions),
            "trades": acct["trades"][-200:],
        }


def _credentials(body: dict[str, Any]) -> tuple[str, str]:
    user, password = body.get("user"), body.get("password")
    if not isinstance(user, str) or not NAME.match(user) or user == "mm":
        raise ApiError(400, "user must be 3 to 24 characters of a-z, 0-9 and _")
    if not isinstance(password, str) or not 8 <= len(password) <= 128:
        raise ApiError(400, "password must be 8 to 128 characters")
    return user, password


def make_app(b: Broker) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except ApiError as exc:
            return web.json_response({"error": str(exc), **exc.extra}, status=exc.status)
        except CircuitOpenError as exc:
            return web.json_response({"error": f"exchange unavailable: {exc}"}, status=503)
        except UnavailableError as exc:
            return web.json_response({"error": f"try again: {exc}"}, status=503)

    async def body(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise ApiError(400, "the body must be a JSON object") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    app = web.Application(middlewares=[errors], client_max_size=64 * 1024)
    r = app.router

    async def signup(req: web.Request) -> web.Response:
        return web.json_response(await b.signup(await body(req)))

    async def login(req: web.Request) -> web.Response:
        return web.json_response(await b.login(await body(req)))

    async def profile(req: web.Request) -> web.Response:
        return web.json_response(await b.profile(b.user_of(req)))

    async def config(req: web.Request) -> web.Response:
        return web.json_response({"ticker": b.args.ticker_url, "tick_size": TICK_SIZE})

    async def insts(req: web.Request) -> web.Response:
        return web.json_response(
            [
                {"token": i.token, "symbol": s, "exchange": EXCHANGE, "ltp": b.ltp[s]}
                for s, i in b.instruments.items()
            ]
        )

    async def depth(req: web.Request) -> web.Response:
        sym = req.match_info["symbol"]
        if sym not in b.instruments:
            raise ApiError(404, f"unknown instrument {sym!r}")
        return web.json_response({"symbol": sym, **b.depth.get(sym, {"bids": [], "asks": []})})

    async def place(req: web.Request) -> web.Response:
        user = b.user_of(req)
        return web.json_response(await b.place(user, await body(req)))

    async def modify(req: web.Request) -> web.Response:
        user = b.user_of(req)
        return web.json_response(await b.modify(user, req.match_info["oid"], await body(req)))

    async def cancel(req: web.Request) -> web.Response:
        user = b.user_of(req)
        return web.json_response(await b.cancel(user, req.match_info["oid"]))

    async def orders(req: web.Request) -> web.Response:
        acct, _ = await b.load(b.user_of(req))
        return web.json_response(sorted(acct["orders"].values(), key=lambda o: -o["placed_at"]))

    async def portfolio(req: web.Request) -> web.Response:
        acct, _ = await b.load(b.user_of(req))
        return web.json_response(b.portfolio(acct))

    async def index(req: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    r.add_post("/api/signup", signup)
    r.add_post("/api/login", login)
    r.add_get("/api/profile", profile)
    r.add_get("/api/config", config)
    r.add_get("/api/instruments", insts)
    r.add_get("/api/depth/{symbol}", depth)
    r.add_post("/api/orders", place)
    r.add_get("/api/orders", orders)
    r.add_put("/api/orders/{oid}", modify)
    r.add_delete("/api/orders/{oid}", cancel)
    r.add_get("/api/portfolio", portfolio)
    r.add_get("/", index)
    r.add_static("/static", STATIC)
    return app


async def main_async(args: argparse.Namespace) -> None:
    async with (
        KVClient(args.kv.split(",")) as kv,
        StreamClient(args.streams.split(",")) as sc,
        Client(args.pubsub.split(","), name="broker") as ps,
    ):
        b = Broker(args, kv, sc)
        await ps.subscribe("ticks.>", cb=b.on_tick)
        await ps.subscribe("depth.>", cb=b.on_depth)

        async def run() -> None:
            await asyncio.gather(b.consume_results(), b.resend_forever())

        await serve("broker api", make_app(b), args.listen, run)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m examples.trading.api", description=__doc__)
    p.add_argument("--kv", required=True)
    p.add_argument("--streams", required=True)
    p.add_argument("--pubsub", required=True)
    p.add_argument("--ticker-url", default="", help="the WebSocket URL the page connects to")
    p.add_argument("--instruments", type=int, default=500)
    p.add_argument("--secret", default="", help="HMAC key for tokens (default: random)")
    p.add_argument("--orders-per-second", type=float, default=10)
    p.add_argument("--orders-per-minute", type=float, default=200)
    p.add_argument("--listen", default="127.0.0.1:0")
    args = p.parse_args(argv)
    configure_logging()
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
