from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import BadInputError, ConfigError
from dsys.pubsub.core import (
    BrokerLimits,
    BrokerState,
    ConnKind,
    Effects,
    Permissions,
    QueueChoice,
    SlowConsumerPolicy,
)


def msgs(state: BrokerState, conn: int) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    while frames := state.take(conn, max_items=7):
        out.extend(frames)
    return out


def test_plain_subscribers_each_get_every_message_and_wildcards_match() -> None:
    state, fx = BrokerState(), Effects()
    for c in (1, 2, 3):
        state.open(c)
    state.subscribe(1, 1, "prices.>", fx)
    state.subscribe(2, 1, "prices.*.INFY", fx)
    state.subscribe(3, 1, "other", fx)
    assert state.publish(1, "prices.NSE.INFY", b"x", None, fx) == 2
    assert fx.wake == {1, 2}
    assert [f["subject"] for f in msgs(state, 1)] == ["prices.NSE.INFY"]
    assert msgs(state, 2)[0]["data"] == b"x"
    assert msgs(state, 3) == []


@pytest.mark.parametrize("choice", list(QueueChoice), ids=lambda c: c.value)
def test_queue_group_delivers_each_message_once_among_members(choice: QueueChoice) -> None:
    state = BrokerState(BrokerLimits(queue_choice=choice), rng=random.Random(3))
    fx = Effects()
    for c in range(1, 6):
        state.open(c)
    for c in (1, 2, 3):
        state.subscribe(c, 7, "jobs.*", fx, queue="workers")
    state.subscribe(4, 1, "jobs.>", fx)  # a plain subscriber beside the group
    for i in range(300):
        state.publish(5, f"jobs.{i % 4}", b"j", None, fx)
    per_member = {c: len(msgs(state, c)) for c in (1, 2, 3)}
    assert sum(per_member.values()) == 300
    assert len(msgs(state, 4)) == 300
    if choice is QueueChoice.ROUND_ROBIN:
        assert set(per_member.values()) == {100}
    else:
        assert all(v > 50 for v in per_member.values()), per_member


def test_permissions_are_checked_for_publish_and_subscribe() -> None:
    state, fx = BrokerState(), Effects()
    perms = Permissions(publish=("prices.>",), subscribe=("prices.>", "_INBOX.>"))
    state.open(1, permissions=perms)
    state.subscribe(1, 1, "prices.*.INFY", fx)
    with pytest.raises(BadInputError, match="permission denied: subscribe"):
        state.subscribe(1, 2, ">", fx)
    with pytest.raises(BadInputError, match="permission denied: publish"):
        state.publish(1, "orders.new", b"", None, fx)
    state.publish(1, "prices.NSE.INFY", b"ok", None, fx)
    with pytest.raises(ConfigError):
        Permissions(publish=("a..b",))


@pytest.mark.parametrize(
    ("sid", "subject", "kwargs", "reason"),
    [
        (-1, "a", {}, "sid"),
        ("x", "a", {}, "sid"),
        (1, "a..b", {}, "empty token"),
        (1, "a", {"queue": "q q"}, "queue"),
        (1, "a", {"max_msgs": 0}, "max_pending"),
    ],
)
def test_bad_subscriptions_are_refused(
    sid: object, subject: str, kwargs: dict[str, object], reason: str
) -> None:
    state, fx = BrokerState(), Effects()
    state.open(1)
    with pytest.raises(BadInputError, match=reason):
        state.subscribe(1, sid, subject, fx, **kwargs)  # type: ignore[arg-type]


def test_subscription_limit_and_duplicate_sid() -> None:
    state, fx = BrokerState(BrokerLimits(max_subs_per_connection=2)), Effects()
    state.open(1)
    state.subscribe(1, 1, "a", fx)
    with pytest.raises(BadInputError, match="already in use"):
        state.subscribe(1, 1, "b", fx)
    state.subscribe(1, 2, "b", fx)
    with pytest.raises(BadInputError, match="too many"):
        state.subscribe(1, 3, "c", fx)
    state.unsubscribe(1, 2, fx)
    state.subscribe(1, 3, "c", fx)
    with pytest.raises(BadInputError, match="no subscription"):
        state.unsubscribe(1, 99, fx)


