"""Range watches on a multi-Raft node: the asyncio side of :mod:`dsys.kv.multiwatch`.

A *range watch* streams the changes of the keys in ``[start, end)`` that one range's
local replica applied, from a start revision on. Any replica serves it, leader or
follower (each serves the history it applied; see :mod:`dsys.kv.watch`, whose
:class:`~dsys.kv.watch.WatchHub` wakes the watchers of each range). When the span's
events continue in another range, the watch says precisely where:

* on the node's ``/v1/ws`` (msgpack frames, as every request there)::

    -> {"id": 7, "op": "watch", "range": 3, "start": "app/", "end": "app0",
        "start_revision": 42}                    (0 or absent: from the next change)
    <- {"id": 7, "status": "ok", "start_revision": 42, "range": 3}
    <- {"id": 7, "status": "events", "events": [[42, "put", "app/a", b"v"], ...],
        "next": 44}                              (everything of the span below 44 seen)
    <- {"id": 7, "status": "progress", "next": 50}
    <- {"id": 7, "status": "moved", "start": "app/m", "end": "app0", "revision": 57,
        "range": 9, "replicas": ["127.0.0.1:7101", ...], "events": [...]}
           (the sub-span's last events here, if any, then: every event of it up to 57
           was delivered; later ones are in range 9. The "next" of later events
           answers is about the spans still served here only)
    <- {"id": 7, "status": "before", "start": ..., "end": ..., "revision": 40,
        "range": 2}           (read the sub-span from range 2 up to 40 first)
    <- {"id": 7, "status": "compacted", "start": ..., "end": ..., "revision": 60}
    <- {"id": 7, "status": "not_here", "start": ..., "end": ...}   (re-plan by the map)
    <- {"id": 7, "status": "end"}               (nothing left to serve; the last answer)
    <- {"id": 7, "status": "unavailable", "message": ...}   (the replica went away, or
           the range has none here: resume on another replica; the last answer)
    -> {"id": 8, "op": "unwatch", "watch": 7}

  ``range`` may also be ``"ID:CONF_VER:VERSION"``; only the id is used (the span
  records make a stale epoch harmless). A split moves the right half with ``moved``
  once the replica applied it; a merge moves the source's whole span to the target once
  the source's replica here is removed (after its remaining history was delivered).
* streaming HTTP ``GET /v1/ranges/{id}/watch?start=&end=&start_revision=``: the same
  answers as newline-delimited JSON, one line per event ``{"revision", "type", "key",
  "value" | "value_b64", "range"}`` and one per other answer (with ``"status"``).

A whole prefix over HTTP, ``GET /v1/watch?prefix=P&start_revision=R`` (or
``&cursor=C``), is fanned in by the node itself with the client of
:mod:`dsys.kv.shardedwatch` (:meth:`RangeWatches.handle_prefix_http`): one NDJSON line
per event with its ``"range"`` and ``"cursor"``, for ``curl -N``.

Limits: ``max_watches`` per node and ``max_per_ws`` per WebSocket (as the single-group
hub); bad input is answered ``bad_request`` (HTTP 400) and the node stays up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dsys.errors import BadInputError, ClosedError, UnavailableError
from dsys.kv.fsm import MAX_KEY_BYTES, Compacted
from dsys.kv.multiwatch import (
    BEFORE,
    COMPACTED,
    MOVED,
    NOT_HERE,
    SERVE,
    SpanRecord,
    before_end,
    classify,
    common_prefix,
    handoffs_passed,
    in_spans,
    intersect,
    subtract,
)
from dsys.kv.rangefsm import RangeStateMachine
from dsys.kv.watch import OUTBOX_LIMIT, WATCH_BATCH, WATCH_BATCH_BYTES, Outbox, WatchHub

if TYPE_CHECKING:
    from dsys.kv.multi import Group, MultiRaftServer

PROGRESS_EVERY = 1.0
"""Seconds between progress answers of an idle range watch whose position moved."""

IDLE_CHECK = 1.0
"""Seconds a waiting range watch sleeps before it looks whether its replica is gone."""

FINAL = ("end", "unavailable", "bad_request")
"""Statuses after which a range watch says nothing more."""


def check_range_watch(req: dict[str, Any]) -> tuple[int, str, str | None, int]:
    """``(range_id, start, end, start_revision)`` of a watch request.

    Raises:
        BadInputError: a field is missing or malformed.
    """
    raw = req.get("range")
    if type(raw) is int:
        rid = raw
    elif isinstance(raw, str):
        try:
            rid = int(raw.split(":", 1)[0])
        except ValueError:
            raise BadInputError(
                f"range must be an id or 'ID:CONF_VER:VERSION', got {raw!r}"
            ) from None
    else:
        raise BadInputError("a range watch needs 'range' (an id or 'ID:CONF_VER:VERSION')")
    if rid < 1:
        raise BadInputError(f"range id must be >= 1, got {rid}")
    start, end = req.get("start", ""), req.get("end")
    if not isinstance(start, str) or (end is not None and not isinstance(end, str)):
        raise BadInputError("start must be a string and end a string or null")
    for k in (start, end or ""):
        if len(k.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES + 4:
            raise BadInputError(f"span bounds must be at most {MAX_KEY_BYTES} bytes")
    if end is not None and end <= start:
        raise BadInputError(f"empty span: end {end!r} <= start {start!r}")
    rev = req.get("start_revision")
    if rev is None:
        rev = 0
    if type(rev) is not int or rev < 0:
        raise BadInputError(f"start_revision must be a non-negative integer, got {rev!r}")
    return rid, start, end, rev


class RangeWatches:
    """Every range watch of one :class:`~dsys.kv.multi.MultiRaftServer`.

    Args:
        server: the node.
        max_watches: open range watches allowed on this node.
        max_per_ws: open range watches allowed on one WebSocket.
    """

    def __init__(
        self, server: MultiRaftServer, *, max_watches: int = 4096, max_per_ws: int = 256
    ) -> None:
        self.server = server
        self.max_watches = max_watches
        self.max_per_ws = max_per_ws
        self.count = 0
        """Open range watches (WebSocket and HTTP)."""
        self.closed = False
        self._hubs: dict[int, tuple[Group, WatchHub]] = {}

    def hub(self, g: Group) -> WatchHub:
        """The wake-ups of range ``g`` (one hub per local replica)."""
        got = self._hubs.get(g.range_id)
        if got is not None and got[0] is g:
            return got[1]
        assert isinstance(g.fsm, RangeStateMachine)
        hub = WatchHub(
            g.node, g.fsm, node_id=self.server.config.id, max_watches=1 << 30, max_per_ws=1 << 30
        )
        self._hubs[g.range_id] = (g, hub)
        return hub

    def addrs(self, range_id: int) -> list[str]:
        """``host:port`` of the replicas of ``range_id`` as this node knows them."""
        s = self.server
        g = s.groups.get(range_id)
        desc = g.desc if g is not None and g.initialized else s.meta.map.get(range_id)
        if desc is None:
            return []
        nodes = {**s.nodes, s.config.id: f"{s.config.host}:{s.port}"}
        return [nodes[r] for r in desc.replicas if r in nodes]

    def open(self, req: dict[str, Any]) -> tuple[int, RangeWatch]:
        """Check a watch request and make its watch (not started): ``(start, watch)``.

        Raises:
            BadInputError: malformed request.
            UnavailableError: no initialized replica of the range here, or too many
                watches.
            ClosedError: the node is closing.
        """
        rid, start, end, rev = check_range_watch(req)
        if self.closed:
            raise ClosedError("node is closing")
        g = self.server.groups.get(rid)
        if g is None or not g.initialized:
            raise UnavailableError(f"range {rid} has no replica on this node", retry_after=0.1)
        if self.count >= self.max_watches:
            raise UnavailableError(
                f"too many watches on this node (limit {self.max_watches})", retry_after=1.0
            )
        fsm = g.fsm
        assert isinstance(fsm, RangeStateMachine)
        first = rev or fsm.revision + 1
        pieces = classify(
            start,
            end,
            first,
            fsm.span_records,
            fsm.desc.start,
            fsm.desc.end,
            records_floor=fsm.records_floor,
        )
        watch = RangeWatch(self, g, start, end, first, pieces)
        watch.known = frozenset(fsm.span_records)
        return first, watch

    def ws_session(self, out: Outbox) -> RangeWsWatches:
        """The range watches of one WebSocket, answering into ``out``."""
        return RangeWsWatches(self, out)

    async def handle_http(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/ranges/{id}/watch?start=&end=&start_revision=``: NDJSON lines."""
        q = request.query
        req: dict[str, Any] = {"range": request.match_info["id"], "start": q.get("start", "")}
        if "end" in q:
            req["end"] = q["end"]
        if q.get("start_revision"):
            try:
                req["start_revision"] = int(q["start_revision"])
            except ValueError:
                raise BadInputError("start_revision must be an integer") from None
        first, watch = self.open(req)
        out = QueueOutbox()
        resp = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        self.count += 1
        task = asyncio.create_task(watch.run(0, out))
        try:
            with contextlib.suppress(ConnectionError, RuntimeError):
                line = {"status": "ok", "start_revision": first, "range": watch.range_id}
                await resp.write(json.dumps(line).encode() + b"\n")
                while True:
                    try:
                        msg = await asyncio.wait_for(out.queue.get(), IDLE_CHECK)
                    except TimeoutError:
                        transport = request.transport
                        if transport is None or transport.is_closing():
                            break
                        continue
                    await resp.write(_ndjson(msg, watch.range_id))
                    if msg.get("status") in FINAL:
                        break
                await resp.write_eof()
        finally:
            task.cancel()
            self.count -= 1
        return resp

    async def handle_prefix_http(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/watch?prefix=P&start_revision=R|cursor=C``: a whole prefix as NDJSON.

        The node fans the prefix's range watches in itself, with the client code of
        :meth:`~dsys.kv.sharded.ShardedKVClient.watch` (over this node and its peers):
        one line per event with its ``"range"`` and the ``"cursor"`` after it (pass it as
        ``cursor=`` to resume after that event, on any node), and a last line
        ``{"error": "compacted", "revision", "start", "end"}`` when a span's events are
        gone, or ``{"error": "unavailable", ...}``.
        """
        from dsys.errors import CompactedError, DsysError
        from dsys.kv.sharded import ShardedKVClient

        q = request.query
        start: int | None = None
        if q.get("start_revision"):
            try:
                start = int(q["start_revision"])
            except ValueError:
                raise BadInputError("start_revision must be an integer") from None
        if self.closed:
            raise ClosedError("node is closing")
        if self.count >= self.max_watches:
            raise UnavailableError(
                f"too many watches on this node (limit {self.max_watches})", retry_after=1.0
            )
        s = self.server
        me = f"{s.config.host}:{s.port}"
        kv = ShardedKVClient([me, *[a for a in s.nodes.values() if a != me]])
        try:
            watcher = kv.watch(q.get("prefix", ""), start_revision=start, cursor=q.get("cursor"))
        except BadInputError:
            await kv.close()
            raise
        self.count += 1
        resp = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
        )
        try:
            await resp.prepare(request)
            with contextlib.suppress(ConnectionError, RuntimeError):
                try:
                    while True:
                        try:
                            ev = await asyncio.wait_for(watcher.__anext__(), IDLE_CHECK)
                        except TimeoutError:  # idle: is the client still there?
                            transport = request.transport
                            if transport is None or transport.is_closing():
                                break
                            continue
                        except StopAsyncIteration:
                            break
                        line: dict[str, Any] = {
                            "revision": ev.revision,
                            "type": ev.type,
                            "key": ev.key,
                        }
                        if ev.value is not None:
                            try:
                                line["value"] = ev.value.decode("utf-8")
                            except UnicodeDecodeError:
                                line["value_b64"] = base64.b64encode(ev.value).decode("ascii")
                        line["range"] = ev.range_id
                        line["cursor"] = ev.cursor
                        await resp.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
                except CompactedError as exc:
                    span = getattr(exc, "span", (None, None))
                    err = {
                        "error": "compacted",
                        "revision": exc.revision,
                        "start": span[0],
                        "end": span[1],
                        "message": str(exc),
                    }
                    await resp.write(json.dumps(err).encode() + b"\n")
                except DsysError as exc:
                    err = {"error": "unavailable", "message": str(exc)}
                    await resp.write(json.dumps(err).encode() + b"\n")
                await resp.write_eof()
        finally:
            self.count -= 1
            await watcher.close()
            await kv.close()
        return resp

    async def close(self) -> None:
        """End every range watch (they answer ``unavailable``)."""
        self.closed = True
        for _, hub in list(self._hubs.values()):
            await hub.close()
        self._hubs.clear()


class QueueOutbox:
    """An :class:`~dsys.kv.watch.Outbox` over an ``asyncio.Queue`` of answers."""

    def __init__(self, queue: asyncio.Queue[dict[str, Any]] | None = None) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = queue if queue is not None else asyncio.Queue()

    def put_nowait(self, resp: dict[str, Any]) -> None:
        """Queue one answer."""
        self.queue.put_nowait(resp)

    def __len__(self) -> int:
        """Answers queued and not yet taken."""
        return self.queue.qsize()


def _ndjson(msg: dict[str, Any], range_id: int) -> bytes:
    lines = []
    for rev, kind, key, value in msg.get("events") or ():
        ev: dict[str, Any] = {"revision": rev, "type": kind, "key": key, "range": range_id}
        if value is not None:
            try:
                ev["value"] = value.decode("utf-8")
            except UnicodeDecodeError:
                ev["value_b64"] = base64.b64encode(value).decode("ascii")
        lines.append(json.dumps(ev, ensure_ascii=False).encode("utf-8") + b"\n")
    if msg.get("status") != "events":  # a moved answer's events come first
        line = {k: v for k, v in msg.items() if k not in ("id", "node", "events")}
        lines.append(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
    return b"".join(lines)


class RangeWatch:
    """One range watch: its served spans and position (see the module docstring)."""

    def __init__(
        self,
        watches: RangeWatches,
        g: Group,
        start: str,
        end: str | None,
        first: int,
        pieces: list[Any],
    ) -> None:
        self.watches = watches
        self.group = g
        self.range_id = g.range_id
        self.first = first
        self.next_revision = first
        self.pieces = pieces
        self.served: list[tuple[str, str | None]] = []
        self.known: frozenset[SpanRecord] = frozenset()
        """The span records the pieces were classified with."""
        self._filter = common_prefix(start, end)

    async def run(self, wid: int, out: Outbox) -> None:
        """Answer the pieces, then stream the served spans until nothing is left."""
        hub = self.watches.hub(self.group)
        try:
            hub._acquire()  # keeps the hub's wake-up task running
        except (ClosedError, UnavailableError) as exc:
            out.put_nowait({"id": wid, "status": "unavailable", "message": str(exc)})
            return
        try:
            await self._run(wid, out)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: say so on the wire rather than go silent
            out.put_nowait({"id": wid, "status": "unavailable", "message": f"watch failed: {exc}"})
            raise
        finally:
            hub._release()
            w = self.watches
            got = w._hubs.get(self.range_id)
            gone = w.server.groups.get(self.range_id) is not self.group
            if gone and hub.count == 0 and got is not None and got[1] is hub:
                del w._hubs[self.range_id]  # the replica is gone: forget its hub

    def _moved(
        self,
        wid: int,
        start: str,
        end: str | None,
        revision: int,
        target: int,
        events: list[list[Any]] | None = None,
    ) -> dict[str, Any]:
        msg = {
            "id": wid,
            "status": "moved",
            "start": start,
            "end": end,
            "revision": revision,
            "range": target,
            "replicas": self.watches.addrs(target),
        }
        if events:
            msg["events"] = events
        return msg

    async def _run(self, wid: int, out: Outbox) -> None:
        g, watches = self.group, self.watches
        fsm = g.fsm
        assert isinstance(fsm, RangeStateMachine)
        for p in self.pieces:
            if p.state == SERVE:
                self.served.append((p.start, p.end))
            elif p.state == MOVED:
                out.put_nowait(self._moved(wid, p.start, p.end, p.revision, p.range_id))
            elif p.state == BEFORE:
                out.put_nowait(
                    {
                        "id": wid,
                        "status": "before",
                        "start": p.start,
                        "end": p.end,
                        "revision": p.revision,
                        "range": p.range_id,
                        "replicas": watches.addrs(p.range_id),
                    }
                )
            elif p.state == COMPACTED:
                out.put_nowait(_compacted(wid, p.start, p.end, p.revision))
            else:
                assert p.state == NOT_HERE
                out.put_nowait({"id": wid, "status": "not_here", "start": p.start, "end": p.end})
        hub = watches.hub(g)
        known = self.known
        loop = asyncio.get_running_loop()
        sent_next, sent_at = self.next_revision, loop.time()
        while self.served:
            if watches.closed:
                out.put_nowait({"id": wid, "status": "unavailable", "message": "node is closing"})
                return
            dropped = watches.server.groups.get(self.range_id) is not g
            if len(out) >= OUTBOX_LIMIT and not dropped:
                # the connection does not keep up: wait; once this watch's position is
                # dropped from the history it ends with compacted
                if self.next_revision <= fsm.compacted_revision:
                    self._compact_all(wid, out, fsm.compacted_revision + 1)
                    break
                await asyncio.sleep(0.01)
                continue
            nxt = self.next_revision
            got = fsm.changes(nxt, self._filter, WATCH_BATCH, WATCH_BATCH_BYTES)
            if isinstance(got, Compacted):
                self._compact_all(wid, out, got.revision)
                break
            events: list[list[Any]] = [
                [e.revision, e.type, e.key, e.value]
                for e in got.events
                if in_spans(e.key, self.served)
            ]
            self.next_revision = got.next_revision
            # a sub-span handed on in this step leaves with its last events in the moved
            # answer: the events answer's "next" (this range's revisions) is only valid
            # for the spans still served here
            passed = handoffs_passed(fsm.span_records, self.first, self.next_revision, known)
            for r in passed:
                for s, e in list(self.served):
                    cut = intersect(s, e, r.start, r.end)
                    if cut is None:
                        continue
                    a, b = cut
                    mine = [ev for ev in events if a <= ev[2] and before_end(ev[2], b)]
                    if mine:
                        events = [ev for ev in events if not (a <= ev[2] and before_end(ev[2], b))]
                    out.put_nowait(self._moved(wid, a, b, r.revision, r.range_id, mine))
                    self.served = subtract(self.served, a, b)
            if events:
                out.put_nowait(
                    {"id": wid, "status": "events", "events": events, "next": got.next_revision}
                )
                sent_next, sent_at = got.next_revision, loop.time()
            if not self.served:
                break
            if self.next_revision <= fsm.revision:
                await asyncio.sleep(0)  # more history: let the other watchers run too
                continue
            if dropped:  # everything this replica had was delivered
                self._gone(wid, out, fsm)
                return
            now = loop.time()
            if self.next_revision > sent_next and now - sent_at >= PROGRESS_EVERY:
                out.put_nowait({"id": wid, "status": "progress", "next": self.next_revision})
                sent_next, sent_at = self.next_revision, now
            await hub._wait_change(self.next_revision, IDLE_CHECK)
        out.put_nowait({"id": wid, "status": "end"})

    def _compact_all(self, wid: int, out: Outbox, revision: int) -> None:
        for s, e in self.served:
            out.put_nowait(_compacted(wid, s, e, revision))
        self.served = []

    def _gone(self, wid: int, out: Outbox, fsm: RangeStateMachine) -> None:
        """The local replica was removed: a merge moves the spans to the target."""
        server = self.watches.server
        target = fsm.merging[0] if fsm.merging is not None else None
        tg = server.groups.get(target) if target is not None else None
        if (
            target is not None
            and tg is not None
            and isinstance(tg.fsm, RangeStateMachine)
            and self.range_id in tg.fsm.absorbed
        ):
            for s, e in self.served:
                out.put_nowait(self._moved(wid, s, e, self.next_revision - 1, target))
            out.put_nowait({"id": wid, "status": "end"})
            return
        out.put_nowait(
            {
                "id": wid,
                "status": "unavailable",
                "message": f"range {self.range_id} has no replica on this node any more",
            }
        )


def _compacted(wid: int, start: str, end: str | None, revision: int) -> dict[str, Any]:
    return {
        "id": wid,
        "status": "compacted",
        "start": start,
        "end": end,
        "revision": revision,
        "message": (
            f"compacted: the changes of [{start!r}, {end!r}) before revision {revision} "
            f"are no longer kept; refetch them and watch from at least {revision}"
        ),
    }


class RangeWsWatches:
    """The range watches of one WebSocket: ``watch``/``unwatch`` requests."""

    def __init__(self, watches: RangeWatches, out: Outbox) -> None:
        self._watches = watches
        self._out = out
        self._pumps: dict[int, asyncio.Task[None]] = {}

    def handle(self, req: dict[str, Any]) -> None:
        """Answer one ``watch`` or ``unwatch`` request (into the outbox, at once)."""
        rid = req.get("id")
        w = self._watches
        node = w.server.config.id
        try:
            if type(rid) is not int:
                raise BadInputError("request needs an integer 'id'")
            if req.get("op") == "unwatch":
                wid = req.get("watch")
                pump = self._pumps.pop(wid, None) if type(wid) is int else None
                if pump is None:
                    raise BadInputError(f"no open watch {wid!r} on this connection")
                pump.cancel()
                self._out.put_nowait({"id": rid, "status": "ok", "node": node})
                return
            if rid in self._pumps:
                raise BadInputError(f"watch id {rid} is already open on this connection")
            if len(self._pumps) >= w.max_per_ws:
                raise BadInputError(f"too many watches on this connection (limit {w.max_per_ws})")
            first, watch = w.open(req)
        except BadInputError as exc:
            self._out.put_nowait(
                {
                    "id": rid if type(rid) is int else None,
                    "status": "bad_request",
                    "message": str(exc),
                    "node": node,
                }
            )
            return
        except (UnavailableError, ClosedError) as exc:
            self._out.put_nowait(
                {"id": rid, "status": "unavailable", "message": str(exc), "node": node}
            )
            return
        self._out.put_nowait(
            {
                "id": rid,
                "status": "ok",
                "start_revision": first,
                "range": watch.range_id,
                "node": node,
            }
        )
        w.count += 1
        pump = self._pumps[rid] = asyncio.create_task(watch.run(rid, self._out))
        pump.add_done_callback(lambda t: self._ended(rid, t))

    def _ended(self, wid: int, pump: asyncio.Task[None]) -> None:
        if self._pumps.get(wid) is pump:
            del self._pumps[wid]
        self._watches.count -= 1

    def close(self) -> None:
        """The connection closed: stop its watches."""
        for pump in self._pumps.values():
            pump.cancel()
        self._pumps.clear()


__all__ = [
    "FINAL",
    "IDLE_CHECK",
    "PROGRESS_EVERY",
    "QueueOutbox",
    "RangeWatch",
    "RangeWatches",
    "RangeWsWatches",
    "check_range_watch",
]
