"""Replica moves and placement decisions of the multi-Raft KV (pure: no I/O, no clock).

Theory of operation
-------------------
**A replica move** of a range from node ``src`` to node ``dst`` follows TiKV/PD's
sequence, one Raft configuration change at a time, each committed in the range's own
log (each bumps the range's ``conf_ver``):

1. ``ADD_LEARNER dst``: ``dst``'s host creates an empty replica when the leader first
   contacts it; the leader snapshots just before, so the learner catches up from an
   InstallSnapshot that carries the range's bounds and epoch;
2. wait until the learner acknowledged the entry that added it and its match index is
   within ``max_lag`` of the leader's last index;
3. ``ADD_VOTER dst`` (promote);
4. if ``src`` leads the range, transfer leadership to ``dst`` (TimeoutNow);
5. ``REMOVE_NODE src``; ``src``'s host drops the group and its data once it learns it.

:func:`next_move_step` says which step comes next for the range's *current*
configuration, so a move is resumable: any leader (the old one after a leader change,
or the new one after step 4) runs the same function and continues where it stands.

**Placement** (:func:`plan_replica_move`, run by the metadata leader) balances the
replicas across live nodes by *load*: a node's load is the sum of the sizes of the
ranges it holds a replica of, where a range's size counts at least 1 (so empty ranges
balance by count). A replica of a range of size ``w`` moves from node S to node T only
if ``load(S) - load(T) > 2 * w`` (PD's rule): the move then narrows the gap without
flipping it, so the sum of squared loads strictly decreases and a static load reaches a
fixed point after finitely many moves (no oscillation). On top, at most one move is in
flight per range, at most ``max_moves`` start per ``interval``, and a range that moved is
not moved again within ``cooldown`` (so no move is undone while loads settle).
:func:`plan_leader_transfer` balances leaders the same way: a transfer from the node with
the most leaders to a voter with at least two fewer.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dsys.errors import BadInputError


class MoveStep(enum.Enum):
    """The next step of a replica move (see the module docstring)."""

    ADD_LEARNER = "add_learner"
    CATCH_UP = "catch_up"
    PROMOTE = "promote"
    TRANSFER_LEADER = "transfer_leader"
    REMOVE = "remove"
    DONE = "done"


def next_move_step(
    *,
    voters: Sequence[str],
    learners: Sequence[str],
    leader: str | None,
    src: str,
    dst: str,
    dst_match: int | None,
    last_index: int,
    min_match: int = 1,
    max_lag: int = 32,
) -> MoveStep:
    """The step that moves the range's replica from ``src`` to ``dst`` forward.

    Args:
        voters, learners: the range's current Raft configuration.
        leader: the range's leader.
        dst_match: the leader's match index of ``dst`` (None: unknown).
        last_index: the leader's last log index.
        min_match: the match ``dst`` needs at least before it is promoted (the index
            of the entry that made it a learner: it acknowledged the snapshot and that
            entry, so it is alive and knows it is a learner).
        max_lag: how far behind ``last_index`` a learner may be to be promoted.

    Raises:
        BadInputError: ``src == dst``, or ``src`` holds no replica and ``dst`` none yet.
    """
    if src == dst:
        raise BadInputError(f"cannot move a replica from {src!r} to itself")
    members = {*voters, *learners}
    if dst not in members:
        if src not in members:
            raise BadInputError(f"{src!r} holds no replica of the range")
        return MoveStep.ADD_LEARNER
    if dst in learners:
        if dst_match is None or dst_match < min_match or dst_match + max_lag < last_index:
            return MoveStep.CATCH_UP
        return MoveStep.PROMOTE
    if src in members:
        return MoveStep.TRANSFER_LEADER if leader == src else MoveStep.REMOVE
    return MoveStep.DONE


@dataclass(frozen=True, slots=True)
class RangeInfo:
    """What placement knows of one data range.

    Attributes:
        range_id: the range.
        replicas: nodes holding a replica (voters and learners).
        size: its size (keys; counted as at least 1).
        leader: its leader, if known.
        learners: the replicas that are learners (a move is under way).
    """

    range_id: int
    replicas: tuple[str, ...]
    size: int = 0
    leader: str | None = None
    learners: tuple[str, ...] = ()

    @property
    def weight(self) -> int:
        """The range's contribution to a node's load (its size, at least 1)."""
        return max(self.size, 1)


@dataclass(frozen=True, slots=True)
class ReplicaMove:
    """Move range ``range_id``'s replica from node ``src`` to node ``dst``."""

    range_id: int
    src: str
    dst: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementRules:
    """Limits of the placement loop.

    Attributes:
        max_moves: replica moves started per ``interval`` at most.
        interval: seconds of the rate limit's window.
        cooldown: seconds before a range that moved may move again.
    """

    max_moves: int = 1
    interval: float = 10.0
    cooldown: float = 60.0

    def __post_init__(self) -> None:
        if self.max_moves < 1 or self.interval <= 0 or self.cooldown < 0:
            raise BadInputError("max_moves >= 1, interval > 0 and cooldown >= 0 are required")


