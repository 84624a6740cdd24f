"""Consistent-hash ring with virtual nodes, weights and replica preference lists.

Theory of operation:
    Every node owns ``vnodes * weight`` points on a 32-bit circle. A key is hashed
    onto the same circle and belongs to the first point strictly after it (wrapping
    around); its *preference list* continues clockwise, skipping points of nodes
    already listed, so ``get_n(key, 3)`` names three distinct nodes and
    ``get_n(key, 1) == [get(key)]``. Adding a node moves only the keys that fall on
    its new points (about ``1/(n+1)`` of them); removing one moves only its own keys.

    The points live in a sorted ``list[int]`` with a parallel list of owners, so a
    lookup is one hash plus one :func:`bisect.bisect_right`. ``get`` usually skips
    even that: the circle is also cut into about ``16 * points`` equal buckets, and a
    bucket that contains no point (about 94% of them) stores its owner directly, so
    most lookups are one hash and one list index. Membership changes only mark the
    ring dirty; the arrays are rebuilt on the next lookup, so a burst of
    ``add``/``remove`` calls costs one rebuild (a few milliseconds for 10 nodes).

Two point layouts are offered:

* ``mode="mmh3"`` (default): 32-bit MurmurHash3 of keys and of ``node + NUL + i``,
  ``round(vnodes * weight)`` points per node (``vnodes`` defaults to 512), weights
  may be any positive number. Placement depends only on the set of nodes and
  weights, not on the order they were added.
* ``mode="ketama"``: libketama's continuum as implemented by ``uhashring``
  (``uhashring.HashRing(nodes, hash_fn="ketama")``): MD5, four 32-bit points per
  digest, ``(vnodes * len(nodes) * weight) // total_weight`` digests per node
  (``vnodes`` defaults to 40) and integer weights. For ``str`` keys and nodes the
  owner of every key is the same as uhashring's, so a dsys client can share a cache
  cluster with existing ketama clients. ``bytes`` keys are hashed as their raw
  bytes (as libketama does; uhashring would hash their ``repr``).

This module is pure: no I/O, no clocks.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from numbers import Real
from typing import Literal

import mmh3

from dsys.errors import BadInputError, ConfigError

__all__ = [
    "DEFAULT_VNODES",
    "KETAMA_VNODES",
    "HashRing",
    "Key",
    "RingMode",
    "hash_key",
    "safe_key",
]

Key = str | bytes
"""A routable key: text (hashed as UTF-8) or bytes."""

RingMode = Literal["mmh3", "ketama"]

DEFAULT_VNODES = 512
"""Points per unit of weight in ``mmh3`` mode."""

KETAMA_VNODES = 40
"""MD5 digests per node (4 points each) in ``ketama`` mode, as in uhashring."""

_mmh3_hash = mmh3.hash
_HALF = 2**31
_MIN_TABLE_BITS = 8
_MAX_TABLE_BITS = 18


def safe_key(key: object) -> Key:
    """Return ``key`` in a form mmh3 can hash safely, or raise a clear error.

    ``bytes`` and ASCII ``str`` come back unchanged; other text comes back as its
    UTF-8 bytes (same hash). Text that is not valid Unicode, such as a lone
    surrogate from ``json.loads('"\\ud800"')``, is refused here because mmh3 5.x
    crashes the interpreter on it.

    Raises:
        BadInputError: if ``key`` is not ``str``/``bytes`` or not encodable as UTF-8.
    """
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        if key.isascii():
            return key
        try:
            return key.encode()
        except UnicodeEncodeError:
            raise BadInputError(
                f"key {key!r:.60} is not valid Unicode text (lone surrogate); pass bytes"
            ) from None
    raise _bad_key(key)


def hash_key(key: Key) -> int:
    """Hash a key to the unsigned 32-bit MurmurHash3 value ``ShardRouter`` cuts into shards.

    The ``mmh3`` ring uses the same hash read as a signed integer.

    Args:
        key: a ``str`` (hashed as UTF-8) or ``bytes``.

    Returns:
        An integer in ``[0, 2**32)``.

    Raises:
        BadInputError: if ``key`` is neither ``str`` nor ``bytes``.
    """
    return int(_mmh3_hash(safe_key(key), 0, False))


_EMPTY = "the ring has no nodes: add a node before looking up keys"


def _bad_key(key: object) -> BadInputError:
    return BadInputError(f"key must be str or bytes, got {type(key).__name__}: {key!r:.60}")


def _ketama_digest(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _ketama_points(name: str, digests: int) -> Iterator[int]:
    for w in range(digests):
        d = _ketama_digest(f"{name}-{w}".encode())
        for r in range(4):
            yield int.from_bytes(d[4 * r : 4 * r + 4], "little")


def _ketama_hash(key: Key) -> int:
    """Ketama's 32-bit key hash, shifted into the signed range the ring stores."""
    if isinstance(key, str):
        data = key.encode()
    elif isinstance(key, bytes):
        data = key
    else:
        raise _bad_key(key)
    return int.from_bytes(_ketama_digest(data)[:4], "little") - _HALF


