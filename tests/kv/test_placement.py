"""The pure placement decisions: move steps, replica and leader balancing, no oscillation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import BadInputError
from dsys.kv.placement import (
    MoveStep,
    PlacementRules,
    PlacementState,
    RangeInfo,
    ReplicaMove,
    apply_move,
    next_move_step,
    node_loads,
    plan_leader_transfer,
    plan_replica_move,
)
from dsys.kv.rangefsm import RangeStateMachine, Split, replicas_after
from dsys.kv.ranges import Epoch, RangeDescriptor
from dsys.raft.messages import ConfState

NODES = ["n1", "n2", "n3", "n4"]


def step(voters: str, learners: str = "", leader: str = "n1", match: int | None = 0) -> MoveStep:
    return next_move_step(
        voters=voters.split(),
        learners=learners.split(),
        leader=leader,
        src="n1",
        dst="n4",
        dst_match=match,
        last_index=100 if match != 0 else 5,
        min_match=1,
        max_lag=10,
    )


@pytest.mark.parametrize(
    ("voters", "learners", "leader", "match", "want"),
    [
        ("n1 n2 n3", "", "n1", None, MoveStep.ADD_LEARNER),
        ("n1 n2 n3", "n4", "n1", None, MoveStep.CATCH_UP),
        ("n1 n2 n3", "n4", "n1", 89, MoveStep.CATCH_UP),
        ("n1 n2 n3", "n4", "n1", 90, MoveStep.PROMOTE),
        ("n1 n2 n3", "n4", "n1", 0, MoveStep.CATCH_UP),  # never answered (a short log)
        ("n1 n2 n3 n4", "", "n1", 100, MoveStep.TRANSFER_LEADER),
        ("n1 n2 n3 n4", "", "n2", 100, MoveStep.REMOVE),
        ("n2 n3 n4", "", "n2", 100, MoveStep.DONE),
    ],
    ids=[
        "add",
        "wait-unknown",
        "wait-behind",
        "promote",
        "wait-silent",
        "transfer",
        "remove",
        "done",
    ],
)
def test_move_steps(
    voters: str, learners: str, leader: str, match: int | None, want: MoveStep
) -> None:
    assert step(voters, learners, leader, match) is want


def test_move_step_refuses_nonsense() -> None:
    with pytest.raises(BadInputError, match="holds no replica"):
        step("n2 n3")
    with pytest.raises(BadInputError, match="itself"):
        next_move_step(
            voters=["n1"], learners=[], leader="n1", src="n1", dst="n1", dst_match=0, last_index=1
        )


def test_conf_entries_bump_conf_ver_and_snapshot_carries_epoch() -> None:
    desc = RangeDescriptor(range_id=3, start="b", end="m", replicas=("n1", "n2", "n3"))
    fsm = RangeStateMachine(desc)
    seen: list[tuple[int, ...]] = []
    fsm.on_conf = lambda d, c: seen.append(d.epoch)
    fsm.apply_conf(ConfState(voters=("n1", "n2", "n3"), learners=("n4",)), 10)
    assert fsm.desc.replicas == ("n1", "n2", "n3", "n4") and fsm.learners == ("n4",)
    assert fsm.apply_split(Split("c", 9, 1)).status == "conf_change_in_progress"
    fsm.apply_conf(ConfState(voters=("n1", "n2", "n3", "n4")), 11)
    fsm.apply_conf(ConfState(voters=("n2", "n3", "n4")), 12)
    assert fsm.desc.epoch == Epoch(4, 1) and fsm.desc.replicas == ("n2", "n3", "n4")
    assert seen == [Epoch(2, 1), Epoch(3, 1), Epoch(4, 1)]
    fsm.apply_conf(ConfState(voters=("n2", "n3", "n4"), learners=("n5",)), 13)
    empty = RangeStateMachine(RangeDescriptor(range_id=3, start="", end=None), initialized=False)
    empty.restore(fsm.snapshot())
    assert empty.initialized and empty.desc == fsm.desc and empty.learners == ("n5",)
    assert (empty.desc.start, empty.desc.end, empty.desc.epoch) == ("b", "m", Epoch(5, 1))


def test_replicas_after_keeps_order() -> None:
    assert replicas_after(("b", "a"), ConfState(voters=("a", "b", "c"))) == ("b", "a", "c")
    assert replicas_after(("b", "a"), ConfState(voters=("a",), learners=("d",))) == ("a", "d")


def test_rules_gap_rate_limit_and_cooldown() -> None:
    rules = PlacementRules(max_moves=1, interval=10.0, cooldown=60.0)
    big = RangeInfo(1, ("n1", "n2", "n3"), size=10)
    small = RangeInfo(2, ("n1", "n2", "n3"), size=3)
    ranges = [big, small]
    state = PlacementState()
    # loads 13, 13, 13, 0: the big range would need a gap > 20, the small one > 6
    move = plan_replica_move(ranges, NODES, now=0.0, state=state, rules=rules)
    assert move == ReplicaMove(2, "n1", "n4")
    state.record(0.0, move)
    assert plan_replica_move(ranges, NODES, now=1.0, state=state, rules=rules) is None  # rate
    state.finished(2)
    after = apply_move(ranges, move)
    # loads 10, 13, 13, 3: gap 10 > 6 but range 2 is cooling down; range 1 needs > 20
    assert plan_replica_move(after, NODES, now=11.0, state=state, rules=rules) is None
    # a node that is down is neither a source nor a target, nor are its ranges moved
    assert (
        plan_replica_move(ranges, ["n1", "n2", "n3"], now=100, state=PlacementState(), rules=rules)
        is None
    )
    with pytest.raises(BadInputError):
        PlacementRules(max_moves=0)


def test_leader_transfer_only_to_voters_with_two_fewer() -> None:
    ranges = [
        RangeInfo(1, ("n1", "n2", "n3"), leader="n1"),
        RangeInfo(2, ("n1", "n2", "n3"), leader="n1"),
        RangeInfo(3, ("n1", "n4", "n3"), leader="n1", learners=("n4",)),
    ]
    assert plan_leader_transfer(ranges, NODES) == (2, "n2")
    assert plan_leader_transfer(ranges[:1], NODES) is None
    assert plan_leader_transfer([*ranges, RangeInfo(4, ("n2",))], NODES) is None  # unknown


range_sets = st.lists(
    st.tuples(
        st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True),
        st.integers(0, 50),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=100, deadline=None)
@given(raw=range_sets, max_moves=st.integers(1, 3), cooldown=st.sampled_from([0.0, 5.0, 60.0]))
def test_static_load_reaches_a_fixed_point_and_never_undoes_a_move(
    raw: list[tuple[list[str], int]], max_moves: int, cooldown: float
) -> None:
    ranges = [RangeInfo(i + 1, tuple(reps), size=size) for i, (reps, size) in enumerate(raw)]
    rules = PlacementRules(max_moves=max_moves, interval=1.0, cooldown=cooldown)
    state = PlacementState()
    now = 0.0
    moves: list[tuple[float, ReplicaMove]] = []
    # each move lowers the sum of squared loads by at least 2 * w * (gap - w) >= 4, so
    # the number of moves is bounded by that sum / 4
    bound = sum(v * v for v in node_loads(ranges, NODES).values()) // 4 + 1
    idle = 0
    while idle < 5:
        now += 1.0
        move = plan_replica_move(ranges, NODES, now=now, state=state, rules=rules)
        if move is None:
            idle += 1 if now > cooldown + 2 else 0
            continue
        idle = 0
        state.record(now, move)
        state.finished(move.range_id)  # moves complete within a round here
        for at, m in moves:  # never moved back within the cool-down
            if m.range_id == move.range_id and now - at < cooldown:
                raise AssertionError(f"range {m.range_id} moved again within the cool-down")
        moves.append((now, move))
        ranges = apply_move(ranges, move)
        assert len(moves) <= bound, moves
    # the fixed point: no candidate fits PD's rule any more, and later rounds stay quiet
    load = node_loads(ranges, NODES)
    for r in ranges:
        for s in r.replicas:
            for t in NODES:
                if t not in r.replicas:
                    assert load[s] - load[t] <= 2 * r.weight, (load, r)
    for k in range(20):
        assert plan_replica_move(ranges, NODES, now=now + 100 + k, state=state, rules=rules) is None


@settings(max_examples=100, deadline=None)
@given(
    raw=st.lists(
        st.tuples(
            st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True),
            st.integers(0, 2),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_leader_balancing_converges(raw: list[tuple[list[str], int]]) -> None:
    ranges = [
        RangeInfo(i + 1, tuple(reps), leader=reps[k % len(reps)]) for i, (reps, k) in enumerate(raw)
    ]
    for _ in range(len(ranges) * len(ranges) + 1):
        t = plan_leader_transfer(ranges, NODES)
        if t is None:
            break
        rid, to = t
        ranges = [
            RangeInfo(r.range_id, r.replicas, leader=to) if r.range_id == rid else r for r in ranges
        ]
    else:
        raise AssertionError("leader balancing did not settle")
    assert plan_leader_transfer(ranges, NODES) is None
