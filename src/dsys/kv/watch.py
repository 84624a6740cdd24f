"""Watches on a KV replica: the asyncio side of :meth:`KVStateMachine.changes`.

A watch streams every change (put, delete, expiry) of keys under a prefix from a start
revision on, in revision order. Every replica serves watches from the change history of
the state it has *applied* (see :mod:`dsys.kv.fsm`), leader or not: a watcher may watch
any node and, after a disconnect, resume on any other from its last revision + 1 (a
node that has not applied that far yet just waits until it has), with no gap and no
duplicate. A watch whose start revision was already dropped from the history gets a
*compacted* answer naming the oldest revision still available.

Nothing is buffered per watcher: a watcher is a position in the history. It is given
at most one batch of events at a time, and only while its connection keeps up (the
WebSocket's outbox holds fewer than :data:`OUTBOX_LIMIT` answers, or the HTTP response
drained). A watcher that cannot keep up falls behind and, once its position leaves the
bounded history, is cancelled with the compacted error.

Two ways in, served by :class:`WatchHub`:

* the multiplexed WebSocket ``/v1/ws`` (what :meth:`KVClient.watch
  <dsys.kv.client.KVClient.watch>` uses)::

    -> {"id": 7, "op": "watch", "prefix": "app/", "start_revision": 42}
    <- {"id": 7, "status": "ok", "start_revision": 42}
    <- {"id": 7, "status": "events", "events": [[42, "put", "app/a", b"v"], ...]}
    <- {"id": 7, "status": "compacted", "revision": 90, "message": "..."}   (then it ends)
    -> {"id": 8, "op": "unwatch", "watch": 7}
    <- {"id": 8, "status": "ok"}

  ``start_revision`` 0 or absent means "from the next change"; the ``ok`` answer says
  which revision that is. Events of one revision are never split across answers.
  At most ``max_watches_per_ws`` watches per connection.
* streaming HTTP, newline-delimited JSON (``application/x-ndjson``), one event per
  line, for ``curl -N``::

    GET /v1/watch?prefix=app/&start_revision=42
    {"revision": 42, "type": "put", "key": "app/a", "value": "v"}
    {"revision": 43, "type": "delete", "key": "app/a"}
    {"revision": 44, "type": "expire", "key": "app/t"}
    {"type": "progress", "revision": 44}                  (after 15 s without events)

  A value that is not UTF-8 comes as ``"value_b64"`` (base64) instead of ``"value"``.
  A start revision already compacted is answered ``410 Gone`` with ``{"error":
  "compacted", "revision": R}``; falling behind later ends the stream with an error line
  ``{"error": "compacted", "revision": R, "message": ...}``. The header
  ``X-Dsys-Start-Revision`` names the first revision the stream covers.

At most ``max_watches`` watches per server (WebSocket and HTTP together).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from dsys.errors import BadInputError, ClosedError, ConfigError, RequestTimeout, UnavailableError
from dsys.kv.fsm import MAX_KEY_BYTES, Compacted, KVStateMachine, WatchEvent
from dsys.observability import json_error

if TYPE_CHECKING:
    from dsys.raft.node import RaftNode

WATCH_BATCH = 512
"""Events looked at per step of one watcher."""

WATCH_BATCH_BYTES = 1024 * 1024
"""Bytes of values sent per step of one watcher (a revision is never split)."""

OUTBOX_LIMIT = 16
"""WebSocket answers queued and not yet written above which watchers wait."""

PROGRESS_EVERY = 15.0
"""Seconds without events after which an HTTP watch writes a progress line."""


DISCONNECT_CHECK = 0.5
"""Seconds between checks that the client of an idle HTTP watch is still connected."""


class Outbox(Protocol):
    """Where a WebSocket's answers wait for its writer (``server._Outbox``)."""

    def put_nowait(self, resp: dict[str, Any]) -> None:
        """Queue one answer."""
        ...

    def __len__(self) -> int:
        """Answers queued and not yet taken by the writer."""
        ...


def _compacted_message(revision: int) -> str:
    return (
        f"compacted: revisions before {revision} are no longer kept; "
        f"refetch the state and watch from its revision + 1 (at least {revision})"
    )


