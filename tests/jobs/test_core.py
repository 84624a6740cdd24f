"""The pure job core: encoding, validation, state transitions, retry decisions."""

from __future__ import annotations

import random

import msgpack
import pytest

from dsys.errors import BadInputError, ConfigError, RemoteProtocolError
from dsys.jobs.core import (
    FINAL_STATES,
    STATES,
    TRANSITIONS,
    DeadLetter,
    JobSpec,
    RetryAt,
    Run,
    can_transition,
    check_delay,
    check_priority,
    check_retries,
    check_timeout,
    decide_failure,
    decide_start,
    decode_spec,
    decode_value,
    encode_spec,
    encode_value,
    format_error,
    parse_state,
    split_target,
)
from dsys.resilience.backoff import Backoff


def test_spec_round_trips_through_msgpack() -> None:
    spec = JobSpec(
        id="j-1",
        task="resize",
        args=("cat.png", 640, 1.5, None, True, b"\x00\xff", [1, 2], {"k": "v"}),
        kwargs={"quality": 90, "tags": ["a"]},
        queue="images",
        priority=7,
        timeout=12.5,
        retries=4,
    )
    assert decode_spec(encode_spec(spec)) == spec


def test_tuples_arrive_as_lists() -> None:
    spec = JobSpec(id="j", task="t", args=((1, 2),))
    assert decode_spec(encode_spec(spec)).args == ([1, 2],)


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ((object(),), {}, "argument 0"),
        ((1, {1, 2}), {}, "argument 1"),
        ((), {"when": __import__("datetime").datetime(2026, 1, 1)}, "keyword argument 'when'"),
        ((lambda: 1,), {}, "argument 0"),
    ],
    ids=["object", "set", "datetime-kwarg", "function"],
)
def test_unencodable_arguments_are_refused_naming_the_argument(
    args: tuple[object, ...], kwargs: dict[str, object], named: str
) -> None:
    spec = JobSpec(id="j", task="t", args=args, kwargs=kwargs)
    with pytest.raises(BadInputError, match=named):
        encode_spec(spec)


def test_oversized_job_is_refused() -> None:
    with pytest.raises(BadInputError, match="bytes"):
        encode_spec(JobSpec(id="j", task="t", args=(b"x" * (2 << 20),)))


@pytest.mark.parametrize(
    "data",
    [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 99}), msgpack.packb({"v": 1, "id": "x"})],
    ids=["not-msgpack", "list", "version", "missing-fields"],
)
def test_decode_refuses_garbage(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_spec(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", ""),
        ("id", "has space"),
        ("id", "x" * 201),
        ("task", "no/slash"),
        ("task", 42),
        ("priority", -1),
        ("priority", 10),
        ("priority", True),
        ("timeout", -1.0),
        ("timeout", 0),
        ("timeout", float("nan")),
        ("retries", -1),
        ("retries", 1.5),
        ("retries", 10_000),
    ],
)
def test_bad_spec_fields_are_refused(field: str, value: object) -> None:
    fields: dict[str, object] = {"id": "j", "task": "t", field: value}
    with pytest.raises(BadInputError):
        JobSpec(**fields)  # type: ignore[arg-type]


def test_bad_queue_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        JobSpec(id="j", task="t", queue="a b")


def test_checkers_accept_the_edges() -> None:
    assert check_priority(0) == 0 and check_priority(9) == 9
    assert check_retries(0) == 0 and check_retries(None) is None
    assert check_timeout(0.001) == 0.001 and check_timeout(None) is None
    assert check_delay(0) == 0.0
    with pytest.raises(BadInputError, match="delay"):
        check_delay(-0.5)
    with pytest.raises(ConfigError):
        check_retries(-3, error=ConfigError)


def test_values_round_trip_and_refuse_unencodable() -> None:
    assert decode_value(encode_value({"a": [1, b"x"]})) == {"a": [1, b"x"]}
    assert decode_value(None) is None
    with pytest.raises(BadInputError, match="the result"):
        encode_value(object())
    with pytest.raises(RemoteProtocolError):
        decode_value(b"\xc1")


def test_transitions_cover_every_state_and_final_states_leave_only_by_requeue() -> None:
    assert set(TRANSITIONS) == set(STATES)
    for old, news in TRANSITIONS.items():
        assert news <= set(STATES), old
    assert TRANSITIONS["succeeded"] == frozenset()
    for s in ("dead", "cancelled"):
        assert TRANSITIONS[s] == {"queued"}
    assert can_transition("running", "succeeded")
    assert not can_transition("succeeded", "queued")
    assert not can_transition("scheduled", "running")  # it is queued first
    assert {"succeeded", "dead", "cancelled"} == FINAL_STATES


@pytest.mark.parametrize(
    ("tries", "retries", "retry"),
    [(1, 0, False), (1, 1, True), (2, 1, False), (3, 3, True), (4, 3, False)],
)
def test_decide_failure_retries_until_the_last_try(tries: int, retries: int, retry: bool) -> None:
    d = decide_failure(
        tries=tries,
        retries=retries,
        error="ValueError: x",
        backoff=Backoff(initial=1.0, maximum=60.0, jitter="none"),
        rng=random.Random(1),
    )
    if retry:
        assert d == RetryAt(2.0 ** (tries - 1))
    else:
        assert isinstance(d, DeadLetter)
        assert "ValueError: x" in d.reason and f"after {tries} tr" in d.reason


def test_backoff_jitter_stays_within_the_exponential_cap() -> None:
    rng = random.Random(7)
    backoff = Backoff(initial=0.5, maximum=8.0, jitter="full")
    for tries in range(1, 12):
        d = decide_failure(tries=tries, retries=100, error="e", backoff=backoff, rng=rng)
        assert isinstance(d, RetryAt)
        assert 0 <= d.delay <= min(8.0, 0.5 * 2 ** (tries - 1))


@pytest.mark.parametrize(
    ("tries", "retries", "runs"), [(1, 0, True), (2, 0, False), (4, 3, True), (5, 3, False)]
)
def test_decide_start_dead_letters_a_job_whose_leases_all_expired(
    tries: int, retries: int, runs: bool
) -> None:
    d = decide_start(tries=tries, retries=retries)
    assert (d == Run()) is runs
    if not runs:
        assert isinstance(d, DeadLetter) and "lease expired" in d.reason


def test_format_error_and_parse_state() -> None:
    assert format_error(ValueError("bad")) == "ValueError: bad"
    assert len(format_error(ValueError("x" * 5000), limit=100)) == 100
    assert parse_state("dead") == "dead"
    with pytest.raises(BadInputError, match="unknown job state"):
        parse_state("zombie")


@pytest.mark.parametrize(
    ("target", "expected"),
    [("app.tasks:registry", ("app.tasks", "registry")), ("app", ("app", None))],
)
def test_split_target(target: str, expected: tuple[str, str | None]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize("target", ["", ":x", "app:", "a-b:c", "app:1x"])
def test_split_target_refuses_malformed(target: str) -> None:
    with pytest.raises(BadInputError, match="MODULE:OBJECT"):
        split_target(target)
