"""The tutorial's set-up against a real flaky HTTP server on 127.0.0.1 (real sockets)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from dsys.clock import ManualClock
from dsys.errors import CircuitOpenError, RequestTimeout
from dsys.observability import start_site
from dsys.resilience import (
    Backoff,
    BreakerState,
    CircuitBreaker,
    Policy,
    Retry,
    RetryBudget,
)


@dataclass
class Flaky:
    """Knobs of the test server: answer 503, or hang, and count the hits."""

    outage: bool = False
    hang: bool = False
    hits: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Flaky]]:
    flaky = Flaky()

    async def inventory(request: web.Request) -> web.Response:
        flaky.hits += 1
        if flaky.hang:
            await flaky.release.wait()  # until the test ends
        if flaky.outage:
            return web.json_response({"error": "down"}, status=503)
        return web.json_response({"item": request.match_info["item"], "stock": 3})

    app = web.Application()
    app.router.add_get("/stock/{item}", inventory)
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}", flaky
    finally:
        flaky.release.set()
        await runner.cleanup()


class UpstreamError(Exception):
    """The inventory service answered 5xx."""


async def test_breaker_protects_a_flaky_http_dependency(server: tuple[str, Flaky]) -> None:
    base, flaky = server
    clock = ManualClock()
    breaker = CircuitBreaker(
        "inventory",
        failure_rate_threshold=50,
        window=20,
        minimum_calls=10,
        open_wait=5.0,
        permitted_calls_in_half_open=2,
        clock=clock,
        metrics=CollectorRegistry(),
    )

    async def no_sleep(_: float) -> None:
        await asyncio.sleep(0)

    retry = Retry(
        max_attempts=3,
        backoff=Backoff(initial=0.0, maximum=0.0),
        budget=RetryBudget(ratio=0.2, min_retries_per_second=1),
        sleep=no_sleep,
        rng=random.Random(1),
        clock=clock,
    )
    policy = Policy.retry(retry).breaker(breaker).timeout(0.5)

    async with aiohttp.ClientSession() as session:

        async def get_stock(item: str) -> int:
            async with session.get(f"{base}/stock/{item}") as resp:
                if resp.status >= 500:
                    raise UpstreamError(f"inventory answered {resp.status}")
                body = await resp.json()
                return int(body["stock"])

        assert await policy.call_async(get_stock, "apple") == 3
        flaky.outage = True
        errors: list[BaseException] = []
        for _ in range(20):
            try:
                await policy.call_async(get_stock, "apple")
            except (UpstreamError, CircuitOpenError) as exc:
                errors.append(exc)
        assert breaker.state is BreakerState.OPEN
        hits_when_open = flaky.hits
        assert hits_when_open < 15  # opened after ~10 calls, retries held back by the budget
        assert isinstance(errors[-1], CircuitOpenError)
        assert errors[-1].retry_after == pytest.approx(5.0)
        # open: nothing reaches the server
        for _ in range(10):
            with pytest.raises(CircuitOpenError):
                await policy.call_async(get_stock, "apple")
        assert flaky.hits == hits_when_open
        # the dependency recovers; after the open wait two trial calls close the breaker
        flaky.outage = False
        clock.advance(5.0)
        assert await policy.call_async(get_stock, "pear") == 3
        assert await policy.call_async(get_stock, "pear") == 3
        assert breaker.state is BreakerState.CLOSED
        # a hanging server: the per-attempt timeout turns hangs into counted failures
        flaky.hang = True
        for _ in range(4):
            with pytest.raises((RequestTimeout, CircuitOpenError)):
                await Policy.breaker(breaker).timeout(0.05).call_async(get_stock, "fig")
        assert breaker.counts().failures >= 4
