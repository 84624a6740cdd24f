"""State machines of multi-Raft ranges (pure: no I/O, no clock, no asyncio).

Theory of operation
-------------------
A data range's replicas apply the KV commands of :mod:`dsys.kv.fsm` through a
:class:`RangeStateMachine`, a :class:`~dsys.kv.fsm.KVStateMachine` that also knows its
:class:`~dsys.kv.ranges.RangeDescriptor`:

* A put or delete of a key outside the descriptor is refused *at apply time* with status
  ``"key_not_in_range"`` (the server turns it into
  :class:`~dsys.errors.KeyNotInRangeError`). The server checks the owner before it
  proposes too, but a split may commit between the proposal and its entry; refusing in
  the log makes the outcome the same on every replica.
* A :class:`Split` is a command in the range's own log. Applying it at index *i* (the
  same on every replica) cuts the state in two: keys ``>= at`` leave this range, which
  keeps ``[start, at)``; the descriptor's ``version`` bumps. The right half becomes the
  initial state (a snapshot) of the new range, handed to ``on_split`` so the host starts
  the new Raft group from it on the same replicas. The new range starts with the parent's
  revision counter, replicated clock and exactly-once sessions, so a key's revisions keep
  growing and a retried write that committed before the split answers its first result.
  A split with a stale ``version`` or a key not strictly inside is a replicated no-op.
* A merge of a *source* range into its left neighbour, the *target* (TiKV's
  PrepareMerge/CommitMerge, simplified): :class:`PrepareMerge` in the source's log bumps
  its ``version`` and freezes it (every later command is refused, so its state is final
  at that index on every replica); :class:`CommitMerge` in the target's log carries that
  final state (a snapshot) and the target's expected ``version``; applying it at index
  *j* (the same on every replica) absorbs the source's keys, revision, clock and
  sessions, and sets ``version = max + 1``. ``on_merge`` then tells the host to stop the
  source's group. The target keeps its own change history (its watchers go on) and
  records that the source's span has no events up to the source's revision here (a
  ``floor`` span record, :mod:`dsys.kv.multiwatch`). A commit the target refuses (its
  ``version`` moved on) can never succeed later, so the source may then
  :class:`RollbackMerge` and take writes again.
* A committed Raft configuration entry (a replica added as learner, promoted, or
  removed) reaches :meth:`RangeStateMachine.apply_conf`: the descriptor's replicas
  become the configuration's voters and learners, and ``conf_ver`` bumps (every step of
  a replica move, as TiKV's ``ConfChange``). The descriptor travels in every snapshot, so
  a replica caught up from a snapshot learns its bounds and epoch from it.

The metadata range (range 0) applies :class:`MetaStateMachine` commands: the
:class:`~dsys.kv.ranges.RangeMap` of every range (updated from the ranges' own reports,
which :meth:`~dsys.kv.ranges.RangeMap.apply_report` guards by epoch) and the allocator
of range ids.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import msgpack
from sortedcontainers import SortedDict

from dsys.codec import decode, encode
from dsys.errors import RemoteProtocolError
from dsys.kv.fsm import SNAPSHOT_MAX_BYTES, KVStateMachine, Result, Sessions
from dsys.kv.multiwatch import FLOOR, ORIGIN, OUT, SpanRecord
from dsys.kv.ranges import FIRST_RANGE_ID, Epoch, RangeDescriptor, RangeMap, split_descriptor
from dsys.raft.messages import ConfState

_SPLIT = 10
_PREPARE_MERGE = 11
_COMMIT_MERGE = 12
_ROLLBACK_MERGE = 13
_REPORT = 20
_ALLOC = 21

MAX_SPAN_RECORDS = 256
"""Span records a range keeps for watchers (:mod:`dsys.kv.multiwatch`); older ones are
forgotten and ``records_floor`` rises to their revision."""

SPLIT_INIT_INDEX = 5
"""Log index (and term) at which a range made by a split starts on every replica.

