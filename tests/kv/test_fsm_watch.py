"""The state machine's change history: what watchers are served from (pure, sync)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import ConfigError
from dsys.kv.fsm import (
    Changes,
    Compacted,
    Delete,
    KVStateMachine,
    Put,
    Tick,
    WatchEvent,
    encode_command,
)


def _all(fsm: KVStateMachine, start: int, prefix: str = "", limit: int = 1000) -> Changes:
    got = fsm.changes(start, prefix, limit)
    assert isinstance(got, Changes), got
    return got


def test_puts_deletes_and_expiry_in_revision_order_with_values() -> None:
    fsm = KVStateMachine()
    fsm.apply(encode_command(Put(key="a", value=b"1", now_ms=1)))  # rev 1 (fast path)
    fsm.apply_command(Put(key="t1", value=b"x", ttl_ms=10, now_ms=1))  # 2
    fsm.apply_command(Put(key="t2", value=b"y", ttl_ms=10, now_ms=1))  # 3
    fsm.apply_command(Delete(key="a", now_ms=2))  # 4
    fsm.apply_command(Delete(key="a", now_ms=2))  # not found: no change
    fsm.apply_command(Put(key="a", value=b"2", if_revision=7, now_ms=2))  # conflict
    fsm.apply_command(Tick(now_ms=11))  # 5: t1 and t2 expire together
    fsm.apply_command(Put(key="a", value=b"3", now_ms=12))  # 6
    got = _all(fsm, 1)
    assert got.events == [
        WatchEvent(1, "put", "a", b"1"),
        WatchEvent(2, "put", "t1", b"x"),
        WatchEvent(3, "put", "t2", b"y"),
        WatchEvent(4, "delete", "a"),
        WatchEvent(5, "expire", "t1"),
        WatchEvent(5, "expire", "t2"),
        WatchEvent(6, "put", "a", b"3"),
    ]
    assert got.next_revision == 7 == fsm.revision + 1
    assert _all(fsm, 5).events[0] == WatchEvent(5, "expire", "t1")
    assert _all(fsm, 7) == Changes([], 7)
    assert _all(fsm, 50) == Changes([], 50)  # a future revision: wait for it


def test_prefix_filter_and_limit_never_split_a_revision() -> None:
    fsm = KVStateMachine()
    for i in range(5):
        fsm.apply_command(Put(key=f"app/{i}", value=b"v", ttl_ms=5, now_ms=1))
        fsm.apply_command(Put(key=f"other/{i}", value=b"w", now_ms=1))
    fsm.apply_command(Tick(now_ms=100))  # revision 11: five expiries
    got = _all(fsm, 1, "app/")
    assert [e.key for e in got.events] == [f"app/{i}" for i in range(5)] * 2
    assert {e.type for e in got.events[5:]} == {"expire"}
    page = _all(fsm, 1, "app/", limit=3)  # looks at revisions 1..3 only
    assert [e.revision for e in page.events] == [1, 3] and page.next_revision == 4
    page = _all(fsm, 10, "", limit=2)  # 10, then all of 11 (five events)
    assert [e.revision for e in page.events] == [10, 11, 11, 11, 11, 11]
    assert page.next_revision == 12
    # paging from 1 with small limits sees every event exactly once
    seen: list[WatchEvent] = []
    rev = 1
    while rev <= fsm.revision:
        page = _all(fsm, rev, "", limit=1)
        seen += page.events
        rev = page.next_revision
    assert seen == _all(fsm, 1).events


def test_old_events_are_dropped_and_the_floor_rises() -> None:
    fsm = KVStateMachine(history_events=3)
    for i in range(5):
        fsm.apply_command(Put(key="k", value=b"%d" % i))
    assert fsm.history_len == 3 and fsm.compacted_revision == 2
    assert fsm.changes(2) == Compacted(revision=3)
    assert [e.value for e in _all(fsm, 3).events] == [b"2", b"3", b"4"]
    fsm.apply_command(Delete(key="k"))
    assert fsm.changes(3) == Compacted(revision=4)


def test_history_bytes_bound_keeps_the_newest_event() -> None:
    fsm = KVStateMachine(history_bytes=10)
    fsm.apply_command(Put(key="a", value=b"x" * 6))
    fsm.apply_command(Put(key="b", value=b"y" * 6))  # 12 bytes > 10: drop rev 1
    assert fsm.compacted_revision == 1 and fsm.history_len == 1
    fsm.apply_command(Put(key="c", value=b"z" * 50))  # alone over the bound: kept
    assert [e.key for e in _all(fsm, 3).events] == ["c"]
    with pytest.raises(ConfigError):
        KVStateMachine(history_events=0)


def test_expiry_group_dropped_in_part_is_compacted_as_a_whole() -> None:
    fsm = KVStateMachine(history_events=3)
    for k in "abc":
        fsm.apply_command(Put(key=k, value=b"v", ttl_ms=1, now_ms=1))
    fsm.apply_command(Tick(now_ms=5))  # revision 4: three expiries, the puts dropped
    assert fsm.compacted_revision == 3
    assert [e.key for e in _all(fsm, 4).events] == ["a", "b", "c"]
    fsm.apply_command(Put(key="d", value=b"v"))  # drops one expiry of revision 4
    assert fsm.changes(4) == Compacted(revision=5)
    assert [e.key for e in _all(fsm, 5).events] == ["d"]


def test_restore_sets_the_floor_to_the_snapshot_revision() -> None:
    src = KVStateMachine()
    for i in range(4):
        src.apply_command(Put(key=f"k{i}", value=b"v"))
    dst = KVStateMachine()
    dst.apply_command(Put(key="old", value=b"v"))
    dst.restore(src.snapshot())
    assert dst.compacted_revision == 4 and dst.history_len == 0
    assert dst.changes(1) == Compacted(revision=5)
    assert _all(dst, 5) == Changes([], 5)
    dst.apply_command(Put(key="new", value=b"n"))
    assert _all(dst, 5).events == [WatchEvent(5, "put", "new", b"n")]


keys = st.sampled_from(["a", "ab", "b", "ba"])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), keys, st.binary(max_size=3), st.sampled_from([0, 0, 5])),
        st.tuples(st.just("del"), keys),
        st.tuples(st.just("tick"), st.integers(0, 3)),
    ),
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(ops, st.integers(1, 8), st.integers(1, 4))
def test_history_replays_to_the_same_store(
    ops_list: list[tuple[object, ...]], cap: int, limit: int
) -> None:
    """Applying the events from any available revision on top of the state just before
    it gives the current state: no gap, no duplicate, revisions ascending."""
    fsm = KVStateMachine(history_events=cap)
    now = 0
    states: dict[int, dict[str, bytes]] = {0: {}}
    for op in ops_list:
        if op[0] == "put":
            _, key, value, ttl = op
            fsm.apply_command(Put(key=key, value=value, ttl_ms=ttl, now_ms=now))  # type: ignore[arg-type]
        elif op[0] == "del":
            fsm.apply_command(Delete(key=op[1], now_ms=now))  # type: ignore[arg-type]
        else:
            now += 3 * op[1]  # type: ignore[operator]
            fsm.apply_command(Tick(now_ms=now))
        states[fsm.revision] = {kv.key: kv.value for kv in fsm.items()}
    final = states[fsm.revision]
    for start in range(1, fsm.revision + 2):
        got = fsm.changes(start, "", limit)
        if start <= fsm.compacted_revision:
            assert got == Compacted(fsm.compacted_revision + 1)
            continue
        model = dict(states[start - 1])
        last = 0
        rev = start
        while rev <= fsm.revision:
            page = fsm.changes(rev, "", limit)
            assert isinstance(page, Changes) and page.next_revision > rev
            for ev in page.events:
                assert ev.revision >= last and ev.revision >= start
                last = ev.revision
                if ev.type == "put":
                    assert ev.value is not None
                    model[ev.key] = ev.value
                else:
                    assert model.pop(ev.key, None) is not None
            rev = page.next_revision
        assert model == final


def test_max_bytes_stops_at_a_revision_boundary() -> None:
    fsm = KVStateMachine()
    for i in range(6):
        fsm.apply_command(Put(key=f"k{i}", value=b"x" * 100))
    page = _all(fsm, 1, "", limit=1000)
    assert len(page.events) == 6
    page = fsm.changes(1, "", 1000, max_bytes=250)
    assert isinstance(page, Changes)
    assert [e.revision for e in page.events] == [1, 2, 3] and page.next_revision == 4