def test_oversized_payload_is_refused() -> None:
    state, fx = BrokerState(BrokerLimits(max_payload=10)), Effects()
    state.open(1)
    with pytest.raises(BadInputError, match="max_payload"):
        state.publish(1, "a", b"x" * 11, None, fx)
    with pytest.raises(BadInputError, match="bytes"):
        state.publish(1, "a", "text", None, fx)


def test_drop_newest_keeps_the_first_messages() -> None:
    state, fx = BrokerState(), Effects()
    state.open(1)
    state.open(2)
    state.subscribe(1, 1, "t", fx, policy=SlowConsumerPolicy.DROP_NEWEST, max_msgs=3)
    for i in range(10):
        state.publish(2, "t", str(i).encode(), None, fx)
    assert [f["data"] for f in msgs(state, 1)] == [b"0", b"1", b"2"]
    assert state.stats.drops["drop_newest"] == 7


def test_drop_oldest_keeps_the_latest_messages_and_fifo_stays_compact() -> None:
    state, fx = BrokerState(), Effects()
    state.open(1)
    state.open(2)
    state.subscribe(1, 1, "t", fx, max_msgs=3)
    for i in range(1000):
        state.publish(2, "t", str(i).encode(), None, fx)
    conn = state.connection(1)
    assert len(conn.fifo) <= 2 * 64 + 3 + 1  # dead entries are compacted away
    assert [f["data"] for f in msgs(state, 1)] == [b"997", b"998", b"999"]
    assert state.stats.drops["drop_oldest"] == 997
    assert conn.pending_bytes == 0


def test_disconnect_policy_marks_only_the_slow_connection() -> None:
    state, fx = BrokerState(), Effects()
    for c in (1, 2, 3):
        state.open(c)
    state.subscribe(1, 1, "t", fx, policy=SlowConsumerPolicy.DISCONNECT, max_msgs=2)
    state.subscribe(2, 1, "t", fx)
    for _ in range(5):
        state.publish(3, "t", b"x", None, fx)
    assert set(fx.disconnect) == {1}
    assert state.stats.slow_consumer_disconnects == 1
    assert state.take(1) == []
    assert len(msgs(state, 2)) == 5
    state.close(1, fx)
    assert state.subscription_count() == 1


def test_pending_bytes_bound_is_shared_by_a_connections_subscriptions() -> None:
    state, fx = BrokerState(BrokerLimits(max_pending_bytes=2000)), Effects()
    state.open(1)
    state.open(2)
    state.subscribe(1, 1, "a", fx)
    state.subscribe(1, 2, "b", fx)
    for _ in range(100):
        state.publish(2, "a", b"x" * 100, None, fx)
        state.publish(2, "b", b"y" * 100, None, fx)
    assert state.connection(1).pending_bytes <= 2000
    got = Counter(f["sid"] for f in msgs(state, 1))
    assert got[1] > 0 and got[2] > 0


def test_control_frames_keep_their_place_after_messages() -> None:
    state, fx = BrokerState(), Effects()
    state.open(1)
    state.subscribe(1, 1, "a", fx)
    state.publish(1, "a", b"1", None, fx)
    state.control(1, {"op": "pong", "id": 1}, fx)
    state.publish(1, "a", b"2", None, fx)
    assert [f["op"] for f in msgs(state, 1)] == ["msg", "pong", "msg"]


def test_a_client_that_never_reads_its_pongs_is_cut_off() -> None:
    state, fx = BrokerState(BrokerLimits(max_control_frames=5)), Effects()
    state.open(1)
    for i in range(6):
        state.control(1, {"op": "pong", "id": i}, fx)
    assert 1 in fx.disconnect