As TiKV's ``RAFT_INIT_LOG_INDEX``: every replica of the new range starts from the same
snapshot at this index, so their logs agree from the first entry on."""


@dataclass(frozen=True, slots=True)
class Split:
    """Split the range at ``at_key`` into a new range ``new_range_id`` (the right half),
    if its epoch ``version`` is still ``expect_version``."""

    at_key: str
    new_range_id: int
    expect_version: int


@dataclass(frozen=True, slots=True)
class SplitResult:
    """The outcome of a :class:`Split` (``left``/``right`` set when ``ok``).

    Attributes:
        ok: the range was split.
        status: ``"ok"``, ``"epoch_not_match"``, ``"bad_split"`` (key not inside, id
            in use) or ``"conf_change_in_progress"`` (the range has learners).
        left: this range after the split.
        right: the new range.
    """

    ok: bool
    status: str
    left: RangeDescriptor | None = None
    right: RangeDescriptor | None = None


def encode_split(cmd: Split) -> bytes:
    """The log entry data of a split."""
    return encode([_SPLIT, cmd.at_key, cmd.new_range_id, cmd.expect_version])


def _decode_split(data: bytes) -> Split | None:
    try:
        v = decode(data)
    except RemoteProtocolError:
        return None
    if (
        isinstance(v, list)
        and len(v) == 4
        and type(v[1]) is str
        and type(v[2]) is int
        and type(v[3]) is int
    ):
        return Split(v[1], v[2], v[3])
    return None


SplitHook = Callable[[RangeDescriptor, RangeDescriptor, bytes], None]
"""``on_split(left, right, right_snapshot)``: called when a split was applied."""

ConfHook = Callable[[RangeDescriptor, ConfState], None]
"""``on_conf(desc, conf)``: called when a configuration entry was applied."""


def replicas_after(old: tuple[str, ...], conf: ConfState) -> tuple[str, ...]:
    """The replica list for ``conf``: ``old``'s members in their order, then new ones."""
    members = [*conf.voters, *conf.learners]
    kept = [r for r in old if r in members]
    return (*kept, *[m for m in members if m not in kept])


@dataclass(frozen=True, slots=True)
class PrepareMerge:
    """Freeze this range (the source) for a merge into its left neighbour
    ``target_id``, whose ``version`` is ``target_version``; only if this range's
    ``version`` is still ``expect_version``."""

    target_id: int
    target_version: int
    expect_version: int


@dataclass(frozen=True, slots=True)
class CommitMerge:
    """Absorb the frozen ``source`` range (its final ``state``, a snapshot) into this
    range (the target), if this range's ``version`` is still ``expect_version``."""

    source: RangeDescriptor
    state: bytes
    expect_version: int


@dataclass(frozen=True, slots=True)
class RollbackMerge:
    """Unfreeze this range (a source whose merge the target refused), if its
    ``version`` is still ``expect_version``."""

    expect_version: int


@dataclass(frozen=True, slots=True)
class MergeResult:
    """The outcome of a merge command.

    Attributes:
        ok: the command took effect (or had already: a repeated commit).
        status: ``"ok"``, ``"epoch_not_match"`` (the range's version moved on, or it is
            frozen by another merge), ``"bad_merge"`` (not neighbours, other replicas,
            not frozen, learners), ``"conf_change_in_progress"`` (a prepare on a range
            with learners) or ``"invalid"`` (undecodable).
        desc: this range after the command.
        source: the absorbed range (a commit).
    """

    ok: bool
    status: str
    desc: RangeDescriptor | None = None
    source: RangeDescriptor | None = None


def encode_merge(cmd: PrepareMerge | CommitMerge | RollbackMerge) -> bytes:
    """The log entry data of a merge command."""
    if isinstance(cmd, PrepareMerge):
        return encode([_PREPARE_MERGE, cmd.target_id, cmd.target_version, cmd.expect_version])
    if isinstance(cmd, CommitMerge):
        return encode(
            [_COMMIT_MERGE, cmd.source.to_plain(), cmd.state, cmd.expect_version],
            max_size=SNAPSHOT_MAX_BYTES,
        )
    return encode([_ROLLBACK_MERGE, cmd.expect_version, 0, 0])


def decode_merge(data: bytes) -> PrepareMerge | CommitMerge | RollbackMerge | None:
    """The merge command in ``data`` (None if it is not a well-formed one)."""
    try:
        v = decode(data, max_size=SNAPSHOT_MAX_BYTES)
    except RemoteProtocolError:
        return None
    if not isinstance(v, list) or len(v) != 4:
        return None
    tag, a, b, c = v
    if tag == _PREPARE_MERGE and type(a) is int and type(b) is int and type(c) is int:
        return PrepareMerge(a, b, c)
    if tag == _COMMIT_MERGE and type(b) is bytes and type(c) is int:
        try:
            return CommitMerge(RangeDescriptor.from_plain(a), b, c)
        except RemoteProtocolError:
            return None
    if tag == _ROLLBACK_MERGE and type(a) is int:
        return RollbackMerge(a)
    return None


