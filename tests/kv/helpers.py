"""Shared helpers for the kv tests: free ports, in-process clusters, server processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from dsys.errors import ConflictError, DsysError
from dsys.kv.multi import MultiConfig, MultiRaftServer
from dsys.kv.server import KVServer, ServerConfig
from dsys.kv.sharded import ShardedKVClient
from dsys.testing.linearizability import History


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_configs(
    tmp: Path, n: int = 3, *, ports: Sequence[int] | None = None, **kw: object
) -> list[ServerConfig]:
    """Configs of an ``n``-node cluster on free loopback ports."""
    ports = list(ports or free_ports(n))
    ids = [f"n{i + 1}" for i in range(n)]
    addrs = {i: f"127.0.0.1:{p}" for i, p in zip(ids, ports, strict=True)}
    return [
        ServerConfig(
            id=i,
            port=p,
            peers={j: a for j, a in addrs.items() if j != i},
            data_dir=str(tmp / i),
            **kw,  # type: ignore[arg-type]
        )
        for i, p in zip(ids, ports, strict=True)
    ]


@contextlib.asynccontextmanager
async def running_cluster(tmp: Path, n: int = 3, **kw: object) -> AsyncIterator[list[KVServer]]:
    """An ``n``-node in-process cluster on free loopback ports, closed on the way out."""
    servers = [KVServer(c) for c in cluster_configs(tmp, n, **kw)]
    try:
        for s in servers:
            await s.start()
        yield servers
    finally:
        for s in servers:
            await s.close()


async def wait_leader(servers: Sequence[KVServer], limit_s: float = 10.0) -> KVServer:
    """The leader of an in-process cluster once one is elected and has committed."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        leaders = [s for s in servers if s.node.is_leader]
        if len(leaders) == 1 and leaders[0].node.applied_index >= 1:
            return leaders[0]
        await asyncio.sleep(0.02)
    raise AssertionError("no leader elected in time")


class Proc:
    """One ``dsys <block> serve`` subprocess (``kv`` by default; ``streams`` too)."""

    def __init__(self, cfg: Any, *, extra: Sequence[str] = (), block: str = "kv") -> None:
        self.cfg = cfg
        self.block = block
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.addr = f"127.0.0.1:{cfg.port}"

    def start(self) -> None:
        args = [
            sys.executable,
            "-m",
            "dsys",
            self.block,
            "serve",
            "--id",
            self.cfg.id,
            "--listen",
            self.addr,
            "--data-dir",
            self.cfg.data_dir,
            *[f"--peer={k}={v}" for k, v in self.cfg.peers.items()],
            *self.extra,
        ]
        Path(self.cfg.data_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(self.cfg.data_dir).parent / f"{self.cfg.id}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill9()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


async def status(addr: str) -> dict[str, object] | None:
    """``GET /v1/status`` of ``addr`` or None when it does not answer."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as s,
            s.get(f"http://{addr}/v1/status") as r,
        ):
            data: dict[str, object] = await r.json()
            return data
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def wait_proc_leader(procs: Sequence[Proc], limit_s: float = 20.0) -> Proc:
    """The process that reports itself leader (agreed by the others that answer)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive:
                continue
            st = await status(p.addr)
            if st and st.get("role") == "leader":
                return p
        await asyncio.sleep(0.05)
    raise AssertionError("no leader among the processes in time")


async def sharded_register_client(
    addrs: list[str],
    cid: int,
    keys: list[str],
    history: History,
    values: Iterator[int],
    stop: asyncio.Event,
) -> None:
    """One Jepsen-style client of a multi-Raft cluster: random puts, gets and CAS on
    ``keys`` through a ``ShardedKVClient``, each recorded in ``history``, until ``stop``."""
    rng = random.Random(cid)
    async with ShardedKVClient(addrs, timeout=3.0, request_timeout=1.0) as kv:
        while not stop.is_set():
            key = rng.choice(keys)
            if rng.random() < 0.5:
                v = next(values)
                op = history.invoke(cid, ("put", key, v))
                try:
                    await kv.put(key, str(v).encode())
                except DsysError:
                    history.info(op)
                else:
                    history.ok(op, None)
                continue
            op = history.invoke(cid, ("get", key))
            try:
                got = await kv.get(key)
            except DsysError:
                history.fail(op)
                continue
            seen = None if got is None else int(got.value)
            history.ok(op, seen)
            if rng.random() < 0.3:
                v = next(values)
                op = history.invoke(cid, ("cas", key, seen, v))
                try:
                    await kv.cas(key, str(v).encode(), revision=got.revision if got else 0)
                except ConflictError:
                    history.ok(op, False)
                except DsysError:
                    history.info(op)
                else:
                    history.ok(op, True)


async def warm_up(kv: ShardedKVClient, tries: int = 200) -> None:
    """Wait (bounded) until a freshly started multi-Raft cluster takes a write through
    ``kv``: a map is served and range 1 has a leader."""
    for _ in range(tries):
        try:
            await kv.refresh()
            await kv.put("warm", b"1")
            return
        except DsysError:
            await asyncio.sleep(0.1)
    raise AssertionError("the cluster took no write in time")


async def dsys_kv(*args: str) -> tuple[int, str, str]:
    """Run ``python -m dsys kv ARGS`` as a real process: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dsys",
        "kv",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, out.decode(), err.decode()


def multi_configs(tmp: Path, ports: Sequence[int], **kw: Any) -> list[MultiConfig]:
    """Multi-Raft nodes n1..nN on loopback ``ports``, each with the others as peers and
    its data under ``tmp/<id>``; ``kw`` sets the remaining :class:`MultiConfig` fields."""
    ids = [f"n{i + 1}" for i in range(len(ports))]
    addrs = {i: f"127.0.0.1:{p}" for i, p in zip(ids, ports, strict=True)}
    return [
        MultiConfig(
            id=i,
            port=p,
            peers={j: a for j, a in addrs.items() if j != i},
            data_dir=str(tmp / i),
            **kw,
        )
        for i, p in zip(ids, ports, strict=True)
    ]


@contextlib.asynccontextmanager
async def multi_cluster(configs: Sequence[MultiConfig]) -> AsyncIterator[list[MultiRaftServer]]:
    """Start a :class:`MultiRaftServer` per config in this process; close them all after."""
    servers = [MultiRaftServer(c) for c in configs]
    try:
        for s in servers:
            await s.start()
        yield servers
    finally:
        for s in servers:
            await s.close()
