"""Rendezvous (highest random weight) hashing, with weights.

Theory of operation:
    Each node draws a pseudo-random score for each key; the key belongs to the node
    with the highest score, and its preference list is the nodes sorted by score. A
    node's scores do not depend on the other nodes, so adding a node moves only the
    keys it now wins (about ``w_new / W`` of them) and removing one moves only its
    own keys, with no virtual nodes and perfect expected balance. The price is
    ``O(n)`` hashes per lookup, fine for tens of nodes.

    For weights the score is ``-w / ln(u)`` where ``u`` in ``(0, 1)`` is the key's
    hash under the node's seed (the "logarithmic method" of Schindelhauer and
    Schomaker, "Weighted distributed hash tables", 2005): the node with
    weight ``w`` wins a ``w / W`` share of keys, and changing one weight moves keys
    only to or from that node. With equal weights the score is monotone in ``u``,
    so the raw hash is compared directly.

    Hashes are 64-bit MurmurHash3 of the key with a per-node 32-bit seed (the 32-bit
    mmh3 of the node name). Two node names whose seeds collide (odds about
    ``n**2 / 2**33``) would draw identical scores, so ``add`` refuses them.

This module is pure: no I/O, no clocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import mmh3

from dsys.errors import BadInputError, ConfigError
from dsys.sharding.ring import Key, _bad_key, _check_node, _check_weight, safe_key

__all__ = ["RendezvousHash"]

_hash64 = mmh3.hash64
_hash32 = mmh3.hash
_EMPTY = "the rendezvous hash has no nodes: add a node before looking up keys"


def _unit(h: int) -> float:
    """Map a 64-bit hash to a float strictly inside (0, 1) using its top 53 bits."""
    return ((h >> 11) + 0.5) / 9007199254740992.0


class RendezvousHash:
    """Highest-random-weight hashing of keys onto weighted nodes.

    Example:
        >>> hrw = RendezvousHash({"a": 1, "b": 1, "c": 2})
        >>> hrw.get("user:42") in hrw
        True

    Args:
        nodes: node names (weight 1 each) or a mapping ``name -> weight``.

    Raises:
        ConfigError: duplicate or non-string names, bad weights, or two names whose
            hash seeds collide.
    """

    __slots__ = ("_members", "_seeds", "_uniform", "_weights")

    def __init__(self, nodes: Iterable[str] | Mapping[str, float] = ()) -> None:
        if isinstance(nodes, str | bytes):
            raise ConfigError("nodes must be a list of names or a mapping of name -> weight")
        self._weights: dict[str, float] = {}
        self._seeds: dict[int, str] = {}
        # (seed, weight, node) per member, rebuilt on every membership change.
        self._members: list[tuple[int, float, str]] = []
        self._uniform = True
        if isinstance(nodes, Mapping):
            for node, weight in nodes.items():
                self.add(node, weight)
        else:
            for node in nodes:
                self.add(node)

    @property
    def nodes(self) -> tuple[str, ...]:
        """The member nodes, in the order they were added."""
        return tuple(self._weights)

    @property
    def weights(self) -> dict[str, float]:
        """A copy of the ``node -> weight`` mapping."""
        return dict(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node: object) -> bool:
        return node in self._weights

    def __repr__(self) -> str:
        return f"RendezvousHash({self._weights!r})"

    def add(self, node: str, weight: float = 1) -> None:
        """Add ``node`` with ``weight``; it takes about ``weight / total`` of the keys.

        Raises:
            ConfigError: duplicate node, bad name or weight, or a seed collision.
        """
        node = _check_node(node)
        value = _check_weight(node, weight, integral=False)
        if node in self._weights:
            raise ConfigError(f"node {node!r} is already in the rendezvous hash")
        seed = int(_hash32(node, 0, False))
        if seed in self._seeds:
            raise ConfigError(
                f"nodes {self._seeds[seed]!r} and {node!r} hash to the same seed; rename one"
            )
        self._weights[node] = value
        self._seeds[seed] = node
        self._refresh()

    def remove(self, node: str) -> None:
        """Remove ``node``; only its keys move.

        Raises:
            ConfigError: if ``node`` is not a member.
        """
        if node not in self._weights:
            raise ConfigError(f"node {node!r} is not in the rendezvous hash")
        del self._weights[node]
        del self._seeds[int(_hash32(node, 0, False))]
        self._refresh()

    def _refresh(self) -> None:
        self._members = [
            (int(_hash32(node, 0, False)), weight, node) for node, weight in self._weights.items()
        ]
        self._uniform = len(set(self._weights.values())) <= 1

    def get(self, key: Key) -> str:
        """Return the node with the highest score for ``key``.

        Raises:
            BadInputError: if ``key`` is not ``str``/``bytes``.
            ConfigError: if there are no nodes.
        """
        key = safe_key(key)
        best_node = ""
        best: float = -1.0
        try:
            if self._uniform:
                for seed, _, node in self._members:
                    h = _hash64(key, seed, signed=False)[0] >> 11
                    if h > best or (h == best and node > best_node):
                        best, best_node = h, node
            else:
                for seed, weight, node in self._members:
                    s = -weight / math.log(_unit(_hash64(key, seed, signed=False)[0]))
                    if s > best or (s == best and node > best_node):
                        best, best_node = s, node
        except TypeError:
            raise _bad_key(key) from None
        if not best_node:
            raise ConfigError(_EMPTY)
        return best_node

    def _ranking(self, key: Key) -> list[tuple[float, str]]:
        # Same ordering as get(): 53-bit hash when weights are equal, else -w/ln(u).
        key = safe_key(key)
        try:
            if self._uniform:
                return [
                    (_hash64(key, seed, signed=False)[0] >> 11, node)
                    for seed, _, node in self._members
                ]
            return [
                (-weight / math.log(_unit(_hash64(key, seed, signed=False)[0])), node)
                for seed, weight, node in self._members
            ]
        except TypeError:
            raise _bad_key(key) from None

    def scores(self, key: Key) -> dict[str, float]:
        """Return every node's score for ``key`` (higher wins); for inspection and tests.

        Raises:
            BadInputError: if ``key`` is not ``str``/``bytes``.
        """
        key = safe_key(key)
        try:
            return {
                node: -weight / math.log(_unit(_hash64(key, seed, signed=False)[0]))
                for seed, weight, node in self._members
            }
        except TypeError:
            raise _bad_key(key) from None

    def get_n(self, key: Key, n: int) -> list[str]:
        """Return the ``n`` highest-scoring nodes for ``key``, best first.

        Raises:
            BadInputError: if ``key`` is not ``str``/``bytes`` or ``n`` is not an
                integer in ``1..len(self)``.
            ConfigError: if there are no nodes.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise BadInputError(f"n must be an integer, got {type(n).__name__}: {n!r}")
        if not self._weights:
            raise ConfigError(_EMPTY)
        if not 1 <= n <= len(self._weights):
            raise BadInputError(
                f"n must be between 1 and the number of nodes ({len(self._weights)}), got {n}"
            )
        ranked = sorted(self._ranking(key), reverse=True)
        return [node for _, node in ranked[:n]]
