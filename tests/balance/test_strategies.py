from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.balance.strategies import (
    STRATEGIES,
    ConsistentHash,
    LeastOutstanding,
    P2CLeastOutstanding,
    PeakEwma,
    SmoothWeightedRoundRobin,
    WeightedRandom,
    make_picker,
)
from dsys.errors import ConfigError


def test_smooth_round_robin_matches_nginx_order() -> None:
    # nginx's documented example: weights a=5, b=1, c=1 -> a a b a c a a
    rr = SmoothWeightedRoundRobin()
    rr.update({"a": 5, "b": 1, "c": 1})
    assert [rr.pick(now=0) for _ in range(7)] == ["a", "a", "b", "a", "c", "a", "a"]
    assert [rr.pick(now=0) for _ in range(7)] == ["a", "a", "b", "a", "c", "a", "a"]


@pytest.mark.parametrize("max_cycle", [1 << 16, 2], ids=["precomputed", "edf-heap"])
def test_round_robin_honours_weights_exactly_over_cycles(max_cycle: int) -> None:
    rr = SmoothWeightedRoundRobin(max_cycle=max_cycle)
    weights = {"a": 3, "b": 2, "c": 1}
    rr.update(weights)
    counts = Counter(rr.pick(now=0) for _ in range(600))
    assert counts == {"a": 300, "b": 200, "c": 100}


def test_round_robin_skips_excluded_and_returns_none_when_all_are() -> None:
    rr = SmoothWeightedRoundRobin()
    rr.update({"a": 1, "b": 1})
    assert {rr.pick(now=0, exclude={"a"}) for _ in range(5)} == {"b"}
    assert rr.pick(now=0, exclude={"a", "b"}) is None
    rr.update({})
    assert rr.pick(now=0) is None


def test_weighted_random_is_seeded_and_honours_weights() -> None:
    a, b = WeightedRandom(seed=7), WeightedRandom(seed=7)
    for p in (a, b):
        p.update({"x": 1, "y": 3})
    seq_a = [a.pick(now=0) for _ in range(4000)]
    assert seq_a == [b.pick(now=0) for _ in range(4000)]
    share = Counter(seq_a)["y"] / 4000
    assert 0.70 < share < 0.80


def test_least_outstanding_picks_least_loaded_per_weight_and_rotates_ties() -> None:
    lo = LeastOutstanding()
    lo.update({"a": 1, "b": 1, "c": 2})
    picks = []
    for _ in range(8):
        ep = lo.pick(now=0)
        assert ep is not None
        lo.started(ep, now=0)
        picks.append(ep)
    # c has twice the weight, so it carries twice the in-flight requests.
    assert Counter(picks) == {"a": 2, "b": 2, "c": 4}
    lo.finished("a", now=1, latency=0.1, ok=True)
    assert lo.pick(now=1) == "a"
    assert lo.pick(now=1, exclude={"a"}) in {"b", "c"}


def test_outstanding_counts_survive_membership_changes() -> None:
    p = P2CLeastOutstanding(seed=1)
    p.update({"a": 1, "b": 1})
    p.started("a", now=0)
    p.update({"b": 1})  # a became ineligible while a request is in flight
    assert p.outstanding("a") == 1
    assert {p.pick(now=0) for _ in range(10)} == {"b"}
    p.finished("a", now=1, latency=0.1, ok=True)
    assert p.outstanding("a") == 0
    p.finished("a", now=1, latency=0.1, ok=True)  # extra finish never goes negative
    assert p.outstanding("a") == 0


def test_p2c_avoids_the_endpoint_with_a_backlog() -> None:
    p = P2CLeastOutstanding(seed=3)
    p.update({"a": 1, "b": 1, "c": 1})
    for _ in range(20):
        p.started("c", now=0)  # c is stuck
    picks = Counter(p.pick(now=0) for _ in range(3000))
    assert picks["c"] == 0
    assert picks["a"] > 900 and picks["b"] > 900


def _simulate(picker_name: str, seed: int, slow: str, steps: int = 4000) -> Counter[str]:
    """Closed-loop simulation: 8 concurrent requests, the slow endpoint takes 50 ms."""
    picker = make_picker(picker_name, seed=seed)
    picker.update({"a": 1, "b": 1, "c": 1})
    latency = {"a": 0.001, "b": 0.001, "c": 0.001}
    latency[slow] = 0.050
    now = 0.0
    in_flight: list[tuple[float, str, float]] = []
    counts: Counter[str] = Counter()
    rng = random.Random(seed)
    for _ in range(steps):
        while len(in_flight) < 8:
            ep = picker.pick(now=now)
            assert ep is not None
            picker.started(ep, now=now)
            lat = latency[ep] * rng.uniform(0.8, 1.2)
            in_flight.append((now + lat, ep, lat))
            counts[ep] += 1
        in_flight.sort()
        done, ep, lat = in_flight.pop(0)
        now = done
        picker.finished(ep, now=now, latency=lat, ok=True)
    return counts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_peak_ewma_sends_little_traffic_to_the_slow_endpoint(seed: int) -> None:
    ewma = _simulate("p2c-ewma", seed, slow="c")
    rr = _simulate("round-robin", seed, slow="c")
    total = sum(ewma.values())
    assert ewma["c"] / total < 0.05
    # Round robin, by design, keeps giving the slow endpoint a third of the picks.
    assert rr["c"] / sum(rr.values()) > 0.30


