"""The shop's services; each runs as its own process: ``python -m examples.shop.services NAME``.

=========  ==================================================================================
gateway    public HTTP API + storefront, sign-up/log-in (argon2 hashes in the KV, HMAC
           tokens), per-client rate limits, carts routed to cart instances by a hash ring,
           order status pushed over a WebSocket
catalog    products and categories: a read model (CQRS) rebuilt from ``shop.catalog.*`` events
cart       carts as JSON documents in the KV (``cart/<user>``), changed by compare-and-set
orders     the saga (:mod:`examples.shop.saga`): order + outbox in one KV document, written
           with one compare-and-set, relayed to the stream with deduplicating message ids
inventory  stock documents (:mod:`examples.shop.stock`) changed only by compare-and-set;
           an expiry sweeper releases reservations that ran out
provider   a simulated payment provider, slow and failing on purpose, with Stripe-style
           idempotency keys kept 24 h (KV TTL): the same key replays the same answer
payment    calls the provider through a circuit breaker and retries with a budget
delivery   moves confirmed orders through packed, shipped, delivered: background jobs
           (``dsys.jobs`` on streams + KV), one per step, each enqueueing the next delayed
history    the order-history read model (CQRS), rebuilt from ``shop.order.status``
=========  ==================================================================================

Each prints ``<name> listening on http://HOST:PORT`` once it serves, and ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import signal
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web

from dsys.errors import BadInputError, CircuitOpenError, ConflictError, DsysError
from dsys.kv import KVClient
from dsys.ratelimit import ClusterStore, Limiter
from dsys.ratelimit.middleware import ratelimit_middleware
from dsys.resilience import Backoff, CircuitBreaker, CountWindow, Retry, RetryBudget
from dsys.sharding import HashRing
from dsys.streams.client import StreamClient, StreamMsg

from . import saga
from .common import (
    Json,
    body_json,
    consume,
    dumps,
    follow,
    get_json,
    get_many,
    healthz,
    json_error,
    log,
    now,
    update_json,
)
from .stock import Stock

STATIC = os.path.join(os.path.dirname(__file__), "static")
MAX_QTY = 100


@dataclass
class Ctx:
    """What a service was started with."""

    args: argparse.Namespace
    kv: KVClient | None = None
    sc: StreamClient | None = None
    http: aiohttp.ClientSession | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def kvc(self) -> KVClient:
        assert self.kv is not None, "this service has no KV client"
        return self.kv

    @property
    def stream(self) -> StreamClient:
        assert self.sc is not None, "this service has no stream client"
        return self.sc

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self.http is not None
        return self.http

    def spawn(self, coro: Awaitable[None]) -> None:
        self.tasks.append(asyncio.ensure_future(coro))


async def publish(ctx: Ctx, subject: str, body: Json, msg_id: str) -> None:
    """Publish JSON ``body`` with a deduplicating message id."""
    await ctx.stream.publish(subject, dumps(body), msg_id=msg_id)


async def publish_event(ctx: Ctx, ev: saga.Event) -> None:
    """Answer the saga (``shop.evt.<kind>``)."""
    await publish(ctx, f"shop.evt.{ev.kind}", ev.to_plain(), ev.id)


def parse_command(msg: StreamMsg) -> saga.Command:
    """The saga command a message carries.

    Raises:
        ValueError: it is not one (dead-lettered by the consumer loop).
    """
    try:
        return saga.Command.from_plain(json.loads(msg.data))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"not a command: {exc}") from exc


# -- catalog -----------------------------------------------------------------------------

SEED_PRODUCTS = [
    ("sunglasses", "Sunglasses", "accessories", 1999, 50),
    ("tank-top", "Tank Top", "clothing", 1899, 50),
    ("watch", "Watch", "accessories", 10999, 20),
    ("loafers", "Loafers", "footwear", 8999, 30),
    ("hairdryer", "Hairdryer", "home", 2499, 40),
    ("candle-holder", "Candle Holder", "home", 1895, 60),
    ("salt-pepper", "Salt & Pepper Shakers", "kitchen", 1849, 60),
    ("bamboo-jar", "Bamboo Glass Jar", "kitchen", 549, 80),
    ("mug", "Mug", "kitchen", 899, 80),
]
"""(id, name, category, price in cents, initial stock): Online Boutique's catalog."""


def product_event(pid: str, name: str, category: str, price: int) -> Json:
    return {"id": pid, "name": name, "category": category, "price": price}


async def catalog_app(ctx: Ctx) -> web.Application:
    products: dict[str, Json] = {}

    def on_event(msg: StreamMsg) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            p = json.loads(msg.data)
            products[str(p["id"])] = p

    for pid, name, cat, price, _ in SEED_PRODUCTS:
        await publish(ctx, "shop.catalog.product", product_event(pid, name, cat, price), pid)
    ctx.spawn(follow(ctx.stream, "shop.catalog.product", on_event, every=0.1))

    async def list_products(request: web.Request) -> web.Response:
        q = request.query.get("q", "").lower()
        cat = request.query.get("category", "")
        found = [
            p
            for p in sorted(products.values(), key=lambda p: p["name"])
            if q in p["name"].lower() and (not cat or p["category"] == cat)
        ]
        return web.json_response(found)

    async def get_product(request: web.Request) -> web.Response:
        p = products.get(request.match_info["pid"])
        if p is None:
            raise json_error(404, "not_found", "no such product")
        return web.json_response(p)

    async def categories(request: web.Request) -> web.Response:
        return web.json_response(sorted({p["category"] for p in products.values()}))

    async def add_product(request: web.Request) -> web.Response:
        b = await body_json(request)
        try:
            p = product_event(str(b["id"]), str(b["name"]), str(b["category"]), int(b["price"]))
        except (KeyError, ValueError, TypeError):
            raise json_error(400, "bad_product", "needs id, name, category, price") from None
        if p["price"] < 0 or not p["id"]:
            raise json_error(400, "bad_product", "price must be >= 0")
        await publish(ctx, "shop.catalog.product", p, f"{p['id']}:{uuid.uuid4().hex}")
        return web.json_response(p, status=201)

    app = web.Application()
    app.router.add_get("/products", list_products)
    app.router.add_get("/products/{pid}", get_product)
    app.router.add_get("/categories", categories)
    app.router.add_post("/admin/products", add_product)
    return app


