"""Five-field cron expressions (pure: the time to start from is an argument).

``minute hour day-of-month month day-of-week``, as in Vixie cron / crontab(5)::

    CronExpr.parse("*/15 9-17 * * mon-fri").next_after(datetime(2026, 12, 3, 9, 7, tzinfo=UTC))
    # -> 2026-12-03 09:15 UTC

Each field is ``*``, a number, a range ``a-b``, a step ``*/n`` or ``a-b/n`` (or ``a/n``:
from ``a`` to the end), or a comma-separated list of those. Months and weekdays also take
three-letter English names (``jan``, ``mon``); day-of-week 0 and 7 are both Sunday. As in
Vixie cron, when both day-of-month and day-of-week are restricted (neither starts with
``*``), a day matches if *either* matches. The aliases ``@yearly`` (``@annually``),
``@monthly``, ``@weekly``, ``@daily`` (``@midnight``) and ``@hourly`` are accepted.

Times are compared in the timezone of the datetime given (UTC by convention in dsys:
the scheduler passes UTC). Invalid expressions raise :class:`~dsys.errors.BadInputError`
naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from dsys.errors import BadInputError
from dsys.jobs.core import JobSpec, encode_spec

_CRON_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# (name, low, high, names offset by low)
_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS),
)
_SEARCH_YEARS = 8  # Feb 29 on a given weekday can take up to 28 years; see next_after


def _value(text: str, field: str, low: int, high: int, names: tuple[str, ...]) -> int:
    t = text.lower()
    if names and t in names:
        return names.index(t) + low
    if not t.isdigit():
        raise BadInputError(f"cron {field}: {text!r} is not a number in {low}-{high}")
    v = int(t)
    if not low <= v <= high:
        raise BadInputError(f"cron {field}: {v} is out of range {low}-{high}")
    return v


def _parse_field(
    text: str, field: str, low: int, high: int, names: tuple[str, ...]
) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise BadInputError(f"cron {field}: empty list item in {text!r}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise BadInputError(f"cron {field}: step {step_text!r} must be a positive integer")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            start = _value(a, field, low, high, names)
            end = _value(b, field, low, high, names)
            if start > end:
                raise BadInputError(f"cron {field}: range {base!r} runs backwards")
        else:
            start = _value(base, field, low, high, names)
            end = high if slash else start
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class CronExpr:
    """A parsed cron expression; build it with :meth:`parse`.

    Attributes:
        text: the expression as given.
        minutes, hours, days, months, weekdays: the matching values of each field
            (weekdays 0-6, Sunday = 0).
        day_or: both day fields are restricted, so a day matches if either does.
    """

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    day_or: bool

    @classmethod
    def parse(cls, text: str) -> CronExpr:
        """Parse five fields (or an ``@alias``).

        Raises:
            BadInputError: the expression is malformed; the message names the field.
        """
        if not isinstance(text, str):
            raise BadInputError(f"a cron expression must be a string, got {text!r}")
        expanded = _ALIASES.get(text.strip().lower(), text)
        parts = expanded.split()
        if len(parts) != 5:
            raise BadInputError(
                f"a cron expression has 5 fields (minute hour day month weekday), "
                f"got {len(parts)} in {text!r}"
            )
        sets = [
            _parse_field(p, name, low, high, names)
            for p, (name, low, high, names) in zip(parts, _FIELDS, strict=True)
        ]
        weekdays = frozenset(d % 7 for d in sets[4])
        return cls(
            text=text,
            minutes=sets[0],
            hours=sets[1],
            days=sets[2],
            months=sets[3],
            weekdays=weekdays,
            day_or=not parts[2].startswith("*") and not parts[4].startswith("*"),
        )

    def _day_matches(self, d: datetime) -> bool:
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        return (dom or dow) if self.day_or else (dom and dow)

    def matches(self, t: datetime) -> bool:
        """Whether the minute containing ``t`` is a fire time."""
        return (
            t.minute in self.minutes
            and t.hour in self.hours
            and t.month in self.months
            and self._day_matches(t)
        )

    def next_after(self, t: datetime) -> datetime:
        """The first fire time strictly after ``t`` (seconds and below are zero).

        Raises:
            BadInputError: the expression never fires (e.g. ``0 0 31 2 *``, Feb 31).
        """
        cur = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t.year + _SEARCH_YEARS * 4
        while cur.year <= limit:
            if cur.month not in self.months:
                # first minute of the next month
                y, m = (cur.year + 1, 1) if cur.month == 12 else (cur.year, cur.month + 1)
                cur = cur.replace(year=y, month=m, day=1, hour=0, minute=0)
                continue
            if not self._day_matches(cur):
                cur = cur.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if cur.hour not in self.hours:
                cur = cur.replace(minute=0) + timedelta(hours=1)
                continue
            if cur.minute not in self.minutes:
                cur += timedelta(minutes=1)
                continue
            return cur
        raise BadInputError(f"cron expression {self.text!r} never fires")

    def fires_between(self, start: datetime, end: datetime, limit: int = 1000) -> list[datetime]:
        """Fire times ``f`` with ``start < f <= end``, oldest first, at most ``limit``."""
        out: list[datetime] = []
        cur = start
        while len(out) < limit:
            nxt = self.next_after(cur)
            if nxt > end:
                break
            out.append(nxt)
            cur = nxt
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class CronJob:
    """A task enqueued on a cron schedule by the queue's elected scheduler.

    Args:
        name: names the schedule (1-64 of ``A-Z a-z 0-9 _ -``); part of each fire's job id.
        expr: the schedule, a :class:`CronExpr` or its text (UTC).
        task: the task to call.
        args: its positional arguments (msgpack-encodable).
        kwargs: its keyword arguments (msgpack-encodable).
        priority: the jobs' priority (0..9).
        timeout: seconds per try (default: the task's).
        retries: retries after the first try (default: the task's).

    Raises:
        BadInputError: a bad name, expression or option.
    """

    name: str
    expr: CronExpr | str
    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0
    timeout: float | None = None
    retries: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _CRON_NAME.match(self.name):
            raise BadInputError(
                f"a cron entry name must be 1-64 characters of A-Z a-z 0-9 _ -, got {self.name!r}"
            )
        if isinstance(self.expr, str):
            object.__setattr__(self, "expr", CronExpr.parse(self.expr))
        elif not isinstance(self.expr, CronExpr):
            raise BadInputError(f"expr must be a cron expression, got {self.expr!r}")
        encode_spec(self.spec_for(datetime(2000, 1, 1, tzinfo=UTC), "default"))  # checks

    @property
    def schedule(self) -> CronExpr:
        """The parsed expression."""
        return self.expr if isinstance(self.expr, CronExpr) else CronExpr.parse(self.expr)

    def spec_for(self, fire: datetime, queue: str) -> JobSpec:
        """The job of the fire at ``fire`` (its id is ``cron:<name>:<YYYYmmddTHHMM>Z``,
        the same for every scheduler, so enqueueing it twice adds it once)."""
        return JobSpec(
            id=f"cron:{self.name}:{fire.astimezone(UTC):%Y%m%dT%H%M}Z",
            task=self.task,
            args=tuple(self.args),
            kwargs=dict(self.kwargs),
            queue=queue,
            priority=self.priority,
            timeout=self.timeout,
            retries=self.retries,
        )


__all__ = ["CronExpr", "CronJob"]
