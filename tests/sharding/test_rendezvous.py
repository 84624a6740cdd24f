from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import BadInputError, ConfigError
from dsys.sharding import RendezvousHash

KEYS = [f"user:{i}" for i in range(20_000)]


def test_api_and_preference_lists() -> None:
    hrw = RendezvousHash(["a", "b", "c", "d"])
    assert len(hrw) == 4 and "a" in hrw and hrw.nodes == ("a", "b", "c", "d")
    for key in KEYS[:2000]:
        full = hrw.get_n(key, 4)
        assert sorted(full) == ["a", "b", "c", "d"]
        assert full[0] == hrw.get(key)
        assert hrw.get(key) == hrw.get(key.encode())


def test_equal_weights_balance() -> None:
    hrw = RendezvousHash([f"n{i}" for i in range(10)])
    counts = Counter(hrw.get(k) for k in KEYS)
    for node in hrw.nodes:
        assert counts[node] / len(KEYS) == pytest.approx(0.1, rel=0.1)


def test_weighted_shares_follow_weights() -> None:
    hrw = RendezvousHash({"a": 1, "b": 2, "c": 3, "d": 4})
    counts = Counter(hrw.get(k) for k in KEYS)
    for node, weight in hrw.weights.items():
        assert counts[node] / len(KEYS) == pytest.approx(weight / 10, rel=0.1)
    for key in KEYS[:1000]:
        assert hrw.get_n(key, 2)[0] == hrw.get(key)
        scores = hrw.scores(key)
        assert max(scores, key=scores.__getitem__) == hrw.get(key)


def test_add_moves_keys_only_to_the_new_node_and_remove_only_its_keys() -> None:
    hrw = RendezvousHash({f"n{i}": 1 + i % 3 for i in range(8)})
    before = {k: hrw.get(k) for k in KEYS}
    hrw.add("new", 2)
    moved = [k for k in KEYS if hrw.get(k) != before[k]]
    assert all(hrw.get(k) == "new" for k in moved)
    assert len(moved) / len(KEYS) == pytest.approx(2 / 17, rel=0.15)
    hrw.remove("n3")
    for k in KEYS:
        if before[k] != "n3":
            assert hrw.get(k) in (before[k], "new")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=8, unique=True))
def test_order_of_addition_does_not_matter(names: list[str]) -> None:
    a, b = RendezvousHash(names), RendezvousHash(list(reversed(names)))
    for key in KEYS[:100]:
        assert a.get_n(key, len(names)) == b.get_n(key, len(names))


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="no nodes"):
        RendezvousHash().get("k")
    with pytest.raises(ConfigError, match="no nodes"):
        RendezvousHash().get_n("k", 1)
    with pytest.raises(ConfigError, match="already in"):
        RendezvousHash(["a", "a"])
    with pytest.raises(ConfigError, match="weight of node 'a'"):
        RendezvousHash({"a": 0})
    with pytest.raises(ConfigError, match="weight of node 'a'"):
        RendezvousHash({"a": "heavy"})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="not in the rendezvous"):
        RendezvousHash(["a"]).remove("b")
    with pytest.raises(ConfigError, match="list of names"):
        RendezvousHash("ab")
    hrw = RendezvousHash(["a", "b"])
    with pytest.raises(BadInputError, match="n must be between"):
        hrw.get_n("k", 3)
    with pytest.raises(BadInputError, match="n must be an integer"):
        hrw.get_n("k", "2")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="key must be str or bytes"):
        hrw.get(7)  # type: ignore[arg-type]
    weighted = RendezvousHash({"a": 1, "b": 2})
    with pytest.raises(BadInputError, match="key must be str or bytes"):
        weighted.get(None)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="key must be str or bytes"):
        weighted.get_n(None, 1)  # type: ignore[arg-type]


def test_seed_collision_is_refused() -> None:
    # mmh3("node-53119") == mmh3("node-70603"): identical scores would starve one.
    with pytest.raises(ConfigError, match="same seed"):
        RendezvousHash(["node-53119", "node-70603"])
    hrw = RendezvousHash(["node-53119"])
    hrw.remove("node-53119")
    hrw.add("node-70603")
    assert hrw.get("k") == "node-70603"


def test_lone_surrogate_keys_are_refused_not_crashing() -> None:
    for hrw in (RendezvousHash(["a", "b"]), RendezvousHash({"a": 1, "b": 2})):
        with pytest.raises(BadInputError, match="not valid Unicode"):
            hrw.get("\ud800")
        with pytest.raises(BadInputError, match="not valid Unicode"):
            hrw.get_n("\ud800", 2)
    with pytest.raises(ConfigError, match="not valid Unicode"):
        RendezvousHash(["\udc80"])
