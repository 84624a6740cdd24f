"""The merge commands of the range state machine and the load tracker (pure)."""

from __future__ import annotations

import dataclasses
import random

from dsys.kv.fsm import Delete, Put, Tick, encode_command
from dsys.kv.rangefsm import (
    CommitMerge,
    MergeResult,
    PrepareMerge,
    RangeStateMachine,
    RollbackMerge,
    Split,
    encode_merge,
    encode_split,
)
from dsys.kv.rangeload import RangeLoad, RangeStats, median_split_key, merged_away, plan_merge
from dsys.kv.ranges import Epoch, RangeDescriptor, RangeMap

REPLICAS = ("n1", "n2", "n3")


def _put(key: str, value: bytes, cid: str = "", seq: int = 0) -> bytes:
    return encode_command(Put(key=key, value=value, now_ms=1000, client_id=cid, seq=seq))


def _two_ranges() -> tuple[RangeStateMachine, RangeStateMachine]:
    whole = RangeStateMachine(RangeDescriptor(range_id=1, start="", end=None, replicas=REPLICAS))
    right: list[bytes] = []
    whole.on_split = lambda left, r, state: right.append(state)
    for k in ["a", "b", "m", "x"]:
        whole.apply(_put(k, k.encode(), cid="c1", seq=ord(k)))
    whole.apply(encode_split(Split("m", 2, 1)))
    r = RangeStateMachine(RangeDescriptor(range_id=2, start="m", end=None))
    r.restore(right[0])
    return whole, r


def _merge(left: RangeStateMachine, right: RangeStateMachine) -> MergeResult:
    prep = right.apply(encode_merge(PrepareMerge(1, left.desc.epoch.version, 2)))
    assert isinstance(prep, MergeResult) and prep.ok
    cmd = CommitMerge(right.desc, right.snapshot(), left.desc.epoch.version)
    res = left.apply(encode_merge(cmd))
    assert isinstance(res, MergeResult)
    return res


def test_prepare_freezes_the_source_and_commit_absorbs_it() -> None:
    left, right = _two_ranges()
    right.apply(_put("y", b"y"))
    prep = right.apply(encode_merge(PrepareMerge(1, left.desc.epoch.version, 2)))
    assert isinstance(prep, MergeResult) and prep.ok and right.desc.epoch == Epoch(1, 3)
    # frozen: writes, deletes, ticks and splits are refused, the state does not move
    before = right.snapshot()
    assert right.apply(_put("z", b"z")).status == "key_not_in_range"
    assert right.apply(encode_command(Delete(key="x", now_ms=5))).status == "key_not_in_range"
    right.apply(encode_command(Tick(now_ms=10**9)))
    assert not right.apply(encode_split(Split("y", 3, 3))).ok
    assert right.snapshot() == before
    merged: list[tuple[RangeDescriptor, RangeDescriptor]] = []
    left.on_merge = lambda m, s: merged.append((m, s))
    res = left.apply(encode_merge(CommitMerge(right.desc, right.snapshot(), 2)))
    assert isinstance(res, MergeResult) and res.ok, res
    assert res.desc == RangeDescriptor(
        range_id=1, start="", end=None, epoch=Epoch(1, 4), replicas=REPLICAS
    )
    assert merged == [(res.desc, right.desc)]
    assert [left.get(k) is not None for k in "abmxy"] == [True] * 5
    # revisions keep growing per key; sessions came along (a retried write answers its
    # first result instead of applying twice)
    assert left.revision == max(left.revision, right.revision)
    again = left.apply(_put("m", b"other", cid="c1", seq=ord("m")))
    assert again.ok and left.get("m").value == b"m"  # type: ignore[union-attr]
    assert left.apply(_put("q", b"q")).revision == right.revision + 1
    # a repeated commit is answered ok and changes nothing
    rep = left.apply(encode_merge(CommitMerge(right.desc, right.snapshot(), 2)))
    assert isinstance(rep, MergeResult) and rep.ok and left.desc == res.desc
    # the merged state survives a snapshot, absorbed ids included
    copy = RangeStateMachine(RangeDescriptor(range_id=1, start="", end=None))
    copy.restore(left.snapshot())
    assert copy.desc == left.desc and copy.absorbed == {2} and copy.merging is None


def test_commit_refused_when_the_target_moved_on_then_rollback() -> None:
    left, right = _two_ranges()
    prep = right.apply(encode_merge(PrepareMerge(1, left.desc.epoch.version, 2)))
    assert isinstance(prep, MergeResult) and prep.ok
    left.apply(encode_split(Split("c", 9, left.desc.epoch.version)))  # the target changed
    res = left.apply(encode_merge(CommitMerge(right.desc, right.snapshot(), 2)))
    assert isinstance(res, MergeResult) and res.status == "epoch_not_match"
    assert left.desc.end == "c" and left.get("m") is None
    back = right.apply(encode_merge(RollbackMerge(right.desc.epoch.version)))
    assert isinstance(back, MergeResult) and back.ok and right.merging is None
    assert right.desc.epoch == Epoch(1, 4)
    assert right.apply(_put("z", b"z")).ok


