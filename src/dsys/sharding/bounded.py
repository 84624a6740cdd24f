"""Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018).

Theory of operation:
    A plain ring gives some nodes noticeably more keys than others, and a few hot
    keys can overload one node. With bounded loads every node has a *capacity*
    ``ceil(c * m / n)`` where ``m`` is the number of keys placed once the new key is
    in (``total + 1``), ``n`` the number of nodes and ``c >= 1`` the load factor
    (``1.25`` lets a node carry 25% more than the mean). A key goes to the first node
    in its ring preference list whose load is *below* its capacity.

    On a weighted ring the capacity is proportional to weight,
    ``ceil(c * m * w / W)`` for a node of weight ``w`` out of a total ``W`` (the same
    as above when all weights are equal).

    The bound always holds when a key is placed: the loads add up to ``m - 1`` and
    the capacities add up to at least ``c * m >= m``, so some node is below its
    capacity, and the chosen node ends with at most its capacity. Keys stay consistent: a key only
    skips its ring owner while that owner is full, and with ``c`` near 1.25 the
    expected number of keys that move when a node joins or leaves stays ``O(1/n)``
    of the total (the paper's result). Releasing keys can leave a node above the
    bound for the smaller total until keys are re-placed; new keys never go to it.

    :meth:`BoundedLoadRing.get` is a pure choice given a ``loads`` mapping (for a
    caller that tracks loads itself, e.g. open connections per backend);
    :meth:`~BoundedLoadRing.assign` and :meth:`~BoundedLoadRing.release` track
    key -> node placements for you.

This module is pure: no I/O, no clocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction

from dsys.errors import BadInputError, ConfigError
from dsys.sharding.ring import HashRing, Key, _bad_key

__all__ = ["BoundedLoadRing", "capacity"]


def capacity(c: float, total: int, nodes: int, *, share: float | Fraction = 1.0) -> int:
    """Return the key bound ``ceil(c * total * share / nodes)``, computed exactly.

    Args:
        c: the load factor (``>= 1``).
        total: the number of keys placed, counting the one being placed.
        nodes: the number of nodes (``>= 1``).
        share: the node's weight over the mean weight (1 when weights are equal).
    """
    bound = Fraction(c) * total * Fraction(share) / nodes
    return -(-bound.numerator // bound.denominator)


_capacity = capacity


class BoundedLoadRing:
    """A :class:`HashRing` whose placements never exceed ``ceil(c * m / n)`` per node.

    (On a weighted ring, each node's bound scales with its weight; see the module.)

    Example:
        >>> bounded = BoundedLoadRing(HashRing(["a", "b", "c"]), c=1.25)
        >>> node = bounded.assign("session:1")
        >>> bounded.loads[node]
        1
        >>> bounded.release("session:1") == node
        True

    Args:
        ring: the ring that gives each key its preference order. It is shared, not
            copied: nodes added to it take part at once. Before removing a node from
            it, release (and re-assign) the keys :meth:`keys_on` lists for that node.
        c: the load factor, a number ``>= 1`` (``1.25`` in the paper's experiments).

    Raises:
        ConfigError: if ``ring`` is not a HashRing or ``c`` is not a number ``>= 1``.
    """

    __slots__ = ("_assigned", "_c", "_loads", "_ring")

    def __init__(self, ring: HashRing, c: float = 1.25) -> None:
        if not isinstance(ring, HashRing):
            raise ConfigError(f"ring must be a HashRing, got {type(ring).__name__}")
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c):
            raise ConfigError(f"load factor c must be a finite number >= 1, got {c!r}")
        if c < 1:
            raise ConfigError(f"load factor c must be >= 1 (1 = perfect balance), got {c!r}")
        self._ring: HashRing = ring
        self._c: float = float(c)
        self._loads: dict[str, int] = {}
        self._assigned: dict[Key, str] = {}

    @property
    def ring(self) -> HashRing:
        """The underlying ring."""
        return self._ring

    @property
    def c(self) -> float:
        """The load factor."""
        return self._c

    @property
    def loads(self) -> dict[str, int]:
        """Keys currently assigned per ring node (a copy; 0 for idle nodes)."""
        return {node: self._loads.get(node, 0) for node in self._ring.nodes}

    @property
    def total(self) -> int:
        """Number of keys currently assigned."""
        return len(self._assigned)

    def capacity(self, total: int, node: str | None = None) -> int:
        """Return the bound for ``total`` placed keys on the ring's current nodes.

        Args:
            total: keys placed, counting the one being placed.
            node: whose bound, on a weighted ring; ``None`` means a node of mean weight.

        Raises:
            ConfigError: if the ring is empty or ``node`` is not in it.
        """
        if not len(self._ring):
            raise ConfigError("the ring has no nodes: add a node before placing keys")
        share: Fraction | float = 1.0
        if node is not None:
            weights = self._ring.weights
            share = (
                Fraction(self._ring.weight(node))
                * len(weights)
                / sum(map(Fraction, weights.values()))
            )
        return _capacity(self._c, total, len(self._ring), share=share)

    def get(self, key: Key, loads: Mapping[str, int]) -> str:
        """Choose the node for a new ``key`` given the current ``loads``; changes nothing.

        Args:
            key: the key to place.
            loads: keys (or any unit of work) per node now; missing nodes count as 0.

        Returns:
            The first node in ``key``'s ring preference list whose load is below
            its capacity: ``ceil(c * (sum(loads) + 1) / n)``, scaled by the node's
            weight over the mean weight on a weighted ring.

        Raises:
            BadInputError: wrong key type, or ``loads`` naming a node not in the ring
                or holding a negative or non-integer count.
            ConfigError: if the ring is empty.
        """
        total = 0
        for node, load in loads.items():
            if node not in self._ring:
                raise BadInputError(f"loads names {node!r}, which is not in the ring")
            if isinstance(load, bool) or not isinstance(load, int) or load < 0:
                raise BadInputError(
                    f"load of {node!r} must be a non-negative integer, got {load!r}"
                )
            total += load
        return self._choose(key, loads, total)

    def _choose(self, key: Key, loads: Mapping[str, int], total: int) -> str:
        weights = self._ring.weights
        if len(set(weights.values())) <= 1:
            cap = self.capacity(total + 1)
            for node in self._ring.iter_owners(key):
                if loads.get(node, 0) < cap:
                    return node
        else:
            weight_sum = sum(map(Fraction, weights.values()))  # exact: shares add up to 1
            c_m = Fraction(self._c) * (total + 1)
            for node in self._ring.iter_owners(key):
                bound = c_m * Fraction(weights[node]) / weight_sum
                if loads.get(node, 0) < -(-bound.numerator // bound.denominator):
                    return node
        raise AssertionError(f"no node below its capacity with {total} keys on {loads}")

    def assign(self, key: Key) -> str:
        """Place ``key`` and count it; an already placed key returns its node unchanged.

        Raises:
            BadInputError: wrong key type.
            ConfigError: if the ring is empty.
        """
        if not isinstance(key, str | bytes):
            raise _bad_key(key)
        node = self._assigned.get(key)
        if node is not None:
            return node
        members = self._ring.nodes
        total = sum(self._loads.get(n, 0) for n in members)
        node = self._choose(key, self._loads, total)
        self._assigned[key] = node
        self._loads[node] = self._loads.get(node, 0) + 1
        return node

    def release(self, key: Key) -> str:
        """Forget ``key``'s placement and return the node it was on.

        Raises:
            BadInputError: if ``key`` is not assigned.
        """
        try:
            node = self._assigned.pop(key)
        except (KeyError, TypeError):
            raise BadInputError(f"key {key!r:.60} is not assigned") from None
        self._loads[node] -= 1
        if not self._loads[node]:
            del self._loads[node]
        return node

    def node_of(self, key: Key) -> str | None:
        """Return the node ``key`` is assigned to, or ``None``."""
        return self._assigned.get(key)

    def keys_on(self, node: str) -> list[Key]:
        """Return the keys assigned to ``node`` (to release them before removing it)."""
        return [key for key, owner in self._assigned.items() if owner == node]