def test_unsubscribe_discards_queued_messages() -> None:
    state, fx = BrokerState(), Effects()
    state.open(1)
    state.subscribe(1, 1, "a", fx)
    state.subscribe(1, 2, "a", fx)
    state.publish(1, "a", b"1", None, fx)
    state.unsubscribe(1, 1, fx)
    assert [f["sid"] for f in msgs(state, 1)] == [2]
    assert state.connection(1).pending_bytes == 0


# -- routes --------------------------------------------------------------------


def route_pair() -> tuple[BrokerState, BrokerState]:
    """Two brokers A and B: A's outbound route 100 reaches B's inbound route 200."""
    return BrokerState(), BrokerState()


def pump_interest(b: BrokerState, b_in: int, a: BrokerState, a_out: int) -> None:
    for f in msgs(b, b_in):
        a.route_interest(a_out, f["subject"], f.get("queue"), add=f["op"] == "rsub")


def test_interest_is_aggregated_and_forwarding_follows_it() -> None:
    a, b = route_pair()
    fx = Effects()
    a.open(100, kind=ConnKind.ROUTE_OUT)
    b.open(200)
    b.become_route_in(200, fx)
    b.open(1)
    b.open(2)
    b.subscribe(1, 1, "x.>", fx)
    b.subscribe(2, 1, "x.>", fx)  # same interest: only one rsub goes out
    frames = msgs(b, 200)
    assert frames == [{"op": "rsub", "subject": "x.>"}]
    a.route_interest(100, "x.>", None, add=True)
    a.open(5)
    assert a.publish(5, "x.y", b"d", None, fx) == 1
    assert a.publish(5, "z", b"d", None, fx) == 0  # no interest: not forwarded
    (rmsg,) = msgs(a, 100)
    assert rmsg["op"] == "rmsg" and rmsg["queues"] == []
    assert b.deliver_from_route(200, rmsg["subject"], rmsg["data"], None, [], fx) == 2
    b.unsubscribe(1, 1, fx)
    assert msgs(b, 200) == []
    b.unsubscribe(2, 1, fx)
    assert msgs(b, 200) == [{"op": "runsub", "subject": "x.>"}]


def test_a_new_inbound_route_learns_existing_interest() -> None:
    b, fx = BrokerState(), Effects()
    b.open(1)
    b.subscribe(1, 1, "a", fx)
    b.subscribe(1, 2, "b", fx, queue="q")
    b.open(200)
    b.become_route_in(200, fx)
    assert {(f["subject"], f.get("queue")) for f in msgs(b, 200)} == {("a", None), ("b", "q")}


def test_queue_group_spans_brokers_and_picks_one_member_overall() -> None:
    a, b = route_pair()
    fx = Effects()
    a.open(100, kind=ConnKind.ROUTE_OUT)
    b.open(200)
    b.become_route_in(200, fx)
    for c in (1, 2):
        a.open(c)
        a.subscribe(c, 1, "job", fx, queue="w")
        b.open(c)
        b.subscribe(c, 1, "job", fx, queue="w")
    pump_interest(b, 200, a, 100)
    a.open(9)
    for _ in range(40):
        a.publish(9, "job", b"j", None, fx)
    local = len(msgs(a, 1)) + len(msgs(a, 2))
    forwarded = msgs(a, 100)
    for f in forwarded:
        assert f["queues"] == ["w"]
        assert b.deliver_from_route(200, f["subject"], f["data"], None, f["queues"], fx) == 1
    remote = len(msgs(b, 1)) + len(msgs(b, 2))
    assert local + remote == 40
    assert local > 0 and remote > 0


