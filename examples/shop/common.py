"""What every shop service shares: JSON in the KV, the stream layout, consumer loops.

Stream layout (one Raft-replicated stream ``SHOP`` capturing ``shop.>``):

* ``shop.cmd.<service>.<verb>``: commands from the orders outbox (``shop.cmd.inventory.reserve``)
* ``shop.evt.<service>.<what>``: answers to the saga (``shop.evt.payment.authorised``)
* ``shop.order.status``: a snapshot of an order after each change (the history read model)
* ``shop.catalog.product``: catalog events (the catalog read model)

A durable consumer per service reads its part; a message it cannot handle after a few
deliveries, or cannot parse at all, goes to the dead-letter stream ``SHOP-DLQ`` with the
reason. Every publish carries a message id derived from what it says, so publishing it
twice (a relay that crashed before noting it) stores it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dsys.errors import ConflictError, DsysError, RequestTimeout
from dsys.kv import KVClient
from dsys.streams import ConsumerConfig, StreamConfig
from dsys.streams.client import StreamClient, StreamMsg

STREAM = "SHOP"
DLQ = "SHOP-DLQ"
CONSUMERS = {  # name: (subjects, ack wait in ms: a little more than handling takes)
    "orders": ("shop.evt.>", 3_000),
    "inventory": ("shop.cmd.inventory.>", 5_000),
    "payment": ("shop.cmd.payment.>", 20_000),
    "delivery": ("shop.cmd.delivery.>", 5_000),
}
MAX_DELIVER = 8

log = logging.getLogger("shop")

Json = dict[str, Any]


def dumps(value: object) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


async def setup_streams(sc: StreamClient) -> None:
    """Create the stream, its dead-letter stream and the services' consumers (idempotent)."""
    await sc.add_stream(StreamConfig(name=DLQ, subjects=()))
    await sc.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=("shop.>",),
            duplicate_window_ms=3_600_000,
            dead_letter=DLQ,
        )
    )
    for name, (subject, ack_wait) in CONSUMERS.items():
        await sc.add_consumer(
            STREAM,
            ConsumerConfig(
                name=name,
                filter_subject=subject,
                ack_wait_ms=ack_wait,
                max_deliver=MAX_DELIVER,
                max_ack_pending=1_000,
            ),
        )


async def get_json(kv: KVClient, key: str) -> tuple[Json | None, int]:
    """The JSON document at ``key`` and its revision (None, 0 when absent)."""
    got = await kv.get(key)
    if got is None:
        return None, 0
    return json.loads(got.value), got.revision


async def get_many(
    kv: KVClient, keys: list[str], batch: int = 256
) -> list[tuple[Json | None, int]]:
    """:func:`get_json` of every key, ``batch`` reads in flight at a time."""
    out: list[tuple[Json | None, int]] = []
    for i in range(0, len(keys), batch):
        out += await asyncio.gather(*(get_json(kv, k) for k in keys[i : i + batch]))
    return out


async def update_json(
    kv: KVClient, key: str, change: Callable[[Json | None], Json | None]
) -> tuple[Json | None, bool]:
    """Apply ``change`` to the document at ``key`` with compare-and-set until it sticks.

    ``change`` gets a fresh copy (None when absent) and returns the new document, or None
    to leave it alone. Returns the document as it is now and whether this call wrote it.
    """
    while True:
        doc, rev = await get_json(kv, key)
        new = change(None if doc is None else json.loads(dumps(doc)))
        if new is None:
            return doc, False
        data = dumps(new)
        try:
            await kv.cas(key, data, revision=rev)
            return new, True
        except ConflictError:
            continue
        except RequestTimeout:  # it may have been applied: look before doing it again
            got = await kv.get(key)
            if got is not None and got.value == data:
                return new, True


async def consume(
    sc: StreamClient,
    consumer: str,
    handle: Callable[[StreamMsg], Awaitable[None]],
    *,
    concurrency: int = 16,
) -> None:
    """Fetch from ``consumer`` forever, running ``handle`` on up to ``concurrency`` at once.

    ``handle`` acks, naks or terms the message itself. A ``ValueError`` (a message that
    makes no sense) sends it to the dead-letter stream at once; any other exception asks
    for redelivery a little later, and after ``MAX_DELIVER`` deliveries the stream
    dead-letters it.
    """
    sem = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def run(msg: StreamMsg) -> None:
        try:
            await handle(msg)
        except ValueError as exc:
            log.warning("%s: dead-lettering seq %d: %s", consumer, msg.seq, exc)
            with contextlib.suppress(DsysError):
                await msg.term(f"{consumer}: {exc}")
        except (DsysError, OSError, TimeoutError) as exc:
            log.info("%s: seq %d failed (%s); redelivering", consumer, msg.seq, exc)
            with contextlib.suppress(DsysError):
                await msg.nak(0.5 * msg.deliveries)
        finally:
            sem.release()

    while True:
        try:
            room = concurrency - len(tasks)
            msgs = await sc.fetch(STREAM, consumer, batch=max(1, room), expires=1.0)
        except DsysError as exc:
            log.info("%s: fetch failed (%s)", consumer, exc)
            await asyncio.sleep(0.5)
            continue
        for msg in msgs:
            await sem.acquire()
            task = asyncio.create_task(run(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


async def follow(
    sc: StreamClient, subject: str, apply: Callable[[StreamMsg], None], every: float = 0.2
) -> None:
    """Read every message of ``subject`` from the start of the stream, then keep up
    (how a read model is rebuilt after a restart)."""
    next_seq = 1
    while True:
        try:
            page = await sc.read(STREAM, start_seq=next_seq, limit=500, subject=subject)
        except DsysError:
            await asyncio.sleep(0.5)
            continue
        for msg in page:
            apply(msg)
            next_seq = msg.seq + 1
        if len(page) < 500:
            await asyncio.sleep(every)


def json_error(status: int, error: str, message: str) -> web.HTTPException:
    """An HTTP error with a JSON body ``{"error", "message"}``."""
    cls = web.HTTPException
    for c in (
        web.HTTPBadRequest,
        web.HTTPUnauthorized,
        web.HTTPPaymentRequired,
        web.HTTPForbidden,
        web.HTTPNotFound,
        web.HTTPConflict,
        web.HTTPUnprocessableEntity,
        web.HTTPServiceUnavailable,
        web.HTTPBadGateway,
    ):
        if c.status_code == status:
            cls = c
    return cls(
        text=json.dumps({"error": error, "message": message}), content_type="application/json"
    )


async def body_json(request: web.Request) -> Json:
    """The request's JSON object body.

    Raises:
        HTTPBadRequest: not JSON, or not an object.
    """
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise json_error(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise json_error(400, "bad_json", "the body must be a JSON object")
    return body


def now() -> float:
    """Wall-clock seconds (reservation expiry is compared across processes)."""
    return time.time()


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``."""
    return web.json_response({"ok": True})
