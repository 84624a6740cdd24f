"""Pub/sub subjects captured into a stream: the forwarder and ``dsys pubsub serve --forward``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dsys.pubsub.broker import Broker, BrokerConfig
from dsys.pubsub.client import Client
from dsys.streams import StreamConfig
from dsys.streams.bridge import StreamForwarder
from dsys.streams.client import StreamClient
from dsys.testing.procs import start_dsys

from .helpers import endpoints, running_cluster, wait_leader


async def _wait_count(c: StreamClient, stream: str, n: int) -> list[bytes]:
    for _ in range(200):
        info = await c.stream_info(stream)
        if info is not None and info["messages"] >= n:
            break
        await asyncio.sleep(0.05)
    return [m.data for m in await c.read(stream, limit=10_000)]


async def test_forwarder_captures_broker_messages_in_order(tmp_path: Path) -> None:
    async with (
        running_cluster(tmp_path, n=1) as servers,
        Broker(BrokerConfig(port=0)) as broker,
        StreamClient(endpoints(servers)) as c,
    ):
        await wait_leader(servers)
        await c.add_stream(StreamConfig(name="ORDERS", subjects=("orders.>",)))
        async with StreamForwarder([f"127.0.0.1:{broker.port}"], endpoints(servers), ["orders.>"]):
            async with Client([f"127.0.0.1:{broker.port}"]) as pub:
                for i in range(300):
                    await pub.publish(f"orders.{i % 3}", b"%d" % i)
                await pub.publish("other.subject", b"not captured")
                await pub.flush()
            got = await _wait_count(c, "ORDERS", 300)
        assert got == [b"%d" % i for i in range(300)]


async def test_pubsub_serve_forward_flag(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1) as servers, StreamClient(endpoints(servers)) as c:
        await wait_leader(servers)
        await c.add_stream(StreamConfig(name="TICKS", subjects=("ticks.>",)))
        spec = f"ticks.>={endpoints(servers)[0]}"
        with start_dsys("pubsub", "serve", "--listen", "127.0.0.1:0", "--forward", spec) as b:
            async with Client([b.addr]) as pub:
                # the forwarder subscribes right after the broker listens: wait for it
                for _ in range(100):
                    await pub.publish("ticks.NSE.INFY", b"probe")
                    await pub.flush()
                    info = await c.stream_info("TICKS")
                    if info and info["messages"]:
                        break
                    await asyncio.sleep(0.05)
                first = (await c.stream_info("TICKS") or {})["messages"]
                for i in range(50):
                    await pub.publish("ticks.NSE.TCS", b"%d" % i)
                await pub.flush()
            got = await _wait_count(c, "TICKS", first + 50)
        # (probes still in flight when the first one landed may come later)
        assert [g for g in got if g != b"probe"] == [b"%d" % i for i in range(50)]