def test_messages_from_a_route_are_never_forwarded_again() -> None:
    b, fx = BrokerState(), Effects()
    b.open(200)
    b.become_route_in(200, fx)
    b.open(300, kind=ConnKind.ROUTE_OUT)
    b.route_interest(300, ">", None, add=True)
    b.open(1)
    b.subscribe(1, 1, ">", fx)
    assert b.deliver_from_route(200, "a.b", b"x", None, [], fx) == 1
    assert msgs(b, 300) == []


def test_route_cannot_subscribe_and_clients_cannot_send_rmsg() -> None:
    b, fx = BrokerState(), Effects()
    b.open(1)
    with pytest.raises(BadInputError):
        b.deliver_from_route(1, "a", b"x", None, [], fx)
    with pytest.raises(BadInputError):
        b.route_interest(1, "a", None, add=True)
    b.open(200)
    b.become_route_in(200, fx)
    with pytest.raises(BadInputError):
        b.subscribe(200, 1, "a", fx)


def test_closing_a_route_forgets_its_interest() -> None:
    a, fx = BrokerState(), Effects()
    a.open(100, kind=ConnKind.ROUTE_OUT)
    a.route_interest(100, "a", None, add=True)
    a.open(1)
    assert a.publish(1, "a", b"x", None, fx) == 1
    a.close(100, fx)
    assert a.publish(1, "a", b"x", None, fx) == 0


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=300),
    policy=st.sampled_from(list(SlowConsumerPolicy)),
    reads=st.lists(st.integers(0, 20), min_size=1, max_size=20),
)
def test_memory_stays_bounded_under_any_publish_and_read_mix(
    sizes: list[int], policy: SlowConsumerPolicy, reads: list[int]
) -> None:
    limits = BrokerLimits(max_pending_bytes=20_000, max_pending_msgs=50)
    state, fx = BrokerState(limits), Effects()
    state.open(1)
    state.open(2)
    state.subscribe(1, 1, "t", fx, policy=policy)
    state.subscribe(1, 2, "t", fx, policy=SlowConsumerPolicy.DROP_NEWEST, max_msgs=5)
    for i, size in enumerate(sizes):
        state.publish(2, "t", b"x" * size, None, fx)
        if 1 in fx.disconnect:
            break
        conn = state.connection(1)
        assert conn.pending_bytes <= limits.max_pending_bytes
        assert all(len(s.pending) <= s.max_msgs for s in conn.subs.values())
        assert len(conn.fifo) <= 2 * (50 + 5) + 64 + 2
        state.take(1, max_items=reads[i % len(reads)])


@pytest.mark.parametrize("count", [1, 5, 20, 300])
def test_take_packed_encodes_exactly_what_take_returns(count: int) -> None:
    import msgpack

    def build() -> BrokerState:
        state, fx = BrokerState(), Effects()
        state.open(1)
        state.subscribe(1, 3, "a.>", fx)
        state.subscribe(1, 70000, "a.b", fx)
        state.open(100, kind=ConnKind.ROUTE_OUT)
        state.route_interest(100, "a.>", None, add=True)
        state.route_interest(100, "a.b", "q", add=True)
        for i in range(count):
            reply = f"_INBOX.r.{i}" if i % 3 == 0 else None
            state.publish(1, "a.b" if i % 2 else "a.c", bytes([i % 256]) * i, reply, fx)
            if i % 7 == 0:
                state.control(1, {"op": "pong", "id": i}, fx)
        return state

    plain, packed = build(), build()
    for conn in (1, 100):
        expected = msgs(plain, conn)
        got: list[object] = []
        while (data := packed.take_packed(conn, max_items=37)) is not None:
            value = msgpack.unpackb(data, raw=False)
            got.extend(value if isinstance(value, list) else [value])
        assert got == expected
    assert packed.stats == plain.stats