def _table_bits(points: int) -> int:
    # About 16 buckets per point, so ~94% of buckets hold no point and resolve directly.
    return min(_MAX_TABLE_BITS, max(_MIN_TABLE_BITS, (16 * points).bit_length()))


def _bucket_table(hashes: list[int], owners: list[str], bits: int) -> list[str | None]:
    """Build the direct-lookup table for a ring (see ``HashRing.get``).

    Bucket ``b`` covers the signed hashes ``[b << shift, (b + 1) << shift)``. Where no
    ring point falls inside a bucket after its first hash, every hash in it has the
    same successor point, so the bucket stores that owner; otherwise ``None`` sends the
    lookup to bisection. Buckets are laid out so that ``table[h >> shift]``, with
    Python's negative indexing, finds the bucket of a signed hash ``h``.
    """
    size = 1 << bits
    shift = 32 - bits
    ordered: list[str | None] = [None] * size  # ordered[k]: bucket of unsigned u = h + 2**31
    start = 0  # first unsigned hash of the current run of equal bisect_right results
    for i, point in enumerate([*hashes, _HALF]):
        end = point + _HALF  # the run [start, end) maps to owners[i]
        first = -(-start >> shift)  # first bucket starting inside the run
        last = end >> shift  # first bucket that does not end inside the run
        if first < last:
            ordered[first:last] = [owners[i]] * (last - first)
        start = end
    half = size >> 1
    return ordered[half:] + ordered[:half]


def _check_node(node: object) -> str:
    if not isinstance(node, str) or not node:
        raise ConfigError(f"node names must be non-empty strings, got {node!r}")
    try:
        node.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"node name {node!r} is not valid Unicode text") from None
    return node


def _check_weight(node: str, weight: object, *, integral: bool) -> float:
    if isinstance(weight, bool) or not isinstance(weight, Real):
        raise ConfigError(
            f"weight of node {node!r} must be a number, got {type(weight).__name__}: {weight!r}"
        )
    value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"weight of node {node!r} must be positive and finite, got {weight!r}")
    if integral and value != int(value):
        raise ConfigError(f"ketama mode needs integer weights; node {node!r} has {weight!r}")
    return value


