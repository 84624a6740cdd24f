"""Shared helpers for the stream tests: in-process clusters on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from dsys.streams.server import StreamServer, StreamServerConfig
from kv.helpers import free_ports, started


def cluster_configs(tmp: Path, n: int = 3, **kw: object) -> list[StreamServerConfig]:
    """Configs of an ``n``-node stream cluster on free loopback ports."""
    ports = free_ports(n)
    ids = [f"n{i + 1}" for i in range(n)]
    addrs = {i: f"127.0.0.1:{p}" for i, p in zip(ids, ports, strict=True)}
    kw.setdefault("tick_interval", 0.01)
    return [
        StreamServerConfig(
            id=i,
            port=p,
            peers={j: a for j, a in addrs.items() if j != i},
            data_dir=str(tmp / i),
            **kw,  # type: ignore[arg-type]
        )
        for i, p in zip(ids, ports, strict=True)
    ]


@contextlib.asynccontextmanager
async def running_cluster(tmp: Path, n: int = 3, **kw: object) -> AsyncIterator[list[StreamServer]]:
    """An ``n``-node in-process stream cluster, closed on the way out."""
    async with started([StreamServer(c) for c in cluster_configs(tmp, n, **kw)]) as servers:
        yield servers


async def wait_leader(servers: Sequence[StreamServer], limit_s: float = 10.0) -> StreamServer:
    """The leader once one is elected and has committed an entry of its term."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        leaders = [s for s in servers if s.node.is_leader and not s.node._closed]
        if len(leaders) == 1 and leaders[0].node.applied_index >= 1:
            return leaders[0]
        await asyncio.sleep(0.02)
    raise AssertionError("no leader elected in time")


def endpoints(servers: Sequence[StreamServer]) -> list[str]:
    """``host:port`` of every server."""
    return [f"127.0.0.1:{s.port}" for s in servers]
