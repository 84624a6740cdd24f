"""``ShardedKVClient``: a client of the multi-Raft KV that routes each key to its range.

The client keeps a :class:`~dsys.kv.ranges.RangeMap` (loaded from ``GET /v1/ranges``)
and a leader per range. Each request goes to the leader it believes in, with
``X-Dsys-Range: ID:CONF_VER:VERSION``; it follows the answers:

* 307 ``not_leader``: remember the named leader, retry there at once;
* 421 ``key_not_in_range`` / ``epoch_not_match`` (:class:`~dsys.errors.KeyNotInRangeError`,
  :class:`~dsys.errors.EpochNotMatchError` on the server): take the descriptors in the answer
  (guarded by epoch, see :meth:`~dsys.kv.ranges.RangeMap.apply_report`), or reload the
  map, and retry;
* 503, a timeout or a connection error: try another replica after a short backoff.

Retries are bounded (``max_attempts`` and ``timeout``). Writes carry a client id and a
sequence number, so a write retried after an unknown outcome is applied once (the
exactly-once sessions travel with the keys across a split).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp

from dsys.errors import (
    BadInputError,
    ConflictError,
    ConnectError,
    DsysError,
    RequestTimeout,
    UnavailableError,
)
from dsys.kv.api import MAX_SCAN_LIMIT, scan_request
from dsys.kv.client import GetResult, ScanItem
from dsys.kv.fsm import validate_key
from dsys.kv.multi import RANGE_HEADER
from dsys.kv.rangefsm import contiguous_runs
from dsys.kv.ranges import RangeDescriptor, RangeMap
from dsys.kv.shardedwatch import ShardedWatcher, open_watch
from dsys.raft.node import TOKEN_HEADER


class ShardedKVClient:
    """Routes each key to the leader of its range; retries on stale routing (bounded).

    Args:
        endpoints: ``host:port`` of some nodes (the rest are learned from the map).
        timeout: seconds one operation may take, retries included.
        request_timeout: seconds one HTTP attempt may take.
        max_attempts: most attempts per operation.
        token: cluster token (only for the admin ``split``).

    Example::

        async with ShardedKVClient(["127.0.0.1:7101"]) as kv:
            await kv.put("user/1", b"x")
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 10.0,
        request_timeout: float = 2.0,
        max_attempts: int = 40,
        token: str | None = None,
    ) -> None:
        if not endpoints:
            raise BadInputError("ShardedKVClient needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.max_attempts = max_attempts
        self.token = token
        self.map: RangeMap | None = None
        self.nodes: dict[str, str] = {}
        self.leaders: dict[int, str] = {}
        """Range id -> ``host:port`` of the leader last seen."""
        self.refreshes = 0
        """Times the map was reloaded (stale routing seen)."""
        self._client_id = uuid.uuid4().hex
        self._seq = 0
        self._session: aiohttp.ClientSession | None = None
        self._rr = 0

    async def __aenter__(self) -> ShardedKVClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.request_timeout)
            )
        return self._session

    # -- the map ----------------------------------------------------------------------

    async def refresh(self) -> RangeMap:
        """Reload the range map from the first node that answers.

        Raises:
            ConnectError: no node answered.
        """
        addrs = [*self.endpoints, *[a for a in self.nodes.values() if a not in self.endpoints]]
        last: Exception | None = None
        for i in range(len(addrs)):
            addr = addrs[(self._rr + i) % len(addrs)]
            try:
                async with self._http().get(f"http://{addr}/v1/ranges") as r:
                    if r.status != 200:
                        last = ConnectError(f"{addr} answered {r.status}")
                        continue
                    data = await r.json()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = exc
                continue
            fresh = RangeMap.from_plain({"version": data["version"], "ranges": data["ranges"]})
            if self.map is None or fresh.version >= self.map.version:
                self.map = fresh
            self.nodes.update({str(k): str(v) for k, v in data["nodes"].items()})
            self.refreshes += 1
            self._rr += 1
            return self.map
        raise ConnectError(f"no node answered GET /v1/ranges: {last}")

    def _learn(self, plain: Any) -> bool:
        """Take the descriptors of a 421 answer into the map; whether it changed."""
        if self.map is None or not isinstance(plain, list):
            return False
        try:
            descs = [RangeDescriptor.from_plain(r) for r in plain]
        except DsysError:
            return False
        changed = False
        for run in contiguous_runs(descs):
            changed = self.map.apply_report(run) or changed
        return changed

    async def locate(self, key: str) -> RangeDescriptor:
        """The range the client currently routes ``key`` to."""
        if self.map is None:
            await self.refresh()
        assert self.map is not None
        return self.map.lookup(key)

    async def range_leaders(self) -> dict[int, str]:
        """Range id -> id of the node that reports itself the range's leader (asks every
        node of the map; a node that does not answer is skipped)."""
        if self.map is None:
            await self.refresh()
        out: dict[int, str] = {}
        for node_id, addr in sorted(self.nodes.items()):
            try:
                async with self._http().get(f"http://{addr}/v1/status") as r:
                    data = await r.json()
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                continue
            for row in data.get("ranges", []):
                if row.get("role") == "leader":
                    out[int(row["range_id"])] = node_id
        return out

    # -- operations -------------------------------------------------------------------

    async def get(self, key: str) -> GetResult | None:
        """The value of ``key`` and its revision, or None (a linearizable read)."""
        status, headers, body = await self._call("GET", key)
        if status == 404:
            return None
        return GetResult(body, int(headers.get("X-Dsys-Revision", "0")))

    async def put(self, key: str, value: bytes) -> int:
        """Set ``key``; returns the revision of the write (in its range)."""
        _, _, body = await self._call("PUT", key, value, write=True)
        return int(json.loads(body)["revision"])

    async def cas(self, key: str, value: bytes, *, revision: int) -> int:
        """Set ``key`` only if its revision is ``revision`` (0 = must not exist).

        Raises:
            ConflictError: the revision differs.
        """
        _, _, body = await self._call(
            "PUT", key, value, write=True, query={"if_revision": str(revision)}
        )
        return int(json.loads(body)["revision"])

    async def delete(self, key: str) -> int | None:
        """Delete ``key``; the new revision, or None when it did not exist."""
        status, _, body = await self._call("DELETE", key, write=True)
        if status == 404:
            return None
        return int(json.loads(body)["revision"])

    async def scan(self, prefix: str = "", limit: int = 1000) -> list[ScanItem]:
        """Keys under ``prefix`` in key order (at most ``limit``), range after range.

        Each range's page is a linearizable read of that range; the scan as a whole is
        not one snapshot (a write may land in a range already read).

        Raises:
            BadInputError: bad prefix or limit.
        """
        scan_request(prefix, min(limit, MAX_SCAN_LIMIT))  # checks the arguments
        deadline = time.monotonic() + self.timeout
        out: list[ScanItem] = []
        after: str | None = None
        desc = await self.locate(prefix)
        attempt = 0
        while len(out) < limit:
            attempt += 1
            if attempt > self.max_attempts * 4 or time.monotonic() >= deadline:
                raise UnavailableError(f"scan of {prefix!r} did not complete in time")
            rid = desc.range_id
            addr = self._target(rid, attempt)
            params = {"prefix": prefix, "limit": str(min(limit - len(out), MAX_SCAN_LIMIT))}
            if after is not None:
                params["after"] = after
            epoch = f"{rid}:{desc.epoch.conf_ver}:{desc.epoch.version}"
            try:
                async with self._http().get(
                    f"http://{addr}/v1/ranges/{rid}/kv",
                    params=params,
                    headers={RANGE_HEADER: epoch},
                    allow_redirects=False,
                ) as r:
                    status, payload = r.status, await r.read()
            except (aiohttp.ClientError, OSError, TimeoutError):
                self.leaders.pop(rid, None)
                await self._pause(attempt, deadline)
                continue
            info = _json(payload)
            if status == 200:
                self.leaders[rid] = addr
                out.extend(ScanItem(str(k), int(v)) for k, v in info["items"])
                if info["more"]:
                    after = info["next"]
                    continue
                end = RangeDescriptor.from_plain(info["range"]).end
                if end is None or not end.startswith(prefix):
                    break  # no key under the prefix lies beyond this range
                assert self.map is not None
                desc = self.map.lookup(end)
                continue
            if status == 307 and info.get("leader"):
                self.leaders[rid] = str(info["leader"]).removeprefix("http://")
                continue
            if status == 421:
                self.leaders.pop(rid, None)
                if not self._learn(info.get("ranges")):
                    await self.refresh()
                    await self._pause(attempt, deadline)
                desc = await self.locate(after if after is not None else prefix)
                continue
            if status == 400:
                raise BadInputError(str(info.get("message", "bad request")))
            self.leaders.pop(rid, None)
            await self._pause(attempt, deadline)
        return out[:limit]

    async def split(self, range_id: int, at_key: str) -> tuple[RangeDescriptor, RangeDescriptor]:
        """Split range ``range_id`` at ``at_key`` (sent to its leader); both halves.

        Raises:
            BadInputError: the key is not strictly inside the range, or no such range.
        """
        validate_key(at_key)
        deadline = time.monotonic() + self.timeout
        if self.map is None:
            await self.refresh()
        headers = {TOKEN_HEADER: self.token} if self.token else {}
        for attempt in range(self.max_attempts):
            addr = self._target(range_id, attempt)
            try:
                async with self._http().post(
                    f"http://{addr}/v1/ranges/{range_id}/split",
                    params={"at": at_key},
                    headers=headers,
                    allow_redirects=False,
                ) as r:
                    data = await r.json(content_type=None)
                    status = r.status
            except (aiohttp.ClientError, OSError, TimeoutError):
                self.leaders.pop(range_id, None)
                await self._pause(attempt, deadline)
                continue
            if status == 200:
                left = RangeDescriptor.from_plain(data["left"])
                right = RangeDescriptor.from_plain(data["right"])
                self._learn([left.to_plain(), right.to_plain()])
                return left, right
            if status == 307 and data.get("leader"):
                self.leaders[range_id] = str(data["leader"]).removeprefix("http://")
                continue
            if status == 400:
                raise BadInputError(str(data.get("message")))
            await self._pause(attempt, deadline)
        raise UnavailableError(f"split of range {range_id} did not succeed in time")

    async def move(self, range_id: int, src: str, dst: str) -> RangeDescriptor:
        """Move range ``range_id``'s replica from node ``src`` to node ``dst`` (any node
        forwards the request to the range's leader); the descriptor once done.

        Raises:
            BadInputError: unknown nodes or range, or ``src`` holds no replica.
            ConflictError: another move of the range is in flight.
            UnavailableError: the move did not finish (asking again resumes it).
        """
        if self.map is None:
            await self.refresh()
        headers = {TOKEN_HEADER: self.token} if self.token else {}
        last = "no attempt"
        for attempt in range(3):
            addr = self.endpoints[(attempt + self._rr) % len(self.endpoints)]
            try:
                async with self._http().post(
                    f"http://{addr}/v1/ranges/{range_id}/move",
                    json={"from": src, "to": dst},
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=max(self.timeout, 70.0)),
                ) as r:
                    data = _json(await r.read())
                    status = r.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = f"{addr}: {type(exc).__name__}: {exc}"
                continue
            if status == 200:
                desc = RangeDescriptor.from_plain(data.get("range"))
                self._learn([desc.to_plain()])
                return desc
            last = f"{addr}: {status} {data.get('message')}"
            if status == 400:
                raise BadInputError(str(data.get("message")))
            if status == 409:
                raise ConflictError(str(data.get("message")))
            await asyncio.sleep(0.2)
        raise UnavailableError(f"move of range {range_id} did not finish; last: {last}")

    async def merge(self, left_id: int, right_id: int) -> RangeDescriptor:
        """Merge range ``right_id`` into its left neighbour ``left_id`` (sent to the
        leader of ``right_id``); the merged range.

        Raises:
            BadInputError: unknown ranges, not neighbours, or different replicas.
            ConflictError: one of them split or merged too recently, or the left range
                changed during the merge (which then rolled back).
        """
        deadline = time.monotonic() + self.timeout
        if self.map is None:
            await self.refresh()
        headers = {TOKEN_HEADER: self.token} if self.token else {}
        for attempt in range(self.max_attempts):
            addr = self._target(right_id, attempt)
            try:
                async with self._http().post(
                    f"http://{addr}/v1/ranges/merge",
                    params={"left": str(left_id), "right": str(right_id)},
                    headers=headers,
                    allow_redirects=False,
                ) as r:
                    data = await r.json(content_type=None)
                    status = r.status
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                self.leaders.pop(right_id, None)
                await self._pause(attempt, deadline)
                continue
            if not isinstance(data, dict):
                data = {}
            if status == 200:
                merged = RangeDescriptor.from_plain(data["merged"])
                self.leaders.pop(right_id, None)
                if not self._learn([merged.to_plain()]):
                    await self.refresh()
                return merged
            if status == 307 and data.get("leader"):
                self.leaders[right_id] = str(data["leader"]).removeprefix("http://")
                continue
            if status == 400:
                raise BadInputError(str(data.get("message")))
            if status == 409:
                raise ConflictError(str(data.get("message")))
            self.leaders.pop(right_id, None)
            await self._pause(attempt, deadline)
        raise UnavailableError(f"merge of ranges {left_id} and {right_id} did not succeed in time")

    def watch(
        self,
        prefix: str = "",
        *,
        start_revision: int | None = None,
        cursor: str | None = None,
        max_buffered: int = 1000,
    ) -> ShardedWatcher:
        """Every change of keys under ``prefix``: per key in revision order, exactly once,
        across splits, merges, moves and reconnects (see :mod:`dsys.kv.shardedwatch`).

        Args:
            prefix: only keys starting with this ("" = every key).
            start_revision: the first revision wanted in every range; None or 0 = from
                each range's next change.
            cursor: resume after the event whose ``cursor`` this is (not with
                ``start_revision``).
            max_buffered: events held for a slow consumer before range watches pause.

        Raises:
            BadInputError: bad prefix, start revision or cursor.
        """
        return open_watch(
            self, prefix, start_revision=start_revision, cursor=cursor, max_buffered=max_buffered
        )

    # -- the request loop -------------------------------------------------------------

    def _target(self, range_id: int, attempt: int) -> str:
        leader = self.leaders.get(range_id)
        if leader is not None:
            return leader
        desc = self.map.get(range_id) if self.map is not None else None
        replicas = [self.nodes[r] for r in desc.replicas if r in self.nodes] if desc else []
        pool = replicas or self.endpoints
        return pool[(attempt + self._rr) % len(pool)]

    async def _pause(self, attempt: int, deadline: float) -> None:
        if time.monotonic() >= deadline:
            raise RequestTimeout("operation did not complete in time")
        await asyncio.sleep(min(0.2, 0.01 * (attempt + 1)))

    async def _call(
        self,
        method: str,
        key: str,
        body: bytes | None = None,
        *,
        write: bool = False,
        query: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        validate_key(key)
        deadline = time.monotonic() + self.timeout
        headers: dict[str, str] = {}
        if write:
            self._seq += 1  # the same seq on every retry: exactly-once
            headers["X-Dsys-Client-Id"] = self._client_id
            headers["X-Dsys-Seq"] = str(self._seq)
        last = "no attempt"
        for attempt in range(self.max_attempts):
            if time.monotonic() >= deadline:
                break
            desc = await self.locate(key)
            rid = desc.range_id
            headers[RANGE_HEADER] = f"{rid}:{desc.epoch.conf_ver}:{desc.epoch.version}"
            addr = self._target(rid, attempt)
            try:
                async with self._http().request(
                    method,
                    f"http://{addr}/v1/kv/{key}",
                    data=body,
                    params=query,
                    headers=headers,
                    allow_redirects=False,
                ) as r:
                    status, payload = r.status, await r.read()
                    rheaders = {k: v for k, v in r.headers.items()}
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = f"{addr}: {type(exc).__name__}: {exc}"
                self.leaders.pop(rid, None)
                await self._pause(attempt, deadline)
                continue
            if status == 200 or (status == 404 and b'"not_found"' in payload):
                self.leaders[rid] = addr
                return status, rheaders, payload
            info = _json(payload)
            last = f"{addr}: {status} {info.get('error')}: {info.get('message')}"
            if status == 409:
                raise ConflictError(str(info.get("message", "conflict")))
            if status == 307 and info.get("leader"):
                self.leaders[rid] = str(info["leader"]).removeprefix("http://")
                continue
            if status == 421:
                self.leaders.pop(rid, None)
                if not self._learn(info.get("ranges")):
                    await self.refresh()
                    await self._pause(attempt, deadline)  # the metadata range may lag
                continue
            if status == 400 or status == 413:
                raise BadInputError(str(info.get("message", "bad request")))
            # 503 (no leader / unavailable), 504, 500: another replica, after a pause
            self.leaders.pop(rid, None)
            await self._pause(attempt, deadline)
        raise UnavailableError(f"{method} {key!r} failed after retries; last: {last}")


def _json(payload: bytes) -> dict[str, Any]:
    try:
        v = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return {}
    return v if isinstance(v, dict) else {}


__all__ = ["ShardedKVClient"]
