"""Kill -9 the KV leader during a load of orders (3 KV replicas; slow)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from examples.trading.api import START_CASH
from examples.trading.market import instruments
from examples.trading.system import TradingSystem

INSTS = instruments(20)


@pytest.mark.slow
async def test_kill_the_kv_leader_during_orders_nothing_lost_or_filled_twice() -> None:
    ts = TradingSystem(
        instruments=20,
        kv_nodes=3,
        feed_args=["--interval", "0.5"],
        api_args=["--orders-per-second", "1000", "--orders-per-minute", "100000"],
    )
    await asyncio.to_thread(ts.start)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

            async def call(method: str, path: str, token: str = "", **body: Any) -> Any:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                try:
                    async with http.request(
                        method, ts.api_url + path, json=body or None, headers=headers
                    ) as r:
                        return r.status, await r.json()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    return 599, {"error": str(exc)}

            tokens = []
            for u in range(3):
                _, got = await call("POST", "/api/signup", user=f"load_{u}", password="pass-word-1")
                tokens.append(got["token"])
            accepted: dict[int, set[str]] = {u: set() for u in range(3)}
            stop = time.monotonic() + 12

            async def trader(u: int) -> None:
                n = 0
                while time.monotonic() < stop:
                    n += 1
                    body = {"symbol": INSTS[n % 5].symbol, "side": "BUY", "qty": 1,
                            "type": "MARKET", "tag": f"u{u}-{n}"}  # fmt: skip
                    for _ in range(60):  # a real client retries with the same tag
                        status, o = await call("POST", "/api/orders", tokens[u], **body)
                        if status == 200:
                            accepted[u].add(o["order_id"])
                            break
                        await asyncio.sleep(0.25)

            load = [asyncio.create_task(trader(u)) for u in range(3)]
            await asyncio.sleep(3)
            leader = await asyncio.to_thread(ts.kv_leader)
            assert leader is not None
            ts.kill9_kv(leader)
            await asyncio.gather(*load)
            for u in range(3):
                deadline = time.monotonic() + 30
                while True:
                    status, orders = await call("GET", "/api/orders", tokens[u])
                    if status == 200 and all(o["status"] == "COMPLETE" for o in orders):
                        break
                    assert time.monotonic() < deadline, orders
                    await asyncio.sleep(0.5)
                ids = {o["order_id"] for o in orders}
                assert accepted[u] <= ids  # no accepted order lost
                assert len(ids) == len({o["tag"] for o in orders})  # one order per tag
                _, p = await call("GET", "/api/portfolio", tokens[u])
                trades = [tuple(t[:3]) for t in p["trades"]]
                assert len(trades) == len(set(trades))  # no fill applied twice
                assert sum(h["qty"] for h in p["holdings"]) == len(ids)
                spent = sum(q * price for *_, q, price, _ in p["trades"])
                assert p["cash"] + p["reserved"] + spent == START_CASH
                assert len(accepted[u]) > 5
    finally:
        await asyncio.to_thread(ts.stop)
