"""Subjects, wildcard patterns and a trie that matches a subject to its subscribers.

A *subject* is a dot-separated list of non-empty tokens, e.g. ``prices.NSE.INFY``.
A *pattern* (what a subscription names) may also use two wildcards, as NATS does:

* ``*`` matches exactly one token: ``prices.*.INFY`` matches ``prices.NSE.INFY``;
* ``>`` matches one or more trailing tokens and must be last: ``prices.>`` matches
  ``prices.NSE`` and ``prices.NSE.INFY`` but not ``prices``.

:class:`SubjectIndex` stores values under patterns in a trie keyed by token. Matching a
subject walks the trie once per token, following at each level the literal child, the
``*`` child and collecting the ``>`` values, so its cost depends on the subject's length
and the wildcards actually present, not on how many subscriptions exist. Results are
cached per subject; every insert or remove clears the cache, so a cached answer is never
stale.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from dsys.errors import BadInputError

MAX_SUBJECT_LENGTH = 512
"""Longest subject or pattern accepted, in characters."""

MAX_TOKENS = 32
"""Most tokens a subject or pattern may have."""

_FORBIDDEN_CHARS = frozenset(" \t\r\n\x00")

V = TypeVar("V")


def _split(text: object, what: str) -> list[str]:
    if not isinstance(text, str):
        raise BadInputError(f"{what} must be a string, got {type(text).__name__}")
    if not text:
        raise BadInputError(f"{what} is empty")
    if len(text) > MAX_SUBJECT_LENGTH:
        raise BadInputError(
            f"{what} is {len(text)} characters long; the limit is {MAX_SUBJECT_LENGTH}"
        )
    if not _FORBIDDEN_CHARS.isdisjoint(text):
        raise BadInputError(f"{what} {text!r} contains whitespace or NUL")
    tokens = text.split(".")
    if len(tokens) > MAX_TOKENS:
        raise BadInputError(f"{what} {text!r} has {len(tokens)} tokens; the limit is {MAX_TOKENS}")
    if "" in tokens:
        raise BadInputError(f"{what} {text!r} has an empty token (leading, trailing or '..')")
    return tokens


def validate_subject(subject: object) -> tuple[str, ...]:
    """Check a publish subject and return its tokens.

    A publish subject has no wildcards.

    Raises:
        BadInputError: the subject is not a string, is empty, too long, has an empty
            token, whitespace, or a wildcard token.
    """
    tokens = _split(subject, "subject")
    for tok in tokens:
        if tok in ("*", ">"):
            raise BadInputError(
                f"subject {subject!r} contains wildcard {tok!r}; publish needs a concrete subject"
            )
    return tuple(tokens)


def validate_pattern(pattern: object) -> tuple[str, ...]:
    """Check a subscription pattern and return its tokens.

    Raises:
        BadInputError: the pattern is malformed, or ``>`` is not the last token, or a
            wildcard is mixed with other characters inside a token (``a*``).
    """
    tokens = _split(pattern, "pattern")
    last = len(tokens) - 1
    for i, tok in enumerate(tokens):
        if tok == ">":
            if i != last:
                raise BadInputError(f"pattern {pattern!r}: '>' may only be the last token")
        elif tok != "*" and ("*" in tok or ">" in tok):
            raise BadInputError(
                f"pattern {pattern!r}: token {tok!r} mixes a wildcard with other characters"
            )
    return tuple(tokens)


def is_literal(pattern: str) -> bool:
    """Whether a (valid) pattern has no wildcard token."""
    return not any(tok in ("*", ">") for tok in pattern.split("."))


def matches(pattern: str, subject: str) -> bool:
    """Brute-force check whether ``pattern`` matches ``subject`` (both assumed valid).

    This is the reference definition the trie is tested against; it costs time in the
    pattern's length for one pattern.
    """
    ptoks = pattern.split(".")
    stoks = subject.split(".")
    for i, p in enumerate(ptoks):
        if p == ">":
            return len(stoks) > i
        if i >= len(stoks):
            return False
        if p != "*" and p != stoks[i]:
            return False
    return len(ptoks) == len(stoks)


def covers(allow: str, pattern: str) -> bool:
    """Whether every subject matched by ``pattern`` is also matched by ``allow``.

    Used for subscribe permissions: a token allowed ``prices.>`` may subscribe to
    ``prices.*.INFY`` but not to ``>``.
    """
    atoks = allow.split(".")
    ptoks = pattern.split(".")
    for i, a in enumerate(atoks):
        if i >= len(ptoks):
            return False
        p = ptoks[i]
        if a == ">":
            return True
        if p == ">":
            return False
        if a == "*":
            continue
        if p != a:
            return False
    return len(atoks) == len(ptoks)


class _Node(Generic[V]):
    __slots__ = ("children", "full", "star", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.star: _Node[V] | None = None
        # values whose pattern ends at this node
        self.values: dict[V, None] = {}
        # values whose pattern ends with '>' right below this node
        self.full: dict[V, None] = {}

    def empty(self) -> bool:
        return not (self.children or self.star or self.values or self.full)


class SubjectIndex(Generic[V]):
    """A trie from patterns to values, matched by concrete subjects.

    Values are hashable (subscriptions, route ids ...). The same value may be stored
    under several patterns; :meth:`match` returns each value once per subject, in a
    stable order (insertion order per trie node, literal before ``*`` before ``>``).

    Args:
        cache_size: how many subjects' results to keep; 0 disables the cache. The
            cache is cleared on every change, so it never returns stale results.
    """

    def __init__(self, *, cache_size: int = 4096) -> None:
        self._root: _Node[V] = _Node()
        self._count = 0
        self._cache: dict[str, tuple[V, ...]] = {}
        self._cache_size = cache_size

    def __len__(self) -> int:
        """How many (pattern, value) pairs are stored."""
        return self._count

    def insert(self, pattern: str, value: V) -> bool:
        """Store ``value`` under ``pattern``; returns False if it was already there.

        Raises:
            BadInputError: the pattern is not valid.
        """
        tokens = validate_pattern(pattern)
        node = self._root
        last = len(tokens) - 1
        for i, tok in enumerate(tokens):
            if tok == ">" and i == last:
                if value in node.full:
                    return False
                node.full[value] = None
                self._changed(1)
                return True
            if tok == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                child = node.children.get(tok)
                if child is None:
                    child = node.children[tok] = _Node()
                node = child
        if value in node.values:
            return False
        node.values[value] = None
        self._changed(1)
        return True

    def remove(self, pattern: str, value: V) -> bool:
        """Remove ``value`` from ``pattern``; returns False if it was not there."""
        tokens = validate_pattern(pattern)
        path: list[tuple[_Node[V], str]] = []
        node: _Node[V] | None = self._root
        last = len(tokens) - 1
        for i, tok in enumerate(tokens):
            assert node is not None
            if tok == ">" and i == last:
                if value not in node.full:
                    return False
                del node.full[value]
                self._prune(path, node)
                self._changed(-1)
                return True
            path.append((node, tok))
            node = node.star if tok == "*" else node.children.get(tok)
            if node is None:
                return False
        assert node is not None
        if value not in node.values:
            return False
        del node.values[value]
        self._prune(path, node)
        self._changed(-1)
        return True

    def _prune(self, path: list[tuple[_Node[V], str]], node: _Node[V]) -> None:
        # Drop nodes that became empty so the trie's size follows its contents.
        while path and node.empty():
            parent, tok = path.pop()
            if tok == "*":
                parent.star = None
            else:
                del parent.children[tok]
            node = parent

    def _changed(self, delta: int) -> None:
        self._count += delta
        if self._cache:
            self._cache.clear()

    def match(self, subject: str) -> tuple[V, ...]:
        """All values whose pattern matches ``subject`` (assumed a valid subject).

        Each value appears once even if several of its patterns match.
        """
        hit = self._cache.get(subject)
        if hit is not None:
            return hit
        out: dict[V, None] = {}
        tokens = subject.split(".")
        self._walk(self._root, tokens, 0, out)
        result = tuple(out)
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[subject] = result
        return result

    def _walk(self, node: _Node[V], tokens: list[str], i: int, out: dict[V, None]) -> None:
        n = len(tokens)
        while True:
            if i == n:
                for v in node.values:
                    out[v] = None
                return
            if node.full:
                # '>' matches here because at least one token (tokens[i]) remains.
                for v in node.full:
                    out[v] = None
            star = node.star
            child = node.children.get(tokens[i])
            if star is not None:
                if child is not None:
                    self._walk(child, tokens, i + 1, out)
                node = star
            elif child is not None:
                node = child
            else:
                return
            i += 1

    def values(self) -> Iterator[V]:
        """Every stored value (once per pattern it is stored under)."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield from node.values
            yield from node.full
            stack.extend(node.children.values())
            if node.star is not None:
                stack.append(node.star)


__all__ = [
    "MAX_SUBJECT_LENGTH",
    "MAX_TOKENS",
    "SubjectIndex",
    "covers",
    "is_literal",
    "matches",
    "validate_pattern",
    "validate_subject",
]
