"""The aiohttp middleware on a real server: headers, 429, keys by IP, header, route, function."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from dsys.clock import ManualClock
from dsys.errors import ConfigError
from dsys.observability import start_site
from dsys.ratelimit import Limiter, MemoryStore, by_header, ratelimit_middleware

Serve = Callable[..., "AsyncIterator[str]"]


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def _missing(request: web.Request) -> web.Response:
    raise web.HTTPNotFound(text="nope")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., object]]:
    runners: list[web.AppRunner] = []

    async def start(limiter: Limiter, **kw: object) -> str:
        app = web.Application(middlewares=[ratelimit_middleware(limiter, **kw)])  # type: ignore[arg-type]
        app.router.add_get("/hello", _hello)
        app.router.add_get("/items/{id}", _hello)
        app.router.add_get("/missing", _missing)
        app.router.add_get("/healthz", _hello)
        runner, port = await start_site(app, "127.0.0.1", 0)
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for r in runners:
        await r.cleanup()


def _limiter(**kw: object) -> tuple[Limiter, ManualClock]:
    clock = ManualClock(10.0)
    return Limiter(store=MemoryStore(clock=clock), **kw), clock  # type: ignore[arg-type]


async def test_headers_on_allowed_and_refused_responses(serve: Callable[..., object]) -> None:
    lim, clock = _limiter(rate=1, per=2.0, burst=2)
    base = await serve(lim)  # type: ignore[misc]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/hello") as r:
            assert r.status == 200
            assert r.headers["RateLimit-Limit"] == "2"
            assert r.headers["RateLimit-Remaining"] == "1"
            assert r.headers["RateLimit-Reset"] == "2"
            assert "Retry-After" not in r.headers
        async with s.get(f"{base}/hello") as r:
            assert r.status == 200 and r.headers["RateLimit-Remaining"] == "0"
        async with s.get(f"{base}/hello") as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "2"
            assert r.headers["RateLimit-Remaining"] == "0"
            body = await r.json()
            assert body["error"] == "rate_limited" and body["retry_after"] == pytest.approx(2.0)
        clock.advance(2.0)
        async with s.get(f"{base}/missing") as r:  # handler raised: headers still set
            assert r.status == 404 and r.headers["RateLimit-Remaining"] == "0"
        for _ in range(5):  # exempt path
            async with s.get(f"{base}/healthz") as r:
                assert r.status == 200 and "RateLimit-Limit" not in r.headers


async def test_key_by_header_separates_clients(serve: Callable[..., object]) -> None:
    lim, _ = _limiter(rate=1, per=60.0, burst=1)
    base = await serve(lim, key=by_header("X-Api-Key"))  # type: ignore[misc]
    async with aiohttp.ClientSession() as s:
        statuses = []
        for api_key in ("a", "b", "a", "b", "c"):
            async with s.get(f"{base}/hello", headers={"X-Api-Key": api_key}) as r:
                statuses.append(r.status)
    assert statuses == [200, 200, 429, 429, 200]


async def test_key_by_route_and_by_function(serve: Callable[..., object]) -> None:
    lim, _ = _limiter(rate=2, per=60.0, burst=2)
    base = await serve(lim, key="route")  # type: ignore[misc]
    async with aiohttp.ClientSession() as s:
        codes = []
        for path in ("/items/1", "/items/2", "/items/3", "/hello"):
            async with s.get(base + path) as r:
                codes.append(r.status)
    assert codes == [200, 200, 429, 200]  # /items/{id} is one bucket

    lim2, _ = _limiter(rate=1, per=60.0, burst=1)

    async def only_items(request: web.Request) -> str | None:
        return "items" if request.path.startswith("/items") else None

    base2 = await serve(lim2, key=only_items)  # type: ignore[misc]
    async with aiohttp.ClientSession() as s:
        codes = []
        for path in ("/hello", "/hello", "/items/1", "/items/1"):
            async with s.get(base2 + path) as r:
                codes.append(r.status)
    assert codes == [200, 200, 200, 429]


async def test_key_by_ip_is_the_default(serve: Callable[..., object]) -> None:
    lim, _ = _limiter(rate=1, per=60.0, burst=1, name="web")
    base = await serve(lim)  # type: ignore[misc]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/hello") as r:
            assert r.status == 200
        async with s.get(f"{base}/items/9") as r:
            assert r.status == 429
    assert 'dsys_ratelimit_denied_total{limit="web"} 1.0' in lim.metrics.render().decode()


def test_unknown_key_shortcut() -> None:
    with pytest.raises(ConfigError, match="unknown key 'cookie'"):
        ratelimit_middleware(Limiter(rate=1), key="cookie")


@pytest.mark.parametrize("cost", [0, -1, 6, 1.5, True])
def test_a_cost_that_can_never_pass_is_a_configuration_error(cost: object) -> None:
    # Found at start-up, not as a 400 (or 500) on every request.
    with pytest.raises(ConfigError, match="cost"):
        ratelimit_middleware(Limiter(rate=5), cost=cost)  # type: ignore[arg-type]


async def test_three_app_instances_share_one_limit_through_the_cluster() -> None:
    """The tutorial's set-up: 3 limiter nodes, 3 app instances, one limit for a client."""
    from dsys.ratelimit import ClusterStore, LimiterServer

    node_sites = [await start_site(LimiterServer().app(), "127.0.0.1", 0) for _ in range(3)]
    nodes = [f"127.0.0.1:{port}" for _, port in node_sites]
    limiters = [Limiter(rate=1, per=60.0, burst=10, store=ClusterStore(nodes)) for _ in range(3)]
    app_sites = []
    for lim in limiters:
        app = web.Application(middlewares=[ratelimit_middleware(lim, key="ip")])
        app.router.add_get("/hello", _hello)
        app_sites.append(await start_site(app, "127.0.0.1", 0))
    try:
        codes = []
        async with aiohttp.ClientSession() as s:
            for i in range(30):
                _, port = app_sites[i % 3]
                async with s.get(f"http://127.0.0.1:{port}/hello") as r:
                    codes.append(r.status)
        assert codes.count(200) == 10 and codes[:10] == [200] * 10
        assert set(codes[10:]) == {429}
    finally:
        for lim in limiters:
            await lim.close()
        for runner, _ in app_sites + node_sites:
            await runner.cleanup()
