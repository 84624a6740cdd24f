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
replicas across live nodes by *size*, as PD's ``region_score``: a node's load is the sum
of the weights of the ranges it holds a replica of, a range's weight being its bytes
(keys and values), at least ``PlacementRules.size_floor`` (PD counts an empty region as
1 MiB, so empty ranges balance by count). A replica of a range of weight ``w`` moves
from node S to node T only if ``load(S) - load(T) > 2 * w`` (PD's rule): the move then
narrows the gap without flipping it, so the sum of squared loads strictly decreases and
a static load reaches a fixed point after finitely many moves (no oscillation). On top,
at most one move is in flight per range, at most ``max_moves`` start per ``interval``,
and a range that moved is not moved again within ``cooldown`` (so no move is undone
while loads settle).

**Leaders** (:func:`plan_leader_transfer`) balance by *load*: a node's leader score is
the sum, over the ranges it leads, of each range's requests per second (at least
``qps_floor``, so idle ranges balance by count). A range of weight ``w`` hands its
leadership from S to a voter T only if ``score(S) - score(T) > (1 + leader_tolerance) * w``:
the sum of squared scores then drops by at least ``2 * leader_tolerance * w**2``, so a
static load reaches a fixed point, and the tolerance is the hysteresis that keeps noisy
request rates from moving a leader back and forth; a range whose leader moved is not
moved again within ``cooldown``.