MergeHook = Callable[[RangeDescriptor, RangeDescriptor], None]
"""``on_merge(merged, source)``: called on the target when a merge was committed."""


def merge_sessions(a: Sessions, b: Sessions) -> Sessions:
    """The exactly-once table of a merged range: both tables' clients and results
    (deterministic; trimmed to ``a``'s bounds as :class:`~dsys.kv.fsm.Sessions` trims)."""
    clients: dict[str, list[Any]] = {}
    for cid, at, floor, items in [*a.to_plain(), *b.to_plain()]:
        old = clients.get(cid)
        if old is None:
            clients[cid] = [at, floor, dict(_pairs(items))]
        else:
            old[0], old[1] = max(old[0], at), max(old[1], floor)
            old[2].update(_pairs(items))
    per_client = a.per_client
    plain = []
    for cid in sorted(clients):
        at, floor, results = clients[cid]
        seqs = sorted(s for s in results if s >= floor)
        if len(seqs) > per_client:
            floor = max(floor, seqs[-per_client])
            seqs = seqs[-per_client:]
        plain.append([cid, at, floor, [[s, results[s]] for s in seqs]])
    while len(plain) > a.max_clients:  # forget the least recently active, as Sessions does
        plain.remove(min(plain, key=lambda c: (c[1], c[0])))
    out = Sessions(max_clients=a.max_clients, per_client=per_client)
    out.load_plain(plain)
    return out


def _pairs(items: Any) -> OrderedDict[int, Any]:
    # [[seq, result_plain], ...] of one session as seq -> result_plain
    return OrderedDict((int(s), r) for s, r in items)