class HashRing:
    """A consistent-hash ring mapping keys to nodes, with weights and replicas.

    Example:
        >>> ring = HashRing({"cache-a": 2, "cache-b": 1, "cache-c": 1})
        >>> ring.get("user:42") in ring
        True
        >>> len(ring.get_n("user:42", 2))
        2

    Args:
        nodes: node names (weight 1 each) or a mapping ``name -> weight``.
        vnodes: points per unit of weight (``mmh3``: default 512) or MD5 digests per
            node (``ketama``: default 40).
        mode: ``"mmh3"`` (fast, default) or ``"ketama"`` (uhashring/libketama
            compatible placements; see the module docstring).

    Raises:
        ConfigError: duplicate or non-string node names, non-numeric or non-positive
            weights, a bad ``vnodes`` or an unknown ``mode``.
    """

    __slots__ = (
        "_dirty",
        "_hash",
        "_hashes",
        "_mode",
        "_node_points",
        "_owners",
        "_shift",
        "_table",
        "_vnodes",
        "_weights",
    )

    def __init__(
        self,
        nodes: Iterable[str] | Mapping[str, float] = (),
        *,
        vnodes: int | None = None,
        mode: RingMode = "mmh3",
    ) -> None:
        if mode not in ("mmh3", "ketama"):
            raise ConfigError(f"mode must be 'mmh3' or 'ketama', got {mode!r}")
        if vnodes is None:
            vnodes = DEFAULT_VNODES if mode == "mmh3" else KETAMA_VNODES
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise ConfigError(f"vnodes must be a positive integer, got {vnodes!r}")
        if isinstance(nodes, str | bytes):
            raise ConfigError("nodes must be a list of names or a mapping of name -> weight")
        self._mode: RingMode = mode
        self._vnodes = vnodes
        self._weights: dict[str, float] = {}
        self._node_points: dict[str, list[int]] = {}  # mmh3 mode only: cached per node
        # Points are signed 32-bit ints: mmh3's own output, or ketama's hash - 2**31
        # (a shift that keeps the order, so placements equal ketama's).
        self._hash: Callable[[Key], int] = _mmh3_hash if mode == "mmh3" else _ketama_hash
        # invariant (when not dirty): _hashes sorted ascending, len(_owners) == len(_hashes) + 1
        # and _owners[-1] == _owners[0], so bisect_right's result indexes _owners directly;
        # _table[h >> _shift] is None or equals _owners[bisect_right(_hashes, h)].
        # While dirty (or empty) _table is [], so get() falls into its slow path.
        self._hashes: list[int] = []
        self._owners: list[str] = []
        self._table: list[str | None] = []
        self._shift = 32
        self._dirty = False
        if isinstance(nodes, Mapping):
            for node, weight in nodes.items():
                self.add(node, weight)
        else:
            for node in nodes:
                self.add(node)

    # -- membership -------------------------------------------------------------

    @property
    def mode(self) -> RingMode:
        """The point layout: ``"mmh3"`` or ``"ketama"``."""
        return self._mode

    @property
    def vnodes(self) -> int:
        """Points per unit weight (``mmh3``) or digests per node (``ketama``)."""
        return self._vnodes

    @property
    def nodes(self) -> tuple[str, ...]:
        """The member nodes, in the order they were added."""
        return tuple(self._weights)

    @property
    def weights(self) -> dict[str, float]:
        """A copy of the ``node -> weight`` mapping."""
        return dict(self._weights)

    def weight(self, node: str) -> float:
        """Return the weight of ``node``.

        Raises:
            ConfigError: if ``node`` is not in the ring.
        """
        try:
            return self._weights[node]
        except KeyError:
            raise ConfigError(f"node {node!r} is not in the ring") from None

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node: object) -> bool:
        return node in self._weights

    def __repr__(self) -> str:
        return f"HashRing({self._weights!r}, vnodes={self._vnodes}, mode={self._mode!r})"

    def add(self, node: str, weight: float = 1) -> None:
        """Add ``node`` with ``weight`` (relative share of keys).

        Raises:
            ConfigError: if the node is already present, its name is not a non-empty
                string, or the weight is not a positive finite number (an integer in
                ``ketama`` mode).
        """
        node = _check_node(node)
        value = _check_weight(node, weight, integral=self._mode == "ketama")
        if node in self._weights:
            raise ConfigError(f"node {node!r} is already in the ring")
        self._weights[node] = value
        if self._mode == "mmh3":
            count = max(1, round(self._vnodes * value))
            prefix = node + "\0"
            self._node_points[node] = [_mmh3_hash(prefix + str(i)) for i in range(count)]
        self._invalidate()

    def remove(self, node: str) -> None:
        """Remove ``node``; its keys move to their next owners on the ring.

        Raises:
            ConfigError: if ``node`` is not in the ring.
        """
        if node not in self._weights:
            raise ConfigError(f"node {node!r} is not in the ring; members: {list(self._weights)}")
        del self._weights[node]
        self._node_points.pop(node, None)
        self._invalidate()

    def _invalidate(self) -> None:
        self._dirty = True
        self._table = []

    def copy(self) -> HashRing:
        """Return an independent ring with the same nodes, weights and layout."""
        return HashRing(self._weights, vnodes=self._vnodes, mode=self._mode)

    # -- lookups ----------------------------------------------------------------

    def get(self, key: Key) -> str:
        """Return the node that owns ``key``.

        Raises:
            BadInputError: if ``key`` is not ``str``/``bytes``.
            ConfigError: if the ring is empty.
        """
        # Fast path: one hash and one list index for ~94% of keys; bisection only when
        # the key's bucket holds a ring point. An empty table (ring changed or empty)
        # raises IndexError and goes to the slow path, so the hot path has no checks.
        try:
            h = self._hash(
                key
                # mmh3 crashes on lone surrogates: only ASCII text and bytes go in raw.
                if (key.__class__ is str and key.isascii()) or key.__class__ is bytes
                else safe_key(key)
            )
            owner = self._table[h >> self._shift]
            if owner is None:
                return self._owners[bisect_right(self._hashes, h)]
            return owner
        except IndexError:
            if self._dirty:
                self._rebuild()
                return self.get(key)
            raise ConfigError(_EMPTY) from None

    def get_n(self, key: Key, n: int) -> list[str]:
        """Return the first ``n`` distinct owners of ``key`` (its preference list).

        The first element is always ``get(key)``; the rest are the replicas, in the
        order a client should fail over to them.

        Raises:
            BadInputError: if ``key`` is not ``str``/``bytes`` or ``n`` is not an
                integer in ``1..len(ring)``.
            ConfigError: if the ring is empty.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise BadInputError(f"n must be an integer, got {type(n).__name__}: {n!r}")
        if not self._weights:
            raise ConfigError(_EMPTY)
        if not 1 <= n <= len(self._weights):
            raise BadInputError(
                f"n must be between 1 and the number of nodes ({len(self._weights)}), got {n}"
            )
        return list(islice(self.iter_owners(key), n))

    def iter_owners(self, key: Key) -> Iterator[str]:
        """Yield every node once, in ``key``'s preference order (clockwise).

        Raises:
            BadInputError: if ``key`` is not ``str``/``bytes``.
            ConfigError: if the ring is empty.
        """
        if self._dirty:
            self._rebuild()
        if not self._weights:
            raise ConfigError(_EMPTY)
        h = self._hash(safe_key(key))
        return self._walk(bisect_right(self._hashes, h))

    def _walk(self, start: int) -> Iterator[str]:
        owners = self._owners
        points = len(self._hashes)
        total = len(self._weights)
        seen: set[str] = set()
        for i in range(start, start + points):
            node = owners[i % points]
            if node not in seen:
                seen.add(node)
                yield node
                if len(seen) == total:
                    return
        # Only in ketama mode with tiny vnodes can a node own no point at all; it
        # still belongs in every preference list, after the nodes that do.
        for node in self._weights:
            if node not in seen:
                yield node

    def points(self) -> list[tuple[int, str]]:
        """Return the ring's ``(point, owner)`` pairs in ascending point order.

        Points are signed 32-bit mmh3 values in ``mmh3`` mode and ketama's unsigned
        values in ``ketama`` mode (uhashring's ``get_points()``).
        """
        if self._dirty:
            self._rebuild()
        offset = _HALF if self._mode == "ketama" else 0
        return [(h + offset, o) for h, o in zip(self._hashes, self._owners, strict=False)]

    def _rebuild(self) -> None:
        # A point claimed by two nodes (a 32-bit collision) goes to the last writer:
        # by sorted name in mmh3 mode (order-independent), by insertion order in
        # ketama mode (what uhashring does).
        ring: dict[int, str] = {}
        if self._mode == "mmh3":
            for node in sorted(self._node_points):
                for h in self._node_points[node]:
                    ring[h] = node
        else:
            total = sum(self._weights.values())
            n = len(self._weights)
            for node, weight in self._weights.items():
                digests = (self._vnodes * n * int(weight)) // int(total)
                for h in _ketama_points(node, digests):
                    ring[h - _HALF] = node
        hashes = sorted(ring)
        owners = [ring[h] for h in hashes]
        if owners:
            owners.append(owners[0])
        bits = _table_bits(len(hashes))
        table = _bucket_table(hashes, owners, bits) if hashes else []
        # The table goes in last: get() trusts _shift, _hashes and _owners once it is set.
        self._hashes = hashes
        self._owners = owners
        self._shift = 32 - bits
        self._table = table
        self._dirty = False
