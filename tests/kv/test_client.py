"""KVClient edge cases: configuration, unreachable clusters, closing, redirects."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dsys.errors import BadInputError, ClosedError, ConfigError, RequestTimeout
from dsys.kv.client import KVClient
from dsys.kv.server import KVServer

from .helpers import cluster_configs, free_ports, wait_leader


def test_needs_endpoints_and_positive_timeouts() -> None:
    with pytest.raises(ConfigError):
        KVClient([])
    with pytest.raises(ConfigError):
        KVClient(["127.0.0.1:1"], timeout=0)


async def test_unreachable_cluster_times_out_with_a_typed_error() -> None:
    (port,) = free_ports(1)
    async with KVClient([f"127.0.0.1:{port}"], timeout=0.5, request_timeout=0.2) as kv:
        with pytest.raises(RequestTimeout):
            await kv.put("k", b"v")


async def test_closed_client_refuses_work() -> None:
    kv = KVClient(["127.0.0.1:1"])
    await kv.close()
    with pytest.raises(ClosedError):
        await kv.get("k")


async def test_follows_the_leader_from_a_follower_and_reports_bad_keys(tmp_path: Path) -> None:
    servers = [KVServer(c) for c in cluster_configs(tmp_path, 3)]
    for s in servers:
        await s.start()
    try:
        leader = await wait_leader(servers)
        follower = next(s for s in servers if s is not leader)
        # only the follower is listed first: the client learns the leader from its answer
        eps = [f"127.0.0.1:{follower.port}", f"127.0.0.1:{leader.port}"]
        async with KVClient(eps) as kv:
            await kv.put("k", b"v")
            assert kv.leader == f"127.0.0.1:{leader.port}"
            stale = await kv.get("k", stale=True)
            assert stale is None or stale.value == b"v"
            with pytest.raises(BadInputError):
                await kv.put("", b"v")
            with pytest.raises(BadInputError):
                await kv.scan("", limit=0)
            info = await kv.status()
            assert info["id"] == follower.config.id
    finally:
        for s in servers:
            await s.close()


async def test_many_large_values_in_flight_are_split_into_frames(tmp_path: Path) -> None:
    servers = [KVServer(c) for c in cluster_configs(tmp_path, 3, fsync=False)]
    for s in servers:
        await s.start()
    try:
        await wait_leader(servers)
        async with KVClient([f"127.0.0.1:{s.port}" for s in servers]) as kv:
            await kv.put("warm", b"up")
            assert kv.leader is not None
            ws = kv._conns[kv.leader]._ws
            big = b"z" * (900 * 1024)
            revs = await asyncio.gather(*(kv.put(f"big{i}", big) for i in range(12)))
            assert len(set(revs)) == 12  # ~10 MiB queued at once, more than one frame holds
            assert kv._conns[kv.leader]._ws is ws  # no frame was refused, no reconnect
            got = await kv.get("big3")
            assert got is not None and got.value == big
            reads = await asyncio.gather(*(kv.get(f"big{i}") for i in range(12)))
            assert all(r is not None and r.value == big for r in reads)
            assert kv._conns[kv.leader]._ws is ws
    finally:
        for s in servers:
            await s.close()


def test_server_config_is_validated() -> None:
    from dsys.kv.server import ServerConfig

    with pytest.raises(ConfigError):
        ServerConfig(id="", data_dir="d")
    with pytest.raises(ConfigError):
        ServerConfig(id="n1", data_dir="d", port=70000)
    with pytest.raises(ConfigError):
        ServerConfig(id="n1", data_dir="d", peers={"n1": "127.0.0.1:1"})
