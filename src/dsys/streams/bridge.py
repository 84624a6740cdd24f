"""Capture pub/sub subjects into a stream, so existing publishers need no code change.

A :class:`StreamForwarder` subscribes to subject patterns on the pub/sub broker (in a
queue group, so several forwarders, or the brokers of a cluster, capture each message
once) and publishes every message it receives to the stream cluster, which stores it in
the stream whose subjects capture it. ``dsys pubsub serve --forward 'orders.>=HOST:PORT'``
runs one inside the broker process.

Delivery from publisher to broker is at most once (pub/sub core, as NATS core); from the
forwarder on it is durable: each message gets a message id before its first attempt, so
the forwarder's retries across a stream leader change never store it twice. Messages are
published in the order received, ``max_inflight`` at a time; a message retried after a
failure (a leader change) may land after messages received later.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence

from dsys.errors import DsysError
from dsys.observability import get_logger
from dsys.pubsub.client import Client, Msg, Subscription
from dsys.pubsub.subjects import validate_pattern
from dsys.streams.client import StreamClient


class StreamForwarder:
    """Forward broker messages matching ``patterns`` into streams.

    Args:
        brokers: ``HOST:PORT`` of pub/sub brokers.
        streams: ``HOST:PORT`` of stream servers.
        patterns: subject patterns to capture (a stream must capture them too).
        queue: queue group shared by forwarders of the same patterns.
        token: pub/sub token, when the broker checks them.
        max_inflight: publishes to the stream cluster in flight at once.
    """

    def __init__(
        self,
        brokers: Sequence[str],
        streams: Sequence[str],
        patterns: Sequence[str],
        *,
        queue: str = "dsys-streams-forward",
        token: str | None = None,
        max_inflight: int = 256,
    ) -> None:
        for p in patterns:
            validate_pattern(p)
        self.patterns = list(patterns)
        self.queue = queue
        self.max_inflight = max_inflight
        self._pubsub = Client(list(brokers), token=token, name="stream-forwarder")
        self._streams = StreamClient(list(streams), timeout=30.0)
        self._tasks: list[asyncio.Task[None]] = []
        self._window = asyncio.Semaphore(max_inflight)
        self.log = get_logger("streams.forwarder")
        self.forwarded = 0
        self.failed = 0

    async def start(self) -> StreamForwarder:
        """Connect to the broker and subscribe; returns once the subscriptions are confirmed."""
        await self._pubsub.connect()
        for pattern in self.patterns:
            sub = await self._pubsub.subscribe(pattern, queue=self.queue, max_pending=100_000)
            self._tasks.append(asyncio.create_task(self._pump(sub)))
        self.log.info("forwarding", patterns=self.patterns, queue=self.queue)
        return self

    async def _pump(self, sub: Subscription) -> None:
        async for msg in sub:
            await self._window.acquire()
            t = asyncio.create_task(self._forward(msg, uuid.uuid4().hex))
            t.add_done_callback(lambda _: self._window.release())

    async def _forward(self, msg: Msg, msg_id: str) -> None:
        for attempt in range(10):
            try:
                await self._streams.publish(msg.subject, msg.data, msg_id=msg_id)
            except DsysError as exc:
                if attempt == 9:
                    self.failed += 1
                    self.log.error("forward_failed", subject=msg.subject, error=str(exc))
                    return
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
            else:
                self.forwarded += 1
                return

    async def close(self) -> None:
        """Stop forwarding (messages in flight are finished or dropped)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self._pubsub.close()
        await self._streams.close()

    async def __aenter__(self) -> StreamForwarder:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["StreamForwarder"]
