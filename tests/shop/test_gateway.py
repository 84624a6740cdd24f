"""The gateway's rate limits and tokens, in process (no other service is needed)."""

from __future__ import annotations

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from examples.shop.services import Ctx, check_token, gateway_app, make_token, parser

from dsys.kv import KVClient
from dsys.testing.procs import start_dsys


async def test_a_client_over_its_rate_gets_429_with_ratelimit_headers() -> None:
    args = parser().parse_args(["gateway", "--kv", "127.0.0.1:1", "--cart", "http://x:1",
                                "--rate", "2"])  # fmt: skip
    ctx = Ctx(args, kv=KVClient(["127.0.0.1:1"]), http=aiohttp.ClientSession())
    try:
        app = await gateway_app(ctx)
        async with TestClient(TestServer(app)) as client:
            statuses = []
            for _ in range(8):
                r = await client.get("/api/currencies")
                statuses.append(r.status)
                assert "RateLimit-Limit" in r.headers and "RateLimit-Remaining" in r.headers
            assert statuses[:4] == [200] * 4 and 429 in statuses  # burst 4, then refused
            r = await client.get("/api/currencies")
            assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["error"] == "rate_limited"
            r = await client.get("/api/cart")  # a signed-in user has a bucket of their own
            assert r.status == 429  # (this one is anonymous: same IP bucket)
    finally:
        await ctx.http.close()  # type: ignore[union-attr]
        await ctx.kvc.close()


def test_tokens_are_signed_and_expire() -> None:
    secret = b"s3cret"
    token = make_token(secret, "alice")
    assert check_token(secret, token) == "alice"
    assert check_token(b"other", token) is None
    payload, _, sig = token.rpartition(".")
    assert check_token(secret, payload[:-1] + "A." + sig) is None
    assert check_token(secret, make_token(secret, "alice", ttl=-1)) is None
    assert check_token(secret, "garbage") is None


async def test_two_gateways_share_one_limit_through_a_ratelimit_node() -> None:
    """Requests alternating between two gateway instances draw on one bucket held by a
    ``dsys ratelimit serve`` node (a real process); with no node each has its own."""

    async def allowed(extra: list[str]) -> list[int]:
        argv = ["gateway", "--kv", "127.0.0.1:1", "--cart", "http://x:1", "--rate", "0.001",
                "--burst", "3", *extra]  # fmt: skip
        ctxs = [
            Ctx(parser().parse_args(argv), kv=KVClient(["127.0.0.1:1"]),
                http=aiohttp.ClientSession())
            for _ in range(2)
        ]  # fmt: skip
        clients = [TestClient(TestServer(await gateway_app(c))) for c in ctxs]
        try:
            for c in clients:
                await c.start_server()
            statuses = []
            for i in range(8):  # one client (one IP), alternating instances
                r = await clients[i % 2].get("/api/currencies")
                statuses.append(r.status)
            return statuses
        finally:
            for c in clients:
                await c.close()
            for ctx in ctxs:
                await ctx.session.close()
                await ctx.kvc.close()

    with start_dsys("ratelimit", "serve", "--listen", "127.0.0.1:0") as node:
        shared = await allowed(["--ratelimit", node.addr])
    assert shared == [200, 200, 200] + [429] * 5  # burst 3 in all, refill 1 per 1000 s
    alone = await allowed([])
    assert alone == [200] * 6 + [429] * 2  # burst 3 on each instance
