from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import BadInputError, ConfigError
from dsys.sharding import BoundedLoadRing, HashRing
from dsys.sharding.bounded import capacity


def exact_bound(c: float, total: int, n: int) -> int:
    return math.ceil(Fraction(c) * total / n)


@pytest.mark.parametrize(
    ("c", "total", "n"), [(1.25, 8, 2), (1.1, 10, 3), (1.0, 7, 7), (3.0, 1, 5)]
)
def test_capacity_is_exact(c: float, total: int, n: int) -> None:
    assert capacity(c, total, n) == exact_bound(c, total, n)


def test_no_node_exceeds_the_bound_with_a_hot_owner() -> None:
    # Keys that all hash to the same ring owner must spill to the next nodes.
    ring = HashRing(["a", "b", "c", "d"])
    hot = [k for k in (f"k{i}" for i in range(20_000)) if ring.get(k) == "a"][:2000]
    bounded = BoundedLoadRing(ring, c=1.25)
    for i, key in enumerate(hot, start=1):
        bounded.assign(key)
        assert max(bounded.loads.values()) <= exact_bound(1.25, i, 4)
    assert Counter(bounded.node_of(k) for k in hot)["a"] == exact_bound(1.25, 2000, 4)


@settings(max_examples=60, deadline=None)
@given(
    nodes=st.integers(min_value=1, max_value=8),
    c=st.sampled_from([1.0, 1.1, 1.25, 1.5, 2.0]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=300)), max_size=300),
)
def test_bound_holds_at_every_placement(nodes: int, c: float, ops: list[tuple[bool, int]]) -> None:
    bounded = BoundedLoadRing(HashRing([f"n{i}" for i in range(nodes)], vnodes=32), c=c)
    for place, k in ops:
        key = f"key-{k}"
        if place or bounded.node_of(key) is None:
            if bounded.node_of(key) is not None:
                continue
            before = bounded.loads
            node = bounded.assign(key)
            cap = exact_bound(c, bounded.total, nodes)
            # The chosen node was below capacity and ends at most at it.
            assert before[node] < cap
            assert bounded.loads[node] <= cap
        else:
            bounded.release(key)
        assert sum(bounded.loads.values()) == bounded.total
    if not any(not place for place, _ in ops):
        # Insert-only runs: every node within the final bound.
        assert max(bounded.loads.values(), default=0) <= exact_bound(c, bounded.total, nodes)


def test_pure_get_matches_assign_and_prefers_the_ring_owner() -> None:
    ring = HashRing(["a", "b", "c"])
    bounded = BoundedLoadRing(ring, c=1.25)
    assert bounded.get("x", {}) == ring.get("x")
    owner = ring.get("x")
    full = {owner: 10, **{n: 0 for n in ring.nodes if n != owner}}
    # total 10 + 1 -> capacity ceil(1.25 * 11 / 3) = 5: the owner is full.
    assert bounded.get("x", full) == ring.get_n("x", 2)[1]


def test_assign_is_idempotent_and_release_frees() -> None:
    bounded = BoundedLoadRing(HashRing(["a", "b"]), c=1.5)
    node = bounded.assign("s1")
    assert bounded.assign("s1") == node and bounded.total == 1
    assert bounded.keys_on(node) == ["s1"]
    assert bounded.release("s1") == node
    assert bounded.total == 0 and bounded.loads == {"a": 0, "b": 0}
    assert bounded.node_of("s1") is None


def test_draining_a_node_before_removal() -> None:
    ring = HashRing(["a", "b", "c"])
    bounded = BoundedLoadRing(ring, c=1.25)
    for i in range(300):
        bounded.assign(f"k{i}")
    moving = bounded.keys_on("b")
    for key in moving:
        bounded.release(key)
    ring.remove("b")
    for key in moving:
        assert bounded.assign(key) in ("a", "c")
    assert max(bounded.loads.values()) <= exact_bound(1.25, 300, 2)


@pytest.mark.parametrize("c", [0.9, 0, -1, float("nan"), float("inf"), "1.25", True])
def test_bad_load_factor(c: object) -> None:
    with pytest.raises(ConfigError, match="load factor"):
        BoundedLoadRing(HashRing(["a"]), c=c)  # type: ignore[arg-type]


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="must be a HashRing"):
        BoundedLoadRing(["a", "b"])  # type: ignore[arg-type]
    bounded = BoundedLoadRing(HashRing(["a", "b"]))
    with pytest.raises(BadInputError, match="not in the ring"):
        bounded.get("k", {"zz": 1})
    with pytest.raises(BadInputError, match="non-negative integer"):
        bounded.get("k", {"a": -1})
    with pytest.raises(BadInputError, match="non-negative integer"):
        bounded.get("k", {"a": 1.5})  # type: ignore[dict-item]
    with pytest.raises(BadInputError, match="key must be str or bytes"):
        bounded.assign(5)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="key must be str or bytes"):
        bounded.get(5, {})  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="not assigned"):
        bounded.release("never")
    with pytest.raises(ConfigError, match="no nodes"):
        BoundedLoadRing(HashRing()).assign("k")


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.1, 0.2, 0.3, 0.7, 1.0, 2.5, 3.0]), min_size=1, max_size=6),
    c=st.sampled_from([1.0, 1.1, 1.25]),
    keys=st.integers(min_value=1, max_value=400),
)
def test_weighted_bounds_scale_with_weight(weights: list[float], c: float, keys: int) -> None:
    ring = HashRing({f"n{i}": w for i, w in enumerate(weights)}, vnodes=16)
    bounded = BoundedLoadRing(ring, c=c)
    total_weight = sum(map(Fraction, weights))
    for i in range(keys):
        node = bounded.assign(f"k{i}")
        share = Fraction(ring.weight(node)) / total_weight
        assert bounded.loads[node] <= math.ceil(Fraction(c) * (i + 1) * share)
        assert bounded.capacity(i + 1, node) == math.ceil(Fraction(c) * (i + 1) * share)


def test_weighted_hot_spot_spills_by_weight() -> None:
    ring = HashRing({"big": 3, "small": 1})
    hot = [k for k in (f"k{i}" for i in range(5000)) if ring.get(k) == "small"][:400]
    bounded = BoundedLoadRing(ring, c=1.0)
    for key in hot:
        bounded.assign(key)
    assert bounded.loads == {"big": 300, "small": 100}
