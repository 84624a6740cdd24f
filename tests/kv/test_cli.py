"""The ``dsys kv`` command line against a real in-process cluster."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from dsys.kv.server import KVServer

from .helpers import dsys_kv, running_cluster, wait_leader


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[KVServer]]:
    async with running_cluster(tmp_path) as servers:
        yield servers


async def test_cli_put_get_del_status(cluster: list[KVServer]) -> None:
    await wait_leader(cluster)
    eps = ",".join(f"127.0.0.1:{s.port}" for s in cluster)
    rc, out, err = await dsys_kv("put", "color", "blue", "--cluster", eps)
    assert rc == 0, err
    rev = json.loads(out)["revision"]
    rc, out, err = await dsys_kv("get", "color", "--cluster", eps)
    assert rc == 0 and out.strip() == "blue" and f"revision {rev}" in err
    rc, out, err = await dsys_kv("put", "color", "red", "--if-revision", "0", "--cluster", eps)
    assert rc == 1 and "revision" in err
    rc, out, err = await dsys_kv("status", "--cluster", eps)
    roles = sorted(v["role"] for v in json.loads(out).values())
    assert rc == 0 and roles == ["follower", "follower", "leader"]
    rc, out, err = await dsys_kv("member", "list", "--cluster", eps)
    assert rc == 0 and sorted(json.loads(out)["voters"]) == ["n1", "n2", "n3"]
    rc, out, err = await dsys_kv("member", "promote", "n9", "--cluster", eps)
    assert rc == 1 and "not a learner" in err
    rc, out, err = await dsys_kv("del", "color", "--cluster", eps)
    assert rc == 0
    rc, out, err = await dsys_kv("get", "color", "--cluster", eps)
    assert rc == 1 and "not found" in err


async def test_cli_rejects_bad_peer_flag(tmp_path: Path) -> None:
    rc, _, err = await dsys_kv(
        "serve", "--id", "n1", "--data-dir", str(tmp_path), "--peer", "n2:127.0.0.1"
    )
    assert rc == 1 and "ID=HOST:PORT" in err


async def test_ttl_key_expires_and_metrics_are_exposed(cluster: list[KVServer]) -> None:
    leader = await wait_leader(cluster)
    base = f"http://127.0.0.1:{leader.port}"
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{base}/v1/kv/session?ttl=1", data=b"x") as r:
            assert r.status == 200
        async with http.get(f"{base}/v1/kv/session") as r:
            assert r.status == 200
        for _ in range(100):  # the leader's periodic Tick expires it (bounded wait)
            async with http.get(f"{base}/v1/kv/session") as r:
                if r.status == 404:
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("TTL key never expired")
        # expiry is replicated: every node agrees
        for s in cluster:
            await s.node.wait_applied(leader.node.applied_index, 5.0)
            assert s.fsm.get("session") is None
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
        for name in (
            "dsys_raft_term",
            "dsys_raft_elections_total",
            "dsys_raft_commit_latency_seconds_bucket",
            "dsys_raft_log_size_bytes",
            "dsys_raft_fsync_seconds_bucket",
            "dsys_kv_requests_total",
        ):
            assert name in text, name
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200 and (await r.json())["role"] == "leader"