class RangeStateMachine(KVStateMachine):
    """A :class:`~dsys.kv.fsm.KVStateMachine` holding only the keys of one range.

    Args:
        desc: the range's descriptor (a restored snapshot replaces it).
        initialized: False for a replica created empty, waiting for its first snapshot
            from the range's leader (its ``desc`` is a placeholder until then).
        **kw: passed to :class:`~dsys.kv.fsm.KVStateMachine`.
    """

    def __init__(self, desc: RangeDescriptor, *, initialized: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.desc = desc
        self.initialized = initialized
        """Whether ``desc`` is real (the state came from a split or a snapshot)."""
        self.on_split: SplitHook | None = None
        """Set by the host: start the new range's group from the right half's snapshot."""
        self.learners: tuple[str, ...] = ()
        """The replicas of ``desc`` that are Raft learners (catching up, not voting)."""
        self.on_conf: ConfHook | None = None
        """Set by the host: learn of replica changes (e.g. that this replica was removed)."""
        self._kw = kw
        self.merging: tuple[int, int] | None = None
        """``(target_id, target_version)`` while this range is frozen by a PrepareMerge."""
        self.absorbed: set[int] = set()
        """Ids of the ranges merged into this one (a repeated commit is answered ok)."""
        self.on_merge: MergeHook | None = None
        """Set by the host: stop the source's group once a merge was committed here."""
        self.span_records: list[SpanRecord] = []
        """Where spans' events live around splits and merges (for watchers), in order."""
        self.records_floor = 0
        """Span records up to this revision were forgotten (bounded list)."""

    def _record(self, rec: SpanRecord) -> None:
        self.span_records.append(rec)
        if len(self.span_records) > MAX_SPAN_RECORDS:
            gone = self.span_records.pop(0)
            self.records_floor = max(self.records_floor, gone.revision)

    def size_bytes(self) -> int:
        """Bytes of the keys and values this replica holds (O(keys): for metrics)."""
        return sum(len(k) + len(kv.value) for k, kv in self._data.items())

    def split_key(self) -> str | None:
        """A key to split this range at so both halves hold about half of its keys
        (None when it holds fewer than two keys)."""
        keys = self._data.keys()
        if len(keys) < 2:
            return None
        at: str = keys[len(keys) // 2]
        return at if at > self.desc.start else None

    # -- commands ---------------------------------------------------------------------

    def apply(self, data: bytes) -> Any:
        """Apply one committed command: a KV command or a :class:`Split`."""
        # a split is a 4-element msgpack list starting with 10; a KV command never is
        if len(data) > 2 and data[0] == 0x94 and data[1] == _SPLIT:
            cmd = _decode_split(data)
            if cmd is None:
                return Result(ok=False, revision=self.revision, status="invalid")
            return self.apply_split(cmd)
        if len(data) > 2 and data[0] == 0x94 and _PREPARE_MERGE <= data[1] <= _ROLLBACK_MERGE:
            return self.apply_merge(decode_merge(data))
        if self.merging is not None:  # frozen: the state is final until a rollback
            return Result(ok=False, revision=self.revision, status="key_not_in_range")
        return super().apply(data)

    def apply_command(self, cmd: Any) -> Result:
        """Apply one decoded KV command (refused while the range is frozen by a merge)."""
        if self.merging is not None:
            return Result(ok=False, revision=self.revision, status="key_not_in_range")
        return super().apply_command(cmd)

    def apply_merge(self, cmd: PrepareMerge | CommitMerge | RollbackMerge | None) -> MergeResult:
        """Apply a merge command (see the module docstring); deterministic on every replica."""
        desc = self.desc
        if isinstance(cmd, PrepareMerge):
            if self.merging is not None or cmd.expect_version != desc.epoch.version:
                return MergeResult(False, "epoch_not_match", desc)
            if self.learners:  # merge once the replica change is over
                return MergeResult(False, "conf_change_in_progress", desc)
            self.desc = replace(desc, epoch=Epoch(desc.epoch.conf_ver, desc.epoch.version + 1))
            self.merging = (cmd.target_id, cmd.target_version)
            return MergeResult(True, "ok", self.desc)
        if isinstance(cmd, RollbackMerge):
            if self.merging is None or cmd.expect_version != desc.epoch.version:
                return MergeResult(False, "epoch_not_match", desc)
            self.desc = replace(desc, epoch=Epoch(desc.epoch.conf_ver, desc.epoch.version + 1))
            self.merging = None
            return MergeResult(True, "ok", self.desc)
        if isinstance(cmd, CommitMerge):
            return self._commit_merge(cmd)
        return MergeResult(False, "invalid", desc)

    def _commit_merge(self, cmd: CommitMerge) -> MergeResult:
        desc, src = self.desc, cmd.source
        if src.range_id in self.absorbed:
            return MergeResult(True, "ok", desc, src)  # a repeated commit
        if self.merging is not None or cmd.expect_version != desc.epoch.version:
            return MergeResult(False, "epoch_not_match", desc)
        if (
            desc.end is None
            or desc.end != src.start
            or src.range_id == desc.range_id
            or sorted(src.replicas) != sorted(desc.replicas)
        ):
            return MergeResult(False, "bad_merge", desc)
        other = RangeStateMachine(src, **self._kw)
        try:
            other.restore(cmd.state)
        except RemoteProtocolError:
            return MergeResult(False, "invalid", desc)
        if other.desc != src or other.merging is None or other.learners or self.learners:
            return MergeResult(False, "bad_merge", desc)
        for key, kv in other._data.items():
            self._data[key] = kv
            if kv.expires_ms:
                self._ttl[(kv.expires_ms, key)] = None
        self.sessions = merge_sessions(self.sessions, other.sessions)
        self.revision = max(self.revision, other.revision)
        self.clock_ms = max(self.clock_ms, other.clock_ms)
        # this range's own history stays (its watchers go on); the source's history is
        # not carried: its span's events up to the source's revision are not here
        self._record(SpanRecord(FLOOR, src.start, src.end, other.revision, src.range_id))
        merged = replace(
            desc,
            end=src.end,
            epoch=Epoch(
                max(desc.epoch.conf_ver, src.epoch.conf_ver),
                max(desc.epoch.version, src.epoch.version) + 1,
            ),
        )
        self.desc = merged
        self.absorbed |= {src.range_id, *other.absorbed}
        if self.on_merge is not None:
            self.on_merge(merged, src)
        return MergeResult(True, "ok", merged, src)

    def _apply_put(
        self,
        key: str,
        value: bytes,
        if_revision: int | None,
        ttl_ms: int,
        now_ms: int,
        client_id: str,
        seq: int,
    ) -> Result:
        if not self.desc.contains(key):
            return Result(ok=False, revision=self.revision, status="key_not_in_range")
        return super()._apply_put(key, value, if_revision, ttl_ms, now_ms, client_id, seq)

    def _delete(self, cmd: Any) -> Result:
        if not self.desc.contains(cmd.key):
            return Result(ok=False, revision=self.revision, status="key_not_in_range")
        return super()._delete(cmd)

    def apply_split(self, cmd: Split) -> SplitResult:
        """Apply a split (see the module docstring); deterministic on every replica."""
        desc = self.desc
        if cmd.expect_version != desc.epoch.version or self.merging is not None:
            return SplitResult(False, "epoch_not_match", desc)
        if self.learners:
            # the new range would start with the learners as voters: split once the
            # replica change is over (a replicated decision, the same on every replica)
            return SplitResult(False, "conf_change_in_progress", desc)
        at = cmd.at_key
        if (
            not (desc.start < at and (desc.end is None or at < desc.end))
            or cmd.new_range_id == desc.range_id
        ):
            return SplitResult(False, "bad_split", desc)
        left, right = split_descriptor(desc, at, cmd.new_range_id)
        child = RangeStateMachine(right, **self._kw)
        moved = list(self._data.irange(minimum=at))
        child_data: SortedDict = SortedDict()
        for key in moved:
            kv = self._data.pop(key)
            child_data[key] = kv
            if kv.expires_ms:
                self._ttl.pop((kv.expires_ms, key), None)
                child._ttl[(kv.expires_ms, key)] = None
        child._data = child_data
        child.revision = self.revision
        child.clock_ms = self.clock_ms
        child.compacted_revision = self.revision
        # watchers: the right half's events up to here are in this range, later ones there
        child._record(SpanRecord(ORIGIN, at, desc.end, self.revision, desc.range_id))
        self._record(SpanRecord(OUT, at, desc.end, self.revision, cmd.new_range_id))
        child.sessions = Sessions(
            max_clients=self.sessions.max_clients, per_client=self.sessions.per_client
        )
        child.sessions.load_plain(self.sessions.to_plain())
        self.desc = left
        if self.on_split is not None:
            self.on_split(left, right, child.snapshot())
        return SplitResult(True, "ok", left, right)

    def apply_conf(self, conf: ConfState, index: int) -> None:
        """A committed configuration entry: the replicas follow it, ``conf_ver`` bumps."""
        desc = self.desc
        self.desc = replace(
            desc,
            replicas=replicas_after(desc.replicas, conf),
            epoch=Epoch(desc.epoch.conf_ver + 1, desc.epoch.version),
        )
        self.learners = tuple(conf.learners)
        if self.on_conf is not None:
            self.on_conf(self.desc, conf)

    # -- snapshots --------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The KV snapshot with the descriptor in front, then the merge state, the
        learners and the span records: ``[descriptor, kv, [merging, absorbed], learners,
        [records, records_floor]]``."""
        merge = [list(self.merging) if self.merging else None, sorted(self.absorbed)]
        spans = [[r.to_plain() for r in self.span_records], self.records_floor]
        return encode(
            [self.desc.to_plain(), super().snapshot(), merge, list(self.learners), spans],
            max_size=SNAPSHOT_MAX_BYTES,
        )

    def restore(self, data: bytes) -> None:
        """Replace the state (and the descriptor) by a :meth:`snapshot`.

        Raises:
            RemoteProtocolError: the snapshot is malformed.
        """
        v = decode(data, max_size=SNAPSHOT_MAX_BYTES)
        if not isinstance(v, list) or len(v) not in (2, 3, 4, 5) or type(v[1]) is not bytes:
            raise RemoteProtocolError("malformed range snapshot")
        learners = v[3] if len(v) >= 4 else []
        if not isinstance(learners, list) or not all(type(x) is str for x in learners):
            raise RemoteProtocolError("malformed range snapshot: learners")
        desc = RangeDescriptor.from_plain(v[0])
        merging, absorbed = _merge_state(v[2] if len(v) >= 3 and v[2] is not None else None)
        records, records_floor = _span_records(v[4] if len(v) == 5 else None)
        super().restore(v[1])
        self.desc = desc
        self.merging, self.absorbed = merging, absorbed
        self.span_records, self.records_floor = records, records_floor
        self.learners = tuple(learners)
        self.initialized = True


def snapshot_descriptor(data: bytes) -> RangeDescriptor | None:
    """The descriptor at the front of a :meth:`RangeStateMachine.snapshot`, read without
    decoding the rest (None if ``data`` is not a range snapshot)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    try:
        if unpacker.read_array_header() < 2:
            return None
        return RangeDescriptor.from_plain(unpacker.unpack())
    except (ValueError, msgpack.UnpackException, RemoteProtocolError):
        return None


def _merge_state(v: Any) -> tuple[tuple[int, int] | None, set[int]]:
    """``(merging, absorbed)`` of a range snapshot's third element (None: no merge state)."""
    if v is None:
        return None, set()
    if (
        not isinstance(v, list)
        or len(v) != 2
        or not isinstance(v[1], list)
        or not all(type(x) is int for x in v[1])
    ):
        raise RemoteProtocolError("malformed merge state in a range snapshot")
    m = v[0]
    if m is None:
        return None, set(v[1])
    if not isinstance(m, list) or len(m) != 2 or not all(type(x) is int for x in m):
        raise RemoteProtocolError("malformed merge state in a range snapshot")
    return (m[0], m[1]), set(v[1])


def _span_records(v: Any) -> tuple[list[SpanRecord], int]:
    """``(records, records_floor)`` of a range snapshot's fifth element."""
    if v is None:
        return [], 0
    if (
        not isinstance(v, list)
        or len(v) != 2
        or not isinstance(v[0], list)
        or type(v[1]) is not int
    ):
        raise RemoteProtocolError("malformed span records in a range snapshot")
    try:
        return [SpanRecord.from_plain(r) for r in v[0]], v[1]
    except ValueError as exc:
        raise RemoteProtocolError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Report:
    """Descriptors a range reports after it changed itself (e.g. both halves of a split)."""

    ranges: tuple[RangeDescriptor, ...]


@dataclass(frozen=True, slots=True)
class AllocId:
    """Allocate a new, never used range id (the command's result)."""


def encode_meta(cmd: Report | AllocId) -> bytes:
    """The log entry data of a metadata command."""
    if isinstance(cmd, AllocId):
        return encode([_ALLOC])
    return encode([_REPORT, [r.to_plain() for r in cmd.ranges]])


class MetaStateMachine:
    """The metadata range's state: the range map and the range-id allocator.

    Args:
        replicas: replicas of the first range of a new cluster.
    """

    def __init__(self, replicas: tuple[str, ...]) -> None:
        self.map = RangeMap(replicas=replicas)
        self.next_id = FIRST_RANGE_ID + 1

    def apply(self, data: bytes) -> object:
        """Apply a :class:`Report` (returns whether the map changed) or an
        :class:`AllocId` (returns the id); anything else is a no-op returning None."""
        try:
            v = decode(data)
        except RemoteProtocolError:
            return None
        if isinstance(v, list) and v == [_ALLOC]:
            rid = self.next_id
            self.next_id += 1
            return rid
        if isinstance(v, list) and len(v) == 2 and v[0] == _REPORT and isinstance(v[1], list):
            try:
                descs = [RangeDescriptor.from_plain(r) for r in v[1]]
            except RemoteProtocolError:
                return False
            changed = False
            # each contiguous run is applied on its own (a node reports all its ranges)
            for run in contiguous_runs(descs):
                changed = self.map.apply_report(run) or changed
            for d in descs:  # ids in use are never allocated again
                self.next_id = max(self.next_id, d.range_id + 1)
            return changed
        return None

    def snapshot(self) -> bytes:
        """The map and the allocator as msgpack."""
        return encode({"map": self.map.to_plain(), "next_id": self.next_id})

    def restore(self, data: bytes) -> None:
        """Replace the state by a :meth:`snapshot`.

        Raises:
            RemoteProtocolError: malformed.
        """
        v = decode(data)
        if not isinstance(v, dict) or type(v.get("next_id")) is not int:
            raise RemoteProtocolError("malformed metadata snapshot")
        self.map = RangeMap.from_plain(v.get("map"))
        self.next_id = v["next_id"]


def contiguous_runs(descs: list[RangeDescriptor]) -> list[list[RangeDescriptor]]:
    """``descs`` sorted by start and cut where one does not end where the next starts."""
    out: list[list[RangeDescriptor]] = []
    for d in sorted(descs, key=lambda d: d.start):
        if out and out[-1][-1].end == d.start:
            out[-1].append(d)
        else:
            out.append([d])
    return out


__all__ = [
    "SPLIT_INIT_INDEX",
    "AllocId",
    "CommitMerge",
    "ConfHook",
    "MergeHook",
    "MergeResult",
    "MetaStateMachine",
    "PrepareMerge",
    "RangeStateMachine",
    "Report",
    "RollbackMerge",
    "Split",
    "SplitHook",
    "SplitResult",
    "contiguous_runs",
    "decode_merge",
    "encode_merge",
    "encode_meta",
    "encode_split",
    "merge_sessions",
    "replicas_after",
    "snapshot_descriptor",
]
