"""The linearizability checker on hand-made histories and on real Jepsen etcd histories."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.errors import BadInputError
from dsys.testing.jepsen import load_jepsen_history
from dsys.testing.linearizability import (
    History,
    KVModel,
    Operation,
    RegisterModel,
    check,
)

REPO = Path(__file__).resolve().parent.parent.parent
JEPSEN = REPO.parent / "shared" / "testdata" / "jepsen-etcd"


def op(client: object, inp: object, out: object, call: float, ret: float | None) -> Operation:
    return Operation(client, inp, out, call, ret)


# -- register model: hand-made histories -------------------------------------------------

LINEARIZABLE = {
    "sequential": [
        op(0, ("write", 1), None, 0, 1),
        op(1, ("read",), 1, 2, 3),
    ],
    "concurrent-read-sees-old-or-new": [
        op(0, ("write", 1), None, 0, 10),
        op(1, ("read",), None, 1, 2),
        op(2, ("read",), 1, 3, 4),
    ],
    "overlapping-writes-either-order": [
        op(0, ("write", 1), None, 0, 5),
        op(1, ("write", 2), None, 1, 6),
        op(2, ("read",), 1, 7, 8),
    ],
    "unknown-write-may-have-happened": [
        op(0, ("write", 5), None, 0, None),
        op(1, ("read",), 5, 10, 11),
    ],
    "unknown-write-may-never-happen": [
        op(0, ("write", 5), None, 0, None),
        op(1, ("read",), None, 10, 11),
    ],
    "cas-success-and-failure": [
        op(0, ("write", 1), None, 0, 1),
        op(1, ("cas", 1, 2), True, 2, 3),
        op(2, ("cas", 1, 3), False, 4, 5),
        op(0, ("read",), 2, 6, 7),
    ],
}

NOT_LINEARIZABLE = {
    "stale-read": [
        op(0, ("write", 1), None, 0, 1),
        op(0, ("write", 2), None, 2, 3),
        op(1, ("read",), 1, 4, 5),
    ],
    "read-from-the-future": [
        op(1, ("read",), 1, 0, 1),
        op(0, ("write", 1), None, 2, 3),
    ],
    "cas-claims-success-on-wrong-value": [
        op(0, ("write", 1), None, 0, 1),
        op(1, ("cas", 2, 3), True, 2, 3),
    ],
    "two-reads-disagree-on-order": [
        op(0, ("write", 1), None, 0, 10),
        op(1, ("write", 2), None, 0, 10),
        op(2, ("read",), 1, 11, 12),
        op(3, ("read",), 2, 13, 14),
    ],
}


@pytest.mark.parametrize("name", sorted(LINEARIZABLE))
def test_linearizable_register_histories(name: str) -> None:
    assert check(LINEARIZABLE[name], RegisterModel()).linearizable


@pytest.mark.parametrize("name", sorted(NOT_LINEARIZABLE))
def test_non_linearizable_register_histories(name: str) -> None:
    result = check(NOT_LINEARIZABLE[name], RegisterModel())
    assert not result.linearizable
    assert result.failing_prefix and result.failed_op is not None
    assert "cannot be explained" in result.explain()


def test_shortest_failing_prefix_stops_at_the_first_bad_return() -> None:
    history = [
        op(0, ("write", 1), None, 0, 1),
        op(1, ("read",), 7, 2, 3),  # impossible
        *[op(2, ("write", i), None, 10 + 2 * i, 11 + 2 * i) for i in range(20)],
    ]
    result = check(history, RegisterModel())
    assert not result.linearizable
    assert result.failed_op == history[1]
    assert len(result.failing_prefix) == 2


# -- KV model ----------------------------------------------------------------------------


def test_kv_model_partitions_per_key_and_names_the_bad_key() -> None:
    history = [
        op(0, ("put", "x", 1), None, 0, 1),
        op(1, ("put", "y", 1), None, 0, 1),
        op(0, ("get", "x"), 1, 2, 3),
        op(1, ("delete", "y"), None, 4, 5),
        op(1, ("get", "y"), 1, 6, 7),  # y was deleted
    ]
    result = check(history, KVModel())
    assert not result.linearizable and result.key == "y"
    assert result.partitions == 2
    assert check(history[:4], KVModel()).linearizable


def test_kv_cas_on_absent_key() -> None:
    history = [
        op(0, ("cas", "k", None, 1), True, 0, 1),
        op(1, ("cas", "k", None, 2), False, 2, 3),
        op(0, ("get", "k"), 1, 4, 5),
    ]
    assert check(history, KVModel()).linearizable


@pytest.mark.parametrize(
    "bad",
    [("frobnicate", "k"), "not-a-tuple", ("put",)],
    ids=["unknown-op", "not-a-tuple", "too-short"],
)
def test_malformed_kv_operations_are_refused(bad: object) -> None:
    with pytest.raises(BadInputError):
        check([op(0, bad, None, 0, 1)], KVModel())


def test_return_before_call_is_refused() -> None:
    with pytest.raises(BadInputError, match="before"):
        check([op(0, ("read",), None, 5, 1)], RegisterModel())


def test_history_recorder() -> None:
    h = History()
    a = h.invoke("c1", ("put", "k", 1))
    b = h.invoke("c2", ("get", "k"))
    h.ok(b, 1)  # concurrent with the put: fine
    h.ok(a, None)
    c = h.invoke("c1", ("put", "k", 2))
    h.info(c)
    d = h.invoke("c2", ("put", "k", 3))
    h.fail(d)
    h.invoke("c3", ("get", "k"))  # still open: unknown
    ops = h.operations()
    assert len(ops) == 4 and len(h) == 4
    assert sum(o.unknown for o in ops) == 2
    assert check(ops, KVModel()).linearizable


@st.composite
def sequential_histories(draw: st.DrawFn) -> list[Operation]:
    state: dict[str, int] = {}
    ops = []
    n = draw(st.integers(0, 30))
    for i in range(n):
        key = draw(st.sampled_from(["a", "b"]))
        kind = draw(st.sampled_from(["get", "put", "delete", "cas"]))
        if kind == "get":
            ops.append(op(0, ("get", key), state.get(key), 2 * i, 2 * i + 1))
        elif kind == "put":
            v = draw(st.integers(0, 3))
            state[key] = v
            ops.append(op(0, ("put", key, v), None, 2 * i, 2 * i + 1))
        elif kind == "delete":
            state.pop(key, None)
            ops.append(op(0, ("delete", key), None, 2 * i, 2 * i + 1))
        else:
            old = draw(st.one_of(st.none(), st.integers(0, 3)))
            new = draw(st.integers(0, 3))
            ok = state.get(key) == old
            if ok:
                state[key] = new
            ops.append(op(0, ("cas", key, old, new), ok, 2 * i, 2 * i + 1))
    return ops


@given(sequential_histories())
@settings(max_examples=150, deadline=None)
def test_sequential_histories_are_linearizable(history: list[Operation]) -> None:
    assert check(history, KVModel()).linearizable


@given(sequential_histories(), st.data())
@settings(max_examples=150, deadline=None)
def test_corrupting_a_sequential_read_breaks_linearizability(
    history: list[Operation], data: st.DataObject
) -> None:
    gets = [i for i, o in enumerate(history) if o.input[0] == "get"]  # type: ignore[index]
    if not gets:
        return
    i = data.draw(st.sampled_from(gets))
    wrong = 99
    history[i] = op(0, history[i].input, wrong, history[i].call, history[i].ret)
    assert not check(history, KVModel()).linearizable


# -- Jepsen etcd histories ---------------------------------------------------------------


def _verdicts() -> list[tuple[str, bool]]:
    path = JEPSEN / "verdicts.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return [(row["file"], row["linearizable"] == "true") for row in csv.DictReader(f)]


def test_jepsen_verdicts_are_all_present(shared_testdata: Path) -> None:
    assert len(_verdicts()) == 102


@pytest.mark.parametrize(("name", "expected"), _verdicts(), ids=[v[0] for v in _verdicts()])
def test_jepsen_etcd_history_verdict(shared_testdata: Path, name: str, expected: bool) -> None:
    history = load_jepsen_history(shared_testdata / "jepsen-etcd" / name)
    assert history
    result = check(history, RegisterModel())
    assert result.linearizable is expected, result.explain()


def test_jepsen_loader_reads_outcomes(shared_testdata: Path) -> None:
    ops = load_jepsen_history(shared_testdata / "jepsen-etcd" / "etcd_000.log")
    assert all(o.call < (o.ret or float("inf")) for o in ops)
    assert any(o.input[0] == "cas" and o.output is False for o in ops)  # type: ignore[index]
    assert any(o.unknown for o in ops)


@pytest.mark.parametrize(
    "line",
    [
        "garbage",
        "INFO  jepsen.util - 0\t:invoke\t:frob\tnil",
        "INFO  jepsen.util - 0\t:invoke\t:write\tx",
        "INFO  jepsen.util - 0\t:ok\t:read\t1",
    ],
    ids=["not-a-line", "unknown-op", "bad-value", "end-without-invoke"],
)
def test_jepsen_loader_rejects_malformed_lines(tmp_path: Path, line: str) -> None:
    path = tmp_path / "h.log"
    path.write_text(line + "\n")
    with pytest.raises(BadInputError):
        load_jepsen_history(path)


def test_stream_model_accepts_gap_free_appends_and_refuses_a_skipped_sequence() -> None:
    from dsys.testing import StreamModel

    h = History()
    a = h.invoke("c1", ("append", "x"))
    b = h.invoke("c2", ("append", "y"))
    h.ok(b, 1)
    h.ok(a, 2)
    r = h.invoke("c3", ("last",))
    h.ok(r, 2)
    lost = h.invoke("c4", ("append", "z"))
    h.info(lost)  # unknown: it may never have happened
    assert check(h.operations(), StreamModel()).linearizable
    bad = History()
    x = bad.invoke("c1", ("append", "x"))
    bad.ok(x, 2)  # sequence 1 was never given to anyone
    assert not check(bad.operations(), StreamModel()).linearizable
    stale = History()
    w = stale.invoke("c1", ("append", "x"))
    stale.ok(w, 1)
    q = stale.invoke("c2", ("last",))
    stale.ok(q, 0)  # a read after the acknowledged append cannot miss it
    assert not check(stale.operations(), StreamModel()).linearizable
