from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import BadInputError, ConfigError
from dsys.sharding import HashRing, KeyRange, ShardRouter, hash_key, plan_rebalance
from dsys.sharding.router import HASH_SPACE

KEYS = [f"user:{i}" for i in range(5000)]


def test_quickstart() -> None:
    router = ShardRouter(["n1", "n2", "n3"], shards=64, replicas=2)
    plan = router.plan_rebalance(router.with_nodes(["n1", "n2", "n3", "n4"]))
    assert plan.moves
    for move in plan.moves:
        assert move.to_nodes == ("n4",)
        assert str(move).startswith(f"shard {move.shard} [0x")
        assert "copy to n4" in str(move)
    assert "of 64 shards move" in str(plan)


def test_keys_map_to_their_shard_range_and_replicas() -> None:
    router = ShardRouter({"a": 1, "b": 2, "c": 1}, shards=100, replicas=2)
    ranges = [router.key_range(s) for s in range(100)]
    assert ranges[0].start == 0 and ranges[-1].end == HASH_SPACE
    assert all(r1.end == r2.start for r1, r2 in itertools.pairwise(ranges))
    for key in KEYS:
        shard = router.shard_for(key)
        assert key in router.key_range(shard)
        assert hash_key(key) in router.key_range(shard)
        owners = router.nodes_for(key)
        assert owners == router.owners(shard) and len(set(owners)) == 2
        assert router.primary(key) == owners[0]
    ring = HashRing({"a": 1, "b": 2, "c": 1})
    assert router.owners(7) == tuple(ring.get_n("shard:7", 2))


def test_shard_boundaries_are_exact() -> None:
    router = ShardRouter(["a"], shards=3)
    for shard in range(3):
        rng = router.key_range(shard)
        assert (rng.start * 3) >> 32 == shard
        assert ((rng.end - 1) * 3) >> 32 == shard
    assert KeyRange(0, 10).width == 10 and str(KeyRange(0, 16)) == "[0x00000000, 0x00000010)"


def test_loads_count_copies() -> None:
    router = ShardRouter([f"n{i}" for i in range(4)], shards=256, replicas=3)
    loads = router.loads()
    assert sum(loads.values()) == 256 * 3
    assert max(loads.values()) <= 256  # one copy per shard per node


NODE_COUNTS = st.integers(min_value=2, max_value=12)


@settings(max_examples=15, deadline=None)
@given(n=NODE_COUNTS, replicas=st.integers(min_value=1, max_value=3), prefix=st.text(max_size=4))
def test_adding_a_node_moves_about_one_over_n_plus_one(n: int, replicas: int, prefix: str) -> None:
    replicas = min(replicas, n)
    nodes = [f"{prefix}node-{i}" for i in range(n)]
    old = ShardRouter(nodes, shards=4096, replicas=replicas)
    new = old.with_nodes([*nodes, f"{prefix}node-{n}"])
    plan = plan_rebalance(old, new)
    ideal = 1 / (n + 1)
    assert plan.ideal_fraction == pytest.approx(ideal)
    # Every copy that moves goes to the new node and nothing else moves.
    assert all(m.to_nodes == (f"{prefix}node-{n}",) for m in plan.moves)
    assert 0.6 * ideal <= plan.moved_fraction <= 1.4 * ideal, (plan, ideal)


@settings(max_examples=15, deadline=None)
@given(n=NODE_COUNTS, gone=st.integers(min_value=0, max_value=11))
def test_removing_a_node_moves_only_its_copies(n: int, gone: int) -> None:
    nodes = [f"n{i}" for i in range(n)]
    victim = nodes[gone % n]
    old = ShardRouter(nodes, shards=4096, replicas=min(2, n - 1))
    new = old.with_nodes([x for x in nodes if x != victim])
    plan = old.plan_rebalance(new)
    assert all(m.from_nodes == (victim,) for m in plan.moves)
    assert plan.moved_copies == old.loads()[victim]
    assert plan.ideal_fraction == pytest.approx(1 / n)
    assert 0.6 / n <= plan.moved_fraction <= 1.4 / n