# -- cart --------------------------------------------------------------------------------


async def cart_app(ctx: Ctx) -> web.Application:
    kv = ctx.kvc

    async def get_cart(request: web.Request) -> web.Response:
        doc, _ = await get_json(kv, f"cart/{request.match_info['user']}")
        return web.json_response(doc or {"items": {}})

    async def set_item(request: web.Request) -> web.Response:
        b = await body_json(request)
        product, qty = b.get("product"), b.get("qty")
        if not isinstance(product, str) or type(qty) is not int or not 0 <= qty <= MAX_QTY:
            raise json_error(400, "bad_item", f"needs product and qty 0..{MAX_QTY}")

        def change(doc: Json | None) -> Json:
            doc = doc or {"items": {}}
            if qty:
                doc["items"][product] = qty
            else:
                doc["items"].pop(product, None)
            return doc

        doc, _ = await update_json(kv, f"cart/{request.match_info['user']}", change)
        return web.json_response(doc)

    async def clear(request: web.Request) -> web.Response:
        b = await body_json(request) if request.can_read_body else {}
        key = f"cart/{request.match_info['user']}"
        if "revision" in b:  # clear only the cart that was checked out
            with contextlib.suppress(ConflictError):
                await kv.delete(key, revision=int(b["revision"]))
        else:
            await kv.delete(key)
        return web.json_response({"ok": True})

    async def with_revision(request: web.Request) -> web.Response:
        doc, rev = await get_json(kv, f"cart/{request.match_info['user']}")
        return web.json_response({"cart": doc or {"items": {}}, "revision": rev})

    app = web.Application()
    app.router.add_get("/carts/{user}", get_cart)
    app.router.add_get("/carts/{user}/snapshot", with_revision)
    app.router.add_post("/carts/{user}/items", set_item)
    app.router.add_delete("/carts/{user}", clear)
    return app


# -- orders ------------------------------------------------------------------------------


def status_message(o: saga.Order) -> Json:
    return {
        "id": o.id,
        "user": o.user,
        "status": o.status.value,
        "amount": o.amount,
        "items": [[i.product, i.qty, i.price] for i in o.items],
        "reason": o.reason,
        "charged": o.charged,
        "refunded": o.refunded,
        "version": len(o.history),
    }


def outbox_entries(o: saga.Order, cmds: tuple[saga.Command, ...], changed: bool) -> list[Json]:
    out = [{"subject": f"shop.cmd.{c.kind}", "id": c.id, "body": c.to_plain()} for c in cmds]
    if changed:
        out.append(
            {
                "subject": "shop.order.status",
                "id": f"{o.id}:status:{len(o.history)}",
                "body": status_message(o),
            }
        )
    return out


