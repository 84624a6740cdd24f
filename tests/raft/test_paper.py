"""One test per Raft rule (paper figure 2 / section 5, dissertation ch. 3, 4, 6, 9).

Each test sets up cores directly (restoring persisted state), steps messages by hand and
checks the outbound messages and state.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from dsys.errors import NotLeaderError, ProposalDroppedError
from dsys.raft import (
    AppendRequest,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    Message,
    RaftConfig,
    RaftCore,
    Role,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from dsys.raft.messages import encode_conf

VOTERS = ("a", "b", "c")


def node(
    nid: str,
    voters: Sequence[str] = VOTERS,
    *,
    term: int = 0,
    vote: str | None = None,
    commit: int = 0,
    log: Sequence[int] = (),
    **kw: object,
) -> RaftCore:
    """A core restored with a log whose entry i+1 has term log[i]."""
    entries = [
        Entry(term=t, index=i + 1, kind=EntryKind.NORMAL, data=b"e%d" % (i + 1))
        for i, t in enumerate(log)
    ]
    core = RaftCore(
        RaftConfig(id=nid, **kw),  # type: ignore[arg-type]
        voters=list(voters),
        hard_state=HardState(term=term, vote=vote, commit=commit),
        entries=entries,
        rng_seed=1,
    )
    drain(core)
    return core


def drain(core: RaftCore) -> list[Message]:
    rd = core.ready()
    core.advance(rd)
    return list(rd.messages)


def leader(voters: Sequence[str] = VOTERS, **kw: object) -> RaftCore:
    """Node "a" elected leader (pre-vote off), with its no-op not yet acknowledged."""
    kw.setdefault("pre_vote", False)
    a = node("a", voters, **kw)  # type: ignore[arg-type]
    for _ in range(100):
        a.tick()
        if a.role is Role.CANDIDATE:
            break
    for v in voters[1:]:
        a.step(VoteResponse(src=v, dst="a", term=a.term, pre_vote=False, granted=True))
    assert a.role is Role.LEADER
    drain(a)
    return a


def ack(core: RaftCore, src: str, match: int) -> None:
    core.step(AppendResponse(src=src, dst=core.id, term=core.term, success=True, match_index=match))


def of(msgs: list[Message], kind: type) -> list[Message]:
    return [m for m in msgs if isinstance(m, kind)]


# -- elections (5.2) -------------------------------------------------------------------


def test_follower_campaigns_after_randomized_election_timeout() -> None:
    a = node("a", pre_vote=False, election_tick=10, log=[1, 1], term=1)
    ticks = 0
    while a.role is Role.FOLLOWER:
        a.tick()
        ticks += 1
        assert ticks < 20, "timeout must be drawn from [election_tick, 2 * election_tick)"
    assert ticks >= 10
    assert a.role is Role.CANDIDATE and a.term == 2 and a.vote == "a"
    reqs = of(drain(a), VoteRequest)
    assert {m.dst for m in reqs} == {"b", "c"}
    assert all((m.term, m.last_log_index, m.last_log_term) == (2, 2, 1) for m in reqs)


def test_candidate_with_majority_becomes_leader_and_appends_noop() -> None:
    a = leader(term=1, log=[1])
    assert a.term == 2 and a.leader_id == "a"
    assert a.last_index == 2
    noop = a.entries(2, 3)[0]
    assert (noop.term, noop.kind) == (2, EntryKind.NOOP)


def test_candidate_steps_down_on_append_from_leader_of_same_term() -> None:
    a = node("a", pre_vote=False)
    while a.role is not Role.CANDIDATE:
        a.tick()
    a.step(
        AppendRequest(
            src="b", dst="a", term=a.term, prev_index=0, prev_term=0, entries=(), commit=0
        )
    )
    assert a.role is Role.FOLLOWER and a.leader_id == "b"


def test_vote_is_granted_at_most_once_per_term() -> None:
    b = node("b", term=1)
    b.step(VoteRequest(src="a", dst="b", term=2, pre_vote=False, last_log_index=0, last_log_term=0))
    b.step(VoteRequest(src="c", dst="b", term=2, pre_vote=False, last_log_index=0, last_log_term=0))
    resp = of(drain(b), VoteResponse)
    assert [(m.dst, m.granted) for m in resp] == [("a", True), ("c", False)]
    assert b.vote == "a"
    assert b.hard_state.vote == "a"  # must be persisted before the response is sent


@pytest.mark.parametrize(
    ("last_index", "last_term", "granted"),
    [(3, 1, False), (2, 2, False), (3, 2, True), (1, 3, True)],
    ids=["lower-last-term", "same-term-shorter-log", "same-log", "higher-last-term"],
)
def test_vote_only_for_candidates_with_up_to_date_logs(
    last_index: int, last_term: int, granted: bool
) -> None:
    b = node("b", term=2, log=[1, 2, 2])
    b.step(
        VoteRequest(
            src="a",
            dst="b",
            term=3,
            pre_vote=False,
            last_log_index=last_index,
            last_log_term=last_term,
        )
    )
    (resp,) = of(drain(b), VoteResponse)
    assert resp.granted is granted


def test_higher_term_turns_leader_into_follower() -> None:
    a = leader()
    term = a.term
    a.step(AppendResponse(src="b", dst="a", term=term + 3, success=False, match_index=0))
    assert a.role is Role.FOLLOWER and a.term == term + 3 and a.vote is None


def test_stale_term_append_is_rejected_with_current_term() -> None:
    b = node("b", term=5, log=[1, 5])
    b.step(
        AppendRequest(
            src="a",
            dst="b",
            term=3,
            prev_index=1,
            prev_term=1,
            entries=(Entry(3, 2, 0, b""),),
            commit=2,
        )
    )
    (resp,) = of(drain(b), AppendResponse)
    assert resp.term == 5 and not resp.success
    assert b.last_index == 2 and b.term_at(2) == 5 and b.commit_index == 0


# -- pre-vote and check-quorum (dissertation 9.6, 6.2) ---------------------------------


def test_pre_vote_does_not_increase_the_term() -> None:
    a = node("a", term=4, pre_vote=True)
    while a.role is Role.FOLLOWER:
        a.tick()
    assert a.role is Role.PRE_CANDIDATE and a.term == 4
    reqs = of(drain(a), VoteRequest)
    assert all(m.pre_vote and m.term == 5 for m in reqs)
    # Rejections leave the term alone; a granted majority starts the real election.
    a.step(VoteResponse(src="b", dst="a", term=5, pre_vote=True, granted=True))
    assert a.role is Role.CANDIDATE and a.term == 5


def test_follower_with_live_leader_ignores_vote_requests() -> None:
    b = node("b", term=2, check_quorum=True)
    b.step(Heartbeat(src="a", dst="b", term=2, commit=0))
    drain(b)
    b.step(VoteRequest(src="c", dst="b", term=3, pre_vote=False, last_log_index=9, last_log_term=9))
    assert b.term == 2 and not of(drain(b), VoteResponse)


def test_check_quorum_leader_steps_down_without_majority() -> None:
    a = leader(check_quorum=True, election_tick=10)
    for _ in range(25):
        a.tick()
    assert a.role is Role.FOLLOWER


def test_check_quorum_leader_stays_with_majority() -> None:
    a = leader(check_quorum=True, election_tick=10)
    for _ in range(40):
        a.tick()
        a.step(HeartbeatResponse(src="b", dst="a", term=a.term, ctx=0))
    assert a.role is Role.LEADER


# -- log replication (5.3) -------------------------------------------------------------


def test_append_rejected_when_prev_entry_mismatches_with_conflict_hint() -> None:
    b = node("b", term=3, log=[1, 1, 2, 2, 2])
    b.step(AppendRequest(src="a", dst="b", term=3, prev_index=5, prev_term=3, entries=(), commit=0))
    b.step(AppendRequest(src="a", dst="b", term=3, prev_index=9, prev_term=3, entries=(), commit=0))
    r1, r2 = of(drain(b), AppendResponse)
    assert (r1.success, r1.reject_index, r1.conflict_term, r1.conflict_index) == (False, 5, 2, 3)
    assert (r2.success, r2.conflict_term, r2.conflict_index) == (False, 0, 6)


def test_conflicting_suffix_is_replaced() -> None:
    b = node("b", term=3, log=[1, 1, 2, 2])
    b.step(
        AppendRequest(
            src="a",
            dst="b",
            term=3,
            prev_index=2,
            prev_term=1,
            entries=(Entry(3, 3, 0, b"new"),),
            commit=0,
        )
    )
    rd = b.ready()
    assert [e.index for e in rd.entries] == [3]  # the store truncates from 3, then appends
    b.advance(rd)
    assert b.last_index == 3 and b.term_at(3) == 3


def test_stale_shorter_append_does_not_truncate_matching_entries() -> None:
    b = node("b", term=1, log=[1, 1, 1, 1])
    b.step(
        AppendRequest(
            src="a",
            dst="b",
            term=1,
            prev_index=1,
            prev_term=1,
            entries=(Entry(1, 2, 0, b"e2"),),
            commit=0,
        )
    )
    assert b.last_index == 4
    (resp,) = of(drain(b), AppendResponse)
    assert resp.success and resp.match_index == 2


def test_follower_commit_is_min_of_leader_commit_and_last_new_entry() -> None:
    b = node("b", term=1, log=[1, 1, 1, 1])
    b.step(AppendRequest(src="a", dst="b", term=1, prev_index=1, prev_term=1, entries=(), commit=3))
    assert b.commit_index == 1
    b.step(
        AppendRequest(
            src="a",
            dst="b",
            term=1,
            prev_index=2,
            prev_term=1,
            entries=(Entry(1, 3, 0, b"e3"),),
            commit=3,
        )
    )
    assert b.commit_index == 3
    rd = b.ready()
    assert [e.index for e in rd.committed] == [1, 2, 3]


def test_leader_commits_with_majority_of_current_term() -> None:
    a = leader(voters=("a", "b", "c", "d", "e"))
    idx = a.propose(b"x")
    drain(a)  # the leader's own copy counts once it is persisted
    ack(a, "b", idx)
    assert a.commit_index == 0
    ack(a, "c", idx)
    assert a.commit_index == idx


def test_leader_never_commits_earlier_term_entry_by_counting_replicas() -> None:
    # Paper figure 8 / section 5.4.2: entry 2 (term 2) is on a majority after the
    # leader of term 3+ replicates it, but it commits only with an entry of its own term.
    a = leader(log=[1, 2], term=2)
    assert a.term == 3 and a.last_index == 3
    ack(a, "b", 2)
    assert a.commit_index == 0
    ack(a, "b", 3)
    assert a.commit_index == 3


def test_fast_backtracking_skips_a_whole_conflicting_term() -> None:
    a = leader(log=[1, 1, 1, 4, 4, 4, 4, 4], term=4)
    b = node("b", term=4, log=[1, 1, 1, 2, 2, 2, 2])
    a.tick()  # heartbeat; b's answer makes the leader probe
    probes = 0
    to_b = [m for m in drain(a) if m.dst == "b"]
    for _ in range(20):
        if not to_b:
            break
        probes += sum(1 for m in to_b if isinstance(m, AppendRequest))
        for m in to_b:
            b.step(m)
        for r in drain(b):
            a.step(r)
        to_b = [m for m in drain(a) if m.dst == "b"]
    assert a.progress()["b"] == a.last_index
    assert b.entries(4, 10) == a.entries(4, 10)
    assert probes <= 4  # one index at a time would need 7+


def test_leader_sends_heartbeats_with_commit_capped_by_follower_match() -> None:
    a = leader(heartbeat_tick=1)
    idx = a.propose(b"x")
    ack(a, "b", idx)
    drain(a)
    a.tick()
    hbs = {m.dst: m for m in of(drain(a), Heartbeat)}
    assert hbs["b"].commit == a.commit_index and hbs["c"].commit == 0


def test_leader_replicates_before_its_own_persist_but_counts_itself_only_once_durable() -> None:
    # Dissertation 10.2.1: the leader's AppendEntries may leave before its own fsync, but
    # "leader + one follower" must not commit while only the follower's copy is durable.
    a = leader()
    ack(a, "b", a.last_index)
    ack(a, "c", a.last_index)
    drain(a)
    idx = a.propose(b"x")
    rd = a.ready()
    assert rd.messages_before_persist
    assert [e.index for e in rd.entries] == [idx]
    sent = {
        m.dst for m in of(list(rd.messages), AppendRequest) if idx in [e.index for e in m.entries]
    }
    assert sent == {"b", "c"}
    ack(a, "b", idx)  # one follower durable, the leader's own write still running
    assert a.commit_index < idx
    assert not a.has_ready()  # the Ready is out; nothing new to commit until it is done
    a.advance(rd)  # the leader's persist finished: now leader + b is a durable majority
    assert a.commit_index == idx
    rd = a.ready()
    assert [e.index for e in rd.committed] == [idx]
    assert {m.dst for m in of(list(rd.messages), Heartbeat)} == {"b"}  # commit notice
    a.advance(rd)


def test_messages_wait_for_the_persist_of_a_new_term_or_vote() -> None:
    a = node("a", pre_vote=False)
    for _ in range(100):
        a.tick()
        if a.role is Role.CANDIDATE:
            break
    rd = a.ready()
    assert of(list(rd.messages), VoteRequest) and not rd.messages_before_persist
    a.advance(rd)
    b = node("b", pre_vote=False)
    b.step(of(list(rd.messages), VoteRequest)[0])
    rd = b.ready()  # a granted vote goes out only once the vote is durable
    assert of(list(rd.messages), VoteResponse) and not rd.messages_before_persist
    b.advance(rd)
    # A single-voter cluster elects itself without any message: its first leader Ready
    # carries the new term, so it is not marked either.
    s = RaftCore(RaftConfig(id="s"), voters=["s"], rng_seed=3)
    while s.role is not Role.LEADER:
        s.tick()
    assert not s.ready().messages_before_persist


# -- linearizable reads (dissertation 6.4) ---------------------------------------------


def test_read_index_needs_a_heartbeat_quorum() -> None:
    a = leader()
    ack(a, "b", a.last_index)
    drain(a)
    a.read_index(b"r1")
    rd = a.ready()
    a.advance(rd)
    assert not rd.read_states
    hb = [m for m in rd.messages if isinstance(m, Heartbeat)]
    assert hb
    a.step(HeartbeatResponse(src="c", dst="a", term=a.term, ctx=hb[0].ctx))
    rd = a.ready()
    a.advance(rd)
    assert [(r.ctx, r.index) for r in rd.read_states] == [(b"r1", a.commit_index)]


def test_read_index_waits_for_the_new_leaders_noop_to_commit() -> None:
    a = leader(log=[1, 1], term=1)
    a.read_index(b"r")
    rd = a.ready()
    a.advance(rd)
    assert not rd.read_states and not any(isinstance(m, Heartbeat) for m in rd.messages)
    ack(a, "b", a.last_index)  # no-op commits: the read starts its round
    rd = a.ready()
    a.advance(rd)
    hb = [m for m in rd.messages if isinstance(m, Heartbeat)]
    a.step(HeartbeatResponse(src="b", dst="a", term=a.term, ctx=max(m.ctx for m in hb)))
    rd = a.ready()
    assert [r.index for r in rd.read_states] == [3]


def test_read_index_on_follower_raises_not_leader_with_hint() -> None:
    b = node("b", term=1)
    b.step(Heartbeat(src="a", dst="b", term=1, commit=0))
    with pytest.raises(NotLeaderError) as info:
        b.read_index(b"r")
    assert info.value.leader_hint == "a"
    with pytest.raises(NotLeaderError):
        b.propose(b"x")


def test_lost_leadership_drops_pending_reads() -> None:
    a = leader()
    ack(a, "b", a.last_index)
    a.read_index(b"r")
    drain(a)
    a.step(AppendResponse(src="b", dst="a", term=a.term + 1, success=False, match_index=0))
    events = a.ready().events
    assert any(getattr(e, "ctx", None) == b"r" for e in events)


def test_lease_read_skips_the_round_only_while_the_lease_holds() -> None:
    a = leader(lease_read=True, check_quorum=True, election_tick=10)
    ack(a, "b", a.last_index)
    a.tick()
    hb = of(drain(a), Heartbeat)
    a.step(HeartbeatResponse(src="b", dst="a", term=a.term, ctx=hb[0].ctx))
    a.read_index(b"fast")
    rd = a.ready()
    a.advance(rd)
    assert [r.ctx for r in rd.read_states] == [b"fast"]
    for _ in range(9):  # no acks: the lease runs out before followers may elect anew
        a.tick()
    drain(a)
    a.read_index(b"slow")
    assert not a.ready().read_states


# -- snapshots (7) ---------------------------------------------------------------------


def test_follower_behind_compacted_log_gets_snapshot() -> None:
    a = leader()
    for i in range(5):
        a.propose(b"x%d" % i)
    drain(a)
    ack(a, "b", a.last_index)
    rd = a.ready()
    a.advance(rd)
    a.compact(a.commit_index, b"fsm-state")
    assert a.first_index == a.commit_index + 1
    # c never answered; its heartbeat response makes the leader retry from index 1,
    # which is compacted away: it must send the snapshot instead.
    a.step(HeartbeatResponse(src="c", dst="a", term=a.term, ctx=1))
    snaps = of(drain(a), SnapshotRequest)
    assert snaps and snaps[0].snapshot.data == b"fsm-state"
    c = node("c", term=a.term)
    c.step(snaps[0])
    rd = c.ready()
    assert rd.snapshot is snaps[0].snapshot and c.commit_index == snaps[0].snapshot.meta.index
    c.advance(rd)
    assert c.applied_index == c.commit_index
    (resp,) = of(list(rd.messages), AppendResponse)
    assert resp.success and resp.match_index == c.commit_index


def test_restart_from_snapshot_and_later_entries() -> None:
    a = leader()
    for i in range(3):
        a.propose(b"x%d" % i)
    drain(a)
    ack(a, "b", a.last_index)
    rd = a.ready()
    a.advance(rd)
    a.compact(3, b"snap")
    snap = a.snapshot
    assert snap is not None
    rest = a.entries(4, a.last_index + 1)
    r = RaftCore(
        RaftConfig(id="a"),
        voters=VOTERS,
        hard_state=a.hard_state,
        snapshot=snap,
        entries=rest,
        applied=3,
    )
    assert (r.first_index, r.last_index, r.commit_index, r.applied_index) == (
        4,
        a.last_index,
        a.commit_index,
        3,
    )
    assert [e.index for e in r.ready().committed] == list(range(4, a.commit_index + 1))


# -- membership (dissertation 4) -------------------------------------------------------


def test_only_one_uncommitted_configuration_change_at_a_time() -> None:
    a = leader()
    ack(a, "b", a.last_index)
    a.propose_conf_change(ConfChange(type=ConfChangeType.ADD_LEARNER, node_id="d"))
    with pytest.raises(ProposalDroppedError):
        a.propose_conf_change(ConfChange(type=ConfChangeType.ADD_VOTER, node_id="d"))


def test_new_leader_refuses_changes_until_its_noop_commits() -> None:
    a = leader()
    with pytest.raises(ProposalDroppedError):
        a.propose_conf_change(ConfChange(type=ConfChangeType.ADD_VOTER, node_id="d"))
    ack(a, "b", a.last_index)
    a.propose_conf_change(ConfChange(type=ConfChangeType.ADD_VOTER, node_id="d"))


def test_configuration_takes_effect_when_appended() -> None:
    b = node("b", term=1, log=[1])
    new = ConfState(voters=("a", "b", "c", "d"))
    b.step(
        AppendRequest(
            src="a",
            dst="b",
            term=1,
            prev_index=1,
            prev_term=1,
            entries=(Entry(1, 2, EntryKind.CONFIG, encode_conf(new)),),
            commit=0,
        )
    )
    assert b.conf == new and b.commit_index == 0
    # Truncating the entry reverts the configuration.
    b.step(
        AppendRequest(
            src="c",
            dst="b",
            term=2,
            prev_index=1,
            prev_term=1,
            entries=(Entry(2, 2, 0, b""),),
            commit=0,
        )
    )
    assert b.conf == ConfState(voters=VOTERS)


def test_learner_neither_campaigns_nor_counts_for_commit() -> None:
    d = node("d", voters=("a", "b"), pre_vote=False)
    for _ in range(100):
        d.tick()
    assert d.role is Role.FOLLOWER and d.term == 0  # not a member: never campaigns
    a = leader(voters=("a", "b"))
    ack(a, "b", a.last_index)
    idx = a.propose_conf_change(ConfChange(type=ConfChangeType.ADD_LEARNER, node_id="d"))
    assert a.conf.learners == ("d",)
    drain(a)
    ack(a, "d", idx)
    assert a.commit_index < idx  # a learner's ack is not a vote
    ack(a, "b", idx)
    assert a.commit_index == idx


def test_removed_leader_steps_down_once_removal_commits() -> None:
    a = leader()
    ack(a, "b", a.last_index)
    idx = a.propose_conf_change(ConfChange(type=ConfChangeType.REMOVE_NODE, node_id="a"))
    assert a.role is Role.LEADER
    ack(a, "b", idx)
    assert a.role is Role.LEADER  # b alone is not a majority of {b, c}
    ack(a, "c", idx)
    assert a.role is Role.FOLLOWER


def test_leadership_transfer_sends_timeout_now_and_target_campaigns_through_lease() -> None:
    a = leader()
    ack(a, "b", a.last_index)
    drain(a)
    a.transfer_leadership("b")
    (tn,) = of(drain(a), TimeoutNow)
    with pytest.raises(ProposalDroppedError):
        a.propose(b"x")
    b = node("b", term=a.term, check_quorum=True, pre_vote=True, log=[a.term])
    b.step(Heartbeat(src="a", dst="b", term=a.term, commit=0))
    drain(b)
    b.step(tn)
    assert b.role is Role.CANDIDATE
    (req,) = [m for m in of(drain(b), VoteRequest) if m.dst == "c"]
    c = node("c", term=a.term, check_quorum=True, log=[a.term])
    c.step(Heartbeat(src="a", dst="c", term=a.term, commit=0))
    drain(c)
    c.step(req)
    (resp,) = of(drain(c), VoteResponse)
    assert resp.granted


def test_leadership_transfer_resends_a_lost_timeout_now() -> None:
    a = leader()
    ack(a, "b", a.last_index)
    drain(a)
    a.transfer_leadership("b")
    assert of(drain(a), TimeoutNow)  # ... and lost on the way
    a.step(HeartbeatResponse(src="c", dst="a", term=a.term, ctx=1))
    assert not of(drain(a), TimeoutNow)  # only the target's answers trigger it
    a.step(HeartbeatResponse(src="b", dst="a", term=a.term, ctx=1))
    (tn,) = of(drain(a), TimeoutNow)
    assert tn.dst == "b" and tn.term == a.term


class _Router:
    """A tiny hand-driven network of cores: deliver only between ``allowed`` nodes."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.cores = {
            i: RaftCore(
                RaftConfig(id=i, pre_vote=False, check_quorum=False, max_entries_per_msg=1),
                voters=list(ids),
                rng_seed=n,
            )
            for n, i in enumerate(ids)
        }
        self.applied: dict[str, list[Entry]] = {i: [] for i in ids}

    def restart(self, nid: str) -> RaftCore:
        """Crash and restart ``nid`` from its (fully persisted) state."""
        old = self.cores[nid]
        self.cores[nid] = RaftCore(
            RaftConfig(id=nid, pre_vote=False, check_quorum=False, max_entries_per_msg=1),
            voters=list(old.conf.voters),
            hard_state=old.hard_state,
            entries=old.entries(1, old.last_index + 1),
            applied=old.applied_index,
            rng_seed=7,
        )
        return self.cores[nid]

    def campaign(self, nid: str, allowed: set[str], *, min_term: int = 0) -> None:
        core = self.cores[nid]
        for _ in range(200):
            core.tick()
            if core.role is Role.CANDIDATE and core.term >= min_term:
                break
        # Stop the moment it wins: its first messages as leader are not delivered yet.
        self.flush(allowed, stop=lambda: core.role is Role.LEADER)
        assert core.role is Role.LEADER

    def flush(self, allowed: set[str], block: object = None, stop: object = None) -> None:
        queue: list[Message] = []
        for _ in range(1000):
            for nid in sorted(allowed):
                core = self.cores[nid]
                if core.has_ready():
                    rd = core.ready()
                    self.applied[nid].extend(rd.committed)
                    queue.extend(
                        m
                        for m in rd.messages
                        if m.dst in allowed and not (block and block(m))  # type: ignore[operator]
                    )
                    core.advance(rd)
            if not queue:
                return
            msgs, queue = queue, []
            for m in msgs:
                self.cores[m.dst].step(m)
                if stop and stop():  # type: ignore[operator]
                    return
        raise AssertionError("router did not settle")


