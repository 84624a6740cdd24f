"""Slow soak: a broker process under stalled consumers keeps its memory bounded."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import msgpack
import pytest

from dsys.pubsub import Client
from dsys.testing.procs import start_dsys


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert m, "no VmRSS"
    return int(m.group(1)) / 1024


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
async def test_broker_memory_stays_bounded_with_stalled_consumers() -> None:
    server = await asyncio.to_thread(
        start_dsys,
        *("pubsub", "serve", "--listen", "127.0.0.1:0", "--max-pending-bytes", str(1024 * 1024)),
        log_level="error",
    )
    proc, port = server.proc, server.port
    try:
        addr = [f"127.0.0.1:{port}"]
        async with aiohttp.ClientSession() as session, Client(addr) as pub, Client(addr) as fast:
            stalled = []
            for i in range(20):
                ws = await session.ws_connect(f"http://127.0.0.1:{port}/v1/ws")
                policy = ["drop_oldest", "drop_newest"][i % 2]
                await ws.send_bytes(
                    msgpack.packb({"op": "sub", "sid": 1, "subject": "feed.>", "policy": policy})
                )
                stalled.append(ws)
            sub = await fast.subscribe("feed.>")
            await pub.flush()
            baseline = rss_mib(proc.pid)
            payload = b"x" * 1024
            peak = baseline
            received = 0
            n = 200_000  # 200 MiB published; each stalled consumer would hold all of it
            for i in range(n):
                await pub.publish(f"feed.{i % 10}", payload)
                if i % 1000 == 999:
                    await pub.flush(timeout=30)
                    while sub.pending():
                        await sub.next_msg(1)
                        received += 1
                    peak = max(peak, rss_mib(proc.pid))
            while received < n:
                await sub.next_msg(30)
                received += 1
            print(f"broker RSS baseline {baseline:.0f} MiB, peak {peak:.0f} MiB")
            # 20 consumers x 1 MiB pending bound, plus slack for allocator and buffers.
            assert peak - baseline < 100
            for ws in stalled:
                await ws.close()
    finally:
        await asyncio.to_thread(server.stop)