async def orders_app(ctx: Ctx) -> web.Application:
    kv = ctx.kvc
    relaying: set[str] = set()
    clean: dict[str, int] = {}  # key -> revision known to have an empty outbox
    stats = {"events": 0, "duplicates": 0, "relayed": 0}

    async def relay(oid: str) -> None:
        """Publish the order's outbox, then remove what was published (one CAS)."""
        key = f"order/{oid}"
        doc, rev = await get_json(kv, key)
        if doc is None or not doc["outbox"]:
            clean[key] = rev
            return
        sent = set()
        for m in doc["outbox"]:
            await ctx.stream.publish(m["subject"], dumps(m["body"]), msg_id=m["id"])
            sent.add(m["id"])
            stats["relayed"] += 1

        def drop_sent(d: Json | None) -> Json | None:
            if d is None:
                return None
            d["outbox"] = [m for m in d["outbox"] if m["id"] not in sent]
            return d

        new, _ = await update_json(kv, key, drop_sent)
        if new is not None and new["outbox"]:
            await relay(oid)  # more arrived meanwhile

    running: set[asyncio.Task[None]] = set()

    def background(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        running.add(task)
        task.add_done_callback(running.discard)

    async def relay_soon(oid: str) -> None:
        if oid in relaying:
            return
        relaying.add(oid)
        try:
            await relay(oid)
        except DsysError as exc:
            log.info("relay of %s failed (%s); the sweeper retries", oid, exc)
        finally:
            relaying.discard(oid)

    async def sweeper() -> None:
        """Relays outboxes left behind (a crash between the CAS and the publish)."""
        while True:
            with contextlib.suppress(DsysError):
                async for item in kv.scan_iter("order/"):
                    if clean.get(item.key) != item.revision:
                        await relay_soon(item.key.removeprefix("order/"))
            await asyncio.sleep(1.0)

    async def on_event(msg: StreamMsg) -> None:
        try:
            ev = saga.Event.from_plain(json.loads(msg.data))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ValueError(f"not an event: {exc}") from exc
        key = f"order/{ev.order}"
        result: dict[str, Any] = {}

        def step(doc: Json | None) -> Json | None:
            if doc is None:
                raise ValueError(f"event {ev.id} for an unknown order")
            o = saga.Order.from_plain(doc["order"])
            s = saga.apply(o, ev)
            result["step"] = s
            if s.duplicate:
                return None
            changed = s.order.status is not o.status
            doc["order"] = s.order.to_plain()
            doc["outbox"] += outbox_entries(s.order, s.commands, changed)
            return doc

        await update_json(kv, key, step)
        s = result["step"]
        stats["events"] += 1
        stats["duplicates"] += s.duplicate
        await msg.ack()
        if not s.duplicate:
            background(relay_soon(ev.order))

    ctx.spawn(consume(ctx.stream, "orders", on_event, concurrency=32))
    ctx.spawn(sweeper())

    async def create(request: web.Request) -> web.Response:
        b = await body_json(request)
        try:
            items = [saga.Item(str(p), int(q), int(c)) for p, q, c in b["items"]]
            oid, user = str(b["id"]), str(b["user"])
            card = str(b.get("card", ""))
            start = saga.place(oid, user, items)
        except (KeyError, ValueError, TypeError) as exc:
            raise json_error(400, "bad_order", str(exc)) from None
        order = start.order
        body = {
            "order": order.to_plain(),
            "card": card,
            "outbox": outbox_entries(order, start.commands, True),
        }
        try:
            await kv.cas(f"order/{oid}", dumps(body), revision=0)
            created = True
        except ConflictError:  # the same checkout again (idempotency key): same order
            created = False
        doc, _ = await get_json(kv, f"order/{oid}")
        assert doc is not None
        if doc["order"]["user"] != user:
            raise json_error(409, "conflict", "that idempotency key was used by someone else")
        background(relay_soon(oid))  # the order is stored: the outbox does the rest
        return web.json_response(status_view(doc), status=201 if created else 200)

    async def get_order(request: web.Request) -> web.Response:
        doc, _ = await get_json(kv, f"order/{request.match_info['oid']}")
        if doc is None:
            raise json_error(404, "not_found", "no such order")
        return web.json_response(status_view(doc))

    async def all_orders(request: web.Request) -> web.Response:
        keys = [i.key async for i in kv.scan_iter("order/")]
        docs = await get_many(kv, keys)
        return web.json_response([status_view(d) for d, _ in docs if d is not None])

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application()
    app.router.add_post("/orders", create)
    app.router.add_get("/orders/{oid}", get_order)
    app.router.add_get("/admin/orders", all_orders)
    app.router.add_get("/admin/stats", get_stats)
    return app


def status_view(doc: Json) -> Json:
    o = saga.Order.from_plain(doc["order"])
    view = status_message(o)
    view["history"] = [s.value for s in o.history]
    view["outbox"] = len(doc["outbox"])
    return view


# -- inventory ---------------------------------------------------------------------------


async def inventory_app(ctx: Ctx) -> web.Application:
    kv = ctx.kvc
    ttl: float = ctx.args.reservation_ttl

    async def change_stock(product: str, fn: Callable[[Stock], str]) -> str:
        """Apply ``fn`` to the product's stock document with compare-and-set; its answer."""
        answer = ["unknown product"]

        def change(doc: Json | None) -> Json | None:
            if doc is None:
                answer[0] = "unknown product"
                return None
            s = Stock.from_plain(doc)
            before = s.to_plain()
            answer[0] = fn(s)
            after = s.to_plain()
            return after if after != before else None

        await update_json(kv, f"stock/{product}", change)
        return answer[0]

    async def reserve(o: str, items: tuple[saga.Item, ...]) -> saga.Event:
        held: list[str] = []
        for i in items:
            a = await change_stock(i.product, partial(_reserve, o, i.qty, ttl))
            if a != "reserved":
                for p in held:
                    await change_stock(p, lambda s: s.release(o))
                return saga.event(o, "inventory.rejected", f"{i.product}: {a}")
            held.append(i.product)
        return saga.event(o, "inventory.reserved")

    async def confirm(o: str, items: tuple[saga.Item, ...]) -> saga.Event:
        answers = [await change_stock(i.product, lambda s: s.confirm(o, now=now())) for i in items]
        bad = [a for a in answers if a != "confirmed"]
        if not bad:
            return saga.event(o, "inventory.confirmed")
        for i in items:  # undo the lines that were confirmed
            await change_stock(i.product, lambda s: s.release(o))
        return saga.event(o, "inventory.confirm_failed", bad[0])

    async def on_command(msg: StreamMsg) -> None:
        c = parse_command(msg)
        o = c.order
        if c.kind == "inventory.reserve":
            await publish_event(ctx, await reserve(o, c.items))
        elif c.kind == "inventory.confirm":
            await publish_event(ctx, await confirm(o, c.items))
        elif c.kind == "inventory.release":
            for i in c.items:
                await change_stock(i.product, lambda s: s.release(o))
        else:
            raise ValueError(f"inventory does not handle {c.kind}")
        await msg.ack()

    async def expiry_sweeper() -> None:
        while True:
            with contextlib.suppress(DsysError):
                async for item in kv.scan_iter("stock/"):
                    gone: list[str] = []
                    _, wrote = await update_json(kv, item.key, partial(_expire, gone))
                    if wrote:
                        for o in gone:
                            await publish_event(ctx, saga.event(o, "inventory.expired"))
            await asyncio.sleep(0.5)

    async def seed() -> None:
        if ctx.args.seed:
            for pid, _, _, _, qty in SEED_PRODUCTS:
                with contextlib.suppress(ConflictError):
                    await kv.cas(f"stock/{pid}", dumps(Stock(pid, qty).to_plain()), revision=0)

    await seed()
    ctx.spawn(consume(ctx.stream, "inventory", on_command, concurrency=32))
    ctx.spawn(expiry_sweeper())

    async def get_stock(request: web.Request) -> web.Response:
        doc, _ = await get_json(kv, f"stock/{request.match_info['pid']}")
        if doc is None:
            raise json_error(404, "not_found", "no such product")
        s = Stock.from_plain(doc)
        return web.json_response(
            {"product": s.product, "on_hand": s.on_hand, "available": s.available,
             "held": len(s.held)}
        )  # fmt: skip

    async def set_stock(request: web.Request) -> web.Response:
        b = await body_json(request)
        qty = b.get("on_hand")
        if type(qty) is not int or qty < 0:
            raise json_error(400, "bad_stock", "on_hand must be an integer >= 0")
        pid = request.match_info["pid"]
        await kv.put(f"stock/{pid}", dumps(Stock(pid, qty).to_plain()))
        return web.json_response({"product": pid, "on_hand": qty})

    async def expire_now(request: web.Request) -> web.Response:
        """Expire a product's reservations as if ``ahead`` seconds had passed (for tests
        and demos of the expiry; the sweeper does the same when their time comes)."""
        b = await body_json(request)
        ahead = b.get("ahead", 0)
        if not isinstance(ahead, (int, float)) or ahead < 0:
            raise json_error(400, "bad_ahead", "ahead must be seconds >= 0")
        gone: list[str] = []
        key = f"stock/{request.match_info['pid']}"
        await update_json(kv, key, partial(_expire, gone, ahead=float(ahead)))
        for o in gone:
            await publish_event(ctx, saga.event(o, "inventory.expired"))
        return web.json_response({"expired": gone})

    app = web.Application()
    app.router.add_get("/stock/{pid}", get_stock)
    app.router.add_put("/admin/stock/{pid}", set_stock)
    app.router.add_post("/admin/stock/{pid}/expire", expire_now)
    return app


def _reserve(order: str, qty: int, ttl: float, s: Stock) -> str:
    return s.reserve(order, qty, now=now(), ttl=ttl)


def _expire(gone: list[str], doc: Json | None, ahead: float = 0.0) -> Json | None:
    """Drop the reservations of a stock document due ``ahead`` seconds from now; their
    orders go into ``gone``."""
    if doc is None:
        return None
    s = Stock.from_plain(doc)
    gone[:] = s.expire(now=now() + ahead)
    return s.to_plain() if gone else None


# -- payment provider (simulated) -------------------------------------------------------

IDEMPOTENCY_TTL = 24 * 3600.0
DECLINED_CARD = "4000000000000002"  # Stripe's test card that is always declined


async def provider_app(ctx: Ctx) -> web.Application:
    kv = ctx.kvc
    rng = random.Random(ctx.args.provider_seed)
    fail: float = ctx.args.provider_error_rate
    lo, hi = ctx.args.provider_latency

    async def pay(request: web.Request, kind: str) -> web.Response:
        key = request.headers.get("Idempotency-Key", "")
        if not key:
            raise json_error(400, "no_key", "Idempotency-Key is required")
        b = await body_json(request)
        await asyncio.sleep(rng.uniform(lo, hi))
        if rng.random() < fail / 2:  # fails before doing anything
            return web.json_response({"error": "provider_unavailable"}, status=503)
        rkey = f"pay/{key}"
        claim = dumps({"state": "processing", "since": now(), "kind": kind, "request": b})
        try:
            await kv.cas(rkey, claim, revision=0)
        except ConflictError:
            doc, _ = await get_json(kv, rkey)
            if doc is None or doc["state"] == "processing":
                return web.json_response({"error": "in_progress"}, status=409)
            if doc["kind"] != kind or doc["request"] != b:
                return web.json_response({"error": "key_reused"}, status=422)
            resp = web.json_response(doc["body"], status=doc["status"])
            resp.headers["Idempotent-Replayed"] = "true"
            return resp
        if kind == "charge" and b.get("card") == DECLINED_CARD:
            status, body = 402, {"error": "card_declined", "order": b.get("order")}
        else:
            status, body = 200, {"id": f"{kind[:2]}_{uuid.uuid4().hex[:12]}", **b, "kind": kind}
        done = {"state": "done", "kind": kind, "request": b, "status": status, "body": body}
        await kv.put(rkey, dumps(done), ttl=IDEMPOTENCY_TTL)
        if rng.random() < fail / 2:  # did it, then the answer is lost
            raise json_error(500, "provider_error", "internal error after processing")
        return web.json_response(body, status=status)

    async def charge(request: web.Request) -> web.Response:
        return await pay(request, "charge")

    async def refund(request: web.Request) -> web.Response:
        return await pay(request, "refund")

    async def ledger(request: web.Request) -> web.Response:
        keys = [i.key async for i in kv.scan_iter("pay/")]
        docs = await get_many(kv, keys)
        out = [
            {"key": k.removeprefix("pay/"), "kind": d["kind"], "status": d.get("status"),
             "order": d["request"].get("order"), "amount": d["request"].get("amount")}
            for k, (d, _) in zip(keys, docs, strict=True)
            if d is not None and d["state"] == "done"
        ]  # fmt: skip
        return web.json_response(out)

    app = web.Application()
    app.router.add_post("/v1/charges", charge)
    app.router.add_post("/v1/refunds", refund)
    app.router.add_get("/v1/ledger", ledger)
    return app


# -- payment -----------------------------------------------------------------------------


class ProviderError(Exception):
    """The provider failed (5xx, 409 in progress, or no answer): worth retrying."""


async def payment_app(ctx: Ctx) -> web.Application:
    provider = ctx.args.provider
    breaker = CircuitBreaker(
        "payment-provider", failure_rate_threshold=60, window=CountWindow(size=20),
        minimum_calls=10, open_wait=1.0, permitted_calls_in_half_open=3,
    )  # fmt: skip
    budget = RetryBudget(ratio=0.5, min_retries_per_second=5.0)
    retry = Retry(
        max_attempts=4,
        backoff=Backoff(initial=0.05, maximum=0.5),
        retry_on=(ProviderError,),
        budget=budget,
        name="payment-provider",
    )
    stats: dict[str, int] = defaultdict(int)

    async def call(path: str, key: str, body: Json) -> tuple[int, Json]:
        async def once() -> tuple[int, Json]:
            stats["calls"] += 1
            try:
                async with ctx.session.post(
                    f"{provider}{path}", json=body, headers={"Idempotency-Key": key},
                    timeout=aiohttp.ClientTimeout(total=3.0),
                ) as r:  # fmt: skip
                    data = await r.json(content_type=None)
                    if r.status >= 500 or r.status == 409:
                        raise ProviderError(f"provider answered {r.status}")
                    return r.status, data
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ProviderError(f"provider unreachable: {exc}") from exc

        return await retry.call_async(breaker.call_async, once)

    async def on_command(msg: StreamMsg) -> None:
        c = parse_command(msg)
        body = {"order": c.order, "amount": c.amount, "user": c.user}
        try:
            if c.kind == "payment.authorise":
                card = await order_card(c.order)
                status, _ = await call("/v1/charges", f"{c.order}:charge", {**body, "card": card})
                kind = "payment.authorised" if status == 200 else "payment.failed"
                stats[kind] += 1
                await publish_event(
                    ctx, saga.event(c.order, kind, "" if status == 200 else "card declined")
                )
            elif c.kind == "payment.refund":
                status, _ = await call("/v1/refunds", f"{c.order}:refund", body)
                if status != 200:
                    raise ValueError(f"refund refused with {status}")
                stats["payment.refunded"] += 1
                await publish_event(ctx, saga.event(c.order, "payment.refunded"))
            else:
                raise ValueError(f"payment does not handle {c.kind}")
        except (ProviderError, CircuitOpenError) as exc:
            stats["deferred"] += 1
            log.info("payment for %s deferred: %s", c.order, exc)
            await msg.nak(min(5.0, 0.5 * msg.deliveries))
            return
        await msg.ack()

    async def order_card(oid: str) -> str:
        doc, _ = await get_json(ctx.kvc, f"order/{oid}")
        return "" if doc is None else str(doc.get("card", ""))

    ctx.spawn(consume(ctx.stream, "payment", on_command, concurrency=32))

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(
            {**stats, "breaker": breaker.state.value, "retries": retry.retries,
             "budget_denied": retry.budget_denied}
        )  # fmt: skip

    app = web.Application()
    app.router.add_get("/admin/stats", get_stats)
    return app


# -- delivery ----------------------------------------------------------------------------

STAGES = ("delivery.packed", "delivery.shipped", "delivery.delivered")
JOBS_STREAM = "SHOPJOBS"
"""The delivery jobs' stream (``dsys.jobs.dsys_backend``; its records live under ``jobs/``)."""


def delivery_job_id(order: str, stage: int) -> str:
    """The job that moves ``order`` to ``STAGES[stage]``: one id per order and step, so a
    redelivered command or a retried job enqueues it once."""
    return f"deliver:{order}:{stage}"


async def delivery_app(ctx: Ctx) -> web.Application:
    """Delivery as background jobs (:mod:`dsys.jobs` on the shop's streams + KV): the
    ``delivery.schedule`` command enqueues the first step; each step publishes its event
    and enqueues the next one ``--delivery-step`` seconds later."""
    from dsys.jobs import Queue, Registry, Worker, WorkerConfig
    from dsys.jobs.dsys_backend import DsysBackend
    from dsys.resilience import Backoff

    step_delay: float = ctx.args.delivery_step
    backend = DsysBackend(
        ctx.args.streams.split(","), ctx.args.kv.split(","), stream=JOBS_STREAM,
        prefix="jobs/", lease=5.0, timeout=15.0,
    )  # fmt: skip
    queue = Queue(backend, "delivery")
    tasks = Registry()

    @tasks.task(name="shop.deliver", retries=100, timeout=20,
                backoff=Backoff(initial=0.1, maximum=2.0))  # fmt: skip
    async def deliver(order: str, stage: int) -> str:
        # the event id is derived from order + stage: a second run publishes nothing new
        await publish_event(ctx, saga.event(order, STAGES[stage]))
        if stage + 1 < len(STAGES):
            await queue.enqueue(
                "shop.deliver", order, stage + 1, delay=step_delay,
                job_id=delivery_job_id(order, stage + 1),
            )  # fmt: skip
        return STAGES[stage]

    async def on_command(msg: StreamMsg) -> None:
        c = parse_command(msg)
        if c.kind != "delivery.schedule":
            raise ValueError(f"delivery does not handle {c.kind}")
        try:
            jid = delivery_job_id(c.order, 0)
            await queue.enqueue("shop.deliver", c.order, 0, job_id=jid)
        except BadInputError as exc:  # an order id no job id can carry
            raise ValueError(str(exc)) from exc
        await msg.ack()

    worker = Worker(
        backend, tasks, WorkerConfig(queue="delivery", concurrency=64, poll=0.2, shutdown_grace=2.0)
    )

    async def run_worker() -> None:
        try:
            await worker.run()
        finally:
            await backend.close()

    ctx.spawn(consume(ctx.stream, "delivery", on_command, concurrency=64))
    ctx.spawn(run_worker())

    async def get_stats(request: web.Request) -> web.Response:
        st = worker.stats
        return web.json_response(
            {"started": st.started, "succeeded": st.succeeded, "retried": st.retried,
             "dead": st.dead, "stale": st.stale, "lost": st.lost}
        )  # fmt: skip

    async def job(request: web.Request) -> web.Response:
        try:
            info = await queue.status(request.match_info["jid"])
        except BadInputError as exc:
            raise json_error(400, "bad_job_id", str(exc)) from None
        if info is None:
            raise json_error(404, "not_found", "no such job")
        return web.json_response(
            {"id": info.spec.id, "state": info.state, "attempt": info.attempt,
             "args": list(info.spec.args), "result": info.result}
        )  # fmt: skip

    app = web.Application()
    app.router.add_get("/admin/stats", get_stats)
    app.router.add_get("/admin/jobs/{jid}", job)
    return app


# -- order history -----------------------------------------------------------------------


async def history_app(ctx: Ctx) -> web.Application:
    orders: dict[str, Json] = {}
    by_user: dict[str, set[str]] = defaultdict(set)
    changed = asyncio.Condition()
    version = [0]

    def on_status(msg: StreamMsg) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            o = json.loads(msg.data)
            old = orders.get(o["id"])
            if old is None or old["version"] < o["version"]:
                orders[o["id"]] = o
                by_user[o["user"]].add(o["id"])
                version[0] += 1

    async def notify() -> None:
        seen = 0
        while True:
            await asyncio.sleep(0.1)
            if version[0] != seen:
                seen = version[0]
                async with changed:
                    changed.notify_all()

    ctx.spawn(follow(ctx.stream, "shop.order.status", on_status, every=0.1))
    ctx.spawn(notify())

    def user_orders(user: str) -> list[Json]:
        return sorted((orders[o] for o in by_user.get(user, ())), key=lambda o: o["id"])

    async def list_user(request: web.Request) -> web.Response:
        # ?after=VERSION waits (up to 10 s) for a change: a long poll for the gateway's WebSocket
        after = request.query.get("after")
        if after is not None and after.isdigit() and int(after) >= version[0]:
            async with changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 10.0)
        return web.json_response(
            {"version": version[0], "orders": user_orders(request.match_info["user"])}
        )

    async def get_one(request: web.Request) -> web.Response:
        o = orders.get(request.match_info["oid"])
        if o is None:
            raise json_error(404, "not_found", "no such order")
        return web.json_response(o)

    async def everything(request: web.Request) -> web.Response:
        return web.json_response(sorted(orders.values(), key=lambda o: o["id"]))

    app = web.Application()
    app.router.add_get("/users/{user}/orders", list_user)
    app.router.add_get("/orders/{oid}", get_one)
    app.router.add_get("/admin/orders", everything)
    return app


