"""The five-field cron parser."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dsys.errors import BadInputError
from dsys.jobs.cron import CronExpr, CronJob


def t(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("* * * * *", t(2026, 12, 3, 9, 7), t(2026, 12, 3, 9, 8)),
        ("*/15 * * * *", t(2026, 12, 3, 9, 7), t(2026, 12, 3, 9, 15)),
        ("*/15 * * * *", t(2026, 12, 3, 9, 45), t(2026, 12, 3, 10, 0)),
        ("0 0 * * *", t(2026, 12, 31, 23, 59), t(2027, 1, 1, 0, 0)),
        ("30 9 * * mon-fri", t(2026, 12, 4, 10, 0), t(2026, 12, 7, 9, 30)),  # Fri -> Mon
        ("0 12 1 * *", t(2026, 1, 31), t(2026, 2, 1, 12, 0)),
        ("0 0 29 2 *", t(2026, 3, 1), t(2028, 2, 29)),  # next leap day
        ("0 0 * * 7", t(2026, 12, 3), t(2026, 12, 6)),  # 7 is Sunday
        ("0 0 * * 0", t(2026, 12, 3), t(2026, 12, 6)),
        ("5,10-12/2 * * * *", t(2026, 1, 1, 0, 5), t(2026, 1, 1, 0, 10)),
        ("5,10-12/2 * * * *", t(2026, 1, 1, 0, 10), t(2026, 1, 1, 0, 12)),
        ("0 0 1 jan *", t(2026, 6, 1), t(2027, 1, 1)),
        ("0 8/6 * * *", t(2026, 1, 1, 9, 0), t(2026, 1, 1, 14, 0)),  # a/n runs to the end
        # both day fields restricted: either matches (Vixie cron): the 13th or a Friday
        ("0 0 13 * fri", t(2026, 11, 1), t(2026, 11, 6)),
        ("0 0 13 * fri", t(2026, 11, 6), t(2026, 11, 13)),
        # day-of-week restricted, day-of-month '*': only the weekday counts
        ("0 0 * * fri", t(2026, 11, 1), t(2026, 11, 6)),
        ("@hourly", t(2026, 1, 1, 5, 30), t(2026, 1, 1, 6, 0)),
        ("@daily", t(2026, 1, 1, 5, 30), t(2026, 1, 2)),
        ("@weekly", t(2026, 12, 3), t(2026, 12, 6)),
        ("@monthly", t(2026, 12, 3), t(2027, 1, 1)),
        ("@yearly", t(2026, 12, 3), t(2027, 1, 1)),
    ],
)
def test_next_after(expr: str, after: datetime, expected: datetime) -> None:
    assert CronExpr.parse(expr).next_after(after) == expected


def test_next_after_ignores_seconds_and_is_strict() -> None:
    c = CronExpr.parse("* * * * *")
    assert c.next_after(datetime(2026, 1, 1, 0, 0, 59, 999, tzinfo=UTC)) == t(2026, 1, 1, 0, 1)
    assert c.matches(t(2026, 1, 1, 0, 1))


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("* * * *", "5 fields"),
        ("* * * * * *", "5 fields"),
        ("60 * * * *", "minute: 60 is out of range"),
        ("* 24 * * *", "hour"),
        ("* * 0 * *", "day-of-month"),
        ("* * * 13 *", "month"),
        ("* * * * 8", "day-of-week"),
        ("*/0 * * * *", "step"),
        ("5-1 * * * *", "backwards"),
        ("a * * * *", "not a number"),
        ("1,,2 * * * *", "empty"),
        ("* * * foo *", "month"),
    ],
)
def test_malformed_expressions_name_the_field(expr: str, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        CronExpr.parse(expr)


def test_an_expression_that_never_fires_is_an_error() -> None:
    with pytest.raises(BadInputError, match="never fires"):
        CronExpr.parse("0 0 31 2 *").next_after(t(2026, 1, 1))


def test_fires_between_is_half_open_and_bounded() -> None:
    c = CronExpr.parse("*/10 * * * *")
    fires = c.fires_between(t(2026, 1, 1, 0, 0), t(2026, 1, 1, 1, 0))
    assert fires == [t(2026, 1, 1, 0, m) for m in (10, 20, 30, 40, 50)] + [t(2026, 1, 1, 1, 0)]
    assert len(c.fires_between(t(2026, 1, 1), t(2026, 2, 1), limit=3)) == 3


def test_cron_job_ids_are_deterministic_per_fire() -> None:
    job = CronJob(name="report", expr="0 * * * *", task="send_report", args=(1,))
    a = job.spec_for(t(2026, 12, 3, 10, 0), "default")
    b = job.spec_for(t(2026, 12, 3, 10, 0), "default")
    assert a == b and a.id == "cron:report:20261203T1000Z"
    with pytest.raises(BadInputError):
        CronJob(name="bad name", expr="* * * * *", task="t")
    with pytest.raises(BadInputError):
        CronJob(name="x", expr="* * *", task="t")
    with pytest.raises(BadInputError, match="argument 0"):
        CronJob(name="x", expr="* * * * *", task="t", args=(object(),))
