"""The trading example as real processes on loopback (one system for the module).

Place an order and see it fill; concurrent orders never overspend; a matcher killed with
SIGKILL rebuilds its books from the stream with exactly the same fills; bad input gets a
clear error and nothing else is affected.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from examples.trading.api import START_CASH
from examples.trading.market import instruments, owner, owner_ring, unpack_message
from examples.trading.system import TradingSystem

from dsys.streams.client import StreamClient

from .conftest import N_INSTRUMENTS

INSTS = instruments(N_INSTRUMENTS)
S0 = INSTS[0].symbol


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


class Api:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base
        self.token = ""

    async def call(self, method: str, path: str, raw: bytes | None = None, **body: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body else None)
        async with self.http.request(method, self.base + path, data=data, headers=headers) as r:
            payload = await r.json()
            return r.status, payload

    async def ok(self, method: str, path: str, **body: Any) -> Any:
        status, payload = await self.call(method, path, **body)
        assert status == 200, (status, payload)
        return payload

    async def signup(self, user: str) -> Api:
        self.token = (await self.ok("POST", "/api/signup", user=user, password="s3cret-pass"))[
            "token"
        ]
        return self

    async def ltp(self, symbol: str) -> int:
        for i in await self.ok("GET", "/api/instruments"):
            if i["symbol"] == symbol:
                return int(i["ltp"])
        raise AssertionError(symbol)

    async def wait_done(self, limit: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + limit
        while True:
            orders = await self.ok("GET", "/api/orders")
            busy = [o for o in orders if o["status"] in ("VALIDATION PENDING", "MODIFY PENDING")]
            if not busy or time.monotonic() > deadline:
                return list(orders)
            await asyncio.sleep(0.1)


def _conserved(p: dict[str, Any]) -> int:
    """cash + reserved + holdings at fill prices (buys minus sells)."""
    spent = sum(
        q * price if side == "BUY" else -q * price for _, _, _, side, q, price, _ in p["trades"]
    )
    return int(p["cash"] + p["reserved"] + spent)


async def test_place_an_order_see_it_fill_portfolio_changes(
    system: TradingSystem, http: aiohttp.ClientSession
) -> None:
    a = await Api(http, system.api_url).signup("alice")
    status, err = await Api(http, system.api_url).call(
        "POST", "/api/login", user="alice", password="wrong-password"
    )
    assert status == 401 and "wrong user name or password" in err["error"]
    relogin = await Api(http, system.api_url).ok(
        "POST", "/api/login", user="alice", password="s3cret-pass"
    )
    assert relogin["user"] == "alice"
    sym = INSTS[0].symbol
    o = await a.ok("POST", "/api/orders", symbol=sym, side="BUY", qty=10, type="MARKET", tag="t1")
    assert o["status"] == "COMPLETE" and o["filled"] == 10, o
    again = await a.ok(
        "POST", "/api/orders", symbol=sym, side="BUY", qty=10, type="MARKET", tag="t1"
    )
    assert again["order_id"] == o["order_id"]  # idempotent by client tag
    p = await a.ok("GET", "/api/portfolio")
    assert [(h["symbol"], h["qty"]) for h in p["holdings"]] == [(sym, 10)]
    assert p["cash"] == START_CASH - 10 * o["avg_price"]
    assert p["positions"][0]["net_qty"] == 10
    # a resting limit order far below the price, then cancelled: the reservation comes back
    ltp = await a.ltp(sym)
    low = int(ltp * 0.85) // 5 * 5
    rest = await a.ok("POST", "/api/orders", symbol=sym, side="BUY", qty=3, price=low)
    assert rest["status"] == "OPEN"
    assert (await a.ok("GET", "/api/portfolio"))["reserved"] == 3 * low
    moved = await a.ok("PUT", f"/api/orders/{rest['order_id']}", price=low - 5, qty=4)
    assert (moved["status"], moved["qty"]) == ("OPEN", 4)
    assert (await a.ok("GET", "/api/portfolio"))["reserved"] == 4 * (low - 5)
    done = await a.ok("DELETE", f"/api/orders/{rest['order_id']}")
    assert done["status"] == "CANCELLED"
    p = await a.ok("GET", "/api/portfolio")
    assert p["reserved"] == 0 and _conserved(p) == START_CASH
    # another user sees none of it
    b = await Api(http, system.api_url).signup("bob")
    assert await b.ok("GET", "/api/orders") == []
    status, _ = await b.call("DELETE", f"/api/orders/{rest['order_id']}")
    assert status == 404


async def test_concurrent_orders_never_overspend_or_oversell(
    system: TradingSystem, http: aiohttp.ClientSession
) -> None:
    c = await Api(http, system.api_url).signup("carol")
    sym = INSTS[1].symbol
    ltp = await c.ltp(sym)
    price = int(ltp * 1.1) // 5 * 5  # crosses the market maker's ask: fills
    qty = int(START_CASH * 0.3) // price  # each order reserves 30% of the cash
    results = await asyncio.gather(
        *(
            c.call("POST", "/api/orders", symbol=sym, side="BUY", qty=qty, price=price)
            for _ in range(8)
        )
    )
    accepted = [o for s, o in results if s == 200]
    refused = [o["error"] for s, o in results if s != 200]
    assert len(accepted) == 3, results
    assert all("insufficient funds" in e for e in refused), refused
    await c.wait_done()
    p = await c.ok("GET", "/api/portfolio")
    assert _conserved(p) == START_CASH
    assert p["cash"] >= 0 and p["reserved"] >= 0
    held = sum(h["qty"] for h in p["holdings"])
    assert held == sum(o["filled"] for o in await c.ok("GET", "/api/orders"))
    # sell more than held, concurrently: at most what is held is ever blocked
    sell = held * 4 // 10
    low = int(ltp * 0.9) // 5 * 5
    results = await asyncio.gather(
        *(
            c.call("POST", "/api/orders", symbol=sym, side="SELL", qty=sell, price=low)
            for _ in range(5)
        )
    )
    assert sum(s == 200 for s, _ in results) == 2, results
    await c.wait_done()
    await asyncio.sleep(1.1)  # let the per-second bucket refill
    p = await c.ok("GET", "/api/portfolio")
    assert _conserved(p) == START_CASH
    assert all(h["qty"] >= 0 and h["blocked"] >= 0 for h in p["holdings"])
    assert p["cash"] >= 0 and p["reserved"] >= 0


async def test_rate_limit_per_user(system: TradingSystem, http: aiohttp.ClientSession) -> None:
    d = await Api(http, system.api_url).signup("dave")
    sym = INSTS[2].symbol
    low = int(await d.ltp(sym) * 0.85) // 5 * 5
    answers = await asyncio.gather(
        *(
            d.call("POST", "/api/orders", symbol=sym, side="BUY", qty=1, price=low)
            for _ in range(20)
        )
    )
    statuses = [s for s, _ in answers]
    for s, body in answers:
        if s == 429:
            assert body["error"].startswith("rate limit") and body["retry_after"] > 0
    assert statuses.count(429) >= 5 and statuses.count(200) >= 10, statuses


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


async def _matcher(system: TradingSystem, node: str, path: str = "status") -> Any:
    return await asyncio.to_thread(_get, f"http://{system.matcher_addr(node)}/{path}")


async def test_matcher_killed_with_sigkill_rebuilds_the_same_books(
    system: TradingSystem, http: aiohttp.ClientSession
) -> None:
    ring = owner_ring(system.matcher_ids)
    sym = next(i.symbol for i in INSTS[3:] if owner(ring, i.symbol) == "m1")
    e = await Api(http, system.api_url).signup("erin")
    ltp = await e.ltp(sym)
    low = int(ltp * 0.9) // 5 * 5
    rest = await e.ok("POST", "/api/orders", symbol=sym, side="BUY", qty=7, price=low)
    buy = await e.ok("POST", "/api/orders", symbol=sym, side="BUY", qty=5, type="MARKET")
    assert rest["status"] == "OPEN" and buy["status"] == "COMPLETE"
    before = await _matcher(system, "m1")
    book_before = await _matcher(system, "m1", f"book/{sym}")
    system.kill9("matcher-m1")
    system.start_matcher("m1")
    deadline = time.monotonic() + 20
    while not (st := await _matcher(system, "m1"))["rebuilt"]:
        assert time.monotonic() < deadline, st
        await asyncio.sleep(0.2)
    assert st["replayed_mismatched"] == 0
    assert st["replayed_identical"] >= before["published"] > 0
    assert st["trades"] >= before["trades"]
    book_after = await _matcher(system, "m1", f"book/{sym}")
    assert book_after == book_before
    # the rebuilt book still has erin's order: a sell at its price fills against it
    sold = await e.ok("POST", "/api/orders", symbol=sym, side="SELL", qty=5, price=low)
    assert sold["status"] == "COMPLETE", sold
    p = await e.ok("GET", "/api/portfolio")
    assert _conserved(p) == START_CASH
    # one result per order command, none twice
    seqs: list[int] = []
    async with StreamClient([system.streams]) as sc:
        start = 1
        while page := await sc.read("RESULTS", start_seq=start, limit=500):
            seqs += [json.loads(m.data)["seq"] for m in page]
            start = page[-1].seq + 1
    assert len(seqs) == len(set(seqs)) > 0


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"symbol": "NOPE", "side": "BUY", "qty": 1}, 400, "unknown instrument 'NOPE'"),
        ({"symbol": S0, "side": "BUY", "qty": -5}, 400, "qty must be a whole number"),
        ({"symbol": S0, "side": "BUY", "qty": 10**9}, 400, "qty must be a whole number"),
        ({"symbol": S0, "side": "BUY", "qty": "1"}, 400, "qty must be a whole number"),
        ({"symbol": S0, "side": "HOLD", "qty": 1}, 400, "side must be BUY or SELL"),
        ({"symbol": S0, "side": "BUY", "qty": 1, "price": -100}, 400, "price must be"),
        ({"symbol": S0, "side": "BUY", "qty": 1, "price": 10**12}, 400, "outside today's band"),
        ({"symbol": S0, "side": "BUY", "qty": 1, "price": 101}, 400, "a multiple of 5"),
        ({"symbol": S0, "side": "BUY", "qty": 1, "type": "SL-M"}, 400, "trigger must be"),
    ],
    ids=["unknown-instrument", "negative-qty", "absurd-qty", "string-qty", "bad-side",
         "negative-price", "absurd-price", "off-tick", "no-trigger"],
)  # fmt: skip
async def test_bad_orders_get_a_clear_error(
    system: TradingSystem,
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    status: int,
    error: str,
) -> None:
    f = Api(http, system.api_url)
    f.token = (await f.call("POST", "/api/login", user="alice", password="s3cret-pass"))[1]["token"]
    before = await f.ok("GET", "/api/portfolio")
    got, answer = await f.call("POST", "/api/orders", **body)
    assert got == status and error in answer["error"], answer
    assert await f.ok("GET", "/api/portfolio") == before


async def test_bad_requests_and_tokens(system: TradingSystem, http: aiohttp.ClientSession) -> None:
    g = Api(http, system.api_url)
    assert (await g.call("POST", "/api/signup", raw=b"{not json"))[0] == 400
    assert (await g.call("POST", "/api/signup", user="x", password="s3cret-pass"))[0] == 400
    assert (await g.call("GET", "/api/orders"))[0] == 401
    g.token = "alice.99999999999.forged"
    assert (await g.call("GET", "/api/portfolio"))[0] == 401


async def test_ticker_through_the_load_balancer_and_bad_frames(
    system: TradingSystem, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(system.ticker_url) as ws:
        for frame, error in [
            ("garbage", "not JSON"),
            ('{"a": "subscribe", "v": ["x"]}', "integer instrument tokens"),
            ('{"a": "fly"}', "expected"),
            ('{"a": "mode", "v": ["loud", []]}', "mode needs"),
            ('{"a": "subscribe", "v": [1]}', "unknown instrument tokens: [1]"),
        ]:
            await ws.send_str(frame)
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.TEXT and error in json.loads(msg.data)["data"]
        await ws.send_bytes(b"\x00\x01")
        assert "binary frames" in json.loads((await ws.receive(timeout=5)).data)["data"]
        tokens = [INSTS[0].token, INSTS[1].token]
        await ws.send_str(json.dumps({"a": "subscribe", "v": tokens}))
        await ws.send_str(json.dumps({"a": "mode", "v": ["full", [INSTS[0].token]]}))
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 10
        while len(seen) < 2 or seen.get(INSTS[0].token) != "full":
            assert time.monotonic() < deadline, seen
            msg = await ws.receive(timeout=5)
            if msg.type == aiohttp.WSMsgType.BINARY:
                for tick in unpack_message(msg.data):
                    seen[int(str(tick["instrument_token"]))] = str(tick["mode"])
        assert set(seen) == set(tokens)


async def test_tick_streams_resume_after_a_ticker_gateway_is_killed(
    system: TradingSystem, http: aiohttp.ClientSession
) -> None:
    """Clients reconnect through dsys lb and resubscribe; the other gateway serves them."""
    tokens = [INSTS[0].token, INSTS[1].token, INSTS[2].token]
    after_kill: dict[int, int] = {}
    killed = asyncio.Event()

    async def client(i: int) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                async with http.ws_connect(system.ticker_url) as ws:
                    await ws.send_str(json.dumps({"a": "subscribe", "v": tokens}))
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.BINARY and killed.is_set():
                            after_kill[i] = after_kill.get(i, 0) + 1
                            if after_kill[i] >= 3:
                                return
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.2)  # the connection dropped: reconnect, resubscribe

    tasks = [asyncio.create_task(client(i)) for i in range(4)]
    await asyncio.sleep(1.0)
    system.kill9("ticker-1")
    killed.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 25)
    assert all(after_kill.get(i, 0) >= 3 for i in range(4)), after_kill
