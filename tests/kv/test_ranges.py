"""The pure range map: lookups, splits, merges, epochs, reports and typed errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import BadInputError, EpochNotMatchError, KeyNotInRangeError, RemoteProtocolError
from dsys.kv.ranges import Epoch, RangeDescriptor, RangeMap, plan_leader_move

keys = st.text(alphabet="abcdef", min_size=0, max_size=4)


def _owners(m: RangeMap, key: str) -> list[int]:
    return [r.range_id for r in m if r.contains(key)]


def test_new_map_has_one_range_over_everything() -> None:
    m = RangeMap(replicas=["n1", "n2", "n3"])
    assert len(m) == 1
    r = m.lookup("anything")
    assert (r.range_id, r.start, r.end, r.epoch) == (1, "", None, Epoch(1, 1))
    assert r.replicas == ("n1", "n2", "n3")


def test_split_bumps_version_and_routes_both_halves() -> None:
    m = RangeMap(replicas=["n1"])
    left, right = m.split(1, "m", 2)
    assert left.epoch == right.epoch == Epoch(1, 2)
    assert m.lookup("a").range_id == 1 and m.lookup("l\xff").range_id == 1
    assert m.lookup("m").range_id == 2 and m.lookup("zzz").range_id == 2
    assert m.version == 1
    m.check()


def test_merge_bumps_version_past_both() -> None:
    m = RangeMap(replicas=["n1"])
    m.split(1, "m", 2)
    m.split(2, "t", 3)
    merged = m.merge(2, 3)
    assert (merged.start, merged.end, merged.epoch) == ("m", None, Epoch(1, 4))
    with pytest.raises(BadInputError, match="not neighbours"):
        m.merge(2, 1)


def test_replica_change_bumps_conf_ver_only() -> None:
    m = RangeMap(replicas=["n1"])
    r = m.change_replicas(1, ["n1", "n2"])
    assert r.epoch == Epoch(2, 1)


@pytest.mark.parametrize("at", ["", "m", "zz"], ids=["at-start", "at-own-end", "beyond"])
def test_split_outside_the_range_is_refused(at: str) -> None:
    m = RangeMap()
    m.split(1, "m", 2)
    with pytest.raises(BadInputError, match="not strictly inside"):
        m.split(1, at, 3)
    with pytest.raises(BadInputError, match="already in use"):
        m.split(2, "q", 1)


def test_locate_raises_typed_errors_with_the_current_descriptor() -> None:
    m = RangeMap()
    m.split(1, "m", 2)
    with pytest.raises(KeyNotInRangeError) as e1:
        m.locate("x", range_id=1)
    assert e1.value.ranges[0].range_id == 2 and "range 2, not 1" in str(e1.value)
    with pytest.raises(EpochNotMatchError) as e2:
        m.locate("x", range_id=2, epoch=(1, 1))
    assert e2.value.ranges[0].epoch == Epoch(1, 2)
    assert "stale" in str(e2.value) and "(1, 2)" in str(e2.value)
    assert m.locate("x", range_id=2, epoch=(1, 2)).range_id == 2


def test_report_of_a_split_is_taken_once_and_stale_reports_are_ignored() -> None:
    authority = RangeMap(replicas=["n1"])
    meta = RangeMap(replicas=["n1"])
    left, right = authority.split(1, "m", 2)
    assert not meta.apply_report([left])  # half a split would leave a hole
    assert meta.apply_report([left, right])
    assert not meta.apply_report([left, right])  # again: nothing new
    old = RangeDescriptor(range_id=1, start="", end=None)
    assert not meta.apply_report([old])  # older epoch
    meta.check()
    assert [r.to_plain() for r in meta] == [r.to_plain() for r in authority]


def test_plain_round_trip_and_bad_input() -> None:
    m = RangeMap(replicas=["a"])
    m.split(1, "k", 7)
    again = RangeMap.from_plain(m.to_plain())
    assert [r.to_plain() for r in again] == [r.to_plain() for r in m]
    assert again.version == m.version
    for bad in [
        None,
        {"version": 1, "ranges": []},
        {"version": 1, "ranges": [[1, "a", None, 1, 1, []]]},
    ]:
        with pytest.raises(RemoteProtocolError):
            RangeMap.from_plain(bad)
    with pytest.raises(RemoteProtocolError):
        RangeDescriptor.from_plain([1, "b", "a", 1, 1, []])


ops = st.lists(
    st.tuples(st.sampled_from(["split", "merge"]), st.integers(0, 50), keys), max_size=40
)


@settings(max_examples=100, deadline=None)
@given(ops, st.lists(keys, min_size=1, max_size=20))
def test_any_splits_and_merges_keep_a_partition(
    script: list[tuple[str, int, str]], probes: list[str]
) -> None:
    m = RangeMap(replicas=["n1", "n2", "n3"])
    meta = RangeMap(replicas=["n1", "n2", "n3"])
    next_id = 2
    versions = {1: 1}
    for op, pick, key in script:
        ranges = list(m)
        r = ranges[pick % len(ranges)]
        if op == "split":
            try:
                left, right = m.split(r.range_id, key, next_id)
            except BadInputError:
                assert not (r.start < key and (r.end is None or key < r.end))
                continue
            assert meta.apply_report([left, right])
            versions[next_id] = right.epoch.version
            next_id += 1
        else:
            i = ranges.index(r)
            if i + 1 >= len(ranges):
                continue
            merged = m.merge(r.range_id, ranges[i + 1].range_id)
            assert meta.apply_report([merged])
        m.check()
        meta.check()
        for d in m:  # versions never go back
            assert d.epoch.version >= versions.get(d.range_id, 0)
            versions[d.range_id] = d.epoch.version
    for key in probes:
        owners = _owners(m, key)
        assert owners == [m.lookup(key).range_id]
        assert meta.lookup(key) == m.lookup(key)


def test_leader_plan_moves_only_from_the_busiest_node_past_a_gap_of_two() -> None:
    nodes = ["n1", "n2", "n3"]
    assert plan_leader_move({1: "n1", 2: "n1", 3: "n2"}, nodes, "n1") == (2, "n3")
    assert plan_leader_move({1: "n1", 2: "n1", 3: "n2"}, nodes, "n2") is None
    assert plan_leader_move({1: "n1", 2: "n2"}, nodes, "n1") is None  # gap 1: stay
    assert plan_leader_move({1: "n1", 2: "n1", 3: None}, nodes, "n1") is None  # unknown


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["n1", "n2", "n3"]), min_size=1, max_size=12))
def test_leader_plans_converge_without_moving_back(start: list[str]) -> None:
    nodes = ["n1", "n2", "n3"]
    leaders: dict[int, str | None] = {i + 1: n for i, n in enumerate(start)}
    seen: set[tuple[int, str, str]] = set()
    for _ in range(50):
        moved = False
        for me in nodes:
            move = plan_leader_move(leaders, nodes, me)
            if move is not None:
                rid, to = move
                assert (rid, to, me) not in seen, "a range moved back"
                seen.add((rid, me, to))
                leaders[rid] = to
                moved = True
        if not moved:
            break
    counts = [sum(1 for v in leaders.values() if v == n) for n in nodes]
    assert max(counts) - min(counts) <= 1
