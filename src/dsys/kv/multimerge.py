"""Merges, splits by load and range upkeep for :class:`~dsys.kv.multi.MultiRaftServer`.

The pure parts are :mod:`dsys.kv.rangefsm` (the merge commands) and
:mod:`dsys.kv.rangeload` (load windows, the split key, :func:`plan_merge`); this module
is the adapter that proposes them and moves data between groups.

A merge of range R (the *source*) into its left neighbour L (the *target*) is run by
R's leader:

1. ``PrepareMerge(L, L.version, R.version)`` in R's log: every replica of R bumps R's
   ``version`` (requests routed with the old epoch get ``EpochNotMatch``) and freezes R:
   every later command is refused (a write gets ``key_not_in_range`` and the client
   retries it in the merged range), so R's state is final at the prepare index.
2. ``CommitMerge(R's descriptor, R's final state, L.version)`` in L's log, proposed on
   L's leader (forwarded there with ``POST /v1/ranges/{L}/merge/commit`` if it is
   another node). Every replica of L applies it at the same index: the keys, revision,
   clock and sessions of R join L, whose ``version`` becomes ``max + 1``. Each node then
   stops its replica of R and removes its data (``on_merge``).
3. The merged descriptor is reported to the metadata range.

If the leader of R dies between 1 and 2, R's next leader finds R frozen and runs step 2
again (a repeated commit is answered ok). If L refuses the commit because its version
moved on (it split or merged meanwhile), no later commit with that version can succeed,
so R proposes ``RollbackMerge`` and takes writes again.

A replica of R that missed the merge (its node was down) is removed when its node's
metadata replica shows a newer range covering R and no longer lists R; ids of removed
ranges are never recreated from stray messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections import deque
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from dsys.errors import (
    BadInputError,
    ConflictError,
    DsysError,
    EpochNotMatchError,
    UnavailableError,
)
from dsys.kv.rangefsm import (
    CommitMerge,
    MergeResult,
    PrepareMerge,
    RangeStateMachine,
    RollbackMerge,
    decode_merge,
    encode_merge,
)
from dsys.kv.rangeload import RangeLoad, RangeStats, merged_away, plan_merge
from dsys.kv.ranges import META_RANGE_ID, Epoch, RangeDescriptor
from dsys.raft.node import TOKEN_HEADER, token_ok

if TYPE_CHECKING:
    from dsys.kv.multi import Group, MultiRaftServer


class RangeUpkeep:
    """Merges, splits by load, and the removal of merged-away replicas, for one server.

    Args:
        server: the node whose ranges this looks after.
    """

    def __init__(self, server: MultiRaftServer) -> None:
        self.server = server
        cfg = server.config
        self.loads: dict[int, RangeLoad] = {}
        """Requests this node served per range (as its leader), for splits by load."""
        self.merges = 0
        """Merges this node committed as the source's leader."""
        self.load_splits = 0
        """Splits by load this node started."""
        self._started = time.monotonic()
        self._changed_at: dict[int, float] = {}  # range -> when it last split or merged
        self._cold_since: dict[int, float] = {}
        self._applied: dict[int, deque[tuple[float, int]]] = {}
        self._finishing: set[int] = set()
        self._window = cfg.split_qps_window

    # -- hooks (called by the server) ----------------------------------------------------

    def record(self, g: Group, key: str) -> None:
        """Count a request for ``key`` served by this node's replica of ``g`` (only as
        the range's leader: a follower redirects it)."""
        if not g.node.is_leader:
            return
        load = self.loads.get(g.range_id)
        if load is None:
            load = self.loads[g.range_id] = RangeLoad(window=self._window, seed=g.range_id)
        load.record(key, time.monotonic())

    def on_split(self, left: RangeDescriptor, right: RangeDescriptor) -> None:
        """A local replica applied a split: both halves start a new merge interval."""
        now = time.monotonic()
        self._changed_at[left.range_id] = self._changed_at[right.range_id] = now
        for rid in (left.range_id, right.range_id):
            self._cold_since.pop(rid, None)
            load = self.loads.get(rid)
            if load is not None:
                load.reset()

    def on_merge(self, merged: RangeDescriptor, source: RangeDescriptor) -> None:
        """A local replica of the target applied a merge: stop and remove the source's
        replica here (runs in the target's Raft loop; the removal is a task)."""
        self._changed_at[merged.range_id] = time.monotonic()
        self._cold_since.pop(merged.range_id, None)
        self.server.log.info(
            "range_merged",
            target=merged.range_id,
            source=source.range_id,
            version=merged.epoch.version,
        )
        self.remove(source.range_id)

    @property
    def tombstones(self) -> set[int]:
        """Ranges merged away here: never recreated (persisted, see ``server.tombs``)."""
        return {t.range_id for t in self.server.tombs if t.merged}

    def remove(self, rid: int) -> None:
        """Stop range ``rid``'s local replica and delete its data; ``rid`` is tombstoned
        (on disk first)."""
        s = self.server
        g = s.groups.get(rid)
        s.bury(rid, g.desc.epoch if g is not None and g.initialized else Epoch(0, 0), merged=True)
        self.loads.pop(rid, None)
        self._cold_since.pop(rid, None)
        self._applied.pop(rid, None)
        g = s.groups.pop(rid, None)
        if g is None:
            return
        d = s.data / f"r{rid}"

        async def stop() -> None:
            await g.node.close()
            s._drop_log(rid)  # it stops pinning the shared WAL's segments
            await asyncio.to_thread(shutil.rmtree, d, True)

        if s._started:
            s._tasks.append(asyncio.create_task(stop()))
        else:
            g.node._log_store.close()
            s._drop_log(rid)
            shutil.rmtree(d, ignore_errors=True)

    def qps(self, range_id: int, now: float) -> float:
        """Requests per second this node served for ``range_id`` over the load window."""
        load = self.loads.get(range_id)
        return load.qps(now) if load is not None else 0.0

    def frozen(self, g: Group) -> bool:
        """Whether ``g`` is frozen by a merge (it serves no reads nor writes)."""
        return isinstance(g.fsm, RangeStateMachine) and g.fsm.merging is not None

    # -- merge ----------------------------------------------------------------------------

    def _cooldown(self, *rids: int) -> float:
        """Seconds until ``rids`` may merge (0: now)."""
        wait = self.server.config.merge_after_split
        now = time.monotonic()
        return max(wait - (now - self._changed_at.get(r, self._started)) for r in rids)

    async def merge(self, left_id: int, right_id: int) -> RangeDescriptor:
        """Merge range ``right_id`` into its left neighbour ``left_id`` (this node must
        lead ``right_id``); the merged descriptor.

        Raises:
            BadInputError: unknown ranges, not neighbours, or different replica sets.
            NotLeaderError: this node does not lead ``right_id``.
            ConflictError: one of them split or merged less than ``merge_after_split``
                seconds ago.
            EpochNotMatchError: the source changed while the merge was proposed.
            ConflictError: also when the target moved on (the merge rolled back).
            UnavailableError: a merge of the range is running, or the outcome is unknown.
        """
        s = self.server
        src, tgt = s.groups.get(right_id), s.groups.get(left_id)
        if src is None or not src.initialized or tgt is None or not tgt.initialized:
            gone = [r for r in (left_id, right_id) if s.tombs.merged(r)]
            if gone:
                raise BadInputError(f"range {gone[0]} was merged away")
            meta_leads = s.groups[META_RANGE_ID].node.is_leader
            if not meta_leads or all(
                META_RANGE_ID < r < s.meta.next_id for r in (left_id, right_id)
            ):
                # allocated but not applied here yet (a split in flight, a node catching
                # up), or this node's metadata replica may lag: another node may know
                raise UnavailableError(
                    f"ranges {left_id} and {right_id} are not both on node {s.config.id} yet",
                    retry_after=0.1,
                )
            raise BadInputError(f"no data ranges {left_id} and {right_id} here")
        sd, td = src.desc, tgt.desc
        if td.end is None or td.end != sd.start:
            raise BadInputError(f"ranges {left_id} and {right_id} are not neighbours (left, right)")
        if sorted(sd.replicas) != sorted(td.replicas):
            raise BadInputError(f"ranges {left_id} and {right_id} have different replicas")
        if not src.node.is_leader:
            raise src.node.not_leader_error()
        assert isinstance(src.fsm, RangeStateMachine) and isinstance(tgt.fsm, RangeStateMachine)
        if src.fsm.merging is None:
            wait = self._cooldown(left_id, right_id)
            if wait > 0:
                raise ConflictError(
                    f"ranges {left_id}/{right_id} split or merged recently; merges wait "
                    f"{s.config.merge_after_split:g} s after that ({wait:.1f} s left)"
                )
            if tgt.fsm.merging is not None:
                raise UnavailableError(f"range {left_id} is being merged", retry_after=0.2)
            if tgt.node.is_leader:
                await tgt.node.read_barrier(s.config.request_timeout)
            res = await s._propose(
                src, encode_merge(PrepareMerge(left_id, tgt.desc.epoch.version, sd.epoch.version))
            )
            assert isinstance(res, MergeResult)
            if not res.ok:
                raise EpochNotMatchError(
                    right_id, (sd.epoch.conf_ver, sd.epoch.version), ranges=s.local_descriptors()
                )
            s.log.info("merge_prepared", source=right_id, target=left_id)
        elif src.fsm.merging[0] != left_id:
            raise UnavailableError(f"range {right_id} is being merged into another range")
        return await self.finish(src)

    async def finish(self, src: Group) -> RangeDescriptor:
        """Commit the merge of frozen range ``src`` into its target (or roll it back if
        the target refuses for good); the merged descriptor.

        Raises:
            ConflictError: the target refused (the merge was rolled back).
            UnavailableError: a commit of this range is running, or no target leader.
        """
        rid = src.range_id
        if rid in self._finishing:
            raise UnavailableError(f"a merge of range {rid} is running", retry_after=0.2)
        self._finishing.add(rid)
        try:
            fsm = src.fsm
            assert isinstance(fsm, RangeStateMachine) and fsm.merging is not None
            if not src.node.is_leader:
                raise src.node.not_leader_error()
            target_id, target_version = fsm.merging
            cmd = CommitMerge(fsm.desc, fsm.snapshot(), target_version)
            status, desc = await self.commit(target_id, cmd)
            if status == "ok" and desc is not None:
                self.merges += 1
                with contextlib.suppress(DsysError):  # the reporter repairs a lost report
                    await self.server.meta_call({"op": "report", "ranges": [desc.to_plain()]})
                return desc
            if status in ("epoch_not_match", "bad_merge") and self.server.groups.get(rid) is src:
                # a refused commit can never succeed later (the target's version only
                # grows, and a commit it took would be in its absorbed set): unfreeze
                back = await self.server._propose(
                    src, encode_merge(RollbackMerge(fsm.desc.epoch.version))
                )
                self.server.log.info(
                    "merge_rolled_back", source=rid, target=target_id, why=status, ok=back
                )
                raise ConflictError(
                    f"range {target_id} refused the merge of range {rid} ({status}); "
                    "the merge was rolled back"
                )
            raise UnavailableError(f"merge commit of range {rid} answered {status!r}")
        finally:
            self._finishing.discard(rid)

    async def commit(self, target_id: int, cmd: CommitMerge) -> tuple[str, RangeDescriptor | None]:
        """Propose ``cmd`` in range ``target_id``'s log, here or on its leader:
        ``(status, merged descriptor)``.

        Raises:
            UnavailableError: no leader of the target is known or reachable.
        """
        s = self.server
        tgt = s.groups.get(target_id)
        if tgt is not None and tgt.node.is_leader:
            res = await s._propose(tgt, encode_merge(cmd))
            assert isinstance(res, MergeResult)
            return res.status, res.desc if res.ok else None
        leader = tgt.node.leader_id if tgt is not None else None
        addr = s.nodes.get(leader) if leader else None
        if addr is None:
            raise UnavailableError(f"no leader of range {target_id} known", retry_after=0.2)
        headers = {TOKEN_HEADER: s.config.token} if s.config.token else {}
        try:
            async with (
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=s.config.request_timeout)
                ) as http,
                http.post(
                    f"http://{addr}/v1/ranges/{target_id}/merge/commit",
                    data=encode_merge(cmd),
                    headers=headers,
                ) as r,
            ):
                data = await r.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, json.JSONDecodeError) as exc:
            raise UnavailableError(f"leader of range {target_id} unreachable: {exc}") from None
        if r.status != 200 or not isinstance(data, dict):
            raise UnavailableError(f"merge commit on {leader} failed: {r.status} {data}")
        desc = RangeDescriptor.from_plain(data["desc"]) if data.get("desc") else None
        return str(data.get("status")), desc

    # -- HTTP -----------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """``POST /v1/ranges/merge?left=L&right=R`` and the internal commit endpoint."""
        app.router.add_post("/v1/ranges/merge", self.handle_merge)
        app.router.add_post("/v1/ranges/{id}/merge/commit", self.handle_commit)

    def _check_token(self, request: web.Request) -> None:
        if not token_ok(request.headers.get(TOKEN_HEADER), self.server.config.token):
            raise web.HTTPForbidden(text="admin endpoints need the cluster token")

    async def handle_merge(self, request: web.Request) -> web.Response:
        """``POST /v1/ranges/merge?left=L&right=R`` on R's leader: the merged range."""
        self._check_token(request)
        ids = []
        for name in ("left", "right"):
            try:
                ids.append(int(request.query.get(name, "")))
            except ValueError:
                raise BadInputError(f"{name} must be a range id") from None
        merged = await self.merge(ids[0], ids[1])
        return web.json_response({"merged": merged.to_plain()})

    async def handle_commit(self, request: web.Request) -> web.Response:
        """``POST /v1/ranges/{id}/merge/commit`` (between nodes): propose a CommitMerge
        in range ``id``'s log on its leader; ``{"status", "desc"}``."""
        self._check_token(request)
        try:
            rid = int(request.match_info["id"])
        except ValueError:
            raise BadInputError("range id must be an integer") from None
        cmd = decode_merge(await request.read())
        if not isinstance(cmd, CommitMerge):
            raise BadInputError("the body must be an encoded CommitMerge")
        g = self.server.groups.get(rid)
        if g is None or not g.initialized:
            raise BadInputError(f"no data range {rid} here")
        if not g.node.is_leader:
            raise g.node.not_leader_error()
        res = await self.server._propose(g, encode_merge(cmd))
        assert isinstance(res, MergeResult)
        desc = res.desc.to_plain() if res.ok and res.desc is not None else None
        return web.json_response({"status": res.status, "desc": desc})

    # -- upkeep ---------------------------------------------------------------------------

    async def upkeep(self) -> None:
        """One round: finish merges left frozen, remove merged-away replicas, split one
        hot range by load, merge one pair of cold neighbours."""
        now = time.monotonic()
        for g in self.server.data_groups():
            if self.frozen(g) and g.node.is_leader and g.range_id not in self._finishing:
                with contextlib.suppress(DsysError):
                    await self.finish(g)
        self._remove_merged_away()
        if await self._split_by_load(now):
            return
        await self._merge_cold(now)

    def _remove_merged_away(self) -> None:
        """Remove local replicas the metadata range shows were merged away (a node that
        was down during a merge, or caught the target up from a snapshot)."""
        local = [g.desc for g in self.server.data_groups()]
        for rid in merged_away(local, self.server.meta.map):
            self.server.log.info("stale_replica_removed", range_id=rid)
            self.remove(rid)

    async def _split_by_load(self, now: float) -> bool:
        limit = self.server.config.split_qps
        if limit is None:
            return False
        for g in self.server.data_groups():
            load = self.loads.get(g.range_id)
            if load is None or not g.node.is_leader or self.frozen(g):
                continue
            qps = load.qps(now)
            if qps <= limit:
                continue
            at = load.split_key(g.desc)
            if at is None:
                continue
            self.server.log.info("split_by_load", range_id=g.range_id, qps=round(qps), at=at)
            load.reset()
            self.load_splits += 1
            await self.server.split(g.range_id, at)
            return True
        return False

    def _write_rate(self, g: Group, now: float) -> float:
        """Entries applied per second by the local replica over the load window (every
        replica sees the writes, the leader or not)."""
        q = self._applied.setdefault(g.range_id, deque())
        q.append((now, g.node.applied_index))
        while len(q) > 2 and now - q[1][0] >= self._window:
            q.popleft()
        (t0, i0), (t1, i1) = q[0], q[-1]
        return (i1 - i0) / (t1 - t0) if t1 > t0 else 0.0

    async def _merge_cold(self, now: float) -> None:
        cfg = self.server.config
        if cfg.merge_keys is None:
            return
        groups = self.server.data_groups()
        stats: dict[int, RangeStats] = {}
        for g in groups:
            assert isinstance(g.fsm, RangeStateMachine)
            load = self.loads.get(g.range_id)
            qps = max(self._write_rate(g, now), load.qps(now) if load is not None else 0.0)
            cold = len(g.fsm) < cfg.merge_keys and qps < cfg.merge_qps
            since = self._cold_since.setdefault(g.range_id, now) if cold else None
            if not cold:
                self._cold_since.pop(g.range_id, None)
            stats[g.range_id] = RangeStats(
                keys=len(g.fsm),
                qps=qps,
                cold_since=since,
                changed_at=self._changed_at.get(g.range_id, self._started),
                frozen=self.frozen(g),
            )
        leads = [g.range_id for g in groups if g.node.is_leader]
        pair = plan_merge(
            [g.desc for g in groups],
            stats,
            leads,
            now,
            cold_for=cfg.merge_cold_for,
            after_split=cfg.merge_after_split,
            # never merge what would split again by size at once (no flapping)
            max_keys=min(cfg.merge_keys, cfg.split_keys // 2) if cfg.split_keys else cfg.merge_keys,
        )
        if pair is None:
            return
        self.server.log.info("merge_cold", left=pair[0], right=pair[1])
        await self.merge(*pair)


__all__ = ["RangeUpkeep"]
