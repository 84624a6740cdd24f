"""A small fault-injecting TCP proxy for the kv tests: partition, delay, drop."""

from __future__ import annotations

import asyncio
import contextlib
import random


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; can cut, delay or drop the traffic.

    * ``partition()``: close every connection and refuse new ones until ``heal()``.
    * ``delay``: seconds added before forwarding each chunk.
    * ``drop``: probability that a new connection is closed at once.
    """

    def __init__(self, target_port: int, *, seed: int = 0) -> None:
        self.target_port = target_port
        self.port = 0
        self.blocked = False
        self.delay = 0.0
        self.drop = 0.0
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def partition(self) -> None:
        self.blocked = True
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def heal(self) -> None:
        self.blocked = False
        self.delay = 0.0
        self.drop = 0.0

    async def close(self) -> None:
        self.partition()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked or self._rng.random() < self.drop:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except asyncio.CancelledError:
            pass  # the test is over: end quietly (asyncio logs a cancelled handler loudly)
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while not self.blocked:
                data = await reader.read(65536)
                if not data:
                    break
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.blocked:
                    break
                writer.write(data)
                await writer.drain()
        writer.close()