def check_watch(prefix: object, start_revision: object) -> tuple[str, int | None]:
    """Validate a watch request's prefix and start revision.

    Raises:
        BadInputError: the prefix is not a string of at most ``MAX_KEY_BYTES`` bytes, or
            the start revision is not a non-negative integer (or None).
    """
    if not isinstance(prefix, str):
        raise BadInputError(f"watch prefix must be a string, got {type(prefix).__name__}")
    if len(prefix.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadInputError(f"watch prefix is longer than {MAX_KEY_BYTES} bytes")
    if start_revision is not None and (type(start_revision) is not int or start_revision < 0):
        raise BadInputError(
            f"start_revision must be a non-negative integer, got {start_revision!r}"
        )
    return prefix, start_revision


class WatchHub:
    """All watches of one replica: limits, and one wake-up per applied batch.

    While at least one watch is open, a task waits for the node to apply more entries
    and then wakes every watcher (one ``asyncio.Event`` swapped per wake-up); with no
    watch open it does not run, so the write path pays nothing for watches.

    Args:
        node: the Raft node (its applied index is what wakes watchers).
        fsm: the state machine the node applies to.
        node_id: this node's id (stamped on WebSocket answers).
        max_watches: open watches allowed on this server.
        max_per_ws: open watches allowed on one WebSocket.

    Raises:
        ConfigError: a limit is below 1.
    """

    def __init__(
        self,
        node: RaftNode,
        fsm: KVStateMachine,
        *,
        node_id: str,
        max_watches: int = 4096,
        max_per_ws: int = 64,
    ) -> None:
        if max_watches < 1 or max_per_ws < 1:
            raise ConfigError("max_watches and max_watches_per_ws must be >= 1")
        self.node = node
        self.fsm = fsm
        self.node_id = node_id
        self.max_watches = max_watches
        self.max_per_ws = max_per_ws
        self.count = 0
        """Open watches (WebSocket and HTTP)."""
        self.closed = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- machinery shared by both ways in ---------------------------------------------

    def _acquire(self) -> None:
        if self.closed:
            raise ClosedError("server is closing")
        if self.count >= self.max_watches:
            raise UnavailableError(
                f"too many watches on this server (limit {self.max_watches})", retry_after=1.0
            )
        self.count += 1
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def _release(self) -> None:
        self.count -= 1

    async def _run(self) -> None:
        node = self.node
        try:
            while self.count > 0 and not self.closed:
                try:
                    await node.wait_applied(node.applied_index + 1, timeout=1.0)
                except RequestTimeout:
                    continue
                except ClosedError:
                    break
                self._wake()
        finally:
            self._task = None
            self._wake()

    def _wake(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def _wait_change(self, next_revision: int, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Until the store passes ``next_revision - 1`` or compacts, the hub closes, or
        ``timeout`` seconds pass."""
        ev = self._changed
        fsm = self.fsm
        if self.closed or fsm.revision >= next_revision or fsm.compacted_revision >= next_revision:
            return
        if timeout is None:
            await ev.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), timeout)

    def start_revision(self, start_revision: int | None) -> int | Compacted:
        """The first revision a new watch covers, or :class:`Compacted`."""
        fsm = self.fsm
        if not start_revision:
            return fsm.revision + 1
        if start_revision <= fsm.compacted_revision:
            return Compacted(fsm.compacted_revision + 1)
        return start_revision

    async def close(self) -> None:
        """End every watch (streams end; WebSocket watches stop) and the wake-up task."""
        self.closed = True
        self._wake()
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- WebSocket --------------------------------------------------------------------

    def ws_session(self, out: Outbox) -> WsWatches:
        """The watches of one WebSocket connection, answering into ``out``."""
        return WsWatches(self, out)

    # -- HTTP -------------------------------------------------------------------------

    async def handle_http(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/watch?prefix=P&start_revision=R``: the changes as NDJSON lines."""
        q = request.query
        raw_start = q.get("start_revision", "")
        start: int | None = None
        if raw_start:
            try:
                start = int(raw_start)
            except ValueError:
                raise BadInputError(
                    f"start_revision must be an integer, got {raw_start!r}"
                ) from None
        prefix, start = check_watch(q.get("prefix", ""), start)
        first = self.start_revision(start)
        if isinstance(first, Compacted):
            return json_error(
                410, "compacted", _compacted_message(first.revision), revision=first.revision
            )
        self._acquire()
        try:
            resp = web.StreamResponse(
                headers={
                    "Content-Type": "application/x-ndjson",
                    "Cache-Control": "no-cache",
                    "X-Dsys-Start-Revision": str(first),
                }
            )
            await resp.prepare(request)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._stream(request, resp, prefix, first)
                await resp.write_eof()
            return resp
        finally:
            self._release()

    async def _stream(
        self, request: web.Request, resp: web.StreamResponse, prefix: str, next_rev: int
    ) -> None:
        fsm = self.fsm
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while not self.closed:
            got = fsm.changes(next_rev, prefix, WATCH_BATCH, WATCH_BATCH_BYTES)
            if isinstance(got, Compacted):
                line = {
                    "error": "compacted",
                    "revision": got.revision,
                    "message": _compacted_message(got.revision),
                }
                await resp.write(json.dumps(line).encode() + b"\n")
                return
            if got.events:
                await resp.write(b"".join(_json_line(ev) for ev in got.events))
                quiet_since = loop.time()
            next_rev = got.next_revision
            if next_rev <= fsm.revision:
                continue
            left = quiet_since + PROGRESS_EVERY - loop.time()
            if left <= 0:
                progress = {"type": "progress", "revision": next_rev - 1}
                await resp.write(json.dumps(progress).encode() + b"\n")
                quiet_since = loop.time()
                continue
            # look at the connection now and then: a client that went away while no
            # events came must not hold a watch until the next progress line
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await self._wait_change(next_rev, min(left, DISCONNECT_CHECK))


class WsWatches:
    """The watches of one WebSocket: ``watch``/``unwatch`` requests and their pumps."""

    def __init__(self, hub: WatchHub, out: Outbox) -> None:
        self._hub = hub
        self._out = out
        self._pumps: dict[int, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._pumps)

    def handle(self, req: dict[str, Any]) -> None:
        """Answer one ``watch`` or ``unwatch`` request (into the outbox, at once)."""
        rid = req.get("id")
        hub = self._hub
        try:
            if type(rid) is not int:
                raise BadInputError("request needs an integer 'id'")
            if req.get("op") == "unwatch":
                wid = req.get("watch")
                pump = self._pumps.pop(wid, None) if type(wid) is int else None
                if pump is None:
                    raise BadInputError(f"no open watch {wid!r} on this connection")
                pump.cancel()
                self._answer({"id": rid, "status": "ok"})
                return
            prefix, start = check_watch(req.get("prefix", ""), req.get("start_revision"))
            if rid in self._pumps:
                raise BadInputError(f"watch id {rid} is already open on this connection")
            if len(self._pumps) >= hub.max_per_ws:
                raise BadInputError(f"too many watches on this connection (limit {hub.max_per_ws})")
            first = hub.start_revision(start)
            if isinstance(first, Compacted):
                self._answer(_compacted_answer(rid, first.revision))
                return
            hub._acquire()
        except BadInputError as exc:
            self._answer(
                {
                    "id": rid if type(rid) is int else None,
                    "status": "bad_request",
                    "message": str(exc),
                }
            )
            return
        except (UnavailableError, ClosedError) as exc:
            self._answer({"id": rid, "status": "unavailable", "message": str(exc)})
            return
        self._answer({"id": rid, "status": "ok", "start_revision": first})
        pump = self._pumps[rid] = asyncio.create_task(self._pump(rid, prefix, first))
        # a done callback, not a finally: a pump cancelled before it ran has no finally
        pump.add_done_callback(lambda t: self._ended(rid, t))

    def _ended(self, wid: int, pump: asyncio.Task[None]) -> None:
        if self._pumps.get(wid) is pump:
            del self._pumps[wid]
        self._hub._release()

    def _answer(self, resp: dict[str, Any]) -> None:
        resp["node"] = self._hub.node_id
        self._out.put_nowait(resp)

    async def _pump(self, wid: int, prefix: str, next_rev: int) -> None:
        hub, fsm, out = self._hub, self._hub.fsm, self._out
        try:
            while not hub.closed:
                if len(out) >= OUTBOX_LIMIT:
                    # the connection does not keep up: wait, queue nothing more; once this
                    # watcher's position is dropped from the history it is cancelled
                    if next_rev <= fsm.compacted_revision:
                        self._answer(_compacted_answer(wid, fsm.compacted_revision + 1, slow=True))
                        return
                    await asyncio.sleep(0.01)
                    continue
                got = fsm.changes(next_rev, prefix, WATCH_BATCH, WATCH_BATCH_BYTES)
                if isinstance(got, Compacted):
                    self._answer(_compacted_answer(wid, got.revision))
                    return
                if got.events:
                    self._answer(
                        {
                            "id": wid,
                            "status": "events",
                            "events": [[e.revision, e.type, e.key, e.value] for e in got.events],
                        }
                    )
                next_rev = got.next_revision
                if next_rev > fsm.revision:
                    await hub._wait_change(next_rev)
        except Exception as exc:  # a bug: say so on the wire rather than go silent
            self._answer({"id": wid, "status": "unavailable", "message": f"watch failed: {exc}"})
            raise

    def close(self) -> None:
        """The connection closed: stop its watches."""
        for pump in self._pumps.values():
            pump.cancel()
        self._pumps.clear()


def _compacted_answer(wid: int, revision: int, *, slow: bool = False) -> dict[str, Any]:
    message = _compacted_message(revision)
    if slow:
        message = "watch cancelled, the connection did not keep up: " + message
    return {"id": wid, "status": "compacted", "revision": revision, "message": message}


def _json_line(ev: WatchEvent) -> bytes:
    line: dict[str, Any] = {"revision": ev.revision, "type": ev.type, "key": ev.key}
    if ev.value is not None:
        try:
            line["value"] = ev.value.decode("utf-8")
        except UnicodeDecodeError:
            line["value_b64"] = base64.b64encode(ev.value).decode("ascii")
    return json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n"


__all__ = [
    "OUTBOX_LIMIT",
    "PROGRESS_EVERY",
    "WATCH_BATCH",
    "WATCH_BATCH_BYTES",
    "WatchHub",
    "WsWatches",
    "check_watch",
]
