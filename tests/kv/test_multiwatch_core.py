"""The pure core of the multi-Raft watch: frontiers, cursors, span records, planning;
and the span records a range state machine keeps through splits and merges."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import BadInputError
from dsys.kv.fsm import Put, encode_command
from dsys.kv.multiwatch import (
    BEFORE,
    COMPACTED,
    FLOOR,
    MOVED,
    NOT_HERE,
    ORIGIN,
    OUT,
    SERVE,
    Frontier,
    Piece,
    SpanRecord,
    classify,
    common_prefix,
    end_le,
    handoffs_passed,
    plan,
    prefix_end,
    subtract,
)
from dsys.kv.rangefsm import (
    CommitMerge,
    PrepareMerge,
    RangeStateMachine,
    Split,
    encode_merge,
    encode_split,
)
from dsys.kv.ranges import RangeDescriptor, RangeMap

KEYS = st.text(alphabet="abcd", min_size=0, max_size=3)


def _rev_of(f: Frontier, key: str) -> int:
    return f.revision_at(key)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["", "a", "ab"]),
    st.lists(st.tuples(KEYS, KEYS, st.integers(0, 20)), max_size=12),
    st.lists(KEYS, min_size=1, max_size=10),
)
def test_frontier_advance_matches_a_per_key_model(
    prefix: str, steps: list[tuple[str, str, int]], probes: list[str]
) -> None:
    f = Frontier.new(prefix, 1)
    model: dict[str, int] = {}
    probes = [prefix + p for p in probes]
    for a, b, rev in steps:
        start, end = prefix + a, (prefix + b) if b else None
        if end is not None and end <= start:
            continue
        f = f.advance(start, end, rev)
        for k in probes:
            if start <= k and (end is None or k < end):
                model[k] = max(model.get(k, 1), rev)
        assert not f.problem()
        # adjacent spans differ (coalesced)
        assert all(
            x.next_revision != y.next_revision for x, y in zip(f.spans, f.spans[1:], strict=False)
        )
    for k in probes:
        assert _rev_of(f, k) == model.get(k, 1)
    back = Frontier.decode(f.encode(), prefix)
    assert back == f


@given(st.binary(max_size=80) | st.text(max_size=40))
def test_garbage_cursors_are_bad_input(junk: bytes | str) -> None:
    import base64

    cursor = junk if isinstance(junk, str) else "w1." + base64.urlsafe_b64encode(junk).decode()
    with contextlib.suppress(BadInputError):
        Frontier.decode(cursor)


def test_cursor_checks() -> None:
    f = Frontier.new("app/", 5).advance("app/m", "app0", 9)
    c = f.encode()
    assert c.startswith("w1.") and Frontier.decode(c, "app/") == f
    with pytest.raises(BadInputError, match="prefix"):
        Frontier.decode(c, "other/")
    with pytest.raises(BadInputError):
        Frontier.decode(c[:-4])
    with pytest.raises(BadInputError):
        Frontier.decode(12)
    import msgpack

    def enc(v: object) -> str:
        import base64

        return "w1." + base64.urlsafe_b64encode(msgpack.packb(v)).decode()

    with pytest.raises(BadInputError, match="contiguous"):
        Frontier.decode(enc([1, "a", [["a", "a1", 1], ["a2", "b", 1]]]))
    with pytest.raises(BadInputError, match="version"):
        Frontier.decode(enc([2, "a", [["a", "b", 1]]]))
    with pytest.raises(BadInputError, match="span"):
        Frontier.decode(enc([1, "a", [["a", "b", -1]]]))


def test_prefix_end_and_common_prefix() -> None:
    assert prefix_end("") is None
    assert prefix_end("ab") == "ac"
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\ud7ff") == "\ue000"
    assert common_prefix("app/", "app0") == "app"
    assert common_prefix("a", None) == ""


def test_classify_split_parent_and_child() -> None:
    # parent [a, z) split at m after revision 10 into range 2
    parent = [SpanRecord(OUT, "m", "z", 10, 2)]
    assert classify("a", "z", 5, parent, "a", "m") == [Piece("a", "z", SERVE)]
    assert classify("a", "z", 12, parent, "a", "m") == [
        Piece("a", "m", SERVE),
        Piece("m", "z", MOVED, 11, 2),
    ]
    child = [SpanRecord(ORIGIN, "m", "z", 10, 1)]
    assert classify("m", "z", 7, child, "m", "z") == [Piece("m", "z", BEFORE, 10, 1)]
    assert classify("m", "z", 11, child, "m", "z") == [Piece("m", "z", SERVE)]
    # a key neither here nor handed off
    assert classify("z", None, 11, child, "m", "z") == [Piece("z", None, NOT_HERE)]


def test_classify_merge_floor_and_a_span_that_came_back() -> None:
    # target [a, m) absorbed source [m, z) whose revision was 20
    target = [SpanRecord(FLOOR, "m", "z", 20, 2)]
    assert classify("a", "z", 15, target, "a", "z") == [
        Piece("a", "m", SERVE),
        Piece("m", "z", COMPACTED, 21),
    ]
    assert classify("a", "z", 21, target, "a", "z") == [Piece("a", "z", SERVE)]
    # split out at 10, merged back at 20: between, the events were in the source
    back = [SpanRecord(OUT, "m", "z", 10, 2), SpanRecord(FLOOR, "m", "z", 20, 2)]
    assert classify("m", "z", 5, back, "a", "z") == [Piece("m", "z", SERVE)]
    assert classify("m", "z", 15, back, "a", "z") == [Piece("m", "z", COMPACTED, 21)]
    assert classify("m", "z", 25, back, "a", "z") == [Piece("m", "z", SERVE)]
    # forgotten records: a start below them is compacted
    assert classify("a", "m", 3, [], "a", "z", records_floor=4) == [Piece("a", "m", COMPACTED, 5)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from("bcdefgh"), unique=True, max_size=5), st.integers(1, 9))
def test_plan_covers_the_frontier_exactly(cuts: list[str], rev: int) -> None:
    m = RangeMap()
    rid = 1
    for c in sorted(cuts):
        m.split(m.lookup(c).range_id, c, rid + 1)
        rid += 1
    f = Frontier.new("", rev).advance("c", "f", rev + 3)
    watches = plan([(s.start, s.end, s.next_revision) for s in f.spans], m)
    covered: list[tuple[str, str | None]] = []
    for w in watches:
        d = m.get(w.range_id)
        assert d is not None and d.start <= w.start and (d.end is None or (w.end or "~") <= d.end)
        assert w.start_revision == f.revision_at(w.start)
        covered.append((w.start, w.end))
    # the watches tile the key space without overlap
    assert subtract([("", None)], "", None) == []
    left: list[tuple[str, str | None]] = [("", None)]
    for s, e in covered:  # each inside what is left: no overlap
        assert any(a <= s and end_le(e, b) for a, b in left)
        left = subtract(left, s, e)
    assert left == []


def _fsm(rid: int = 1, start: str = "", end: str | None = None) -> RangeStateMachine:
    return RangeStateMachine(RangeDescriptor(range_id=rid, start=start, end=end, replicas=("n1",)))


def _put(fsm: RangeStateMachine, key: str, seq: int) -> int:
    res = fsm.apply(encode_command(Put(key=key, value=b"v", client_id="c", seq=seq, now_ms=1)))
    return int(res.revision)


def test_range_state_machine_records_splits_and_merges_and_keeps_history() -> None:
    parent = _fsm()
    children: list[bytes] = []
    parent.on_split = lambda left, right, snap: children.append(snap)
    r1 = _put(parent, "a", 1)
    _put(parent, "q", 2)
    assert parent.apply(encode_split(Split("m", 2, 1))).ok
    assert parent.span_records == [SpanRecord(OUT, "m", None, 2, 2)]
    child = _fsm(2)
    child.restore(children[0])
    assert child.span_records == [SpanRecord(ORIGIN, "m", None, 2, 1)]
    # the child's events up to the split are the parent's: a child watch says so
    assert (
        classify("m", None, 1, child.span_records, child.desc.start, child.desc.end)[0].state
        == BEFORE
    )
    _put(child, "r", 3)
    # merge the child back: the target keeps its own history
    assert child.apply(encode_merge(PrepareMerge(1, 2, 2))).ok
    snap = child.snapshot()
    res = parent.apply(encode_merge(CommitMerge(child.desc, snap, 2)))
    assert res.ok
    assert parent.span_records[-1] == SpanRecord(FLOOR, "m", None, 3, 2)
    got = parent.changes(r1, "a")
    assert not isinstance(got, type(None)) and [e.key for e in got.events] == ["a"]  # type: ignore[union-attr]
    # the records travel in snapshots
    again = _fsm()
    again.restore(parent.snapshot())
    assert again.span_records == parent.span_records


def test_handoffs_passed_includes_splits_applied_after_the_watch_opened() -> None:
    old = SpanRecord(OUT, "m", None, 4, 2)
    new = SpanRecord(OUT, "t", None, 7, 3)  # applied by a lagging replica after the open
    recs = [old, new]
    # a watch opened at 10 with only `old` known: `new` is below its start, yet passed
    assert handoffs_passed(recs, 10, 10, frozenset({old})) == [new]
    # one opened at 5: `new` passes once the watch looked past 7, `old` never (before)
    assert handoffs_passed(recs, 5, 7, frozenset(recs)) == []
    assert handoffs_passed(recs, 5, 8, frozenset(recs)) == [new]
