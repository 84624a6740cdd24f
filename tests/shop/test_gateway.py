"""The gateway's rate limits and tokens, in process (no other service is needed)."""

from __future__ import annotations

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from examples.shop.services import Ctx, check_token, gateway_app, make_token, parser

from dsys.kv import KVClient


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
