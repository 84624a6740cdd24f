from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import RemoteProtocolError
from dsys.kv.fsm import (
    Delete,
    KVStateMachine,
    Put,
    Result,
    Tick,
    decode_command,
    encode_command,
)

keys = st.sampled_from(["a", "ab", "abc", "b", "ba", "c"])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), keys, st.binary(max_size=4), st.none() | st.integers(0, 8)),
        st.tuples(st.just("del"), keys, st.none() | st.integers(0, 8)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_matches_a_dict_model(ops_list: list[tuple[object, ...]]) -> None:
    fsm = KVStateMachine()
    model: dict[str, tuple[bytes, int]] = {}
    rev = 0
    for op in ops_list:
        if op[0] == "put":
            _, key, value, if_rev = op
            assert isinstance(key, str) and isinstance(value, bytes)
            cur = model.get(key, (b"", 0))[1]
            res = fsm.apply(encode_command(Put(key=key, value=value, if_revision=if_rev)))  # type: ignore[arg-type]
            if if_rev is None or if_rev == cur:
                rev += 1
                model[key] = (value, rev)
                assert res.ok and res.revision == rev
            else:
                assert res.status == "conflict" and res.key_revision == cur
        else:
            _, key, if_rev = op
            assert isinstance(key, str)
            cur = model.get(key, (b"", 0))[1]
            res = fsm.apply(encode_command(Delete(key=key, if_revision=if_rev)))  # type: ignore[arg-type]
            if if_rev is not None and if_rev != cur:
                assert res.status == "conflict"
            elif cur == 0:
                assert res.status == "not_found"
            else:
                rev += 1
                del model[key]
                assert res.ok and res.revision == rev
        assert fsm.revision == rev
    for key, (value, r) in model.items():
        kv = fsm.get(key)
        assert kv is not None and kv.value == value and kv.mod_revision == r
    for prefix in ("", "a", "ab", "b", "z"):
        want = sorted(k for k in model if k.startswith(prefix))
        assert [kv.key for kv in fsm.scan(prefix, 1000)] == want
        assert [kv.key for kv in fsm.scan(prefix, 2)] == want[:2]
        for cut in want:  # a cursor continues right after the key it names
            assert [kv.key for kv in fsm.scan(prefix, 1000, after=cut)] == [
                k for k in want if k > cut
            ]
    # snapshot round trip gives the same state
    other = KVStateMachine()
    other.restore(fsm.snapshot())
    assert list(other.items()) == list(fsm.items())
    assert other.revision == fsm.revision


def test_cas_zero_means_must_not_exist() -> None:
    fsm = KVStateMachine()
    assert fsm.apply_command(Put(key="k", value=b"1", if_revision=0)).ok
    r = fsm.apply_command(Put(key="k", value=b"2", if_revision=0))
    assert r.status == "conflict" and r.key_revision == 1
    assert fsm.apply_command(Put(key="k", value=b"2", if_revision=1)).revision == 2


def test_exactly_once_retry_returns_first_result() -> None:
    fsm = KVStateMachine()
    cmd = Put(key="k", value=b"v", client_id="c1", seq=1)
    first = fsm.apply(encode_command(cmd))
    again = fsm.apply(encode_command(cmd))
    assert first == again and fsm.revision == 1
    # a retried CAS that succeeded the first time must not now report a conflict
    cas = Put(key="k", value=b"w", if_revision=1, client_id="c1", seq=2)
    assert fsm.apply_command(cas).ok
    assert fsm.apply_command(cas).ok and fsm.revision == 2


def test_sessions_are_bounded_and_old_seqs_expire() -> None:
    fsm = KVStateMachine(max_clients=2, per_client=2)
    for seq in range(1, 5):
        fsm.apply_command(Put(key="k", value=b"v", client_id="c", seq=seq))
    assert fsm.apply_command(Put(key="k", value=b"v", client_id="c", seq=1)).status == (
        "expired_session"
    )
    for cid in ("d", "e"):
        fsm.apply_command(Put(key="k", value=b"v", client_id=cid, seq=1, now_ms=5))
    assert len(fsm.sessions) == 2


def test_ttl_expires_by_replicated_clock_only() -> None:
    fsm = KVStateMachine()
    fsm.apply_command(Put(key="t", value=b"v", ttl_ms=1000, now_ms=10_000))
    fsm.apply_command(Put(key="p", value=b"v", now_ms=10_000))
    assert fsm.get("t") is not None and fsm.has_ttl_keys
    fsm.apply_command(Tick(now_ms=10_999))
    assert fsm.get("t") is not None
    rev = fsm.revision
    fsm.apply_command(Tick(now_ms=11_000))
    assert fsm.get("t") is None and fsm.get("p") is not None
    assert fsm.revision == rev + 1 and not fsm.has_ttl_keys
    # a stale timestamp never moves the clock back
    fsm.apply_command(Put(key="t2", value=b"v", ttl_ms=10, now_ms=5))
    assert fsm.get("t2") is not None and fsm.clock_ms == 11_000


def test_garbage_command_is_a_noop() -> None:
    fsm = KVStateMachine()
    assert fsm.apply(b"\xc1garbage").status == "invalid"
    assert fsm.revision == 0


@given(st.binary(max_size=64))
def test_decode_command_refuses_garbage_cleanly(data: bytes) -> None:
    from dsys.errors import RemoteProtocolError
    from dsys.kv.fsm import decode_command

    try:
        cmd = decode_command(data)
    except RemoteProtocolError:
        return
    assert encode_command(cmd)  # anything accepted re-encodes


def test_command_round_trip() -> None:
    from dsys.kv.fsm import decode_command

    for cmd in (
        Put(key="k", value=b"v", if_revision=3, ttl_ms=5, now_ms=9, client_id="c", seq=2),
        Delete(key="k", if_revision=None, now_ms=1, client_id="", seq=0),
        Tick(now_ms=7),
    ):
        assert decode_command(encode_command(cmd)) == cmd


_field = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-2, max_value=40),
    st.text(max_size=3),
    st.binary(max_size=3),
)


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(
            # well-formed puts, deletes and ticks on few keys, with TTLs and sessions
            st.builds(
                lambda k, v, r, ttl, now, c, s: encode_command(
                    Put(key=k, value=v, if_revision=r, ttl_ms=ttl, now_ms=now, client_id=c, seq=s)
                ),
                st.sampled_from(["a", "b"]),
                st.binary(max_size=2),
                st.one_of(st.none(), st.integers(0, 6)),
                st.sampled_from([0, 0, 5]),
                st.integers(0, 30),
                st.sampled_from(["", "c1", "c2"]),
                st.integers(1, 6),
            ),
            st.builds(
                lambda k, now: encode_command(Delete(key=k, now_ms=now)),
                st.sampled_from(["a", "b"]),
                st.integers(0, 30),
            ),
            st.builds(lambda now: encode_command(Tick(now_ms=now)), st.integers(0, 30)),
            # put-shaped lists with a wrong field somewhere, and plain garbage
            st.lists(_field, min_size=8, max_size=8).map(lambda v: msgpack.packb([1, *v[1:]])),
            st.binary(max_size=12),
        ),
        max_size=30,
    )
)
def test_apply_decides_exactly_what_decode_and_apply_command_decide(datas: list[bytes]) -> None:
    """``apply`` has a fast path for puts; it must agree with the general one."""
    fast, slow = KVStateMachine(per_client=3), KVStateMachine(per_client=3)
    for data in datas:
        try:
            cmd = decode_command(data)
        except RemoteProtocolError:
            want = Result(ok=False, revision=slow.revision, status="invalid")
        else:
            want = slow.apply_command(cmd)
        assert fast.apply(data) == want
    assert fast.snapshot() == slow.snapshot()
