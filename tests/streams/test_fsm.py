"""The pure stream state machine: publish, retention, consumers, acks, dead letters."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.pubsub.subjects import validate_subject
from dsys.streams import fsm as fsm_module
from dsys.streams.fsm import (
    NOT_BEFORE_HEADER,
    Ack,
    AckResult,
    AddConsumer,
    AddStream,
    Claim,
    Command,
    ConsumerConfig,
    DeleteConsumer,
    DeleteMessage,
    DeleteStream,
    Done,
    Error,
    Fetch,
    Fetched,
    InvalidCommand,
    PubAck,
    Publish,
    Purge,
    Release,
    StreamConfig,
    StreamStateMachine,
    Tick,
    build_command,
    check_headers,
    decode_command,
    encode_command,
    patterns_overlap,
    validate_name,
)


def machine(**cfg: Any) -> StreamStateMachine:
    sm = StreamStateMachine()
    cfg.setdefault("subjects", ("orders.>",))
    assert isinstance(sm.apply_command(AddStream(config=StreamConfig(name="S", **cfg))), Done)
    return sm


def pub(sm: StreamStateMachine, subject: str = "orders.1", data: bytes = b"x", **kw: Any) -> Any:
    kw.setdefault("now_ms", sm.clock_ms)
    return sm.apply_command(Publish(subject=subject, data=data, **kw))


def consumer(sm: StreamStateMachine, name: str = "C", **cfg: Any) -> None:
    out = sm.apply_command(AddConsumer(stream="S", config=ConsumerConfig(name=name, **cfg)))
    assert isinstance(out, Done), out


def fetch(sm: StreamStateMachine, n: int = 10, now: int | None = None, worker: str = "w") -> Any:
    out = sm.apply_command(
        Fetch(
            stream="S",
            consumer="C",
            batch=n,
            worker=worker,
            now_ms=sm.clock_ms if now is None else now,
        )
    )
    assert isinstance(out, Fetched), out
    return out


def ack(sm: StreamStateMachine, *pairs: tuple[int, int], kind: str = "ack", **kw: Any) -> Any:
    kw.setdefault("now_ms", sm.clock_ms)
    out = sm.apply_command(Ack(stream="S", consumer="C", acks=pairs, kind=kind, **kw))
    assert isinstance(out, AckResult), out
    return out.statuses


def seqs(f: Fetched) -> list[int]:
    return [d.message.seq for d in f.deliveries]


# -- publish ---------------------------------------------------------------------------


def test_publish_assigns_sequences_and_routes_by_subject() -> None:
    sm = machine()
    assert pub(sm) == PubAck("S", 1)
    assert pub(sm, "orders.2") == PubAck("S", 2)
    out = pub(sm, "payments.1")
    assert isinstance(out, Error) and out.code == "not_found"
    assert sm.stream_info("S")["last_seq"] == 2  # type: ignore[index]


def test_message_id_dedups_within_the_window_only() -> None:
    sm = machine(duplicate_window_ms=1000)
    assert pub(sm, msg_id="a", now_ms=10) == PubAck("S", 1)
    assert pub(sm, msg_id="a", now_ms=500) == PubAck("S", 1, duplicate=True)
    assert pub(sm, msg_id="a", now_ms=1011) == PubAck("S", 2)


def test_the_dedup_table_is_bounded_by_count_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsm_module, "MAX_DEDUP_IDS", 3)
    sm = machine()
    for i, mid in enumerate("abcd"):
        assert pub(sm, msg_id=mid) == PubAck("S", i + 1)
    assert pub(sm, msg_id="a") == PubAck("S", 5)  # forgotten: the oldest of four ids
    assert pub(sm, msg_id="d") == PubAck("S", 4, duplicate=True)


def test_expected_last_sequence_is_optimistic_concurrency() -> None:
    sm = machine()
    pub(sm)
    out = pub(sm, expected_last_seq=0)
    assert isinstance(out, Error) and out.code == "conflict" and out.info == {"last_seq": 1}
    assert pub(sm, expected_last_seq=1) == PubAck("S", 2)


def test_limits_drop_the_oldest_or_refuse_new() -> None:
    sm = machine(max_msgs=3)
    for _ in range(5):
        pub(sm)
    info = sm.stream_info("S")
    assert info is not None and (info["first_seq"], info["last_seq"], info["messages"]) == (3, 5, 3)
    sm2 = machine(max_msgs=2, discard="new")
    pub(sm2)
    pub(sm2)
    out = pub(sm2)
    assert isinstance(out, Error) and out.code == "full"


def test_max_bytes_and_max_age() -> None:
    sm = machine(max_bytes=100, max_age_ms=1000)
    for i in range(5):
        pub(sm, data=b"x" * 30, now_ms=i)
    info = sm.stream_info("S")
    assert info is not None and info["bytes"] <= 100 and info["messages"] == 2
    sm.apply_command(Tick(now_ms=1003))
    assert sm.stream_info("S")["messages"] == 1  # type: ignore[index]
    sm.apply_command(Tick(now_ms=5000))
    assert sm.stream_info("S")["messages"] == 0  # type: ignore[index]


def test_payload_larger_than_max_msg_size_is_refused() -> None:
    sm = machine(max_msg_size=4)
    out = pub(sm, data=b"12345")
    assert isinstance(out, Error) and out.code == "too_large" and "5 bytes" in out.message


def test_overlapping_subjects_are_refused() -> None:
    sm = machine()
    out = sm.apply_command(AddStream(config=StreamConfig(name="T", subjects=("orders.*",))))
    assert isinstance(out, Error) and out.code == "conflict"
    assert patterns_overlap("a.*", "a.b")
    assert patterns_overlap("a.>", "a.b.c")
    assert not patterns_overlap("a.>", "a")
    assert not patterns_overlap("a.b", "a.c")
    assert patterns_overlap(">", "x")
    assert not patterns_overlap("a.*", "a.b.c")


def test_same_config_is_idempotent_and_a_different_one_exists() -> None:
    sm = machine()
    again = sm.apply_command(AddStream(config=StreamConfig(name="S", subjects=("orders.>",))))
    assert isinstance(again, Done)
    other = sm.apply_command(AddStream(config=StreamConfig(name="S", subjects=("x",))))
    assert isinstance(other, Error) and other.code == "exists"
    upd = sm.apply_command(
        AddStream(config=StreamConfig(name="S", subjects=("x",), max_msgs=5), update=True)
    )
    assert isinstance(upd, Done) and sm.stream_for("x") == "S"


# -- consumers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "extra", "first"),
    [
        ("all", {}, 1),
        ("new", {}, None),
        ("last", {}, 4),
        ("by_start_seq", {"opt_start_seq": 3}, 3),
        ("by_start_time", {"opt_start_time_ms": 200}, 3),
    ],
    ids=["all", "new", "last", "by_start_seq", "by_start_time"],
)
def test_deliver_policies(policy: str, extra: dict[str, int], first: int | None) -> None:
    sm = machine()
    for i in range(4):
        pub(sm, now_ms=i * 100)
    consumer(sm, deliver_policy=policy, **extra)
    got = seqs(fetch(sm))
    assert (got[0] if got else None) == first
    pub(sm)
    assert seqs(fetch(sm))[-1] == 5


def test_ack_wait_redelivers_and_a_stale_ack_changes_nothing() -> None:
    sm = machine()
    pub(sm, now_ms=0)
    consumer(sm, ack_wait_ms=1000)
    f = fetch(sm, now=0, worker="slow")
    assert [(d.message.seq, d.deliveries) for d in f.deliveries] == [(1, 1)]
    assert seqs(fetch(sm, now=500)) == []  # still leased
    again = fetch(sm, now=1000, worker="fast")
    assert [(d.message.seq, d.deliveries) for d in again.deliveries] == [(1, 2)]
    assert ack(sm, (1, 1)) == ["stale"]  # the slow worker's ack of its old delivery
    assert ack(sm, (1, 2)) == ["ok"]
    assert ack(sm, (1, 2)) == ["not_pending"]
    info = sm.consumer_info("S", "C")
    assert info is not None and info["ack_floor"] == 1 and info["redelivered"] == 1


def test_nak_with_delay_progress_and_term() -> None:
    sm = machine()
    for _ in range(3):
        pub(sm, now_ms=0)
    consumer(sm, ack_wait_ms=1000)
    fetch(sm, now=0)
    assert ack(sm, (1, 1), kind="nak", delay_ms=300, now_ms=0) == ["ok"]
    assert ack(sm, (2, 1), kind="progress", now_ms=900) == ["ok"]
    assert ack(sm, (3, 1), kind="term", reason="poison", now_ms=900) == ["ok"]
    # at 1000: 1 is due (nak'd), 2 was extended to 1900, 3 is dead
    assert seqs(fetch(sm, now=1000)) == [1]
    dlq = sm.read("S-dlq")
    assert dlq is not None and len(dlq) == 1
    assert dlq[0].headers["dsys-dlq-reason"] == "terminated: poison"
    assert dlq[0].headers["dsys-dlq-seq"] == "3"


def test_max_deliver_dead_letters_with_the_reason() -> None:
    sm = machine(dead_letter="DEAD")
    pub(sm, now_ms=0)
    consumer(sm, ack_wait_ms=10, max_deliver=2)
    assert seqs(fetch(sm, now=0)) == [1]
    assert seqs(fetch(sm, now=10)) == [1]
    assert seqs(fetch(sm, now=20)) == []
    dead = sm.read("DEAD")
    assert dead is not None and [m.headers["dsys-dlq-reason"] for m in dead] == ["max_deliver"]
    info = sm.consumer_info("S", "C")
    assert info is not None and info["dead_lettered"] == 1 and info["num_ack_pending"] == 0


def test_max_ack_pending_is_flow_control() -> None:
    sm = machine()
    for _ in range(10):
        pub(sm)
    consumer(sm, max_ack_pending=3)
    assert seqs(fetch(sm, 10)) == [1, 2, 3]
    assert seqs(fetch(sm, 10)) == []
    assert not sm.has_work("S", "C", sm.clock_ms)
    ack(sm, (2, 1))
    assert sm.has_work("S", "C", sm.clock_ms)
    assert seqs(fetch(sm, 10)) == [4]


def test_ack_policy_all_and_none() -> None:
    sm = machine()
    for _ in range(4):
        pub(sm)
    consumer(sm, ack_policy="all")
    fetch(sm)
    assert ack(sm, (3, 1)) == ["ok"]
    info = sm.consumer_info("S", "C")
    assert info is not None and info["ack_floor"] == 3 and info["num_ack_pending"] == 1
    consumer(sm, "N", ack_policy="none")
    out = sm.apply_command(Fetch(stream="S", consumer="N", batch=10))
    assert isinstance(out, Fetched) and len(out.deliveries) == 4 and out.pending == 0


def test_workqueue_deletes_acked_messages() -> None:
    sm = machine(retention="workqueue")
    for _ in range(3):
        pub(sm)
    consumer(sm)
    fetch(sm)
    ack(sm, (1, 1), (3, 1))
    got = sm.read("S")
    assert got is not None and [m.seq for m in got] == [2]


def test_consumer_group_workers_share_without_overlap() -> None:
    sm = machine()
    for _ in range(6):
        pub(sm)
    consumer(sm)
    a = seqs(fetch(sm, 3, worker="a"))
    b = seqs(fetch(sm, 3, worker="b"))
    assert sorted(a + b) == [1, 2, 3, 4, 5, 6] and not set(a) & set(b)


def test_filter_subject() -> None:
    sm = machine()
    pub(sm, "orders.eu.1")
    pub(sm, "orders.us.1")
    pub(sm, "orders.eu.2")
    consumer(sm, filter_subject="orders.eu.*")
    assert seqs(fetch(sm)) == [1, 3]
    info = sm.consumer_info("S", "C")
    assert info is not None and info["ack_floor"] == 0


def test_claim_idle_and_release_worker() -> None:
    sm = machine()
    for _ in range(3):
        pub(sm, now_ms=0)
    consumer(sm, ack_wait_ms=60_000)
    fetch(sm, now=0, worker="dead")
    out = sm.apply_command(
        Claim(stream="S", consumer="C", worker="alive", min_idle_ms=500, count=2, now_ms=600)
    )
    assert isinstance(out, Fetched)
    assert [(d.message.seq, d.deliveries) for d in out.deliveries] == [(1, 2), (2, 2)]
    pending = sm.pending("S", "C")
    assert pending is not None
    assert [(p["seq"], p["worker"], p["idle_ms"]) for p in pending] == [
        (1, "alive", 0),
        (2, "alive", 0),
        (3, "dead", 600),
    ]
    rel = sm.apply_command(Release(stream="S", consumer="C", worker="dead", now_ms=600))
    assert rel == Done({"released": 1})
    assert seqs(fetch(sm, now=600, worker="alive")) == [3]


def test_ephemeral_consumer_goes_away_when_idle() -> None:
    sm = machine()
    consumer(sm, "E", durable=False, inactive_threshold_ms=1000)
    sm.apply_command(Tick(now_ms=999))
    assert sm.consumers("S") == ["E"]
    sm.apply_command(Tick(now_ms=1000))
    assert sm.consumers("S") == []


def test_not_before_header_delays_delivery() -> None:
    sm = machine()
    pub(sm, headers={NOT_BEFORE_HEADER: "5000"}, now_ms=0)
    pub(sm, now_ms=0)
    consumer(sm)
    assert seqs(fetch(sm, now=0)) == [2]
    assert seqs(fetch(sm, now=4999)) == []
    assert [(d.message.seq, d.deliveries) for d in fetch(sm, now=5000).deliveries] == [(1, 1)]


def test_unknown_stream_and_consumer_errors() -> None:
    sm = machine()
    for cmd in (
        Fetch(stream="X", consumer="C", batch=1),
        Fetch(stream="S", consumer="X", batch=1),
        Ack(stream="S", consumer="X", acks=((1, 1),)),
        DeleteConsumer(stream="S", consumer="X"),
        DeleteMessage(stream="S", seq=9),
        DeleteStream(stream="X"),
    ):
        out = sm.apply_command(cmd)
        assert isinstance(out, Error) and out.code == "not_found", cmd


def test_purge_by_subject() -> None:
    sm = machine()
    pub(sm, "orders.a")
    pub(sm, "orders.b")
    pub(sm, "orders.a")
    assert sm.apply_command(Purge(stream="S", subject="orders.a")) == Done({"purged": 2})
    assert [m.seq for m in sm.read("S") or []] == [2]


@pytest.mark.parametrize(
    ("cls", "kwargs", "needle"),
    [
        (Publish, {"subject": "a.*", "data": b""}, "wildcard"),
        (Publish, {"subject": "a", "data": "text"}, "data must be bytes"),
        (Publish, {"subject": "a", "data": b"", "headers": {"k": 1}}, "header"),
        (Publish, {"subject": "a", "data": b"", "headers": {str(i): "" for i in range(99)}}, "64"),
        (Fetch, {"stream": "S", "consumer": "C", "batch": 0}, "batch"),
        (Fetch, {"stream": "S", "consumer": "C", "batch": True}, "batch"),
        (Fetch, {"stream": "bad name", "consumer": "C", "batch": 1}, "stream name"),
        (Ack, {"stream": "S", "consumer": "C", "acks": [[0, 1]]}, "seq >= 1"),
        (Ack, {"stream": "S", "consumer": "C", "acks": [[1, 1]], "kind": "x"}, "kind"),
        (AddStream, {"config": {"name": "S", "bogus": 1}}, "unknown StreamConfig field"),
        (AddStream, {"config": {"name": "S", "max_bytes": -1}}, "max_bytes"),
        (AddConsumer, {"stream": "S", "config": {"name": "C", "ack_wait_ms": 0}}, "ack_wait"),
        (
            AddConsumer,
            {"stream": "S", "config": {"name": "C", "max_ack_pending": 10**9}},
            "max_ack",
        ),
    ],
)
def test_bad_commands_are_refused_with_a_reason(cls: Any, kwargs: Any, needle: str) -> None:
    with pytest.raises(InvalidCommand, match=needle):
        build_command(cls, kwargs)


def test_undecodable_entry_is_a_replicated_no_op() -> None:
    sm = machine()
    out = sm.apply(b"\x93\x01\x02")
    assert isinstance(out, Error) and out.code == "invalid"


# -- determinism -------------------------------------------------------------------------


_subjects = st.sampled_from(["orders.a", "orders.b", "orders.c.d", "other.x"])
_now = st.integers(0, 5000)
_commands = st.one_of(
    st.builds(
        Publish,
        subject=_subjects,
        data=st.binary(max_size=20),
        msg_id=st.sampled_from(["", "", "m1", "m2"]),
        expected_last_seq=st.one_of(st.none(), st.integers(0, 5)),
        headers=st.one_of(st.just({}), st.builds(lambda t: {NOT_BEFORE_HEADER: str(t)}, _now)),
        now_ms=_now,
    ),
    st.builds(
        Fetch,
        stream=st.just("S"),
        consumer=st.sampled_from(["C", "D"]),
        batch=st.integers(1, 5),
        worker=st.sampled_from(["w1", "w2"]),
        now_ms=_now,
    ),
    st.builds(
        Ack,
        stream=st.just("S"),
        consumer=st.sampled_from(["C", "D"]),
        acks=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 3)), min_size=1, max_size=3).map(
            tuple
        ),
        kind=st.sampled_from(["ack", "ack", "nak", "progress", "term"]),
        delay_ms=st.integers(0, 500),
        now_ms=_now,
    ),
    st.builds(
        Claim,
        stream=st.just("S"),
        consumer=st.just("C"),
        worker=st.just("w3"),
        min_idle_ms=st.integers(0, 1000),
        count=st.integers(1, 3),
        now_ms=_now,
    ),
    st.builds(Release, stream=st.just("S"), consumer=st.just("D"), worker=st.just("w1")),
    st.builds(Tick, now_ms=_now),
    st.builds(DeleteMessage, stream=st.just("S"), seq=st.integers(1, 10)),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_commands, max_size=40), st.integers(0, 40), st.sampled_from(["limits", "workqueue"])
)
def test_replicas_agree_through_bytes_and_snapshots(
    cmds: list[Any], cut: int, retention: str
) -> None:
    """A replica applying decoded log bytes, with a snapshot/restore in the middle,
    ends in exactly the state of the leader that applied the commands directly."""
    setup = [
        AddStream(
            config=StreamConfig(
                name="S", subjects=("orders.>",), retention=retention, max_msgs=8, max_bytes=400
            )
        ),
        AddConsumer(stream="S", config=ConsumerConfig(name="C", ack_wait_ms=300, max_deliver=3)),
        AddConsumer(
            stream="S",
            config=ConsumerConfig(name="D", ack_policy="all", max_ack_pending=4, ack_wait_ms=200),
        ),
    ]
    leader, follower = StreamStateMachine(), StreamStateMachine()
    for i, cmd in enumerate(setup + cmds):
        a = leader.apply_command(cmd)
        b = follower.apply(encode_command(cmd))
        assert a == b, (i, cmd)
        if i == cut:
            restored = StreamStateMachine()
            restored.restore(follower.snapshot())
            follower = restored
        # invariants on every step once the consumers exist
        for name in ("C", "D") if i >= len(setup) - 1 else ():
            info = leader.consumer_info("S", name)
            assert info is not None
            assert 0 <= info["num_ack_pending"] <= (4 if name == "D" else 1000)
            for p in leader.pending("S", name) or []:
                assert p["seq"] > info["ack_floor"]
            keys = list(leader._streams["S"].consumers[name].pending)
            assert keys == sorted(keys), "pending must stay in sequence order"
    assert leader.snapshot() == follower.snapshot()


def test_commands_round_trip_through_bytes() -> None:
    cmds = [
        Publish(subject="a.b", data=b"x", headers={"h": "v"}, msg_id="m", expected_last_seq=3),
        AddStream(config=StreamConfig(name="S", subjects=("a.>",)), update=True),
        AddConsumer(stream="S", config=ConsumerConfig(name="C", filter_subject="a.*")),
        Ack(stream="S", consumer="C", acks=((1, 2), (3, 4)), kind="nak", delay_ms=5),
        Claim(stream="S", consumer="C", worker="w", min_idle_ms=1, count=2),
        Purge(stream="S", subject="a.b", upto_seq=9),
    ]
    for cmd in cmds:
        assert decode_command(encode_command(cmd)) == cmd


# -- the Publish fast path ----------------------------------------------------------------


def _reference_publish(kwargs: dict[str, Any]) -> Publish:
    """The general checks ``build_command`` ran for a Publish before it had a fast path."""
    kw = dict(kwargs)
    now = kw.get("now_ms", 0)
    if not (type(now) is int and now >= 0):
        raise InvalidCommand("now_ms")
    if "stream" in kw and kw["stream"] != "":
        validate_name(kw["stream"])
    try:
        validate_subject(kw.get("subject"))
    except ValueError as exc:
        raise InvalidCommand(str(exc)) from None
    if type(kw.get("data")) is not bytes:
        raise InvalidCommand("data")
    kw["headers"] = check_headers(kw.get("headers", {}))
    msg_id = kw.get("msg_id", "")
    if not (type(msg_id) is str and len(msg_id) <= 256):
        raise InvalidCommand("msg_id")
    els = kw.get("expected_last_seq")
    if not (els is None or (type(els) is int and els >= 0)):
        raise InvalidCommand("expected_last_seq")
    if type(kw.get("stream", "")) is not str:
        raise InvalidCommand("stream")
    try:
        return Publish(**kw)
    except TypeError as exc:
        raise InvalidCommand(str(exc)) from None


_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2),
)
_GOOD_PUB = {
    "subject": st.sampled_from(["a.b", "a", "orders.1.x"]),
    "data": st.binary(max_size=8),
    "headers": st.dictionaries(st.text(min_size=1, max_size=3), st.text(max_size=3), max_size=3),
    "stream": st.sampled_from(["", "S"]),
    "msg_id": st.one_of(st.text(max_size=3), st.just("x" * 256)),
    "expected_last_seq": st.one_of(st.none(), st.integers(0, 5)),
    "now_ms": st.integers(0, 10**6),
}
_BAD_PUB = {
    "subject": st.one_of(st.sampled_from(["a..b", "a.*", "a.>", "a b", "", ".a"]), _ANY),
    "data": _ANY,
    "headers": st.one_of(st.just({"": "v"}), st.just({"k": 1}), _ANY),
    "stream": st.one_of(st.sampled_from(["bad name", "x" * 65]), _ANY),
    "msg_id": st.one_of(st.just("x" * 257), _ANY),
    "expected_last_seq": st.one_of(st.integers(-3, -1), _ANY),
    "now_ms": st.one_of(st.integers(-3, -1), _ANY),
    "extra": _ANY,
}


@st.composite
def _publish_fields(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly valid Publish fields with zero to two of them replaced by odd values."""
    optional = {k: v for k, v in _GOOD_PUB.items() if k != "subject"}
    kw = draw(st.fixed_dictionaries({"subject": _GOOD_PUB["subject"]}, optional=optional))
    if draw(st.booleans()):
        kw["data"] = draw(_GOOD_PUB["data"])
    for name in draw(st.lists(st.sampled_from(sorted(_BAD_PUB)), max_size=2)):
        kw[name] = draw(_BAD_PUB[name])
    return kw


@settings(max_examples=300, deadline=None)
@given(_publish_fields())
def test_the_publish_fast_path_accepts_exactly_what_the_general_checks_accept(
    kwargs: dict[str, Any],
) -> None:
    try:
        want: Publish | None = _reference_publish(kwargs)
    except InvalidCommand:
        want = None
    for _ in range(2):  # the second time the subject may come from the validated cache
        try:
            got: Command | None = build_command(Publish, kwargs)
        except InvalidCommand:
            got = None
        assert got == want