def test_commit_refuses_a_non_neighbour_or_an_unfrozen_source() -> None:
    left, right = _two_ranges()
    # not frozen: the state is not final
    res = left.apply(encode_merge(CommitMerge(right.desc, right.snapshot(), 2)))
    assert isinstance(res, MergeResult) and res.status == "bad_merge"
    far = RangeDescriptor(range_id=7, start="q", end=None, replicas=REPLICAS)
    res = left.apply(encode_merge(CommitMerge(far, right.snapshot(), 2)))
    assert isinstance(res, MergeResult) and res.status == "bad_merge"
    res = left.apply(b"\x94\x0c\x01\x02\x03")  # a merge tag, garbage after it
    assert isinstance(res, MergeResult) and res.status == "invalid"
    assert _merge(left, right).ok


def test_median_split_key_shares_the_load() -> None:
    desc = RangeDescriptor(range_id=1, start="k", end="l")
    load = RangeLoad(window=10.0, sample_size=200, seed=3)
    rng = random.Random(1)
    for i in range(5000):
        load.record(f"k{rng.randrange(1000):03d}", 100.0 + i / 1000)
    at = load.split_key(desc)
    assert at is not None and "k400" < at < "k600"
    assert load.qps(105.0) == 500.0  # 5000 requests over the 10 s window
    assert load.qps(200.0) == 0.0
    # one hot key is no split key; keys outside the range do not count
    assert median_split_key(["k5"] * 100, desc) is None
    assert median_split_key(["a", "z", "k1"], desc) is None
    assert median_split_key(["k1", "k2", "k3", "k4"], desc) == "k3"


def test_plan_merge_waits_for_cold_ranges_and_the_split_interval() -> None:
    a = RangeDescriptor(range_id=1, start="", end="m", replicas=REPLICAS)
    b = RangeDescriptor(range_id=2, start="m", end="t", replicas=REPLICAS)
    c = RangeDescriptor(range_id=3, start="t", end=None, replicas=("n1", "n2", "n4"))
    cold = RangeStats(keys=10, qps=0.0, cold_since=0.0, changed_at=0.0)
    stats = {1: cold, 2: cold, 3: cold}
    kw = {"cold_for": 30.0, "after_split": 60.0, "max_keys": 100}
    assert plan_merge([a, b, c], stats, [2, 3], 100.0, **kw) == (1, 2)  # type: ignore[arg-type]
    assert plan_merge([a, b, c], stats, [3], 100.0, **kw) is None  # type: ignore[arg-type]
    assert plan_merge([a, b, c], stats, [2], 50.0, **kw) is None  # type: ignore[arg-type]
    hot = {**stats, 1: RangeStats(keys=10, qps=50.0, cold_since=None, changed_at=0.0)}
    assert plan_merge([a, b, c], hot, [2], 100.0, **kw) is None  # type: ignore[arg-type]
    big = {**stats, 2: RangeStats(keys=95, qps=0.0, cold_since=0.0, changed_at=0.0)}
    assert plan_merge([a, b, c], big, [2], 100.0, **kw) is None  # type: ignore[arg-type]


def test_merged_away_finds_only_replicas_of_merged_ranges() -> None:
    m = RangeMap(replicas=REPLICAS)
    m.split(1, "m", 2)
    m.split(2, "t", 3)
    stale_2 = m.get(2)
    m.merge(1, 2)  # range 2 is gone: range 1 covers it at a higher version
    assert stale_2 is not None
    assert merged_away([m.get(1), stale_2, m.get(3)], m) == [2]  # type: ignore[list-item]
    # a range a split just made, not reported yet: the map still has its parent
    fresh = RangeDescriptor(range_id=9, start="w", end=None, epoch=Epoch(1, 4))
    assert merged_away([fresh], m) == []
    # a lagging replica of a range the map still lists is kept whatever its version
    old_1 = RangeDescriptor(range_id=1, start="", end="m", epoch=Epoch(1, 2))
    assert merged_away([old_1], m) == []


def test_no_merge_across_replica_sets_or_during_a_replica_move() -> None:
    left, right = _two_ranges()
    left.learners = ("n4",)  # a move under way on the target
    prep = right.apply(encode_merge(PrepareMerge(1, left.desc.epoch.version, 2)))
    assert isinstance(prep, MergeResult) and prep.ok
    res = left.apply(encode_merge(CommitMerge(right.desc, right.snapshot(), 2)))
    assert isinstance(res, MergeResult) and res.status == "bad_merge"
    left.learners = ()
    other = dataclasses.replace(right.desc, replicas=("n1", "n2", "n4"))
    res = left.apply(encode_merge(CommitMerge(other, right.snapshot(), 2)))
    assert isinstance(res, MergeResult) and res.status == "bad_merge"
    _, src = _two_ranges()
    src.learners = ("n4",)
    prep = src.apply(encode_merge(PrepareMerge(1, 2, 2)))
    assert isinstance(prep, MergeResult) and prep.status == "conf_change_in_progress"
