"""Pub/sub quickstart: a broker, a publisher, wildcard subscribers, a queue group, request/reply.

Run: ``python examples/pubsub/quickstart.py`` (starts its own broker on a free port), or
point it at a running one: ``python examples/pubsub/quickstart.py 127.0.0.1:7201``.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Awaitable, Callable

from dsys.pubsub import Broker, BrokerConfig, Client, Msg


async def demo(servers: list[str]) -> None:
    async with Client(servers, name="publisher") as pub, Client(servers, name="app") as app:
        # 1. Wildcards: every price, and only INFY on any exchange.
        all_prices = await app.subscribe("prices.>")
        infy = await app.subscribe("prices.*.INFY")

        # 2. A queue group: three workers share the "orders.new" stream.
        handled: Counter[str] = Counter()

        def worker(name: str) -> Callable[[Msg], Awaitable[None]]:
            async def handle(msg: Msg) -> None:
                handled[name] += 1

            return handle

        workers = [Client(servers, name=f"worker-{i}") for i in range(3)]
        for i, w in enumerate(workers):
            await w.connect()
            await w.subscribe("orders.new", queue="order-workers", cb=worker(f"worker-{i}"))

        # 3. A responder for request/reply.
        async def quote(msg: Msg) -> None:
            assert msg.reply is not None
            await app.publish(msg.reply, b"1523.50")

        await app.subscribe("quote.INFY", cb=quote)

        for symbol, price in [("INFY", b"1523.5"), ("TCS", b"3410.0")]:
            await pub.publish(f"prices.NSE.{symbol}", price)
        for i in range(30):
            await pub.publish("orders.new", f"order-{i}".encode())
        await pub.flush()

        for _ in range(2):
            msg = await all_prices.next_msg(timeout=5)
            print(f"prices.>      got {msg.subject} = {msg.data.decode()}")
        msg = await infy.next_msg(timeout=5)
        print(f"prices.*.INFY got {msg.subject} = {msg.data.decode()}")

        reply = await pub.request("quote.INFY", b"", timeout=5)
        print(f"request quote.INFY -> {reply.data.decode()}")

        for w in workers:
            await w.drain()  # let each worker finish what it received
        print("queue group split:", dict(sorted(handled.items())))
        assert sum(handled.values()) == 30


async def main() -> None:
    if len(sys.argv) > 1:
        await demo(sys.argv[1:])
        return
    async with Broker(BrokerConfig(port=0)) as broker:
        await demo([f"127.0.0.1:{broker.port}"])


if __name__ == "__main__":
    asyncio.run(main())