def test_peak_ewma_reacts_at_once_to_a_slow_answer_and_decays_back() -> None:
    p = PeakEwma(seed=0, decay=10.0)
    p.update({"a": 1, "b": 1})
    assert p.latency_estimate("a", 0.0) is None
    p.started("a", now=0)
    p.finished("a", now=0.0, latency=0.010, ok=True)
    p.started("a", now=0)
    p.finished("a", now=1.0, latency=0.500, ok=True)
    assert p.latency_estimate("a", 1.0) == pytest.approx(0.5)  # the peak, at once
    later = p.latency_estimate("a", 31.0)
    assert later is not None and later < 0.5 * 0.06  # three time constants later
    p.started("b", now=0)
    p.finished("b", now=0.0, latency=0.001, ok=False)  # fast failure is penalised
    failed = p.latency_estimate("b", 0.0)
    assert failed is not None and failed >= 0.5


def test_peak_ewma_tries_a_new_endpoint_once_then_waits_for_its_answer() -> None:
    p = PeakEwma(seed=0)
    p.update({"a": 1})
    p.started("a", now=0)
    p.finished("a", now=0.01, latency=0.01, ok=True)
    p.update({"a": 1, "new": 1})
    assert p.pick(now=0.02) == "new"  # idle and unknown: cheapest
    p.started("new", now=0.02)
    assert {p.pick(now=0.02) for _ in range(20)} == {"a"}  # first answer pending
    p.finished("new", now=0.03, latency=0.005, ok=True)  # faster than a
    assert "new" in {p.pick(now=0.03) for _ in range(20)}


def test_consistent_hash_is_sticky_and_moves_few_keys() -> None:
    ch = ConsistentHash(load_factor=float("inf"))
    ch.update({f"n{i}": 1 for i in range(5)})
    keys = [f"user:{i}" for i in range(2000)]
    before = {k: ch.pick(now=0, key=k) for k in keys}
    assert before == {k: ch.pick(now=0, key=k) for k in keys}
    ch.update({f"n{i}": 1 for i in range(6)})
    after = {k: ch.pick(now=0, key=k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "n5" for k in moved)
    assert 0.08 < len(moved) / len(keys) < 0.30


def test_consistent_hash_bounded_load_spills_hot_key_to_next_endpoint() -> None:
    ch = ConsistentHash(load_factor=1.25)
    ch.update({"a": 1, "b": 1, "c": 1, "d": 1})
    owner = ch.owner("hot")
    placed = []
    for _ in range(40):
        ep = ch.pick(now=0, key="hot")
        assert ep is not None
        ch.started(ep, now=0)
        placed.append(ep)
    counts = Counter(placed)
    assert counts[owner] <= 13  # ceil(1.25 * 40 / 4)
    assert max(counts.values()) <= 13
    assert placed[0] == owner
    assert ch.pick(now=0, key="hot", exclude={"a", "b", "c", "d"}) is None
    assert ch.pick(now=0) is not None  # no key: least loaded


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_handles_empty_single_and_excluded(name: str) -> None:
    p = make_picker(name, seed=5)
    assert p.pick(now=0, key="k") is None
    p.update({"only": 1})
    assert p.pick(now=0, key="k") == "only"
    assert p.pick(now=0, key="k", exclude={"only"}) is None


def test_bad_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_picker("fastest")
    with pytest.raises(ConfigError, match="weight"):
        SmoothWeightedRoundRobin().update({"a": 0})
    with pytest.raises(ConfigError, match="weight"):
        WeightedRandom().update({"a": 10_000})
    with pytest.raises(ConfigError, match="load_factor"):
        ConsistentHash(load_factor=0.5)
    with pytest.raises(ConfigError):
        PeakEwma(decay=0)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(STRATEGIES),
    weights=st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 5), min_size=1),
    ops=st.lists(st.tuples(st.integers(0, 2), st.sampled_from("abcdef")), max_size=60),
)
def test_picks_are_always_eligible_and_counts_never_negative(
    name: str, weights: dict[str, int], ops: list[tuple[int, str]]
) -> None:
    p = make_picker(name, seed=0)
    p.update(weights)
    now = 0.0
    for op, ep in ops:
        now += 0.01
        if op == 0:
            got = p.pick(now=now, key=ep, exclude={ep})
            assert got is None or (got in weights and got != ep)
            if got is not None:
                p.started(got, now=now)
        elif op == 1:
            p.finished(ep, now=now, latency=0.01, ok=True)
        else:
            p.update({k: w for k, w in weights.items() if k != ep} or weights)
        assert all(p.outstanding(k) >= 0 for k in "abcdef")
