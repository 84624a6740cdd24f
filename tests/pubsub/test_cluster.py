"""A 3-broker cluster of real `python -m dsys pubsub serve` processes."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from dsys.pubsub import Client, Msg, Subscription
from dsys.testing.procs import ServerProcess, start_dsys

Proc = ServerProcess


async def start_broker(*routes: str) -> Proc:
    args = ["pubsub", "serve", "--listen", "127.0.0.1:0"]
    for r in routes:
        args += ["--route", r]
    return await asyncio.to_thread(start_dsys, *args, log_level="info", keep_log=True)


async def stop(p: Proc) -> None:
    await asyncio.to_thread(p.stop)


async def health(session: aiohttp.ClientSession, p: Proc) -> dict:
    async with session.get(f"http://{p.addr}/healthz") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def eventually(cond: Callable[[], Awaitable[bool]], what: str, limit: float = 20.0) -> None:
    """Poll ``cond`` every 50 ms, at most ``limit`` seconds (a bound, not an assertion)."""
    for _ in range(int(limit / 0.05)):
        if await cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def route_interest(session: aiohttp.ClientSession, p: Proc) -> dict[str, int]:
    h = await health(session, p)
    return {r["server_id"]: r["interest"] for r in h["routes"] if r["connected"]}


@pytest.fixture
async def cluster() -> AsyncIterator[list[Proc]]:
    procs: list[Proc] = []
    try:
        a = await start_broker()
        procs.append(a)
        b = await start_broker(a.addr)
        procs.append(b)
        c = await start_broker(a.addr, b.addr)
        procs.append(c)
        async with aiohttp.ClientSession() as session:

            async def meshed() -> bool:
                for p in procs:
                    h = await health(session, p)
                    kinds = h["connections"]
                    if kinds["route_out"] != 2 or kinds["route_in"] != 2:
                        return False
                return True

            await eventually(meshed, "a full mesh of routes")
        yield procs
    finally:
        for p in procs:
            await stop(p)


async def drain_exactly(sub: Subscription, n: int) -> list[bytes]:
    return [(await sub.next_msg(10)).data for _ in range(n)]


async def test_three_brokers_deliver_across_the_cluster_exactly_once(cluster: list[Proc]) -> None:
    a, b, c = cluster
    clients = {p.port: Client([p.addr]) for p in cluster}
    for cl in clients.values():
        await cl.connect()
    try:
        subs = {p.port: await clients[p.port].subscribe("t.>") for p in cluster}
        workers = [
            await clients[b.port].subscribe("w.job", queue="workers"),
            await clients[c.port].subscribe("w.job", queue="workers"),
        ]
        async with aiohttp.ClientSession() as session:

            async def a_knows_interest() -> bool:
                # each peer reported 2 interests to A: ("t.>", None) and ("w.job", "workers")
                got = await route_interest(session, a)
                return sorted(got.values()) == [2, 2]

            await eventually(a_knows_interest, "interest to reach broker A")
        pub = clients[a.port]
        n = 300
        for i in range(n):
            await pub.publish(f"t.{i % 3}", str(i).encode())
            await pub.publish("w.job", str(i).encode())
        await pub.publish("t.end", b"end")
        await pub.flush()
        for p in cluster:
            got = await drain_exactly(subs[p.port], n + 1)
            assert got == [str(i).encode() for i in range(n)] + [b"end"], p.addr
        # The "end" marker came after every forwarded message on the same link, so any
        # duplicate would already be queued; a round trip to each broker settles it.
        for cl in clients.values():
            await cl.flush()
        assert all(s.pending() == 0 for s in subs.values())
        # Jobs travelled on the same links ahead of "end", and the flushes above made
        # sure each worker's client has received everything its broker queued.
        jobs = [(await w.next_msg(1)).data for w in workers for _ in range(w.pending())]
        assert sorted(jobs, key=int) == [str(i).encode() for i in range(n)]
        assert workers[0].delivered > 0 and workers[1].delivered > 0

        # Request/reply across brokers: requester on A, responder on C.
        responder = clients[c.port]

        async def quote(msg: Msg) -> None:
            assert msg.reply is not None
            await responder.publish(msg.reply, b"quote:" + msg.data)

        await responder.subscribe("svc.quote", queue="quoters", cb=quote)
        async with aiohttp.ClientSession() as session:

            async def a_knows_the_service() -> bool:
                return sorted((await route_interest(session, a)).values()) == [2, 3]

            await eventually(a_knows_the_service, "the service's interest to reach A")
        answers = await asyncio.gather(
            *(pub.request("svc.quote", str(i).encode(), timeout=10) for i in range(20))
        )
        assert [m.data for m in answers] == [f"quote:{i}".encode() for i in range(20)]
    finally:
        for cl in clients.values():
            await cl.close()


async def test_killed_broker_clients_reconnect_and_resume(cluster: list[Proc]) -> None:
    a, b, c = cluster
    # The subscriber prefers B and the publisher prefers B; both know C and A too.
    sub_client = Client([b.addr, c.addr], max_reconnect_wait=0.2)
    pub_client = Client([b.addr, a.addr], max_reconnect_wait=0.2)
    bystander = Client([c.addr])
    for cl in (sub_client, pub_client, bystander):
        await cl.connect()
    try:
        s = await sub_client.subscribe("live")
        watch = await bystander.subscribe("live")
        async with aiohttp.ClientSession() as session:

            async def b_knows_c_listens() -> bool:
                return sum((await route_interest(session, b)).values()) == 1

            await eventually(b_knows_c_listens, "C's interest to reach B")
        await pub_client.publish("live", b"before")
        await pub_client.flush()
        assert (await s.next_msg(10)).data == b"before"
        assert (await watch.next_msg(10)).data == b"before"  # forwarded B -> C

        b.proc.kill()
        await asyncio.to_thread(b.proc.wait)

        async def reconnected() -> bool:
            return bool(sub_client.reconnects and pub_client.reconnects)

        await eventually(reconnected, "clients to reconnect")
        assert sub_client.connected_url is not None and str(c.port) in sub_client.connected_url
        # Publish until the re-subscription's interest reaches the publisher's broker.
        seen: set[bytes] = set()

        async def resumed() -> bool:
            await pub_client.publish("live", b"after")
            while s.pending():
                seen.add((await s.next_msg(1)).data)
            return b"after" in seen

        await eventually(resumed, "delivery to resume after the broker died")
        assert (await watch.next_msg(10)).data in (b"after",)  # C's own subscriber unaffected
    finally:
        for cl in (sub_client, pub_client, bystander):
            await cl.close()


async def test_drain_delivers_messages_still_in_flight() -> None:
    """drain() keeps subscriptions until its flush returns, so nothing sent is dropped.

    With a broker in another process, messages are often still in flight when drain()
    starts; a drain that forgot its subscriptions first dropped them as unknown.
    """
    p = await start_broker()
    try:
        for _ in range(5):
            got: list[bytes] = []
            async with Client([p.addr]) as pub:
                workers = [Client([p.addr]) for _ in range(3)]

                async def handle(msg: Msg, got: list[bytes] = got) -> None:
                    got.append(msg.data)

                for worker in workers:
                    await worker.connect()
                    await worker.subscribe("orders", queue="q", cb=handle)
                for i in range(30):
                    await pub.publish("orders", b"%d" % i)
                await pub.flush()  # the broker has every message; the workers may not yet
                for worker in workers:
                    await worker.drain(timeout=5)
                assert len(got) == 30
    finally:
        await stop(p)


async def test_cli_pub_and_sub_against_a_broker() -> None:
    p = await start_broker()
    try:
        sub = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dsys", "pubsub", "sub", "greet.*", "--count", "1",
            "--server", p.addr, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with aiohttp.ClientSession() as session:

            async def subscribed() -> bool:
                return bool((await health(session, p))["subscriptions"] == 1)

            await eventually(subscribed, "the CLI subscriber")
        pub = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dsys", "pubsub", "pub", "greet.world", "hello",
            "--server", p.addr,
        )  # fmt: skip
        assert await asyncio.wait_for(pub.wait(), 20) == 0
        out, _ = await asyncio.wait_for(sub.communicate(), 20)
        assert out.decode().strip() == "greet.world hello"
    finally:
        await stop(p)
