from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import BadInputError
from dsys.pubsub.subjects import (
    SubjectIndex,
    covers,
    matches,
    validate_pattern,
    validate_subject,
)

CASES = [
    ("a.b.c", "a.b.c", True),
    ("a.b.c", "a.b", False),
    ("a.b", "a.b.c", False),
    ("a.*.c", "a.x.c", True),
    ("a.*.c", "a.x.y.c", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c.d", True),
    ("a.>", "a", False),
    (">", "a", True),
    ("*", "a", True),
    ("*", "a.b", False),
    ("*.>", "a.b", True),
    ("*.>", "a", False),
    ("prices.*.INFY", "prices.NSE.INFY", True),
    ("prices.*.INFY", "prices.NSE.TCS", False),
]


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"), CASES, ids=[f"{p}~{s}" for p, s, _ in CASES]
)
def test_matches_table(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected
    index: SubjectIndex[str] = SubjectIndex()
    index.insert(pattern, "v")
    assert (index.match(subject) == ("v",)) is expected


@pytest.mark.parametrize(
    "bad", ["", ".a", "a.", "a..b", "a b", "a.*", "a.>", 5, "x" * 600, ".".join("a" * 40)]
)
def test_bad_subjects_are_refused_with_a_reason(bad: object) -> None:
    with pytest.raises(BadInputError) as exc:
        validate_subject(bad)
    assert str(exc.value)


@pytest.mark.parametrize("bad", ["a.>.b", "a*", "a.b>", "", "a..b", None])
def test_bad_patterns_are_refused(bad: object) -> None:
    with pytest.raises(BadInputError):
        validate_pattern(bad)


@pytest.mark.parametrize(
    ("allow", "pattern", "expected"),
    [
        (">", "a.b", True),
        ("prices.>", "prices.*.INFY", True),
        ("prices.>", ">", False),
        ("prices.*", "prices.NSE", True),
        ("prices.*", "prices.>", False),
        ("prices.*", "prices.*", True),
        ("a.b", "a.*", False),
        ("a.*.c", "a.b.c", True),
    ],
)
def test_covers(allow: str, pattern: str, expected: bool) -> None:
    assert covers(allow, pattern) is expected


def test_remove_prunes_and_cache_is_invalidated() -> None:
    index: SubjectIndex[int] = SubjectIndex()
    assert index.insert("a.*", 1)
    assert not index.insert("a.*", 1)
    assert index.match("a.b") == (1,)  # now cached
    index.insert("a.b", 2)
    assert set(index.match("a.b")) == {1, 2}
    assert index.remove("a.*", 1)
    assert index.match("a.b") == (2,)
    assert not index.remove("a.*", 1)
    assert index.remove("a.b", 2)
    assert len(index) == 0
    assert index._root.empty()


def test_a_value_under_two_matching_patterns_appears_once() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    index.insert("a.>", "s")
    index.insert("a.*", "s")
    index.insert("*.b", "s")
    assert index.match("a.b") == ("s",)


TOKENS = st.sampled_from(["a", "b", "c", "dd"])
SUBJECTS = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)
PATTERNS = (
    st.lists(st.sampled_from(["a", "b", "c", "dd", "*"]), min_size=1, max_size=5)
    .flatmap(lambda toks: st.sampled_from([toks, [*toks[:-1], ">"]]))
    .map(".".join)
)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), PATTERNS, st.integers(0, 5)), max_size=40),
    subjects=st.lists(SUBJECTS, min_size=1, max_size=10),
)
def test_trie_agrees_with_brute_force(
    ops: list[tuple[bool, str, int]], subjects: list[str]
) -> None:
    index: SubjectIndex[tuple[str, int]] = SubjectIndex(cache_size=8)
    stored: set[tuple[str, int]] = set()
    for i, (add, pattern, value) in enumerate(ops):
        key = (pattern, value)
        if add:
            assert index.insert(pattern, key) == (key not in stored)
            stored.add(key)
        else:
            assert index.remove(pattern, key) == (key in stored)
            stored.discard(key)
        # query between changes so that stale cache entries would be caught
        subject = subjects[i % len(subjects)]
        assert set(index.match(subject)) == {k for k in stored if matches(k[0], subject)}
    assert len(index) == len(stored)
    for subject in subjects:
        got = index.match(subject)
        assert len(got) == len(set(got))
        assert set(got) == {k for k in stored if matches(k[0], subject)}


@given(pattern=PATTERNS, subject=SUBJECTS)
def test_covers_is_consistent_with_matching(pattern: str, subject: str) -> None:
    # if allow covers pattern, every subject the pattern matches, allow matches too
    for allow in (">", "a.>", "*.b", "a.*", pattern):
        if covers(allow, pattern) and matches(pattern, subject):
            assert matches(allow, subject)
