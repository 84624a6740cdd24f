"""``ShardedKVClient.watch``: a prefix watch over the multi-Raft KV (client side).

The watch keeps a :class:`~dsys.kv.multiwatch.Frontier` (the next revision wanted per
span of the prefix) and, for each span, one *range watch* on a replica of the range
holding it (:mod:`dsys.kv.rangewatch`), planned from the client's range map. It fans
their events in: per key in revision order, exactly once; no order across ranges. It
follows what the range watches say:

* ``moved`` (a split or merge handed a sub-span on): watch it on the named range from
  the revision after the one given;
* ``before`` (a split's child asked for revisions its parent holds): watch the sub-span
  on the parent first, which moves it back once it delivered everything up to the split;
* ``not_here`` (a stale map): reload the map and plan the sub-span again;
* a lost connection, a replica that went away (a move, a node closing): resume the span
  on the next replica of its range from its position (its events below it are dropped
  if a replica sends them again);
* ``compacted`` on every replica of the range: fail with
  :class:`~dsys.errors.CompactedError` (``exc.revision``, ``exc.span``).

Every event carries the ``cursor`` after it (an opaque string): ``watch(prefix,
cursor=c)`` resumes after that event, even in another process, without gaps or
duplicates (a cursor taken in the middle of the events of one revision, several keys
expiring at once in one range, resumes at that revision).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from dsys.errors import (
    BadInputError,
    CompactedError,
    ConfigError,
    ConnectError,
    DsysError,
    RequestTimeout,
    UnavailableError,
)
from dsys.kv.client import _Conn
from dsys.kv.multiwatch import Frontier, intersect, plan, subtract

if TYPE_CHECKING:
    from dsys.kv.sharded import ShardedKVClient

MAX_FAILURES = 60
"""Subscriptions in a row that no replica accepted before the watch gives up."""

MAX_HOPS = 1000
"""``moved``/``before``/``not_here`` answers in a row without an event before the watch
gives up (each after a backoff of up to 0.5 s)."""


@dataclass(frozen=True, slots=True)
class ShardedWatchEvent:
    """One change, as :meth:`ShardedKVClient.watch` yields it.

    Attributes:
        revision: the revision of the change in its range.
        type: ``"put"``, ``"delete"`` or ``"expire"``.
        key: the changed key.
        value: the new value of a put (None otherwise).
        range_id: the range that served it.
        frontier: the watch's position after this event (see ``cursor``).
    """

    revision: int
    type: str
    key: str
    value: bytes | None
    range_id: int
    frontier: Frontier = field(repr=False, compare=False)

    @property
    def cursor(self) -> str:
        """Resume token: ``watch(prefix, cursor=...)`` continues after this event."""
        return self.frontier.encode()


@dataclass(slots=True)
class _Piece:
    """One range watch the client runs: range, spans left, next revision wanted."""

    range_id: int
    spans: list[tuple[str, str | None]]
    next_revision: int
    addrs: list[str]
    forced: bool  # the range was named by a server (moved/before), not by the map
    events: int = 0


class ShardedWatcher:
    """An open prefix watch of :meth:`ShardedKVClient.watch`: an async iterator.

    Iterate it with ``async for`` (it yields :class:`ShardedWatchEvent`), close it with
    :meth:`close` or ``async with``. Iteration raises
    :class:`~dsys.errors.CompactedError` (a span's events from its position are gone
    everywhere), :class:`~dsys.errors.BadInputError` (refused) or
    :class:`~dsys.errors.UnavailableError` (no replica accepted a range watch in
    :data:`MAX_FAILURES` tries with backoff).
    """

    def __init__(
        self, client: ShardedKVClient, frontier: Frontier, max_buffered: int = 1000
    ) -> None:
        if max_buffered < 1:
            raise ConfigError("max_buffered must be >= 1")
        self.prefix = frontier.prefix
        self.frontier = frontier
        """The position: every span's next revision wanted."""
        self.resumes = 0
        """Range watches opened again after a lost connection or replica."""
        self.moves = 0
        """``moved``/``before`` answers followed."""
        self.replans = 0
        """Spans planned again from a reloaded map."""
        self._client = client
        self._max = max_buffered
        self._queue: deque[ShardedWatchEvent] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._started = asyncio.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: dict[str, _Conn] = {}
        self._by_id: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None
        self._rr: dict[int, int] = {}
        self._failures = 0
        self._hops = 0  # moved/before/not_here answers since the last event

    @property
    def cursor(self) -> str:
        """Resume token of everything delivered so far."""
        return self.frontier.encode()

    async def start(self) -> ShardedWatcher:
        """Plan the range watches from the map and wait until the first one is accepted."""
        if not self._tasks and not self._closed:
            self._spawn(self._begin())
        await self._started.wait()
        if self._error is not None and not self._queue:
            raise self._error
        return self

    async def close(self) -> None:
        """Stop every range watch; iteration ends."""
        self._closed = True
        self._queue.clear()
        self._ready.set()
        self._started.set()
        self._room.set()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ShardedWatcher:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> ShardedWatcher:
        return self

    async def __anext__(self) -> ShardedWatchEvent:
        if not self._tasks and not self._closed and self._error is None:
            self._spawn(self._begin())
        queue = self._queue
        while not queue:
            if self._closed:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            self._ready.clear()
            await self._ready.wait()
        ev = queue.popleft()
        if len(queue) <= self._max // 2:
            self._room.set()
        return ev

    # -- machinery ----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._ready.set()
        self._started.set()
        for t in list(self._tasks):
            if t is not asyncio.current_task():
                t.cancel()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _conn(self, ep: str) -> _Conn:
        conn = self._conns.get(ep)
        if conn is None:
            loop = asyncio.get_running_loop()
            conn = self._conns[ep] = _Conn(ep, loop, self._client.request_timeout, self._by_id)
        return conn

    async def _begin(self) -> None:
        client = self._client
        try:
            if client.map is None:
                await client.refresh()
            for sp in self.frontier.spans:
                await self._plan(sp.start, sp.end, sp.next_revision, refresh=False)
        except DsysError as exc:
            self._fail(exc)

    async def _plan(self, start: str, end: str | None, rev: int, *, refresh: bool) -> None:
        """Open range watches for ``[start, end)`` from ``rev`` by the map."""
        client = self._client
        if refresh or client.map is None:
            self.replans += 1
            await client.refresh()
        assert client.map is not None
        for pw in plan([(start, end, rev)], client.map):
            piece = _Piece(pw.range_id, [(pw.start, pw.end)], rev, [], forced=False)
            self._spawn(self._run_piece(piece))

    def _replicas(self, piece: _Piece) -> list[str]:
        if piece.addrs:
            return piece.addrs
        client = self._client
        desc = client.map.get(piece.range_id) if client.map is not None else None
        if desc is None:
            return []
        return [client.nodes[r] for r in desc.replicas if r in client.nodes]

    async def _run_piece(self, piece: _Piece) -> None:
        """Run one range watch until its spans are all handed on (or the watch fails)."""
        compacted: set[str] = set()
        try:
            while piece.spans and not self._closed:
                pool = self._replicas(piece)
                if not pool:
                    await self._unknown_range(piece)
                    return
                if len(piece.spans) > 1:  # resume each span as a range watch of its own
                    for sp in piece.spans:
                        self._spawn(
                            self._run_piece(
                                _Piece(
                                    piece.range_id, [sp], piece.next_revision, pool, piece.forced
                                )
                            )
                        )
                    return
                if self._hops > MAX_HOPS:
                    self._fail(
                        UnavailableError(
                            f"the watch found no range serving a span "
                            f"({self._hops} hand-offs without an event)"
                        )
                    )
                    return
                if self._hops > 8:  # hand-offs without events: a map or node catching up
                    await asyncio.sleep(min(0.5, 0.005 * self._hops) * (0.5 + random.random()))
                n = self._rr.get(piece.range_id, 0)
                ep = pool[n % len(pool)]
                try:
                    outcome = await self._subscribe(piece, ep)
                except (ConnectError, RequestTimeout) as exc:
                    outcome = f"lost: {exc}"
                if outcome == "end":
                    return
                if outcome == "paused":
                    self._room.clear()
                    if len(self._queue) > self._max // 2:
                        await self._room.wait()
                    continue
                self._rr[piece.range_id] = n + 1
                if isinstance(outcome, CompactedError):
                    compacted.add(ep)
                    if len(compacted) >= len(pool):
                        self._fail(outcome)
                        return
                    continue
                if isinstance(outcome, BaseException):
                    self._fail(outcome)
                    return
                # lost, or the replica is gone: the next replica (each tried once), then
                # the map again (the range may have moved, merged or split away)
                self.resumes += 1
                self._failures += 1
                if self._failures > MAX_FAILURES:
                    self._fail(
                        UnavailableError(
                            f"no replica of range {piece.range_id} serves the watch: {outcome}"
                        )
                    )
                    return
                delay = min(0.5, 0.01 * (2 ** min(self._failures, 6))) * (0.5 + random.random())
                await asyncio.sleep(delay)
                if (n + 1) % len(pool) == 0:
                    for s, e in piece.spans:
                        await self._plan(s, e, piece.next_revision, refresh=True)
                    return
        except DsysError as exc:
            self._fail(exc)

    async def _unknown_range(self, piece: _Piece) -> None:
        """A range named by a server that the map does not know: reload the map; a
        range gone from it (merged away) with events still wanted is compacted."""
        client = self._client
        await client.refresh()
        assert client.map is not None
        if client.map.get(piece.range_id) is not None:
            self._spawn(self._run_piece(piece))
            return
        for s, e in piece.spans:
            await self._plan(s, e, piece.next_revision, refresh=False)

    async def _subscribe(self, piece: _Piece, ep: str) -> str | BaseException:
        """One range watch on ``ep``; returns why it ended (or the error to raise)."""
        client = self._client
        conn = self._conn(ep)
        if not conn.up:
            await conn.connect(self._http(), client.request_timeout)
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[str | BaseException] = loop.create_future()
        start, end = piece.spans[0]
        req: dict[str, Any] = {
            "op": "watch",
            "range": piece.range_id,
            "start": start,
            "end": end,
            "start_revision": piece.next_revision,
        }
        sink = self._sink(piece, ended)
        fut = conn.submit(req, len(start) + len(end or ""), client.request_timeout)
        wid: int = req["id"]
        conn.sinks[wid] = sink
        try:
            resp = await fut
            status = resp.get("status")
            if status == "bad_request":
                return BadInputError(str(resp.get("message")))
            if status != "ok":
                return f"lost: {resp.get('message')}"
            first = resp.get("start_revision")
            if type(first) is int and first > piece.next_revision:
                piece.next_revision = first
                for s, e in piece.spans:
                    self.frontier = self.frontier.advance(s, e, first)
            self._failures = 0
            self._started.set()
            return await ended
        finally:
            conn.sinks.pop(wid, None)
            if not ended.done() or ended.result() != "end":
                self._unwatch(conn, wid)

    def _sink(
        self, piece: _Piece, ended: asyncio.Future[str | BaseException]
    ) -> Callable[[dict[str, Any] | None], None]:
        def sink(resp: dict[str, Any] | None) -> None:
            if ended.done():
                return
            if resp is None:
                ended.set_result("lost: connection lost")
                return
            try:
                outcome = self._on_answer(piece, resp)
            except (KeyError, TypeError, ValueError) as exc:
                outcome = f"lost: malformed answer: {exc}"
            if outcome is not None:
                ended.set_result(outcome)

        return sink

    def _on_answer(self, piece: _Piece, resp: dict[str, Any]) -> str | BaseException | None:
        """Take one pushed answer; the outcome when it ends this range watch."""
        status = resp.get("status")
        if status == "events":
            self._take(piece, resp["events"], int(resp["next"]))
            if len(self._queue) >= self._max:
                return "paused"
            return None
        if status == "progress":
            self._advance(piece, int(resp["next"]))
            return None
        if status in ("moved", "before", "not_here"):
            start, end = str(resp["start"]), resp["end"]
            if end is not None:
                end = str(end)
            if not any(intersect(s, e, start, end) for s, e in piece.spans):
                return None  # not ours (an answer to an older subscription)
            if status == "moved" and resp.get("events"):  # the sub-span's last events
                self._take(piece, resp["events"], 0, [(start, end)])
            piece.spans = subtract(piece.spans, start, end)
            self._hops += 1
            addrs = [str(a) for a in resp.get("replicas") or []]
            if status == "moved":
                rev = int(resp["revision"]) + 1
                self.frontier = self.frontier.advance(start, end, rev)
                self.moves += 1
                nxt = _Piece(
                    int(resp["range"]), [(start, end)], max(rev, piece.next_revision), addrs, True
                )
                self._spawn(self._run_piece(nxt))
            elif status == "before":
                self.moves += 1
                nxt = _Piece(int(resp["range"]), [(start, end)], piece.next_revision, addrs, True)
                self._spawn(self._run_piece(nxt))
            else:
                self._spawn(self._replan(start, end, piece.next_revision))
            return "end" if not piece.spans else None
        if status == "end":
            return "end"
        if status == "compacted":
            crev = resp.get("revision")
            exc = CompactedError(
                str(resp.get("message") or ""), revision=crev if type(crev) is int else 0
            )
            exc.span = (resp.get("start"), resp.get("end"))  # type: ignore[attr-defined]
            return exc
        if status == "bad_request":
            return BadInputError(str(resp.get("message")))
        return f"lost: {resp.get('message')}"

    async def _replan(self, start: str, end: str | None, rev: int) -> None:
        try:
            await asyncio.sleep(0.01 * random.random())
            await self._plan(start, end, rev, refresh=True)
        except DsysError as exc:
            self._fail(exc)

    def _advance(
        self, piece: _Piece, nxt: int, spans: list[tuple[str, str | None]] | None = None
    ) -> None:
        if spans is not None:  # a sub-span leaving the piece
            for s, e in spans:
                self.frontier = self.frontier.advance(s, e, nxt)
            return
        if nxt > piece.next_revision:
            piece.next_revision = nxt
            for s, e in piece.spans:
                self.frontier = self.frontier.advance(s, e, nxt)

    def _take(
        self,
        piece: _Piece,
        events: list[Any],
        nxt: int,
        spans: list[tuple[str, str | None]] | None = None,
    ) -> None:
        """Queue pushed events not delivered yet, each with the position after it
        (of the piece's spans, or of ``spans`` only: a sub-span's last events)."""
        low = piece.next_revision
        kept = [ev for ev in events if type(ev[0]) is int and ev[0] >= low]
        for i, (revision, kind, key, value) in enumerate(kept):
            if not isinstance(key, str):
                raise TypeError("malformed event")
            last_of_rev = i + 1 == len(kept) or kept[i + 1][0] != revision
            if last_of_rev:
                self._advance(piece, revision + 1, spans)
            self._queue.append(
                ShardedWatchEvent(revision, str(kind), key, value, piece.range_id, self.frontier)
            )
        piece.events += len(kept)
        if spans is None:
            self._advance(piece, nxt)
        if kept:
            self._hops = 0
            self._ready.set()
            self._started.set()

    def _unwatch(self, conn: _Conn, wid: int) -> None:
        if not conn.up:
            return
        fut = conn.submit({"op": "unwatch", "watch": wid}, 0, self._client.request_timeout)
        fut.add_done_callback(_ignore_result)


def _ignore_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def open_watch(
    client: ShardedKVClient,
    prefix: str,
    *,
    start_revision: int | None = None,
    cursor: str | None = None,
    max_buffered: int = 1000,
) -> ShardedWatcher:
    """The watcher of :meth:`ShardedKVClient.watch` (arguments checked).

    Raises:
        BadInputError: bad prefix, start revision or cursor, or both a start revision
            and a cursor.
    """
    if not isinstance(prefix, str):
        raise BadInputError(f"watch prefix must be a string, got {type(prefix).__name__}")
    if start_revision is not None and (type(start_revision) is not int or start_revision < 0):
        raise BadInputError(
            f"start_revision must be a non-negative integer, got {start_revision!r}"
        )
    if cursor is not None:
        if start_revision:
            raise BadInputError("give a start_revision or a cursor, not both")
        frontier = Frontier.decode(cursor, prefix)
    else:
        frontier = Frontier.new(prefix, start_revision or 0)
    return ShardedWatcher(client, frontier, max_buffered)


__all__ = ["MAX_FAILURES", "MAX_HOPS", "ShardedWatchEvent", "ShardedWatcher", "open_watch"]
