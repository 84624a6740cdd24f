from __future__ import annotations

from collections import Counter

import jump
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsys.errors import BadInputError
from dsys.sharding import jump_hash
from dsys.sharding.jump import MAX_BUCKETS, key_to_u64


@given(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=1, max_value=MAX_BUCKETS),
)
def test_matches_the_reference_implementation(key: int, n: int) -> None:
    assert jump_hash(key, n) == jump.hash(key, n)


def test_known_values() -> None:
    # Values from the paper's C++ code (also the `jump` package's test vectors).
    assert [jump_hash(k, 10) for k in (0, 1, 2, 123456789)] == [
        jump.hash(k, 10) for k in (0, 1, 2, 123456789)
    ]
    assert jump_hash(0, 1) == 0
    assert jump_hash(2**64 - 1, 1) == 0


def test_string_keys_hash_through_mmh3_and_bytes_agree() -> None:
    assert jump_hash("user:42", 64) == jump_hash(b"user:42", 64)
    assert jump_hash("user:42", 64) == jump.hash(key_to_u64("user:42"), 64)
    assert 0 <= key_to_u64("x") < 2**64


def test_balance_and_minimal_movement_when_growing() -> None:
    keys = [f"k{i}" for i in range(30_000)]
    before = [jump_hash(k, 10) for k in keys]
    counts = Counter(before)
    assert max(counts.values()) / min(counts.values()) < 1.15
    after = [jump_hash(k, 11) for k in keys]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == 10 for _, a in moved)  # keys only move into the new bucket
    assert len(moved) / len(keys) == pytest.approx(1 / 11, rel=0.1)


@pytest.mark.parametrize("key", [-1, 2**64, 1.5, None, True, ["k"]])
def test_bad_key_raises(key: object) -> None:
    with pytest.raises(BadInputError, match="key"):
        jump_hash(key, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, -3, 2**31, 2.0, "4", False])
def test_bad_bucket_count_raises(n: object) -> None:
    with pytest.raises(BadInputError, match="number of buckets"):
        jump_hash(5, n)  # type: ignore[arg-type]


def test_lone_surrogate_keys_are_refused_not_crashing() -> None:
    with pytest.raises(BadInputError, match="not valid Unicode"):
        jump_hash("\ud800", 4)