**Down nodes** (PD's replica checker with ``max-store-down-time``): a
:class:`NodeLiveness` remembers when each node last answered the metadata leader; a node
silent for ``down_after`` seconds is *down*, and :func:`plan_repairs` replaces each of
its replicas: a move from the down node to the live node with the least load that holds
none of the range (add learner, catch up, promote, remove the dead one), only while the
range's live voters form a quorum (else no configuration change can commit), at most
``max_repairs`` in flight, one move per range at a time. Replica balancing waits while a
node is down or a repair runs. A node that comes back simply holds fewer replicas; its
stale replicas are dropped by epoch (the host's job), and only the ordinary balancing
rule may move replicas to it again.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

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
        size: its size in bytes (keys and values).
        leader: its leader, if known.
        learners: the replicas that are learners (a move is under way).
        qps: requests per second its leader serves.
    """

    range_id: int
    replicas: tuple[str, ...]
    size: int = 0
    leader: str | None = None
    learners: tuple[str, ...] = ()
    qps: float = 0.0

    def weight(self, floor: int = 1) -> int:
        """The range's contribution to a node's load: its size, at least ``floor``."""
        return max(self.size, floor)

    def leader_weight(self, floor: float = 1.0) -> float:
        """The range's contribution to its leader's score: its QPS, at least ``floor``."""
        return max(self.qps, floor)

    @property
    def voters(self) -> tuple[str, ...]:
        """The replicas that vote."""
        return tuple(n for n in self.replicas if n not in self.learners)


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
        max_moves: balancing replica moves started per ``interval`` at most.
        interval: seconds of the rate limit's window.
        cooldown: seconds before a range that moved (or whose leader moved) may move again.
        size_floor: bytes a range weighs at least (PD counts an empty region as 1 MiB).
        qps_floor: requests/s a led range weighs at least in its leader's score.
        leader_tolerance: hysteresis of leader balancing (see the module docstring).
        down_after: seconds a node may stay silent before its replicas are replaced
            (PD's ``max-store-down-time`` is 30 min, CockroachDB's
            ``server.time_until_store_dead`` 5 min).
        max_repairs: replacements of replicas on down nodes in flight at once.
    """

    max_moves: int = 1
    interval: float = 10.0
    cooldown: float = 60.0
    size_floor: int = 1 << 20
    qps_floor: float = 1.0
    leader_tolerance: float = 0.2
    down_after: float = 300.0
    max_repairs: int = 4

    def __post_init__(self) -> None:
        if self.max_moves < 1 or self.interval <= 0 or self.cooldown < 0:
            raise BadInputError("max_moves >= 1, interval > 0 and cooldown >= 0 are required")
        if self.size_floor < 1 or self.qps_floor <= 0 or self.leader_tolerance <= 0:
            raise BadInputError("size_floor >= 1, qps_floor > 0, leader_tolerance > 0 required")
        if self.down_after <= 0 or self.max_repairs < 1:
            raise BadInputError("down_after > 0 and max_repairs >= 1 are required")


@dataclass(slots=True)
class PlacementState:
    """What the placement loop remembers between rounds: the moves it started (for
    the rate limit and the cool-down), those still in flight, the repairs among them,
    and the leader transfers it started (for their cool-down)."""

    started: list[tuple[float, ReplicaMove]] = field(default_factory=list)
    in_flight: set[int] = field(default_factory=set)
    repairing: set[int] = field(default_factory=set)
    transfers: list[tuple[float, int, float]] = field(default_factory=list)

    def record(self, now: float, move: ReplicaMove, *, repair: bool = False) -> None:
        """A move was started at ``now`` (``repair``: it replaces a down replica)."""
        if repair:
            self.repairing.add(move.range_id)
        else:
            self.started.append((now, move))
        self.in_flight.add(move.range_id)

    def finished(self, range_id: int) -> None:
        """The move of ``range_id`` ended (done or failed)."""
        self.in_flight.discard(range_id)
        self.repairing.discard(range_id)

    def transferred(self, now: float, range_id: int, qps: float = 0.0) -> None:
        """A leader transfer of ``range_id`` (serving ``qps`` requests/s) was started at
        ``now``. Until the cool-down ends the range counts at least ``qps`` in its new
        leader's score: the new leader's own load window starts empty."""
        self.transfers.append((now, range_id, qps))

    def forget_before(self, t: float) -> None:
        """Drop records older than ``t`` (they limit nothing any more)."""
        self.started = [(at, m) for at, m in self.started if at >= t]
        self.transfers = [x for x in self.transfers if x[0] >= t]


@dataclass(slots=True)
class NodeLiveness:
    """When each node last answered the metadata leader (see the module docstring).

    The clock of a node never heard from starts when tracking started, so a new
    metadata leader waits ``down_after`` before it calls anybody down.
    """

    since: float | None = None
    seen: dict[str, float] = field(default_factory=dict)

    def observe(self, nodes: Iterable[str], now: float) -> None:
        """``nodes`` answered at ``now``."""
        if self.since is None:
            self.since = now
        for n in nodes:
            self.seen[n] = now

    def down(self, nodes: Iterable[str], now: float, down_after: float) -> list[str]:
        """The ``nodes`` silent for ``down_after`` seconds or more, sorted."""
        if self.since is None:
            return []
        return sorted(n for n in nodes if now - self.seen.get(n, self.since) >= down_after)

    def reset(self) -> None:
        """Forget everything (this node stopped leading the metadata range)."""
        self.since = None
        self.seen.clear()


def node_loads(
    ranges: Sequence[RangeInfo], nodes: Sequence[str], *, floor: int = 1
) -> dict[str, int]:
    """Each node's load: the summed weights (sizes, at least ``floor``) of the ranges it
    holds a replica of."""
    load = dict.fromkeys(nodes, 0)
    for r in ranges:
        w = r.weight(floor)
        for n in r.replicas:
            if n in load:
                load[n] += w
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
    also when ``rules.max_moves`` moves started within ``rules.interval``, and while a
    repair (:func:`plan_repairs`) is in flight.
    """
    if state.repairing:
        return None
    if sum(1 for at, _ in state.started if now - at < rules.interval) >= rules.max_moves:
        return None
    live = set(alive)
    floor = rules.size_floor
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
    load = node_loads(ranges, sorted(live), floor=floor)
    pairs = sorted(
        ((s, t) for s in load for t in load if load[s] - load[t] > 2 * floor),
        key=lambda p: (load[p[1]] - load[p[0]], p),
    )
    for s, t in pairs:
        gap = load[s] - load[t]
        fits = [
            r
            for r in movable
            if s in r.replicas and t not in r.replicas and 2 * r.weight(floor) < gap
        ]
        if fits:
            best = min(fits, key=lambda r: (-r.weight(floor), r.range_id))
            return ReplicaMove(best.range_id, s, t)
    return None


def plan_repairs(
    ranges: Sequence[RangeInfo],
    alive: Sequence[str],
    down: Collection[str],
    *,
    state: PlacementState,
    rules: PlacementRules,
) -> list[ReplicaMove]:
    """Moves that replace replicas on ``down`` nodes by replicas on live ones.

    A range with a replica on a down node is repaired when it has a known leader, no
    learner and no move in flight, and more than half of its voters are alive (the
    configuration changes of the move must commit; with the new voter promoted, the
    live voters still form a quorum). The replica moves from the down node (the first
    by id, if several) to the live node with the least load (sizes; ties by id) that
    holds no replica of the range; the moves planned here count in that load. At most
    ``rules.max_repairs`` repairs are in flight; lowest range ids first.
    """
    room = rules.max_repairs - len(state.repairing)
    if room <= 0 or not down:
        return []
    live = sorted(set(alive) - set(down))
    floor = rules.size_floor
    load = node_loads(ranges, live, floor=floor)
    out: list[ReplicaMove] = []
    for r in sorted(ranges, key=lambda r: r.range_id):
        if len(out) >= room:
            break
        dead = sorted(n for n in r.replicas if n in down)
        if not dead or r.range_id in state.in_flight or r.learners or r.leader is None:
            continue
        voters = r.voters
        if 2 * sum(1 for n in voters if n in load) <= len(voters):
            continue  # no quorum: nothing can commit until a dead node comes back
        targets = [n for n in live if n not in r.replicas]
        if not targets:
            continue  # no spare node: the range stays under-replicated (as PD)
        dst = min(targets, key=lambda n: (load[n], n))
        load[dst] += r.weight(floor)
        out.append(ReplicaMove(r.range_id, dead[0], dst))
    return out


def plan_leader_transfer(
    ranges: Sequence[RangeInfo],
    alive: Sequence[str],
    *,
    rules: PlacementRules | None = None,
    now: float = 0.0,
    state: PlacementState | None = None,
) -> tuple[int, str] | None:
    """One leader transfer that evens out the leaders' load across live nodes, or None.

    A node's score is the summed :meth:`RangeInfo.leader_weight` of the ranges it leads.
    From the node with the highest score, a range of weight ``w`` hands its leadership
    to a live voter T of that range when ``score(S) - score(T) > (1 + tolerance) * w``
    (the heaviest such range, then the lowest-scored voter, ties by node id, then by
    highest range id). With every range weighing the same this is a transfer to a node with at least
    two leaders fewer. Ranges whose leader moved within ``rules.cooldown`` (per
    ``state``) stay, and count at least the rate they had when it moved (the new
    leader's load window starts empty). None when some range has no known leader (the scores are not
    trustworthy) or nothing is uneven enough.

    Returns:
        ``(range_id, target_node)``.
    """
    rules = rules or PlacementRules()
    if any(r.leader is None for r in ranges):
        return None
    floor, tol = rules.qps_floor, rules.leader_tolerance
    recent: dict[int, float] = {}  # range -> the rate it had when its leader moved
    for at, rid, qps in state.transfers if state else ():
        if now - at < rules.cooldown:
            recent[rid] = max(recent.get(rid, 0.0), qps)
    ranges = [
        replace(r, qps=max(r.qps, recent[r.range_id])) if r.range_id in recent else r
        for r in ranges
    ]
    score = dict.fromkeys(sorted(alive), 0.0)
    for r in ranges:
        if r.leader in score:
            score[r.leader] += r.leader_weight(floor)
    for src in sorted(score, key=lambda n: (-score[n], n)):
        best: tuple[float, float, str, int] | None = None  # the smallest wins
        for r in ranges:
            if r.leader != src or r.range_id in recent:
                continue
            w = r.leader_weight(floor)
            for t in r.voters:
                if t in score and t != src and score[src] - score[t] > (1 + tol) * w:
                    cand = (-w, score[t], t, -r.range_id)
                    if best is None or cand < best:
                        best = cand
        if best is not None:
            return -best[3], best[2]
    return None


def apply_move(ranges: Sequence[RangeInfo], move: ReplicaMove) -> list[RangeInfo]:
    """``ranges`` after ``move`` completed (for simulations and tests)."""
    out = []
    for r in ranges:
        if r.range_id == move.range_id:
            reps = tuple(move.dst if n == move.src else n for n in r.replicas)
            lead = move.dst if r.leader == move.src else r.leader
            r = replace(r, replicas=reps, leader=lead)
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
    "NodeLiveness",
    "PlacementRules",
    "PlacementState",
    "RangeInfo",
    "ReplicaMove",
    "apply_move",
    "loads_by_leader",
    "next_move_step",
    "node_loads",
    "plan_leader_transfer",
    "plan_repairs",
    "plan_replica_move",
]
