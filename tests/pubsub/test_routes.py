"""Broker-to-broker routes, with brokers in this process (subprocess clusters: test_cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import msgpack
import pytest

from dsys.errors import ConfigError
from dsys.pubsub import Broker, BrokerConfig, Client, Permissions
from dsys.pubsub.core import ConnKind
from dsys.testing.procs import free_port


async def eventually(cond: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    for _ in range(400):  # at most 20 s
        result = cond()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kinds(b: Broker) -> dict[ConnKind, int]:
    out = dict.fromkeys(ConnKind, 0)
    for conn in b.state.connections():
        out[conn.kind] += 1
    return out


def meshed(*brokers: Broker) -> Callable[[], bool]:
    n = len(brokers) - 1
    return lambda: all(
        kinds(b)[ConnKind.ROUTE_OUT] == n and kinds(b)[ConnKind.ROUTE_IN] == n for b in brokers
    )


def knows(b: Broker, count: int) -> Callable[[], bool]:
    return lambda: (
        sum(len(c.interest) for c in b.state.connections() if c.kind is ConnKind.ROUTE_OUT) == count
    )


async def test_a_broker_joining_later_learns_existing_interest_and_is_dialled_back() -> None:
    async with Broker(BrokerConfig(port=0)) as a, Client([f"127.0.0.1:{a.port}"]) as on_a:
        s_a = await on_a.subscribe("x.>")
        await on_a.subscribe("x.q", queue="g")
        async with Broker(BrokerConfig(port=0, routes=(f"127.0.0.1:{a.port}",))) as b:
            await eventually(meshed(a, b), "A and B to link both ways")
            # A's interest was batched right behind its info frame on B's link.
            await eventually(knows(b, 2), "B to learn A's interest")
            async with Client([f"127.0.0.1:{b.port}"]) as on_b:
                s_b = await on_b.subscribe("y")
                await eventually(knows(a, 1), "A to learn B's interest")
                await on_b.publish("x.1", b"from b")
                await on_a.publish("y", b"from a")
                assert (await s_a.next_msg(5)).data == b"from b"
                assert (await s_b.next_msg(5)).data == b"from a"


async def test_routes_configured_both_ways_deliver_once() -> None:
    pa, pb = free_port(), free_port()
    ca = BrokerConfig(port=pa, routes=(f"127.0.0.1:{pb}",), route_backoff_max=0.2)
    cb = BrokerConfig(port=pb, routes=(f"localhost:{pa}",), route_backoff_max=0.2)
    async with Broker(ca) as a, Broker(cb) as b:
        await eventually(meshed(a, b), "one link each way")
        async with Client([f"127.0.0.1:{pa}"]) as pub, Client([f"127.0.0.1:{pb}"]) as sub_c:
            sub = await sub_c.subscribe("t")
            await eventually(knows(a, 1), "A to learn B's interest")
            for i in range(100):
                await pub.publish("t", str(i).encode())
            await pub.publish("t", b"end")
            got = [(await sub.next_msg(5)).data for _ in range(101)]
            assert got == [str(i).encode() for i in range(100)] + [b"end"]
            await sub_c.flush()
            assert sub.pending() == 0
        out_a = a.metrics.render().decode()
        in_b = b.metrics.render().decode()
        assert f'dsys_pubsub_route_msgs_out_total{{peer="127.0.0.1:{pb}"}} 101.0' in out_a
        assert f'dsys_pubsub_route_msgs_in_total{{peer="127.0.0.1:{pa}"}} 101.0' in in_b
        assert f'dsys_pubsub_route_bytes_in_total{{peer="127.0.0.1:{pa}"}} 193.0' in in_b
        assert sum(1 for _ in a.routes()) >= 1
        assert kinds(a)[ConnKind.ROUTE_OUT] == 1 and kinds(b)[ConnKind.ROUTE_OUT] == 1
        for broker in (a, b):
            live = [link for link in broker._links.values() if not link.stopped]
            # whichever link survived, it keeps redialling forever like a configured one
            assert len(live) == 1 and not live[0].dialback and live[0].connected


async def test_a_route_to_itself_is_dropped() -> None:
    port = free_port()
    async with Broker(BrokerConfig(port=port, routes=(f"127.0.0.1:{port}",))) as b:
        link = b._links[f"127.0.0.1:{port}"]
        await eventually(lambda: link.stopped, "the self-route to stop")
        assert kinds(b)[ConnKind.ROUTE_OUT] == 0


ROUTE_HELLO = {"op": "connect", "route": True, "server_id": "x", "listen": "127.0.0.1:9"}


async def assert_route_refused(
    session: aiohttp.ClientSession, b: Broker, ops: list[dict[str, object]]
) -> None:
    """Announce a route with ``ops``; the broker must answer a cluster-token error and close."""
    ws = await session.ws_connect(f"http://127.0.0.1:{b.port}/v1/ws")
    await ws.send_bytes(msgpack.packb(ops, use_bin_type=True))
    m = await asyncio.wait_for(ws.receive(), 5)
    frame = msgpack.unpackb(m.data)
    assert frame["op"] == "err" and "cluster token" in frame["reason"]
    m = await asyncio.wait_for(ws.receive(), 5)
    assert m.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert kinds(b)[ConnKind.ROUTE_IN] == 0


async def test_route_with_a_wrong_cluster_token_is_refused() -> None:
    async with (
        Broker(BrokerConfig(port=0, cluster_token="s3cret")) as b,
        aiohttp.ClientSession() as session,
    ):
        await assert_route_refused(session, b, [{**ROUTE_HELLO, "token": "guess"}])


@pytest.mark.parametrize("listen", ["10.1.2.3:7201", "example.invalid:7201", "127.0.0.1:0"])
async def test_dial_back_only_to_the_peers_own_address(listen: str) -> None:
    async with Broker(BrokerConfig(port=0)) as b, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"http://127.0.0.1:{b.port}/v1/ws")
        hello = {"op": "connect", "route": True, "server_id": "peer", "listen": listen}
        await ws.send_bytes(msgpack.packb(hello))
        m = await asyncio.wait_for(ws.receive(), 5)
        assert msgpack.unpackb(m.data)["op"] == "info"
        assert kinds(b)[ConnKind.ROUTE_IN] == 1
        assert b._links == {}  # no dial-back to an address the peer does not own
        await ws.close()


async def test_client_tokens_without_a_cluster_token_refuse_routes() -> None:
    """A route may publish anything (rmsg), so with client tokens it needs its own secret:
    otherwise any client could skip its token and permissions by announcing a route."""
    tokens = {"reader": Permissions(publish=(), subscribe=("secret.>",))}
    async with (
        Broker(BrokerConfig(port=0, tokens=tokens)) as b,
        Client([f"127.0.0.1:{b.port}"], token="reader") as reader,
        aiohttp.ClientSession() as session,
    ):
        sub = await reader.subscribe("secret.>")
        forged = {"op": "rmsg", "subject": "secret.plans", "data": b"forged", "queues": []}
        await assert_route_refused(session, b, [ROUTE_HELLO, forged])
        await reader.flush()
        assert sub.pending() == 0


def test_client_tokens_with_routes_need_a_cluster_token() -> None:
    tokens = {"t": Permissions()}
    with pytest.raises(ConfigError, match="cluster_token"):
        BrokerConfig(port=0, tokens=tokens, routes=("127.0.0.1:7202",))
    BrokerConfig(port=0, tokens=tokens, routes=("127.0.0.1:7202",), cluster_token="s")