# -- gateway -----------------------------------------------------------------------------


def make_token(secret: bytes, user: str, ttl: float = 24 * 3600) -> str:
    payload = base64.urlsafe_b64encode(dumps({"u": user, "exp": int(time.time() + ttl)}))
    sig = hmac.new(secret, payload, hashlib.sha256).hexdigest()
    return f"{payload.decode()}.{sig}"


def check_token(secret: bytes, token: str) -> str | None:
    """The user a token was issued to, or None when it is forged or expired."""
    payload, _, sig = token.rpartition(".")
    good = hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
    if not payload or not hmac.compare_digest(sig, good):
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, TypeError):
        return None
    if not isinstance(claims, dict) or claims.get("exp", 0) < time.time():
        return None
    user = claims.get("u")
    return user if isinstance(user, str) else None


CURRENCIES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "CAD": 1.36}


async def gateway_app(ctx: Ctx) -> web.Application:
    from argon2 import PasswordHasher
    from argon2.exceptions import VerificationError

    kv = ctx.kvc
    a = ctx.args
    secret = os.environ.get("DSYS_SHOP_SECRET", "dev-secret-change-me").encode()
    hasher = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)
    carts = a.cart.split(",")
    ring = HashRing(carts)

    def user_of(request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") or request.query.get("token", "")
        user = check_token(secret, token) if token else None
        if user is None:
            raise json_error(401, "unauthorized", "log in first (Authorization: Bearer TOKEN)")
        return user

    def limit_key(request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        user = check_token(secret, auth.removeprefix("Bearer ")) if auth else None
        return f"user:{user}" if user else f"ip:{request.remote}"

    async def upstream(method: str, url: str, body: Json | None = None) -> tuple[int, Any]:
        try:
            async with ctx.session.request(
                method, url, json=body, timeout=aiohttp.ClientTimeout(total=10)
            ) as r:
                if r.status in (502, 504):  # its load balancer found no instance to answer
                    host = url.split("/")[2]
                    raise json_error(503, "unavailable", f"upstream {host}: {r.status}")
                return r.status, await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise json_error(503, "unavailable", f"upstream {url.split('/')[2]}: {exc}") from exc

    async def cart_call(user: str, method: str, path: str, body: Json | None = None) -> Any:
        """Ask the cart instance that owns ``user`` (the next one on the ring if it is down)."""
        last: web.HTTPException | None = None
        for node in ring.iter_owners(user):
            try:
                status, data = await upstream(method, f"{node}/carts/{user}{path}", body)
            except web.HTTPServiceUnavailable as exc:
                last = exc
                continue
            if status >= 400:
                raise json_error(status, data.get("error", "error"), data.get("message", ""))
            return data
        assert last is not None
        raise last

    async def product(pid: str) -> Json | None:
        status, data = await upstream("GET", f"{a.catalog}/products/{pid}")
        return data if status == 200 else None

    # -- auth
    async def signup(request: web.Request) -> web.Response:
        b = await body_json(request)
        user, pw = b.get("user"), b.get("password")
        if not isinstance(user, str) or not 3 <= len(user) <= 32 or not user.isalnum():
            raise json_error(400, "bad_user", "user: 3-32 letters or digits")
        if not isinstance(pw, str) or len(pw) < 8:
            raise json_error(400, "bad_password", "password: at least 8 characters")
        h = await asyncio.to_thread(hasher.hash, pw)
        try:
            await kv.cas(f"user/{user}", dumps({"hash": h}), revision=0)
        except ConflictError:
            raise json_error(409, "taken", "that user name is taken") from None
        return web.json_response({"user": user, "token": make_token(secret, user)}, status=201)

    async def login(request: web.Request) -> web.Response:
        b = await body_json(request)
        user, pw = b.get("user"), b.get("password")
        if not isinstance(user, str) or not isinstance(pw, str):
            raise json_error(400, "bad_login", "needs user and password")
        doc, _ = await get_json(kv, f"user/{user}")
        try:
            if doc is None:
                raise VerificationError("no such user")
            await asyncio.to_thread(hasher.verify, doc["hash"], pw)
        except VerificationError:
            raise json_error(401, "bad_login", "wrong user or password") from None
        return web.json_response({"user": user, "token": make_token(secret, user)})

    # -- catalog
    async def products(request: web.Request) -> web.Response:
        qs = "&".join(f"{k}={v}" for k, v in request.query.items() if k in ("q", "category"))
        status, data = await upstream("GET", f"{a.catalog}/products?{qs}")
        rate = CURRENCIES.get(request.query.get("currency", "USD"), 1.0)
        for p in data:
            p["display_price"] = round(p["price"] * rate / 100, 2)
        return web.json_response(data, status=status)

    async def get_product(request: web.Request) -> web.Response:
        p = await product(request.match_info["pid"])
        if p is None:
            raise json_error(404, "not_found", "no such product")
        return web.json_response(p)

    async def categories(request: web.Request) -> web.Response:
        status, data = await upstream("GET", f"{a.catalog}/categories")
        return web.json_response(data, status=status)

    async def currencies(request: web.Request) -> web.Response:
        return web.json_response(CURRENCIES)

    # -- cart
    async def view_cart(request: web.Request) -> web.Response:
        return web.json_response(await cart_call(user_of(request), "GET", ""))

    async def add_to_cart(request: web.Request) -> web.Response:
        user = user_of(request)
        b = await body_json(request)
        pid, qty = b.get("product"), b.get("qty", 1)
        if not isinstance(pid, str) or type(qty) is not int or not 0 <= qty <= MAX_QTY:
            raise json_error(400, "bad_item", f"needs product (a string) and qty 0..{MAX_QTY}")
        if await product(pid) is None:
            raise json_error(404, "unknown_product", f"no product {pid!r}")
        return web.json_response(
            await cart_call(user, "POST", "/items", {"product": pid, "qty": qty})
        )

    async def empty_cart(request: web.Request) -> web.Response:
        return web.json_response(await cart_call(user_of(request), "DELETE", ""))

    # -- checkout and orders
    async def checkout(request: web.Request) -> web.Response:
        user = user_of(request)
        b = await body_json(request) if request.can_read_body else {}
        card = b.get("card", "4242424242424242")
        if not isinstance(card, str) or not card.isdigit() or not 12 <= len(card) <= 19:
            raise json_error(400, "bad_card", "card: 12-19 digits")
        snap = await cart_call(user, "GET", "/snapshot")
        cart = snap["cart"]["items"]
        if not cart:
            raise json_error(400, "empty_cart", "the cart is empty")
        lines = []
        for pid, qty in sorted(cart.items()):
            p = await product(pid)
            if p is None:
                raise json_error(400, "unknown_product", f"{pid} is no longer sold")
            lines.append([pid, qty, p["price"]])
        key = request.headers.get("Idempotency-Key") or uuid.uuid4().hex
        oid = "o-" + hashlib.sha256(f"{user}:{key}".encode()).hexdigest()[:16]
        status, data = await upstream(
            "POST", f"{a.orders}/orders", {"id": oid, "user": user, "items": lines, "card": card}
        )
        if status >= 400:
            raise json_error(status, data.get("error", "error"), data.get("message", ""))
        with contextlib.suppress(web.HTTPException):
            await cart_call(user, "DELETE", "", {"revision": snap["revision"]})
        return web.json_response(data, status=202)

    async def my_orders(request: web.Request) -> web.Response:
        user = user_of(request)
        status, data = await upstream("GET", f"{a.history}/users/{user}/orders")
        return web.json_response(data["orders"], status=status)

    async def my_order(request: web.Request) -> web.Response:
        user = user_of(request)
        status, data = await upstream("GET", f"{a.history}/orders/{request.match_info['oid']}")
        if status != 200 or data.get("user") != user:  # another user's: as if it did not exist
            raise json_error(404, "not_found", "no such order")
        return web.json_response(data)

    async def ws(request: web.Request) -> web.StreamResponse:
        user = user_of(request)
        sock = web.WebSocketResponse(heartbeat=20)
        await sock.prepare(request)
        version = -1

        async def pump() -> None:
            nonlocal version
            while not sock.closed:
                q = "" if version < 0 else f"?after={version}"
                try:
                    status, data = await upstream("GET", f"{a.history}/users/{user}/orders{q}")
                except web.HTTPServiceUnavailable:  # the history service restarts: wait
                    await asyncio.sleep(1.0)
                    continue
                if status == 200 and data["version"] != version:
                    version = data["version"]
                    await sock.send_json({"orders": data["orders"]})

        task = asyncio.create_task(pump())
        try:
            async for _ in sock:
                pass
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, web.HTTPException, ConnectionError):
                await task
        return sock

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(os.path.join(STATIC, "index.html"))

    # with --ratelimit the buckets live on `dsys ratelimit serve` nodes, shared by every
    # gateway instance (a client alternating between instances gets one limit); if the
    # nodes are unreachable the limiter lets requests through (fail open)
    store = ClusterStore(a.ratelimit.split(","), timeout=0.5) if a.ratelimit else None
    limiter = Limiter(
        rate=a.rate, per=1.0, burst=a.burst or max(1, int(a.rate * 2)), name="gateway", store=store,
        on_store_error="open",
    )  # fmt: skip

    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except DsysError as exc:
            raise json_error(503, "unavailable", str(exc)) from exc

    app = web.Application(
        middlewares=[ratelimit_middleware(limiter, key=limit_key), errors],
        client_max_size=64 * 1024,
    )
    app.router.add_get("/", index)
    app.router.add_static("/static", STATIC)
    app.router.add_post("/api/signup", signup)
    app.router.add_post("/api/login", login)
    app.router.add_get("/api/products", products)
    app.router.add_get("/api/products/{pid}", get_product)
    app.router.add_get("/api/categories", categories)
    app.router.add_get("/api/currencies", currencies)
    app.router.add_get("/api/cart", view_cart)
    app.router.add_post("/api/cart/items", add_to_cart)
    app.router.add_delete("/api/cart", empty_cart)
    app.router.add_post("/api/checkout", checkout)
    app.router.add_get("/api/orders", my_orders)
    app.router.add_get("/api/orders/{oid}", my_order)
    app.router.add_get("/api/ws", ws)

    async def close_store(app: web.Application) -> None:
        if store is not None:
            await store.close()

    app.on_cleanup.append(close_store)
    return app


# -- process entry point -------------------------------------------------------------------

APPS: dict[str, Callable[[Ctx], Awaitable[web.Application]]] = {
    "gateway": gateway_app,
    "catalog": catalog_app,
    "cart": cart_app,
    "orders": orders_app,
    "inventory": inventory_app,
    "provider": provider_app,
    "payment": payment_app,
    "delivery": delivery_app,
    "history": history_app,
}
NEEDS_KV = {"gateway", "cart", "orders", "inventory", "provider", "payment", "delivery"}
NEEDS_STREAMS = {"catalog", "orders", "inventory", "payment", "delivery", "history"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.shop.services")
    p.add_argument("service", choices=sorted(APPS))
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--kv", default="", help="KV servers, comma-separated HOST:PORT")
    p.add_argument("--streams", default="", help="stream servers, comma-separated HOST:PORT")
    for name in ("catalog", "orders", "history", "provider"):
        p.add_argument(f"--{name}", default="", help=f"URL of the {name} service")
    p.add_argument("--cart", default="", help="URLs of the cart instances, comma-separated")
    p.add_argument("--rate", type=float, default=50.0, help="gateway: requests/s per client")
    p.add_argument("--burst", type=int, default=0, help="gateway: burst (default 2 s of --rate)")
    p.add_argument(
        "--ratelimit", default="", help="gateway: `dsys ratelimit serve` nodes, comma-separated"
    )
    p.add_argument("--seed", action="store_true", help="inventory: stock the seed catalog")
    p.add_argument("--reservation-ttl", type=float, default=saga.RESERVATION_TTL)
    p.add_argument("--delivery-step", type=float, default=1.0, help="seconds per stage")
    p.add_argument("--provider-error-rate", type=float, default=0.2)
    p.add_argument(
        "--provider-latency", type=float, nargs=2, default=(0.02, 0.2), metavar=("MIN", "MAX")
    )
    p.add_argument("--provider-seed", type=int, default=None)
    return p


async def amain(args: argparse.Namespace) -> None:
    ctx = Ctx(args)
    if args.service in NEEDS_KV:
        ctx.kv = KVClient(args.kv.split(","), timeout=15.0)
    if args.service in NEEDS_STREAMS:
        ctx.sc = StreamClient(args.streams, timeout=15.0)
    ctx.http = aiohttp.ClientSession()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        app = await APPS[args.service](ctx)
        app.router.add_get("/healthz", healthz)
        host, _, port = args.listen.rpartition(":")
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, int(port))
        await site.start()
        bound = runner.addresses[0][1]
        print(f"{args.service} listening on http://{host}:{bound}", flush=True)
        done = [asyncio.ensure_future(stop.wait()), *ctx.tasks]
        finished, _ = await asyncio.wait(done, return_when=asyncio.FIRST_COMPLETED)
        for t in finished:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        await runner.cleanup()
    finally:
        for t in ctx.tasks:
            t.cancel()
        await asyncio.gather(*ctx.tasks, return_exceptions=True)
        await ctx.http.close()
        if ctx.kv is not None:
            await ctx.kv.close()
        if ctx.sc is not None:
            await ctx.sc.close()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("SHOP_LOG_LEVEL", "WARNING").upper(),
        format=f"%(asctime)s {args.service} %(levelname)s %(message)s",
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