def test_figure_8_an_old_term_entry_on_a_majority_can_still_be_overwritten() -> None:
    # Paper figure 8, end to end: with the 5.4.2 rule the scenario is harmless; a core
    # that commits by counting replicas of an old-term entry loses a committed entry.
    everyone = {"s1", "s2", "s3", "s4", "s5"}
    net = _Router(sorted(everyone))
    s1, s3, s5 = net.cores["s1"], net.cores["s3"], net.cores["s5"]
    net.campaign("s1", everyone)
    net.flush(everyone)  # term 1, no-op at 1 committed everywhere
    x = s1.propose(b"X")  # index 2, reaches s2 only
    net.flush({"s1", "s2"})
    s1 = net.restart("s1")  # s1 crashes
    net.campaign("s5", {"s3", "s4", "s5"})  # term 2; crashes before its no-op spreads
    # s1 restarts, wins a later term with s2, s3 and sends X (term 1) to s3, never its
    # no-op.
    s1 = net.restart("s1")
    net.campaign("s1", {"s1", "s2", "s3"}, min_term=s5.term + 1)
    net.flush(
        {"s1", "s2", "s3"},
        # s3 may reject probes, but never stores anything after X.
        block=lambda m: (
            m.src == "s1"
            and m.dst == "s3"
            and isinstance(m, AppendRequest)
            and any(e.index > x for e in m.entries)
            and m.prev_index <= s3.last_index
        ),
    )
    assert s3.term_at(x) == 1  # X is now on s1, s2, s3: a majority, but of term 1
    assert s1.commit_index < x, "5.4.2: an old-term entry is not committed by counting"
    # s1 crashes; s5 restarts (last term 2 > 1), wins with s3, s4 and overwrites index 2.
    s5 = net.restart("s5")
    net.campaign("s5", {"s2", "s3", "s4", "s5"}, min_term=s1.term + 1)
    net.flush({"s2", "s3", "s4", "s5"})
    assert s5.commit_index >= x and s3.term_at(x) == 2
    by_index: dict[int, Entry] = {}
    for entries in net.applied.values():
        for e in entries:
            assert by_index.setdefault(e.index, e) == e, (
                f"two different entries applied at {e.index}"
            )
