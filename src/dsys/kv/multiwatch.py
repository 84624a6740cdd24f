"""Watch over the multi-Raft KV: span frontiers, span records, planning (pure).

Theory of operation
-------------------
Each range has its own revision counter (a split's child starts with its parent's, a
merge takes the larger), so revisions are not ordered across ranges, and the ranges
holding a prefix change (splits, merges) and move. A watch of a prefix is therefore,
as a CockroachDB changefeed, a set of *range watches*, each over one span of keys, and
its position is a **frontier**: a sorted list of ``(start, end, next_revision)`` spans
that together cover the prefix's key span. Everything of a span below its
``next_revision`` was delivered. :class:`Frontier` is immutable; :meth:`Frontier.encode`
makes the opaque, versioned resume token (``cursor``) and :meth:`Frontier.decode`
checks one (:class:`~dsys.errors.BadInputError` when malformed).

**Guarantee.** Per key: every change (put, delete, expiry) at or after the start, in
revision order, exactly once, across splits, merges, replica moves, leader changes and
reconnects. No order across keys of different ranges. When a span's events from its
position are no longer kept anywhere, the watch fails with
:class:`~dsys.errors.CompactedError` naming the span and the oldest revision still
available: never a silent gap.

**Span records.** A range's state machine records, deterministically at apply time,
where the events of a span live before or after a change of its bounds
(:class:`SpanRecord`, kept in order of revision and carried in snapshots):

* ``out``: a split hands ``[at, end)`` to the new range after revision R (the parent's
  revision at the split): events of those keys ``<= R`` are in the parent, later ones in
  the child;
* ``origin``: the child's side of the same split: events ``<= R`` of its keys are in the
  parent;
* ``floor``: a merge absorbed a source's span whose history stayed with the (now gone)
  source: events ``<= S`` of those keys are not available here.

:func:`classify` turns a range's records, its bounds and a watch's ``(span, start)``
into pieces to *serve*, or to answer ``moved`` (the span is in another range from
here on), ``before`` (read it from the parent up to R first), ``compacted`` or
``not_here``. :func:`plan` turns a frontier and a :class:`~dsys.kv.ranges.RangeMap` into
the range watches to open.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from dsys.errors import BadInputError
from dsys.kv.ranges import RangeMap

CURSOR_VERSION = 1
"""Version of the cursor encoding (the first element of the packed list)."""

CURSOR_PREFIX = "w1."
"""What every cursor of this version starts with."""

MAX_CURSOR_CHARS = 64 * 1024
"""Longest cursor accepted."""

MAX_SPANS = 4096
"""Most spans in a frontier (a cursor with more is refused)."""

OUT, ORIGIN, FLOOR = "out", "origin", "floor"
"""Kinds of :class:`SpanRecord`."""

SERVE, MOVED, BEFORE, COMPACTED, NOT_HERE = "serve", "moved", "before", "compacted", "not_here"
"""States of a :class:`Piece`."""


def prefix_end(prefix: str) -> str | None:
    """The first key after every key starting with ``prefix`` (None: none, ``""``)."""
    p = prefix
    while p:
        last = ord(p[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # skip the surrogates
                nxt = 0xE000
            return p[:-1] + chr(nxt)
        p = p[:-1]
    return None


def before_end(key: str, end: str | None) -> bool:
    """Whether ``key < end`` (``end`` None is past every key)."""
    return end is None or key < end


def end_le(a: str | None, b: str | None) -> bool:
    """Whether end bound ``a <= b`` (None is the largest)."""
    if b is None:
        return True
    return a is not None and a <= b


def min_end(a: str | None, b: str | None) -> str | None:
    """The smaller of two end bounds."""
    return a if end_le(a, b) else b


def intersect(s1: str, e1: str | None, s2: str, e2: str | None) -> tuple[str, str | None] | None:
    """``[s1, e1) ∩ [s2, e2)``, or None when empty."""
    s = max(s1, s2)
    e = min_end(e1, e2)
    if e is not None and e <= s:
        return None
    return s, e


# -- the frontier -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    """A span of keys ``[start, end)`` and the next revision wanted for it (0: "from
    the next change", fixed by the first range watch that serves it)."""

    start: str
    end: str | None
    next_revision: int


@dataclass(frozen=True, slots=True)
class Frontier:
    """The position of a prefix watch: spans covering ``[prefix, prefix_end(prefix))``,
    sorted, contiguous, adjacent spans with different revisions."""

    prefix: str
    spans: tuple[Span, ...]

    @classmethod
    def new(cls, prefix: str, start_revision: int = 0) -> Frontier:
        """One span over the whole prefix at ``start_revision`` (0: from now)."""
        return cls(prefix, (Span(prefix, prefix_end(prefix), start_revision),))

    def advance(self, start: str, end: str | None, next_revision: int) -> Frontier:
        """This frontier with ``[start, end)`` at least at ``next_revision``."""
        out: list[Span] = []
        for sp in self.spans:
            cut = intersect(sp.start, sp.end, start, end)
            if cut is None or sp.next_revision >= next_revision:
                out.append(sp)
                continue
            a, b = cut
            if sp.start < a:
                out.append(Span(sp.start, a, sp.next_revision))
            out.append(Span(a, b, next_revision))
            if b is not None and before_end(b, sp.end):
                out.append(Span(b, sp.end, sp.next_revision))
        return Frontier(self.prefix, _coalesce(out))

    def revision_at(self, key: str) -> int:
        """The next revision wanted for ``key`` (-1 if outside the frontier)."""
        for sp in self.spans:
            if sp.start <= key and before_end(key, sp.end):
                return sp.next_revision
        return -1

    def encode(self) -> str:
        """The opaque cursor: ``w1.`` + urlsafe base64 of msgpack, unpadded."""
        packed = msgpack.packb(
            [CURSOR_VERSION, self.prefix, [[s.start, s.end, s.next_revision] for s in self.spans]],
            use_bin_type=True,
        )
        return CURSOR_PREFIX + base64.urlsafe_b64encode(packed).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, cursor: object, prefix: str | None = None) -> Frontier:
        """The frontier of a cursor made by :meth:`encode` (for ``prefix``, if given).

        Raises:
            BadInputError: not a cursor of this version, malformed, spans that do not
                cover the prefix in order, or made for another prefix.
        """
        if not isinstance(cursor, str) or not cursor.startswith(CURSOR_PREFIX):
            raise BadInputError(f"a watch cursor is a string starting with {CURSOR_PREFIX!r}")
        if len(cursor) > MAX_CURSOR_CHARS:
            raise BadInputError(f"watch cursor is longer than {MAX_CURSOR_CHARS} characters")
        body = cursor[len(CURSOR_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            v = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=len(raw))
        except (binascii.Error, ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise BadInputError(f"malformed watch cursor: {exc}") from None
        except Exception as exc:  # msgpack raises a few more kinds on garbage
            raise BadInputError(f"malformed watch cursor: {type(exc).__name__}") from None
        if (
            not isinstance(v, list)
            or len(v) != 3
            or v[0] != CURSOR_VERSION
            or type(v[1]) is not str
            or not isinstance(v[2], list)
            or not 1 <= len(v[2]) <= MAX_SPANS
        ):
            raise BadInputError("malformed watch cursor (or of another version)")
        spans: list[Span] = []
        for item in v[2]:
            if (
                not isinstance(item, list)
                or len(item) != 3
                or type(item[0]) is not str
                or (item[1] is not None and type(item[1]) is not str)
                or type(item[2]) is not int
                or item[2] < 0
            ):
                raise BadInputError("malformed span in watch cursor")
            spans.append(Span(item[0], item[1], item[2]))
        f = cls(v[1], tuple(spans))
        problem = f.problem()
        if problem:
            raise BadInputError(f"bad watch cursor: {problem}")
        if prefix is not None and f.prefix != prefix:
            raise BadInputError(f"watch cursor was made for prefix {f.prefix!r}, not {prefix!r}")
        return f

    def problem(self) -> str:
        """What breaks the invariant ("" when none)."""
        if not self.spans:
            return "no spans"
        if self.spans[0].start != self.prefix:
            return "the first span does not start at the prefix"
        if self.spans[-1].end != prefix_end(self.prefix):
            return "the last span does not end at the prefix's end"
        for a, b in zip(self.spans, self.spans[1:], strict=False):
            if a.end is None or a.end != b.start:
                return "spans are not contiguous"
        for sp in self.spans:
            if sp.end is not None and sp.end <= sp.start:
                return "an empty span"
        return ""


def _coalesce(spans: Iterable[Span]) -> tuple[Span, ...]:
    out: list[Span] = []
    for sp in spans:
        if out and out[-1].next_revision == sp.next_revision and out[-1].end == sp.start:
            out[-1] = Span(out[-1].start, sp.end, sp.next_revision)
        else:
            out.append(sp)
    return tuple(out)


# -- span records and what a range answers ---------------------------------------------


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """Where a span's events live around a change of a range's bounds (see the module
    docstring): ``kind`` is ``out``, ``origin`` or ``floor``; ``range_id`` the other
    range (the child for ``out``, the parent for ``origin``, the source for ``floor``)."""

    kind: str
    start: str
    end: str | None
    revision: int
    range_id: int

    def to_plain(self) -> list[Any]:
        """``[kind, start, end, revision, range_id]``."""
        return [self.kind, self.start, self.end, self.revision, self.range_id]

    @classmethod
    def from_plain(cls, v: Any) -> SpanRecord:
        """Inverse of :meth:`to_plain`.

        Raises:
            ValueError: malformed.
        """
        if (
            not isinstance(v, (list, tuple))
            or len(v) != 5
            or v[0] not in (OUT, ORIGIN, FLOOR)
            or type(v[1]) is not str
            or (v[2] is not None and type(v[2]) is not str)
            or type(v[3]) is not int
            or type(v[4]) is not int
        ):
            raise ValueError("malformed span record")
        return cls(v[0], v[1], v[2], v[3], v[4])


@dataclass(frozen=True, slots=True)
class Piece:
    """A part of a requested span, all in one state.

    Attributes:
        start: first key.
        end: end bound (None: to the end of the key space).
        state: ``serve``, ``moved`` (now in ``range_id``; everything ``<= revision``
            was delivered, i.e. nothing new), ``before`` (read it from range
            ``range_id`` up to ``revision`` first), ``compacted`` (``revision`` is the
            oldest available) or ``not_here``.
        revision: see ``state``.
        range_id: see ``state`` (0 when none).
    """

    start: str
    end: str | None
    state: str
    revision: int = 0
    range_id: int = 0


def _covers(r: SpanRecord, key: str) -> bool:
    return r.start <= key and before_end(key, r.end)


def classify(
    start: str,
    end: str | None,
    start_revision: int,
    records: Sequence[SpanRecord],
    desc_start: str,
    desc_end: str | None,
    *,
    records_floor: int = 0,
) -> list[Piece]:
    """What a range answers for a watch of ``[start, end)`` from ``start_revision``.

    Args:
        records: the range's span records, in the order they were applied.
        desc_start: the range's first key now.
        desc_end: the range's end bound now.
        records_floor: records of revisions up to this one were forgotten: a start at
            or below it is compacted wherever records would have mattered.
    """
    points = {start}
    for b in (desc_start, desc_end, *[x for r in records for x in (r.start, r.end)]):
        if b is not None and start < b and before_end(b, end):
            points.add(b)
    bounds = sorted(points)
    pieces: list[Piece] = []
    for i, a in enumerate(bounds):
        b = bounds[i + 1] if i + 1 < len(bounds) else end
        pieces.append(
            _classify_point(a, b, start_revision, records, desc_start, desc_end, records_floor)
        )
    out: list[Piece] = []
    for p in pieces:
        last = out[-1] if out else None
        if (
            last is not None
            and (last.state, last.revision, last.range_id) == (p.state, p.revision, p.range_id)
            and last.end == p.start
        ):
            out[-1] = Piece(last.start, p.end, p.state, p.revision, p.range_id)
        else:
            out.append(p)
    return out


def _classify_point(
    a: str,
    b: str | None,
    n: int,
    records: Sequence[SpanRecord],
    desc_start: str,
    desc_end: str | None,
    records_floor: int,
) -> Piece:
    inside = desc_start <= a and before_end(a, desc_end)
    recs = [r for r in records if _covers(r, a)]
    if not recs:
        if not inside:
            return Piece(a, b, NOT_HERE)
        if n <= records_floor:
            return Piece(a, b, COMPACTED, records_floor + 1)
        return Piece(a, b, SERVE)
    if n <= records_floor:
        return Piece(a, b, COMPACTED, records_floor + 1)
    first = recs[0]
    state = Piece(a, b, SERVE)
    if first.kind == ORIGIN:
        state = Piece(a, b, BEFORE, first.revision, first.range_id)
    elif first.kind == FLOOR:
        state = Piece(a, b, COMPACTED, first.revision + 1)
    later: list[SpanRecord] = []
    for i, r in enumerate(recs):
        if r.revision >= n:
            later = recs[i:]
            break
        moved = r.kind == OUT
        state = Piece(a, b, MOVED, n - 1, r.range_id) if moved else Piece(a, b, SERVE)
    if state.state == MOVED:
        back = next((r for r in later if r.kind == FLOOR), None)
        if back is not None:
            # the span left, then came back with a merge: its events in between stayed
            # with the merged-away source
            return Piece(a, b, COMPACTED, back.revision + 1)
    if state.state == SERVE and not inside:
        pending = any(r.kind == OUT and r.revision >= n for r in recs)
        if not pending:
            return Piece(a, b, NOT_HERE)
    return state


def handoffs_passed(
    records: Sequence[SpanRecord],
    low: int,
    next_revision: int,
    known: frozenset[SpanRecord] = frozenset(),
) -> list[SpanRecord]:
    """``out`` records a range watch that started at ``low`` has now passed (every event
    up to their revision was looked at): those with a revision in ``[low,
    next_revision)``, and those applied since the watch opened (not in ``known``, the
    records it was classified with: a lagging replica may apply a split the watch's
    start is already past)."""
    return [
        r
        for r in records
        if r.kind == OUT and r.revision < next_revision and (r.revision >= low or r not in known)
    ]


def subtract(
    spans: Sequence[tuple[str, str | None]], start: str, end: str | None
) -> list[tuple[str, str | None]]:
    """``spans`` without ``[start, end)``."""
    out: list[tuple[str, str | None]] = []
    for s, e in spans:
        cut = intersect(s, e, start, end)
        if cut is None:
            out.append((s, e))
            continue
        a, b = cut
        if s < a:
            out.append((s, a))
        if b is not None and before_end(b, e):
            out.append((b, e))
    return out


def in_spans(key: str, spans: Sequence[tuple[str, str | None]]) -> bool:
    """Whether ``key`` falls in one of ``spans``."""
    return any(s <= key and before_end(key, e) for s, e in spans)


# -- planning ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedWatch:
    """A range watch to open: range ``range_id`` over ``[start, end)`` from
    ``start_revision`` (0: from the next change)."""

    range_id: int
    start: str
    end: str | None
    start_revision: int


def plan(spans: Iterable[tuple[str, str | None, int]], ranges: RangeMap) -> list[PlannedWatch]:
    """The range watches that serve ``spans`` ``(start, end, next_revision)`` by
    ``ranges``: one per range and span (adjacent spans of one range at the same
    revision are joined)."""
    out: list[PlannedWatch] = []
    for start, end, rev in spans:
        for desc in ranges._overlapping(start, end):
            cut = intersect(start, end, desc.start, desc.end)
            if cut is None:
                continue
            a, b = cut
            last = out[-1] if out else None
            if (
                last is not None
                and last.range_id == desc.range_id
                and last.start_revision == rev
                and last.end == a
            ):
                out[-1] = PlannedWatch(desc.range_id, last.start, b, rev)
            else:
                out.append(PlannedWatch(desc.range_id, a, b, rev))
    return out


def common_prefix(start: str, end: str | None) -> str:
    """The longest prefix shared by every key of ``[start, end)`` (a cheap filter)."""
    if end is None:
        return ""
    n = 0
    for x, y in zip(start, end, strict=False):
        if x != y:
            break
        n += 1
    return start[:n]


__all__ = [
    "BEFORE",
    "COMPACTED",
    "CURSOR_PREFIX",
    "CURSOR_VERSION",
    "FLOOR",
    "MAX_CURSOR_CHARS",
    "MAX_SPANS",
    "MOVED",
    "NOT_HERE",
    "ORIGIN",
    "OUT",
    "SERVE",
    "Frontier",
    "Piece",
    "PlannedWatch",
    "Span",
    "SpanRecord",
    "before_end",
    "classify",
    "common_prefix",
    "end_le",
    "handoffs_passed",
    "in_spans",
    "intersect",
    "min_end",
    "plan",
    "prefix_end",
    "subtract",
]