@dataclass(slots=True)
class PlacementState:
    """What the placement loop remembers between rounds: the moves it started (for
    the rate limit and the cool-down) and those still in flight."""

    started: list[tuple[float, ReplicaMove]] = field(default_factory=list)
    in_flight: set[int] = field(default_factory=set)

    def record(self, now: float, move: ReplicaMove) -> None:
        """A move was started at ``now``."""
        self.started.append((now, move))
        self.in_flight.add(move.range_id)

    def finished(self, range_id: int) -> None:
        """The move of ``range_id`` ended (done or failed)."""
        self.in_flight.discard(range_id)

    def forget_before(self, t: float) -> None:
        """Drop records older than ``t`` (they limit nothing any more)."""
        self.started = [(at, m) for at, m in self.started if at >= t]


def node_loads(ranges: Sequence[RangeInfo], nodes: Sequence[str]) -> dict[str, int]:
    """Each node's load: the summed weights of the ranges it holds a replica of."""
    load = dict.fromkeys(nodes, 0)
    for r in ranges:
        for n in r.replicas:
            if n in load:
                load[n] += r.weight
    return load


def plan_replica_move(
    ranges: Sequence[RangeInfo],
    alive: Sequence[str],
    *,
    now: float,
    state: PlacementState,
    rules: PlacementRules,
) -> ReplicaMove | None:
    """One replica move that narrows the load gap between live nodes, or None.

    Only ranges whose replicas are all alive, with no learner and no move in flight,
    and not moved within ``rules.cooldown`` are candidates; a move of a range of weight
    ``w`` from S to T needs ``load(S) - load(T) > 2 * w``. Pairs are tried from the
    widest gap; on a pair, the heaviest candidate moves (ties: lowest range id). None
    also when ``rules.max_moves`` moves started within ``rules.interval``.
    """
    if sum(1 for at, _ in state.started if now - at < rules.interval) >= rules.max_moves:
        return None
    live = set(alive)
    cooled = {m.range_id for at, m in state.started if now - at < rules.cooldown}
    movable = [
        r
        for r in ranges
        if r.range_id not in state.in_flight
        and r.range_id not in cooled
        and not r.learners
        and r.replicas
        and all(n in live for n in r.replicas)
    ]
    load = node_loads(ranges, sorted(live))
    pairs = sorted(
        ((s, t) for s in load for t in load if load[s] - load[t] > 2),
        key=lambda p: (load[p[1]] - load[p[0]], p),
    )
    for s, t in pairs:
        gap = load[s] - load[t]
        fits = [
            r for r in movable if s in r.replicas and t not in r.replicas and 2 * r.weight < gap
        ]
        if fits:
            best = min(fits, key=lambda r: (-r.weight, r.range_id))
            return ReplicaMove(best.range_id, s, t)
    return None


def plan_leader_transfer(
    ranges: Sequence[RangeInfo], alive: Sequence[str]
) -> tuple[int, str] | None:
    """One leader transfer that evens out leaders across live nodes, or None.

    The node with the most leaders hands one range to a live voter of that range with
    at least two leaders fewer (the one with the fewest; ties by id), so the gap never
    flips and the sum of squared counts decreases: no oscillation. None when some range
    has no known leader (the counts are not trustworthy) or nothing is uneven enough.

    Returns:
        ``(range_id, target_node)``.
    """
    if any(r.leader is None for r in ranges):
        return None
    count = dict.fromkeys(sorted(alive), 0)
    for r in ranges:
        if r.leader in count:
            count[r.leader] += 1
    for src in sorted(count, key=lambda n: (-count[n], n)):
        best: tuple[int, str, int] | None = None
        for r in sorted(ranges, key=lambda r: -r.range_id):
            if r.leader != src:
                continue
            for t in r.replicas:
                if (
                    t in count
                    and t not in r.learners
                    and count[src] - count[t] >= 2
                    and (best is None or (count[t], t) < (best[2], best[1]))
                ):
                    best = (r.range_id, t, count[t])
        if best is not None:
            return best[0], best[1]
    return None


def apply_move(ranges: Sequence[RangeInfo], move: ReplicaMove) -> list[RangeInfo]:
    """``ranges`` after ``move`` completed (for simulations and tests)."""
    out = []
    for r in ranges:
        if r.range_id == move.range_id:
            reps = tuple(move.dst if n == move.src else n for n in r.replicas)
            lead = move.dst if r.leader == move.src else r.leader
            r = RangeInfo(r.range_id, reps, r.size, lead, r.learners)
        out.append(r)
    return out


def loads_by_leader(ranges: Sequence[RangeInfo]) -> Mapping[str, int]:
    """Leaders per node (nodes leading nothing are absent)."""
    out: dict[str, int] = {}
    for r in ranges:
        if r.leader is not None:
            out[r.leader] = out.get(r.leader, 0) + 1
    return out


__all__ = [
    "MoveStep",
    "PlacementRules",
    "PlacementState",
    "RangeInfo",
    "ReplicaMove",
    "apply_move",
    "loads_by_leader",
    "next_move_step",
    "node_loads",
    "plan_leader_transfer",
    "plan_replica_move",
]
