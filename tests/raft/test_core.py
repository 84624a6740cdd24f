"""Table tests for RaftCore's interface: config validation, codec, Ready/advance, sessions."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import (
    BadInputError,
    ConfigError,
    LocalProtocolError,
    NotLeaderError,
    RemoteProtocolError,
)
from dsys.raft import (
    CODEC,
    AppendRequest,
    AppendResponse,
    BecameLeader,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    RaftConfig,
    RaftCore,
    Role,
    SessionTable,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"id": ""}, "id"),
        ({"id": "a", "heartbeat_tick": 0}, "heartbeat_tick"),
        ({"id": "a", "election_tick": 2, "heartbeat_tick": 2}, "election_tick"),
        ({"id": "a", "max_entries_per_msg": 0}, "max_entries_per_msg"),
        ({"id": "a", "max_inflight_msgs": 0}, "max_inflight_msgs"),
        ({"id": "a", "lease_read": True, "check_quorum": False}, "lease_read"),
        ({"id": "a", "max_committed_per_ready": 0}, "max_committed_per_ready"),
    ],
    ids=[
        "empty-id",
        "zero-heartbeat",
        "election-not-above-heartbeat",
        "zero-batch",
        "zero-inflight",
        "lease-without-check-quorum",
        "zero-committed-batch",
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RaftConfig(**kwargs)  # type: ignore[arg-type]


SNAP = Snapshot(meta=SnapshotMeta(index=3, term=2, conf=ConfState(voters=("a", "b"))), data=b"s")
MESSAGES = [
    VoteRequest(src="a", dst="b", term=1, pre_vote=True, last_log_index=3, last_log_term=1),
    VoteResponse(src="b", dst="a", term=1, pre_vote=False, granted=True),
    AppendRequest(
        src="a",
        dst="b",
        term=2,
        prev_index=1,
        prev_term=1,
        entries=(Entry(term=2, index=2, kind=EntryKind.NOOP, data=b""),),
        commit=1,
    ),
    AppendResponse(
        src="b",
        dst="a",
        term=2,
        success=False,
        match_index=0,
        reject_index=4,
        conflict_index=2,
        conflict_term=1,
    ),
    Heartbeat(src="a", dst="b", term=2, commit=1, ctx=7),
    HeartbeatResponse(src="b", dst="a", term=2, ctx=7),
    SnapshotRequest(src="a", dst="b", term=2, snapshot=SNAP),
    TimeoutNow(src="a", dst="b", term=2),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_the_codec(msg: object) -> None:
    assert CODEC.decode(CODEC.encode(msg)) == msg


def test_codec_rejects_a_message_with_a_wrong_field_type() -> None:
    plain = CODEC.to_plain(MESSAGES[0])
    plain["term"] = "one"
    from dsys.codec import encode

    with pytest.raises(RemoteProtocolError, match="term"):
        CODEC.decode(encode(plain))


@given(st.binary(max_size=64))
@settings(max_examples=200, deadline=None)
def test_garbage_bytes_raise_a_typed_error(data: bytes) -> None:
    try:
        msg = CODEC.decode(data)
    except RemoteProtocolError:
        return
    assert type(msg) in CODEC.tags.values()


def _single() -> RaftCore:
    core = RaftCore(RaftConfig(id="a"), voters=["a"], rng_seed=3)
    for _ in range(40):
        core.tick()
        if core.role is Role.LEADER:
            break
    return core


def test_single_node_cluster_elects_itself_and_commits_alone() -> None:
    core = _single()
    assert core.role is Role.LEADER
    rd = core.ready()
    assert any(isinstance(e, BecameLeader) for e in rd.events)
    core.advance(rd)
    idx = core.propose(b"x")
    rd = core.ready()
    # Its only copy is not durable yet: persisted first (this Ready), committed after.
    assert [e.data for e in rd.entries] == [b"x"]
    assert idx not in [e.index for e in rd.committed] and core.commit_index < idx
    core.advance(rd)
    assert core.commit_index == idx
    rd = core.ready()
    assert rd.hard_state is not None and rd.hard_state.commit == idx
    assert not rd.entries and [e.data for e in rd.committed] == [b"x"]
    core.advance(rd)
    assert core.applied_index == idx and not core.has_ready()


def test_ready_twice_without_advance_is_misuse() -> None:
    core = _single()
    core.ready()
    with pytest.raises(LocalProtocolError, match="advance"):
        core.ready()


def test_inputs_between_ready_and_advance_are_kept() -> None:
    core = _single()
    core.advance(core.ready())
    rd1 = core.ready()
    idx = core.propose(b"late")
    core.advance(rd1)
    rd2 = core.ready()
    assert [e.index for e in rd2.entries] == [idx]
    core.advance(rd2)
    assert [e.index for e in core.ready().committed] == [idx]


def test_messages_for_other_nodes_are_ignored() -> None:
    core = RaftCore(RaftConfig(id="a"), voters=["a", "b", "c"])
    core.step(Heartbeat(src="b", dst="z", term=9, commit=0))
    assert core.term == 0


def test_a_commit_notice_is_applied_without_an_answer_and_a_heartbeat_is_answered() -> None:
    core = RaftCore(RaftConfig(id="a"), voters=["a", "b", "c"])
    ents = (Entry(term=1, index=1, kind=int(EntryKind.NORMAL), data=b"x"),)
    core.step(
        AppendRequest(src="b", dst="a", term=1, prev_index=0, prev_term=0, commit=0, entries=ents)
    )
    core.advance(core.ready())
    # ctx 0: the leader only tells the new commit index
    core.step(Heartbeat(src="b", dst="a", term=1, commit=1, ctx=0))
    rd = core.ready()
    assert [e.index for e in rd.committed] == [1]
    assert not any(isinstance(m, HeartbeatResponse) for m in rd.messages)
    core.advance(rd)
    # a heartbeat round (ctx > 0) is answered: leases and ReadIndex count on it
    core.step(Heartbeat(src="b", dst="a", term=1, commit=1, ctx=5))
    rd = core.ready()
    assert [(type(m), m.ctx) for m in rd.messages if isinstance(m, HeartbeatResponse)] == [
        (HeartbeatResponse, 5)
    ]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (ConfChange(type=ConfChangeType.ADD_VOTER, node_id="a"), "already a voter"),
        (ConfChange(type=ConfChangeType.REMOVE_NODE, node_id="zz"), "not a member"),
        (ConfChange(type=99, node_id="d"), "unknown"),
        (ConfChange(type=ConfChangeType.ADD_LEARNER, node_id=""), "invalid node id"),
    ],
    ids=["add-existing-voter", "remove-unknown", "bad-type", "empty-id"],
)
def test_bad_membership_changes_are_refused(change: ConfChange, error: str) -> None:
    core = _single()
    core.advance(core.ready())
    with pytest.raises(BadInputError, match=error):
        core.propose_conf_change(change)


def test_cannot_remove_the_last_voter() -> None:
    core = _single()
    core.advance(core.ready())
    with pytest.raises(BadInputError, match="last voter"):
        core.propose_conf_change(ConfChange(type=ConfChangeType.REMOVE_NODE, node_id="a"))


def test_compact_beyond_applied_is_refused() -> None:
    core = _single()
    core.advance(core.ready())
    core.propose(b"x")
    with pytest.raises(LocalProtocolError, match="applied"):
        core.compact(core.last_index, b"")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"entries": [Entry(1, 2, 0, b"")]}, "gap"),
    ],
    ids=["log-gap"],
)
def test_inconsistent_persisted_state_is_refused(kwargs: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        RaftCore(RaftConfig(id="a"), voters=["a"], **kwargs)  # type: ignore[arg-type]


def test_committed_entries_are_handed_out_in_bounded_batches() -> None:
    entries = [Entry(1, i, 0, b"") for i in range(1, 11)]
    core = RaftCore(
        RaftConfig(id="a", max_committed_per_ready=4),
        voters=["a"],
        hard_state=HardState(term=1, vote="a", commit=10),
        entries=entries,
    )
    batches = []
    while core.has_ready():
        rd = core.ready()
        batches.append([e.index for e in rd.committed])
        core.advance(rd)
    assert [b for b in batches if b] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert core.applied_index == 10


def test_restart_clamps_a_commit_index_ahead_of_the_log() -> None:
    core = RaftCore(
        RaftConfig(id="a"),
        voters=["a"],
        hard_state=HardState(term=1, vote=None, commit=5),
        entries=[Entry(1, 1, 0, b"")],
    )
    assert core.commit_index == 1


def test_restart_keeps_term_vote_and_log() -> None:
    entries = [Entry(1, 1, 0, b"a"), Entry(2, 2, 0, b"b")]
    core = RaftCore(
        RaftConfig(id="a"),
        voters=["a", "b", "c"],
        hard_state=HardState(term=2, vote="b", commit=1),
        entries=entries,
    )
    assert (core.term, core.vote, core.commit_index, core.last_index, core.last_term) == (
        2,
        "b",
        1,
        2,
        2,
    )
    rd = core.ready()
    assert rd.hard_state is None and rd.entries == ()  # already persisted
    assert [e.index for e in rd.committed] == [1]


def test_not_leader_error_carries_no_hint_when_leader_unknown() -> None:
    core = RaftCore(RaftConfig(id="a"), voters=["a", "b", "c"])
    with pytest.raises(NotLeaderError) as info:
        core.propose(b"x")
    assert info.value.leader_hint is None


def test_long_log_replication_is_batched() -> None:
    a = RaftCore(RaftConfig(id="a", max_entries_per_msg=50, pre_vote=False), voters=["a", "b"])
    b = RaftCore(RaftConfig(id="b", pre_vote=False), voters=["a", "b"])
    while a.role is not Role.CANDIDATE:
        a.tick()
    a.step(VoteResponse(src="b", dst="a", term=a.term, pre_vote=False, granted=True))
    for i in range(1000):
        a.propose(b"%d" % i)
    sent = 0
    for _ in range(200):
        moved = False
        for src, dst in ((a, b), (b, a)):
            if src.has_ready():
                rd = src.ready()
                src.advance(rd)
                for m in rd.messages:
                    if isinstance(m, AppendRequest):
                        sent += 1
                    dst.step(m)
                moved = True
        if not moved:
            break
    assert b.commit_index == a.commit_index == a.last_index == 1001
    assert sent <= 1001 // 50 + 5


# -- SessionTable -------------------------------------------------------------------------


def test_session_table_answers_duplicates_from_cache() -> None:
    t: SessionTable[str] = SessionTable()
    assert t.check("c1", 1) is None
    t.record("c1", 1, "ok-1")
    hit = t.check("c1", 1)
    assert hit is not None and hit.result == "ok-1" and not hit.expired
    assert t.check("c1", 2) is None
    assert t.check("c2", 1) is None


def test_session_table_expires_old_results_and_evicts_idle_clients() -> None:
    t: SessionTable[int] = SessionTable(max_sessions=2, max_results_per_client=2)
    for seq in range(1, 5):
        t.record("a", seq, seq)
    old = t.check("a", 1)
    assert old is not None and old.expired
    t.record("b", 1, 1)
    t.record("c", 1, 1)  # evicts "a", the least recently active
    assert len(t) == 2 and t.check("a", 4) is None


def test_session_table_ack_and_snapshot_round_trip() -> None:
    t: SessionTable[object] = SessionTable()
    t.record("a", 1, None)
    t.record("a", 2, True)
    t.ack("a", 2)
    hit = t.check("a", 1)
    assert hit is not None and hit.expired
    copy: SessionTable[object] = SessionTable.from_plain(t.to_plain())
    assert copy.check("a", 2) == t.check("a", 2)
    assert copy.to_plain() == t.to_plain()


@pytest.mark.parametrize(
    "kwargs", [{"max_sessions": 0}, {"max_results_per_client": 0}], ids=["sessions", "results"]
)
def test_session_table_config_validation(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        SessionTable(**kwargs)


def test_session_table_rejects_negative_sequence() -> None:
    with pytest.raises(BadInputError):
        SessionTable[int]().check("a", -1)


def test_ready_is_frozen() -> None:
    core = _single()
    rd = core.ready()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rd.entries = ()  # type: ignore[misc]


# -- hostile or broken peers ----------------------------------------------------------------

_ids = st.sampled_from(["b", "c"])
_small = st.integers(0, 6)
_entries = st.lists(
    st.tuples(_small, st.sampled_from([0, 2])), max_size=3
)  # (term, kind); indices are filled in to follow prev_index (or not)


@st.composite
def _messages(draw: st.DrawFn) -> object:
    src = draw(_ids)
    term = draw(_small)
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return VoteRequest(
            src=src,
            dst="a",
            term=term,
            pre_vote=draw(st.booleans()),
            last_log_index=draw(_small),
            last_log_term=draw(_small),
        )
    if kind == 1:
        return VoteResponse(
            src=src, dst="a", term=term, pre_vote=draw(st.booleans()), granted=draw(st.booleans())
        )
    if kind == 2:
        prev = draw(_small)
        shift = draw(st.sampled_from([1, 1, 1, 0, 2]))
        ents = tuple(
            Entry(term=t, index=prev + shift + i, kind=k, data=b"")
            for i, (t, k) in enumerate(draw(_entries))
        )
        return AppendRequest(
            src=src,
            dst="a",
            term=term,
            prev_index=prev,
            prev_term=draw(_small),
            entries=ents,
            commit=draw(_small),
        )
    if kind == 3:
        return AppendResponse(
            src=src,
            dst="a",
            term=term,
            success=draw(st.booleans()),
            match_index=draw(_small),
            reject_index=draw(_small),
            conflict_index=draw(_small),
            conflict_term=draw(_small),
        )
    if kind == 4:
        return Heartbeat(src=src, dst="a", term=term, commit=draw(_small), ctx=draw(_small))
    if kind == 5:
        return HeartbeatResponse(src=src, dst="a", term=term, ctx=draw(_small))
    return TimeoutNow(src=src, dst="a", term=term)


@given(st.lists(st.one_of(_messages(), st.just("tick"), st.just("propose")), max_size=40))
@settings(max_examples=300, deadline=None)
def test_arbitrary_peer_messages_never_break_the_core(inputs: list[object]) -> None:
    core = RaftCore(RaftConfig(id="a", election_tick=3, pre_vote=False), voters=["a", "b", "c"])
    for item in inputs:
        try:
            if item == "tick":
                core.tick()
            elif item == "propose":
                if core.role is Role.LEADER:
                    core.propose(b"x")
            else:
                core.step(item)  # type: ignore[arg-type]
        except RemoteProtocolError:
            pass
        if core.has_ready():
            core.advance(core.ready())
        assert core.commit_index <= core.last_index
        assert core.applied_index <= core.commit_index
        assert core.term >= 0
