"""Shard routing: keys -> fixed shards -> replica nodes, and rebalance planning.

Theory of operation:
    Keys are never placed on nodes directly. The 32-bit key hash space
    (:func:`dsys.sharding.ring.hash_key`) is cut into ``shards`` equal, contiguous
    ranges, and shard ``s`` holds the keys whose hash ``h`` has
    ``h * shards >> 32 == s``. The shard count is fixed for the life of the data, so
    a key's shard never changes. Each shard is then placed on ``replicas`` distinct
    nodes by a :class:`~dsys.sharding.HashRing` preference list (``get_n``), the first
    being the primary.

    Changing the nodes only changes the shard -> nodes table. Comparing the old and
    new tables gives a :class:`RebalancePlan`: for every shard whose replica set
    changes, which key range it is, which nodes must receive a copy (``to_nodes``)
    and which may drop theirs once the copy is done (``from_nodes``). Because the
    ring moves the minimum, adding one node to ``n`` equal nodes moves about
    ``1/(n+1)`` of all replica copies, all of them to the new node.

    Example::

        router = ShardRouter(["n1", "n2", "n3"], shards=64, replicas=2)
        plan = router.plan_rebalance(router.with_nodes(["n1", "n2", "n3", "n4"]))
        for move in plan.moves:
            print(move)  # shard 5 [0x14000000, 0x18000000): copy to n4 from n1; drop from n2

This module is pure: no I/O, no clocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dsys.errors import BadInputError, ConfigError
from dsys.sharding.ring import HashRing, Key, RingMode, hash_key

__all__ = [
    "HASH_SPACE",
    "MAX_SHARDS",
    "KeyRange",
    "Move",
    "Placement",
    "RebalancePlan",
    "ShardRouter",
    "plan_rebalance",
]

HASH_SPACE = 2**32
"""Size of the key hash space that shards divide."""

MAX_SHARDS = 2**20
"""The largest shard count (the shard table is computed eagerly)."""

Placement = tuple[tuple[str, ...], ...]
"""Owners of every shard, indexed by shard number; each tuple is primary first."""


@dataclass(frozen=True, slots=True)
class KeyRange:
    """The half-open range ``[start, end)`` of 32-bit key hashes one shard holds.

    ``key in key_range`` tells whether a key belongs to it, so a migration can scan a
    node's keys and pick the ones to copy.
    """

    start: int
    end: int  # invariant: 0 <= start < end <= HASH_SPACE

    @property
    def width(self) -> int:
        """Number of hash values in the range."""
        return self.end - self.start

    @property
    def fraction(self) -> float:
        """Share of the whole key space this range covers."""
        return self.width / HASH_SPACE

    def __contains__(self, key: object) -> bool:
        if isinstance(key, int) and not isinstance(key, bool):
            return self.start <= key < self.end
        return self.start <= hash_key(key) < self.end  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"[{self.start:#010x}, {self.end:#010x})"


@dataclass(frozen=True, slots=True)
class Move:
    """One shard whose replica set changes, and how to migrate it.

    Attributes:
        shard: the shard number.
        key_range: the key hashes the shard holds.
        from_nodes: nodes that stop holding the shard; they may delete it once every
            node in ``to_nodes`` has its copy.
        to_nodes: nodes that start holding the shard; copy its keys to them.
        old_owners: the shard's owners before, primary first.
        new_owners: the shard's owners after, primary first.
    """

    shard: int
    key_range: KeyRange
    from_nodes: tuple[str, ...]
    to_nodes: tuple[str, ...]
    old_owners: tuple[str, ...]
    new_owners: tuple[str, ...]

    @property
    def sources(self) -> tuple[str, ...]:
        """Nodes to copy from: old owners that keep the shard, else the departing ones."""
        kept = tuple(node for node in self.old_owners if node not in self.from_nodes)
        return kept or self.from_nodes

    def __str__(self) -> str:
        actions = []
        if self.to_nodes:
            actions.append(f"copy to {', '.join(self.to_nodes)} from {', '.join(self.sources)}")
        if self.from_nodes:
            actions.append(f"drop from {', '.join(self.from_nodes)}")
        return f"shard {self.shard} {self.key_range}: {'; '.join(actions)}"


@dataclass(frozen=True, slots=True)
class RebalancePlan:
    """Everything that must move to go from one shard placement to another.

    Attributes:
        moves: one :class:`Move` per shard whose replica set changes, by shard number.
        shards: the (unchanged) shard count.
        replicas: owners per shard in the new placement.
        old_nodes: the nodes before.
        new_nodes: the nodes after.
        ideal_fraction: the least share of replica copies any placement must move for
            this membership change: ``sum(max(0, new_share - old_share))`` over nodes,
            where a node's share is its weight over the total weight (e.g.
            ``1/(n+1)`` when one node joins ``n`` equal ones).
        primary_changes: number of shards whose primary changes (including those
            that only swap the order of the same owners).
    """

    moves: tuple[Move, ...]
    shards: int
    replicas: int
    old_nodes: tuple[str, ...]
    new_nodes: tuple[str, ...]
    ideal_fraction: float
    primary_changes: int

    @property
    def moved_copies(self) -> int:
        """Number of shard copies that must be written to a new node."""
        return sum(len(move.to_nodes) for move in self.moves)

    @property
    def moved_fraction(self) -> float:
        """Share of all replica copies (weighted by key range) that must be copied."""
        moved = sum(len(move.to_nodes) * move.key_range.width for move in self.moves)
        return moved / (self.replicas * HASH_SPACE)

    def apply(self, placement: Sequence[Sequence[str]]) -> Placement:
        """Apply the moves to an old placement and return the resulting one.

        Each moved shard keeps its old owners minus ``from_nodes`` and gains
        ``to_nodes`` (appended); unmoved shards are unchanged. The replica *sets*
        equal the new router's; ``Move.new_owners`` gives the new primary order.

        Raises:
            BadInputError: if ``placement`` does not have ``shards`` entries or does
                not hold the owners a move expects to remove.
        """
        if len(placement) != self.shards:
            raise BadInputError(
                f"placement has {len(placement)} shards, the plan is for {self.shards}"
            )
        result = [tuple(owners) for owners in placement]
        for move in self.moves:
            owners = result[move.shard]
            missing = [node for node in move.from_nodes if node not in owners]
            if missing:
                raise BadInputError(f"shard {move.shard} is not on {missing}; wrong placement")
            kept = tuple(node for node in owners if node not in move.from_nodes)
            result[move.shard] = kept + tuple(n for n in move.to_nodes if n not in kept)
        return tuple(result)

    def __str__(self) -> str:
        return (
            f"{len(self.moves)} of {self.shards} shards move, "
            f"{self.moved_fraction:.2%} of replica copies (ideal {self.ideal_fraction:.2%})"
        )


def _check_count(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value


class ShardRouter:
    """Route keys to a fixed number of shards and shards to replica nodes.

    Example:
        >>> router = ShardRouter(["n1", "n2", "n3"], shards=64, replicas=2)
        >>> shard = router.shard_for("user:42")
        >>> router.nodes_for("user:42") == router.owners(shard)
        True

    Args:
        nodes: node names or a mapping ``name -> weight`` (as for HashRing).
        shards: the fixed number of shards, ``1..2**20``. Pick it once, much larger
            than the node count you expect (e.g. 64-4096): keys never change shard.
        replicas: owners per shard, ``1..len(nodes)``.
        vnodes: ring points per unit weight (see :class:`HashRing`).
        mode: the ring layout, ``"mmh3"`` or ``"ketama"``.

    Raises:
        ConfigError: no nodes, bad shard or replica counts, or any HashRing error.
    """

    __slots__ = ("_placement", "_replicas", "_ring", "_shards")

    def __init__(
        self,
        nodes: Iterable[str] | Mapping[str, float],
        shards: int = 64,
        replicas: int = 1,
        *,
        vnodes: int | None = None,
        mode: RingMode = "mmh3",
    ) -> None:
        self._shards = _check_count("shards", shards, 1, MAX_SHARDS)
        self._ring = HashRing(nodes, vnodes=vnodes, mode=mode)
        if not len(self._ring):
            raise ConfigError("a shard router needs at least one node")
        self._replicas = _check_count("replicas", replicas, 1, len(self._ring))
        self._placement: Placement = tuple(
            tuple(self._ring.get_n(f"shard:{shard}", replicas)) for shard in range(shards)
        )

    @property
    def shards(self) -> int:
        """The number of shards."""
        return self._shards

    @property
    def replicas(self) -> int:
        """Owners per shard."""
        return self._replicas

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes, in the order given."""
        return self._ring.nodes

    @property
    def weights(self) -> dict[str, float]:
        """A copy of the ``node -> weight`` mapping."""
        return self._ring.weights

    @property
    def placement(self) -> Placement:
        """Owners of every shard (primary first), indexed by shard number."""
        return self._placement

    def __repr__(self) -> str:
        return (
            f"ShardRouter({self._ring.weights!r}, shards={self._shards}, replicas={self._replicas})"
        )

    def shard_for(self, key: Key) -> int:
        """Return the shard that holds ``key``.

        Raises:
            BadInputError: if ``key`` is not ``str``/``bytes``.
        """
        return (hash_key(key) * self._shards) >> 32

    def key_range(self, shard: int) -> KeyRange:
        """Return the key hashes shard ``shard`` holds.

        Raises:
            BadInputError: if ``shard`` is not in ``range(shards)``.
        """
        self._check_shard(shard)
        start = -(-(shard * HASH_SPACE) // self._shards)
        end = -(-((shard + 1) * HASH_SPACE) // self._shards)
        return KeyRange(start, end)

    def owners(self, shard: int) -> tuple[str, ...]:
        """Return the nodes holding ``shard``, primary first.

        Raises:
            BadInputError: if ``shard`` is not in ``range(shards)``.
        """
        self._check_shard(shard)
        return self._placement[shard]

    def nodes_for(self, key: Key) -> tuple[str, ...]:
        """Return the nodes holding ``key``, primary first.

        Raises:
            BadInputError: if ``key`` is not ``str``/``bytes``.
        """
        return self._placement[self.shard_for(key)]

    def primary(self, key: Key) -> str:
        """Return the primary node of ``key``.

        Raises:
            BadInputError: if ``key`` is not ``str``/``bytes``.
        """
        return self._placement[self.shard_for(key)][0]

    def loads(self) -> dict[str, int]:
        """Return the number of shard copies each node holds."""
        counts = dict.fromkeys(self._ring.nodes, 0)
        for owners in self._placement:
            for node in owners:
                counts[node] += 1
        return counts

    def with_nodes(self, nodes: Iterable[str] | Mapping[str, float]) -> ShardRouter:
        """Return a router with the same shards, replicas and ring layout on ``nodes``.

        Raises:
            ConfigError: as for the constructor (e.g. fewer nodes than replicas).
        """
        return ShardRouter(
            nodes,
            self._shards,
            self._replicas,
            vnodes=self._ring.vnodes,
            mode=self._ring.mode,
        )

    def plan_rebalance(self, new: ShardRouter) -> RebalancePlan:
        """Return what must move to go from this router's placement to ``new``'s.

        Raises:
            ConfigError: if ``new`` has a different shard count.
        """
        return plan_rebalance(self, new)

    def _check_shard(self, shard: int) -> None:
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < self._shards:
            raise BadInputError(f"shard must be an integer in 0..{self._shards - 1}, got {shard!r}")


def _ideal_fraction(old: Mapping[str, float], new: Mapping[str, float]) -> float:
    old_total = sum(old.values())
    new_total = sum(new.values())
    gained = 0.0
    for node, weight in new.items():
        gained += max(0.0, weight / new_total - old.get(node, 0.0) / old_total)
    return gained


def plan_rebalance(old: ShardRouter, new: ShardRouter) -> RebalancePlan:
    """Compare two routers over the same shards and list the shards that move.

    Args:
        old: the placement the data is in now.
        new: the placement to reach (e.g. ``old.with_nodes([...])``).

    Returns:
        A :class:`RebalancePlan` whose moves, applied to ``old.placement``, give the
        replica sets of ``new.placement``.

    Raises:
        ConfigError: if the routers have different shard counts.
    """
    if not isinstance(old, ShardRouter) or not isinstance(new, ShardRouter):
        raise ConfigError("plan_rebalance compares two ShardRouter instances")
    if old.shards != new.shards:
        raise ConfigError(
            f"cannot plan between {old.shards} and {new.shards} shards: the shard count is "
            "fixed for the life of the data"
        )
    moves: list[Move] = []
    primary_changes = 0
    for shard, (before, after) in enumerate(zip(old.placement, new.placement, strict=True)):
        if before[0] != after[0]:
            primary_changes += 1
        if set(before) == set(after):
            continue
        moves.append(
            Move(
                shard=shard,
                key_range=old.key_range(shard),
                from_nodes=tuple(node for node in before if node not in after),
                to_nodes=tuple(node for node in after if node not in before),
                old_owners=before,
                new_owners=after,
            )
        )
    return RebalancePlan(
        moves=tuple(moves),
        shards=old.shards,
        replicas=new.replicas,
        old_nodes=old.nodes,
        new_nodes=new.nodes,
        ideal_fraction=_ideal_fraction(old.weights, new.weights),
        primary_changes=primary_changes,
    )
