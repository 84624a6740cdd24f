"""One running shop shared by the tests that need real processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from examples.shop.run import Shop


@pytest.fixture(scope="package")
def shop() -> Iterator[Shop]:
    """The shop on loopback: 1 KV node, 1 stream node, 2 instances of each stateless service
    (gateways, catalog, orders, history behind ``dsys lb``s), a
    provider failing 30 % of its calls, 0.2 s delivery stages."""
    with Shop(
        kv_nodes=1,
        stream_nodes=1,
        gateways=2,
        delivery_step=0.2,
        provider_error_rate=0.3,
        provider_latency=(0.0, 0.05),
        rate=1000,
        quiet=True,
    ) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
