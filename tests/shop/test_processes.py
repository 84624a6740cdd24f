"""The shop's invariants, checked on real processes (``examples.shop.run.Shop``).

One shop for the tests of this package (``conftest.py``: 1 KV node, 1 stream node, 2 gateways
behind ``dsys lb``, a payment provider failing 30 % of its calls), so the whole file runs
in well under a minute.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from examples.shop.run import Api, Shop
from examples.shop.services import JOBS_STREAM, delivery_job_id

from dsys.jobs import Queue
from dsys.jobs.dsys_backend import DsysBackend
from dsys.kv import KVClient
from dsys.streams.client import StreamClient

FINAL = ("delivered", "cancelled", "refunded")


async def get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as r:
        assert r.status == 200, (url, r.status, await r.text())
        return await r.json()


async def new_product(shop: Shop, http: aiohttp.ClientSession, stock: int, price: int) -> str:
    pid = f"limited-{secrets.token_hex(3)}"
    body = {"id": pid, "name": f"Limited {pid}", "category": "test", "price": price}
    async with http.post(f"{shop.urls['catalog']}/admin/products", json=body) as r:
        assert r.status == 201
    async with http.put(f"{shop.urls['inventory']}/admin/stock/{pid}", json={"on_hand": stock}):
        pass
    deadline = time.monotonic() + 10
    while (await http.get(f"{shop.url}/api/products/{pid}")).status != 200:
        assert time.monotonic() < deadline, "the catalog read model did not pick the product up"
        await asyncio.sleep(0.1)
    return pid


async def customer(http: aiohttp.ClientSession, shop: Shop, prefix: str) -> Api:
    api = Api(http, shop.url)
    await api.signup(f"{prefix}{secrets.token_hex(4)}")
    return api


async def check_money(shop: Shop, http: aiohttp.ClientSession, orders: list[str]) -> None:
    """No order charged twice; every charged order delivered or refunded (provider's
    ledger, the orders service's records and the history read model agree)."""
    ledger = await get(http, f"{shop.urls['provider']}/v1/ledger")
    charged = Counter(e["order"] for e in ledger if e["kind"] == "charge" and e["status"] == 200)
    refunded = Counter(e["order"] for e in ledger if e["kind"] == "refund" and e["status"] == 200)
    assert max(charged.values(), default=0) <= 1 and max(refunded.values(), default=0) <= 1
    assert set(refunded) <= set(charged)
    records = {o["id"]: o for o in await get(http, f"{shop.urls['orders']}/admin/orders")}
    deadline = time.monotonic() + 10
    while True:  # the read model catches up shortly after
        history = {o["id"]: o for o in await get(http, f"{shop.urls['history']}/admin/orders")}
        if all(history.get(o, {}).get("status") == records[o]["status"] for o in orders):
            break
        assert time.monotonic() < deadline, "the history read model does not match the orders"
        await asyncio.sleep(0.2)
    for oid in orders:
        status = records[oid]["status"]
        if charged[oid]:
            assert status in ("delivered", "refunded"), records[oid]
            assert (status == "refunded") == bool(refunded[oid]), (records[oid], refunded[oid])
        else:
            assert status == "cancelled", records[oid]


async def test_n_concurrent_checkouts_of_stock_k_make_exactly_k_paid_orders(
    shop: Shop, http: aiohttp.ClientSession
) -> None:
    n, k = 12, 5
    pid = await new_product(shop, http, stock=k, price=700)
    buyers = await asyncio.gather(*(customer(http, shop, "buyer") for _ in range(n)))
    for b in buyers:
        status, _ = await b.call("POST", "/api/cart/items", {"product": pid, "qty": 1})
        assert status == 200
    answers = await asyncio.gather(*(b.call("POST", "/api/checkout", {}) for b in buyers))
    assert [s for s, _ in answers] == [202] * n, answers
    finals = await asyncio.gather(
        *(b.wait_final(o["id"], timeout=40) for b, (_, o) in zip(buyers, answers, strict=True))
    )
    statuses = Counter(f["status"] for f in finals)
    assert statuses == Counter({"delivered": k, "cancelled": n - k}), statuses
    stock = await get(http, f"{shop.urls['inventory']}/stock/{pid}")
    assert stock == {"product": pid, "on_hand": 0, "available": 0, "held": 0}
    await check_money(shop, http, [o["id"] for _, o in answers])


async def test_a_retried_checkout_with_the_same_key_is_one_order_charged_once(
    shop: Shop, http: aiohttp.ClientSession
) -> None:
    api = await customer(http, shop, "retry")
    await api.call("POST", "/api/cart/items", {"product": "mug", "qty": 1})
    key = {"Idempotency-Key": secrets.token_hex(8)}
    (s1, o1), (s2, o2) = await asyncio.gather(
        api.call("POST", "/api/checkout", {}, headers=key),
        api.call("POST", "/api/checkout", {}, headers=key),
    )
    assert s1 == s2 == 202 and o1["id"] == o2["id"]
    assert (await api.wait_final(o1["id"]))["status"] == "delivered"
    await check_money(shop, http, [o1["id"]])


async def test_bad_input_gets_a_clear_4xx_and_changes_nothing(
    shop: Shop, http: aiohttp.ClientSession
) -> None:
    alice = await customer(http, shop, "alice")
    bob = await customer(http, shop, "bob")
    await alice.call("POST", "/api/cart/items", {"product": "mug", "qty": 2})
    _, order = await alice.call("POST", "/api/checkout", {})
    await alice.call("POST", "/api/cart/items", {"product": "watch", "qty": 1})
    cart_before = await alice.call("GET", "/api/cart")
    orders_before = len(await get(http, f"{shop.urls['orders']}/admin/orders"))
    url = shop.url
    headers = {"Authorization": f"Bearer {alice.token}", "Content-Type": "application/json"}
    for path in ("/api/cart/items", "/api/checkout", "/api/signup", "/api/login"):
        async with http.post(url + path, data=b"{not json", headers=headers) as r:
            assert r.status == 400, path
            assert (await r.json())["error"] == "bad_json"
    cases: list[tuple[Api, str, str, Any, int, str]] = [
        (alice, "POST", "/api/cart/items", {"product": "mug", "qty": -1}, 400, "bad_item"),
        (alice, "POST", "/api/cart/items", {"product": "mug", "qty": 10**9}, 400, "bad_item"),
        (alice, "POST", "/api/cart/items", {"product": "mug", "qty": "2"}, 400, "bad_item"),
        (alice, "POST", "/api/cart/items", [1, 2], 400, "bad_json"),
        (alice, "POST", "/api/cart/items", {"product": "nope", "qty": 1}, 404, "unknown_product"),
        (alice, "POST", "/api/checkout", {"card": "12"}, 400, "bad_card"),
        (bob, "GET", f"/api/orders/{order['id']}", None, 404, "not_found"),
        (bob, "POST", "/api/checkout", {}, 400, "empty_cart"),
        (alice, "GET", "/api/orders/o-doesnotexist", None, 404, "not_found"),
    ]
    for api, method, path, body, status, error in cases:
        got, data = await api.call(method, path, body)
        assert (got, data.get("error")) == (status, error), (path, body, data)
    forged = Api(http, url)
    payload, _, sig = alice.token.rpartition(".")
    forged.token = f"{payload[:-2]}xx.{sig}"
    for path in ("/api/cart", "/api/orders", f"/api/orders/{order['id']}"):
        got, data = await forged.call("GET", path)
        assert (got, data["error"]) == (401, "unauthorized")
        got, _ = await Api(http, url).call("GET", path)
        assert got == 401
    async with http.get(f"{url}/api/cart", headers={"Authorization": f"Bearer {bob.token}"}) as r:
        assert r.status == 200 and int(r.headers["RateLimit-Limit"]) > 0  # the limiter's view
        assert "RateLimit-Remaining" in r.headers
    assert await alice.call("GET", "/api/cart") == cart_before
    assert len(await get(http, f"{shop.urls['orders']}/admin/orders")) == orders_before
    await alice.wait_final(order["id"])


async def test_a_message_nobody_can_handle_goes_to_the_dead_letter_stream(shop: Shop) -> None:
    async with StreamClient(shop.streams) as sc:
        before = (await sc.stream_info("SHOP-DLQ") or {}).get("messages", 0)
        await sc.publish("shop.evt.payment.authorised", b"{this is not an event")
        await sc.publish(
            "shop.cmd.inventory.reserve", json.dumps({"id": "x", "kind": "bogus"}).encode()
        )
        deadline = time.monotonic() + 10
        while True:
            info = await sc.stream_info("SHOP-DLQ") or {}
            if info.get("messages", 0) >= before + 2:
                break
            assert time.monotonic() < deadline, info
            await asyncio.sleep(0.2)
        last = await sc.read("SHOP-DLQ", start_seq=0, limit=2, reverse=True)
        assert {m.subject for m in last} == {
            "shop.evt.payment.authorised",
            "shop.cmd.inventory.reserve",
        }


async def test_kill_9_the_orders_service_mid_load_every_acknowledged_order_ends_final(
    shop: Shop, http: aiohttp.ClientSession
) -> None:
    pid = await new_product(shop, http, stock=15, price=300)
    buyers = await asyncio.gather(*(customer(http, shop, "chaos") for _ in range(20)))
    acked: list[str] = []
    answers: Counter[int] = Counter()
    flowing = asyncio.Event()

    async def buy(api: Api, delay: float = 0.0) -> None:
        await api.call("POST", "/api/cart/items", {"product": pid, "qty": 1})
        await asyncio.sleep(delay)  # spread over the kill
        status, data = await api.call("POST", "/api/checkout", {})
        answers[status] += 1
        if status == 202:
            acked.append(data["id"])
            flowing.set()

    first = asyncio.gather(*(buy(b, 0.05 * i) for i, b in enumerate(buyers[:10])))
    await asyncio.wait_for(flowing.wait(), 20)  # kill it once orders are flowing
    instances = shop.instances_of("orders")
    assert len(instances) >= 2
    for name in instances:  # every instance: the whole orders service is down
        await asyncio.to_thread(shop.kill, name)
    await first
    refused_while_down = answers[503]
    for name in instances:
        await asyncio.to_thread(shop.restart, name)
    await asyncio.gather(*(buy(b) for b in buyers[10:]))
    print(f"checkouts: {dict(answers)}; refused while orders was down: {refused_while_down}")
    assert refused_while_down > 0 and len(acked) >= 11
    deadline = time.monotonic() + 40
    while True:  # every order, acknowledged or not (created just before the kill), ends
        mine = [
            o
            for o in await get(http, f"{shop.urls['orders']}/admin/orders")
            if o["items"][0][0] == pid
        ]
        if all(o["status"] in FINAL for o in mine):
            break
        assert time.monotonic() < deadline, [o for o in mine if o["status"] not in FINAL]
        await asyncio.sleep(0.3)
    assert set(acked) <= {o["id"] for o in mine}
    sold = Counter(o["status"] for o in mine)["delivered"]
    stock = await get(http, f"{shop.urls['inventory']}/stock/{pid}")
    assert stock["on_hand"] == 15 - sold and stock["held"] == 0
    await check_money(shop, http, acked)


@pytest.mark.slow
async def test_chaos_kill_orders_kv_leader_stream_node_and_a_gateway_during_load() -> None:
    """The issue's chaos run on 3-node clusters (about 90 s): kill -9 the orders service
    (both instances), the KV leader, the stream leader, a gateway instance and a delivery
    worker during a load, restart each."""
    shop = await asyncio.to_thread(
        Shop(kv_nodes=3, stream_nodes=3, gateways=2, delivery_step=0.2, rate=1000,
             provider_error_rate=0.2, provider_latency=(0.0, 0.05), quiet=True).start
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            pid = await new_product(shop, http, stock=40, price=300)
            buyers = await asyncio.gather(*(customer(http, shop, "c") for _ in range(60)))
            acked: list[str] = []
            answers: Counter[Any] = Counter()
            killed: list[str] = []

            async def buy(api: Api, delay: float) -> None:
                await asyncio.sleep(delay)
                for _ in range(10):  # a customer retries a failed checkout (same key)
                    s, e = await api.call("POST", "/api/cart/items", {"product": pid, "qty": 1})
                    if s != 200:
                        answers[f"cart {s} {e.get('error')}"] += 1
                        await asyncio.sleep(0.5)
                        continue
                    key = {"Idempotency-Key": api.token[-16:]}
                    status, data = await api.call("POST", "/api/checkout", {}, headers=key)
                    answers[status] += 1
                    if status == 202:
                        acked.append(data["id"])
                        return
                    await asyncio.sleep(0.5)

            async def chaos() -> None:
                async with KVClient(shop.kv) as kv:
                    leader = (await kv.status(kv.leader or shop.kv[0]))["leader"]
                async with StreamClient(shop.streams) as sc:
                    sleader = (await sc.status())["leader"]
                victims = [
                    shop.instances_of("orders"),  # the whole orders service
                    [f"kv-{leader}"],
                    [f"streams-{sleader}"],
                    ["gateway-1"],
                    ["delivery-1"],  # a jobs worker: its leased jobs go to delivery-2
                ]
                for names in victims:
                    await asyncio.sleep(1.5)
                    for name in names:
                        await asyncio.to_thread(shop.kill, name)
                    killed.extend(names)
                    await asyncio.sleep(1.0)
                    for name in names:
                        await asyncio.to_thread(shop.restart, name)

            await asyncio.gather(chaos(), *(buy(b, 0.1 * i) for i, b in enumerate(buyers)))
            deadline = time.monotonic() + 60
            while True:
                mine = [
                    o
                    for o in await get(http, f"{shop.urls['orders']}/admin/orders")
                    if o["items"][0][0] == pid
                ]
                if all(o["status"] in FINAL for o in mine):
                    break
                assert time.monotonic() < deadline, [o for o in mine if o["status"] not in FINAL]
                await asyncio.sleep(0.5)
            assert set(acked) <= {o["id"] for o in mine}
            sold = Counter(o["status"] for o in mine)["delivered"]
            stock = await get(http, f"{shop.urls['inventory']}/stock/{pid}")
            print(f"killed {killed}; checkouts {dict(answers)}; "
                  f"orders {Counter(o['status'] for o in mine)}")  # fmt: skip
            assert len(killed) == 6 and len(acked) >= 30
            assert stock["on_hand"] == 40 - sold and stock["held"] == 0
            await check_money(shop, http, [o["id"] for o in mine])
    finally:
        await asyncio.to_thread(shop.stop)


async def test_a_duplicate_event_is_skipped_and_a_replayed_charge_is_not_charged_again(
    shop: Shop, http: aiohttp.ClientSession
) -> None:
    api = await customer(http, shop, "dup")
    await api.call("POST", "/api/cart/items", {"product": "mug", "qty": 1})
    _, order = await api.call("POST", "/api/checkout", {})
    assert (await api.wait_final(order["id"]))["status"] == "delivered"
    oid = order["id"]

    async def duplicates() -> int:
        """Duplicates skipped by all orders instances (each counts its own; the orders lb
        would show one instance's count at a time)."""
        stats = [await get(http, f"{shop.urls[n]}/admin/stats") for n in orders_instances]
        return sum(int(st["duplicates"]) for st in stats)

    orders_instances = shop.instances_of("orders")
    before = await duplicates()
    async with StreamClient(shop.streams) as sc:  # the same event again, stored again
        ev = {"id": f"{oid}:payment.authorised", "kind": "payment.authorised", "order": oid}
        await sc.publish("shop.evt.payment.authorised", json.dumps(ev).encode())
    deadline = time.monotonic() + 10
    while await duplicates() == before:
        assert time.monotonic() < deadline, "the duplicate was not seen"
        await asyncio.sleep(0.1)
    assert (await get(http, f"{shop.urls['orders']}/orders/{oid}"))["status"] == "delivered"
    # the provider replays the answer for the same idempotency key: no second charge
    key = {"Idempotency-Key": f"{oid}:charge"}
    card = "4242424242424242"  # the gateway's default
    body = {"order": oid, "amount": order["amount"], "user": order["user"], "card": card}
    for _ in range(20):  # the provider fails 30 % of calls on purpose
        async with http.post(f"{shop.urls['provider']}/v1/charges", json=body, headers=key) as r:
            if r.status == 200:
                assert r.headers["Idempotent-Replayed"] == "true"
                break
    else:
        raise AssertionError("the provider never answered")
    await check_money(shop, http, [oid])


async def test_delivery_runs_as_jobs_and_a_redelivered_schedule_enqueues_nothing_twice(
    shop: Shop, http: aiohttp.ClientSession
) -> None:
    api = await customer(http, shop, "ship")
    await api.call("POST", "/api/cart/items", {"product": "candle-holder", "qty": 1})
    _, order = await api.call("POST", "/api/checkout", {})
    oid = order["id"]
    assert (await api.wait_final(oid))["status"] == "delivered"
    async with DsysBackend(shop.streams, shop.kv, stream=JOBS_STREAM) as backend:
        queue = Queue(backend, "delivery")
        before = []
        for stage in range(3):  # one job per step, each succeeded once
            info = await queue.status(delivery_job_id(oid, stage))
            assert info is not None and info.state == "succeeded", info
            assert list(info.spec.args) == [oid, stage]
            before.append(info)
        async with StreamClient(shop.streams) as sc:  # the command again, stored again
            cmd = {"id": f"{oid}:again", "kind": "delivery.schedule", "order": oid,
                   "user": order["user"], "items": [], "amount": order["amount"]}  # fmt: skip
            ack = await sc.publish("shop.cmd.delivery.schedule", json.dumps(cmd).encode())
            deadline = time.monotonic() + 10
            while (await sc.consumer_info("SHOP", "delivery") or {})["ack_floor"] < ack.seq:
                assert time.monotonic() < deadline, "the delivery service did not take it"
                await asyncio.sleep(0.1)
        for stage in range(3):  # the same jobs, not run again
            info = await queue.status(delivery_job_id(oid, stage))
            assert info is not None and info.state == "succeeded"
            assert (info.enqueued_ms, info.finished_ms, info.tries) == (
                before[stage].enqueued_ms, before[stage].finished_ms, before[stage].tries
            )  # fmt: skip
    history = (await get(http, f"{shop.urls['orders']}/orders/{oid}"))["history"]
    assert history[-3:] == ["packed", "shipped", "delivered"], history
    assert history.count("packed") == 1, history


async def test_a_cart_survives_its_cart_instance_dying(
    shop: Shop, http: aiohttp.ClientSession
) -> None:
    assert shop.instances_of("cart") == ["cart-1", "cart-2"]
    users = await asyncio.gather(*(customer(http, shop, "cart") for _ in range(6)))
    for u in users:
        await u.call("POST", "/api/cart/items", {"product": "hairdryer", "qty": 2})
    await asyncio.to_thread(shop.kill, "cart-1")
    try:
        for u in users:  # half of them lived on cart-1: the ring sends them to cart-2
            assert await u.call("GET", "/api/cart") == (200, {"items": {"hairdryer": 2}})
    finally:
        await asyncio.to_thread(shop.restart, "cart-1")


async def test_an_expired_reservation_frees_the_stock_for_the_next_customer(
    shop: Shop, http: aiohttp.ClientSession
) -> None:
    pid = await new_product(shop, http, stock=1, price=100)
    async with StreamClient(shop.streams) as sc:  # a checkout that never pays: a ghost hold
        ghost = {"id": "o-ghost:inventory.reserve:0", "kind": "inventory.reserve",
                 "order": f"o-ghost-{pid}", "user": "ghost", "items": [[pid, 1, 100]],
                 "amount": 100}  # fmt: skip
        await sc.publish("shop.cmd.inventory.reserve", json.dumps(ghost).encode())
    deadline = time.monotonic() + 10
    while (await get(http, f"{shop.urls['inventory']}/stock/{pid}"))["held"] != 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    late = await customer(http, shop, "late")
    await late.call("POST", "/api/cart/items", {"product": pid, "qty": 1})
    _, first = await late.call("POST", "/api/checkout", {})
    final = await late.wait_final(first["id"])
    assert (final["status"], final["reason"]) == ("cancelled", f"{pid}: out of stock")
    url = f"{shop.urls['inventory']}/admin/stock/{pid}/expire"
    async with http.post(url, json={"ahead": 301}) as r:  # the 5-minute hold runs out
        assert (await r.json())["expired"] == [f"o-ghost-{pid}"]
    await late.call("POST", "/api/cart/items", {"product": pid, "qty": 1})
    _, second = await late.call("POST", "/api/checkout", {})
    assert (await late.wait_final(second["id"]))["status"] == "delivered"
    stock = await get(http, f"{shop.urls['inventory']}/stock/{pid}")
    assert stock == {"product": pid, "on_hand": 0, "available": 0, "held": 0}