@settings(max_examples=40, deadline=None)
@given(
    old_nodes=st.dictionaries(
        st.sampled_from([f"n{i}" for i in range(10)]),
        st.integers(min_value=1, max_value=4),
        min_size=3,
        max_size=10,
    ),
    new_nodes=st.dictionaries(
        st.sampled_from([f"n{i}" for i in range(12)]),
        st.integers(min_value=1, max_value=4),
        min_size=3,
        max_size=12,
    ),
    replicas=st.integers(min_value=1, max_value=3),
)
def test_applying_the_plan_gives_the_new_placement(
    old_nodes: dict[str, int], new_nodes: dict[str, int], replicas: int
) -> None:
    old = ShardRouter(old_nodes, shards=128, replicas=replicas, vnodes=32)
    new = old.with_nodes(new_nodes)
    plan = old.plan_rebalance(new)
    applied = plan.apply(old.placement)
    moved = {m.shard for m in plan.moves}
    for shard in range(128):
        # Every shard has exactly `replicas` distinct owners, before and after.
        assert len(set(new.owners(shard))) == replicas == len(new.owners(shard))
        assert set(applied[shard]) == set(new.owners(shard))
        if shard not in moved:
            assert applied[shard] == old.owners(shard)
    for m in plan.moves:
        assert m.new_owners == new.owners(m.shard) and m.old_owners == old.owners(m.shard)
        assert set(m.sources) <= set(m.old_owners)
    assert 0.0 <= plan.ideal_fraction <= plan.moved_fraction + 0.35


def test_primary_changes_are_counted() -> None:
    old = ShardRouter(["a", "b", "c"], shards=64, replicas=3)
    plan = old.plan_rebalance(old.with_nodes(["a", "b", "c"]))
    assert plan.moves == () and plan.primary_changes == 0 and plan.moved_fraction == 0
    grown = old.plan_rebalance(old.with_nodes(["a", "b", "c", "d"]))
    assert grown.primary_changes == sum(
        1
        for s in range(64)
        if old.owners(s)[0] != old.with_nodes(["a", "b", "c", "d"]).owners(s)[0]
    )


def test_bad_config() -> None:
    with pytest.raises(ConfigError, match="at least one node"):
        ShardRouter([])
    with pytest.raises(ConfigError, match=r"replicas must be an integer in 1\.\.2"):
        ShardRouter(["a", "b"], replicas=3)
    with pytest.raises(ConfigError, match="shards must be"):
        ShardRouter(["a"], shards=0)
    with pytest.raises(ConfigError, match="shards must be"):
        ShardRouter(["a"], shards=2**21)
    with pytest.raises(ConfigError, match="already in the ring"):
        ShardRouter(["a", "a"])
    router = ShardRouter(["a", "b"], replicas=2)
    with pytest.raises(ConfigError, match="replicas must be"):
        router.with_nodes(["a"])
    with pytest.raises(ConfigError, match="shard count is fixed"):
        router.plan_rebalance(ShardRouter(["a", "b"], shards=32))
    with pytest.raises(ConfigError, match="two ShardRouter"):
        plan_rebalance(router, "x")  # type: ignore[arg-type]


def test_bad_lookup_input() -> None:
    router = ShardRouter(["a", "b"], shards=8)
    with pytest.raises(BadInputError, match="key must be str or bytes"):
        router.shard_for(3)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="key must be str or bytes"):
        router.nodes_for(None)  # type: ignore[arg-type]
    for shard in (-1, 8, "1", 1.0):
        with pytest.raises(BadInputError, match=r"shard must be an integer in 0\.\.7"):
            router.owners(shard)  # type: ignore[arg-type]
    plan = router.plan_rebalance(router.with_nodes(["a", "b", "c"]))
    with pytest.raises(BadInputError, match="placement has 2 shards"):
        plan.apply([("a",), ("b",)])
    assert plan.moves
    with pytest.raises(BadInputError, match="wrong placement"):
        plan.apply([("zz",)] * 8)