def test_replies_go_to_every_peer_even_before_interest_arrives() -> None:
    a, fx = BrokerState(), Effects()
    a.open(1)
    a.open(100, kind=ConnKind.ROUTE_OUT)
    a.open(101, kind=ConnKind.ROUTE_OUT)
    assert a.publish(1, "_INBOX.abc.1", b"answer", None, fx) == 2
    assert a.publish(1, "not.an.inbox", b"x", None, fx) == 0
    a.route_interest(100, "_INBOX.abc.*", None, add=True)
    assert a.publish(1, "_INBOX.abc.2", b"answer", None, fx) == 2  # still once per peer
    assert [f["subject"] for f in msgs(a, 100)] == ["_INBOX.abc.1", "_INBOX.abc.2"]


CORE_PATTERNS = st.sampled_from(["a", "a.*", "a.>", ">", "b.c", "*.c"])
SUB_OP = st.tuples(
    st.just("sub"),
    st.integers(1, 3),
    st.integers(0, 4),
    CORE_PATTERNS,
    st.sampled_from([None, "q"]),
    st.sampled_from(list(SlowConsumerPolicy)),
    st.integers(1, 4),
)
PUB_OP = st.tuples(
    st.just("pub"),
    st.integers(1, 3),
    st.sampled_from(["a", "a.b", "b.c", "x.c"]),
    st.integers(0, 300),
)
OPS = st.one_of(
    SUB_OP,
    PUB_OP,
    st.tuples(st.just("unsub"), st.integers(1, 3), st.integers(0, 4)),
    st.tuples(st.just("take"), st.integers(1, 3), st.integers(0, 5)),
    st.tuples(st.just("close"), st.integers(1, 3)),
)


def check_invariants(state: BrokerState) -> None:
    expected_interest: Counter[tuple[str, str | None]] = Counter()
    for conn in state.connections():
        live = [e for e in conn.fifo if e[1] is not None and e[0] is not None]
        assert conn.pending_bytes == sum(e[1].size for e in live)
        assert conn.pending_bytes <= conn.max_pending_bytes
        assert conn.dead == sum(1 for e in conn.fifo if e[1] is None)
        for sub in conn.subs.values():
            assert len(sub.pending) <= sub.max_msgs
            assert all(e[1] is not None for e in sub.pending)
            assert list(sub.pending) == [e for e in live if e[0] is sub]
            expected_interest[(sub.pattern, sub.queue)] += 1
    assert dict(state.interest()) == dict(expected_interest)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(OPS, max_size=60))
def test_random_operations_keep_the_accounting_exact(ops: list[tuple[object, ...]]) -> None:
    limits = BrokerLimits(max_pending_bytes=1500, max_pending_msgs=50)
    state, fx = BrokerState(limits), Effects()
    state.open(200)
    state.become_route_in(200, fx)  # a peer that mirrors our interest
    peer_view: set[tuple[str, str | None]] = set()
    open_conns: set[int] = set()
    for op in ops:
        kind, conn = op[0], op[1]
        if conn not in open_conns and kind != "close":
            state.open(conn)
            open_conns.add(conn)
        try:
            if kind == "sub":
                _, _, sid, pattern, queue, policy, max_msgs = op
                state.subscribe(
                    conn, sid, pattern, fx, queue=queue, policy=policy, max_msgs=max_msgs
                )
            elif kind == "unsub":
                state.unsubscribe(conn, op[2], fx)
            elif kind == "pub":
                state.publish(conn, op[2], b"x" * op[3], None, fx)
            elif kind == "take":
                state.take(conn, max_items=op[2])
            elif kind == "close" and conn in open_conns:
                state.close(conn, fx)
                open_conns.discard(conn)
        except BadInputError:
            pass
        for cid in list(fx.disconnect):
            state.close(cid, fx)
            open_conns.discard(cid)
        fx.disconnect.clear()
        for f in msgs(state, 200):
            key = (f["subject"], f.get("queue"))
            if f["op"] == "rsub":
                assert key not in peer_view
                peer_view.add(key)
            else:
                peer_view.remove(key)
        check_invariants(state)
        assert peer_view == set(state.interest())
