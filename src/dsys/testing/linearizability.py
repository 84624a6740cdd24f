"""A linearizability checker for concurrent histories (Wing & Gong / Lowe, as in porcupine).

A *history* is a list of :class:`Operation`: who called what (``input``), what came back
(``output``), and when it was called and returned (any totally ordered numbers: event
counters, nanoseconds, log line numbers). An operation whose outcome is unknown (a
timeout, a crashed client) has ``ret=None``: it may have taken effect at any point after
its call, or never, and its output is not checked.

The history is *linearizable* for a sequential ``model`` if every operation can be given
one instant between its call and return (unknown ones: any instant after the call, or
none) such that applying them in that order to the model yields every observed output.

Algorithm: depth-first search over the call/return event list (Wing-Gong), linearizing a
pending call when the model accepts it and backtracking at a return whose call was not
linearized yet, memoizing visited ``(set of linearized ops, model state)`` pairs (Lowe's
cache; the set is a Python int used as a bitset). Models may split a history into
independent partitions (per key for a KV store, as porcupine's P-compositionality), which
are checked separately. On failure the result names the partition and the shortest
failing prefix (found by bisection over return events).

Example::

    h = History()
    a = h.invoke("c1", ("write", 1)); h.ok(a, None)
    b = h.invoke("c2", ("read",));    h.ok(b, 2)
    assert not check(h.operations(), RegisterModel()).linearizable

Pure: no I/O. :func:`parse_jepsen_history` reads a history's text;
:func:`dsys.testing.jepsen.load_jepsen_history` reads it from a file.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from dsys.errors import BadInputError

S = TypeVar("S", bound=Hashable)


class _Unknown:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: object = _Unknown()
"""The output of an operation whose outcome is unknown (passed to ``Model.step``)."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation in a history.

    Attributes:
        client: who issued it (informational).
        input: what was asked (model-specific, hashable tuples for the built-in models).
        output: what came back (ignored when ``ret`` is None).
        call: when it was invoked.
        ret: when it returned; ``None`` when the outcome is unknown.
    """

    client: object
    input: object
    output: object
    call: float
    ret: float | None

    @property
    def unknown(self) -> bool:
        """True when the outcome is unknown (may or may not have taken effect)."""
        return self.ret is None


class Model(Protocol[S]):
    """A sequential specification for the checker."""

    def init(self) -> S:
        """The initial state."""
        ...

    def step(self, state: S, input: object, output: object) -> tuple[bool, S]:
        """Apply ``input`` to ``state``; return whether ``output`` is legal and the new state.

        ``output`` is :data:`UNKNOWN` for operations with an unknown outcome: accept any.
        """
        ...

    def partition(self, history: Sequence[Operation]) -> dict[object, list[Operation]]:
        """Split the history into independently checkable parts (key -> operations)."""
        ...


class RegisterModel:
    """A single register with ``("read",)``, ``("write", v)`` and ``("cas", old, new)``.

    Outputs: read returns the value (``None`` when unset), write returns anything,
    cas returns ``True`` when it swapped and ``False`` otherwise.
    """

    def __init__(self, initial: Hashable = None) -> None:
        self._initial = initial

    def init(self) -> Hashable:
        """The initial value (``None``: unset)."""
        return self._initial

    def step(self, state: Hashable, input: object, output: object) -> tuple[bool, Hashable]:
        """Apply one register operation."""
        return _register_step(state, input, output, 0)

    def partition(self, history: Sequence[Operation]) -> dict[object, list[Operation]]:
        """A register is one partition."""
        return {None: list(history)}


class KVModel:
    """A key-value map: ``("get", k)``, ``("put", k, v)``, ``("delete", k)``,
    ``("cas", k, old, new)`` (``old=None`` means "absent").

    Outputs: get returns the value or ``None``; put/delete anything; cas ``True``/``False``.
    The history is partitioned per key, so the state is one key's value.
    """

    def init(self) -> Hashable:
        """Every key starts absent."""
        return None

    def step(self, state: Hashable, input: object, output: object) -> tuple[bool, Hashable]:
        """Apply one operation to one key's value."""
        if not isinstance(input, tuple) or len(input) < 2:
            raise BadInputError(f"not a KV operation: {input!r}")
        op = input[0]
        if op == "get":
            return _register_step(state, ("read",), output, 0)
        if op == "put":
            return True, input[2]
        if op == "delete":
            return True, None
        if op == "cas":
            return _register_step(state, ("cas", input[2], input[3]), output, 0)
        raise BadInputError(f"unknown KV operation {op!r}")

    def partition(self, history: Sequence[Operation]) -> dict[object, list[Operation]]:
        """One partition per key."""
        parts: dict[object, list[Operation]] = {}
        for op in history:
            if not isinstance(op.input, tuple) or len(op.input) < 2:
                raise BadInputError(f"not a KV operation: {op.input!r}")
            parts.setdefault(op.input[1], []).append(op)
        return parts


class StreamModel:
    """An append-only log: ``("append", v)`` returns the sequence it was given, and
    ``("last",)`` returns the last sequence (0 = empty).

    The state is the last sequence, so an append answered ``s`` must take effect right
    after the log reached ``s - 1``: acknowledged sequences are unique, gap-free and in
    real-time order. Which value sits at which sequence is checked against the stored
    log separately (it is not a property of one history).
    """

    def init(self) -> Hashable:
        """An empty log."""
        return 0

    def step(self, state: Hashable, input: object, output: object) -> tuple[bool, Hashable]:
        """Apply one append or read of the last sequence."""
        if not isinstance(input, tuple) or not input or not isinstance(state, int):
            raise BadInputError(f"not a stream operation: {input!r}")
        if input[0] == "append":
            return (output is UNKNOWN or output == state + 1), state + 1
        if input[0] == "last":
            return (output is UNKNOWN or output == state), state
        raise BadInputError(f"unknown stream operation {input[0]!r}")

    def partition(self, history: Sequence[Operation]) -> dict[object, list[Operation]]:
        """A log is one partition."""
        return {None: list(history)}


def _register_step(state: Hashable, input: object, output: object, _: int) -> tuple[bool, Hashable]:
    if not isinstance(input, tuple) or not input:
        raise BadInputError(f"not a register operation: {input!r}")
    op = input[0]
    if op == "read":
        return (output is UNKNOWN or output == state), state
    if op == "write":
        return True, input[1]
    if op == "cas":
        swapped = state == input[1]
        ok = output is UNKNOWN or bool(output) == swapped
        return ok, (input[2] if swapped else state)
    raise BadInputError(f"unknown register operation {op!r}")


@dataclass(frozen=True)
class CheckResult:
    """The verdict of :func:`check`.

    Attributes:
        linearizable: the verdict.
        key: for a failure, the partition (KV key) that is not linearizable.
        failing_prefix: for a failure, the operations of that partition in the shortest
            prefix of the history (by time) that is already not linearizable; operations
            still pending at its end count as unknown.
        failed_op: the operation whose return ends that prefix.
        states_explored: search effort (for diagnostics).
    """

    linearizable: bool
    key: object = None
    failing_prefix: tuple[Operation, ...] = ()
    failed_op: Operation | None = None
    states_explored: int = 0
    partitions: int = field(default=1)

    def explain(self) -> str:
        """A human-readable summary of a failure (empty when linearizable)."""
        if self.linearizable:
            return ""
        lines = [f"not linearizable (key={self.key!r}); shortest failing prefix:"]
        for op in self.failing_prefix:
            ret = "?" if op.ret is None else op.ret
            out = "?" if op.ret is None else repr(op.output)
            mark = "  <-- cannot be explained" if op is self.failed_op else ""
            lines.append(f"  [{op.call}, {ret}] {op.client}: {op.input!r} -> {out}{mark}")
        return "\n".join(lines)


class _Node:
    __slots__ = ("id", "is_call", "match", "next", "op", "prev")

    def __init__(self, id: int, is_call: bool, op: Operation) -> None:
        self.id = id
        self.is_call = is_call
        self.op = op
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


def _search(model: Model[S], ops: Sequence[Operation]) -> tuple[bool, int]:
    """Wing-Gong DFS with Lowe's memoization. Returns (linearizable, states explored)."""
    if not ops:
        return True, 0
    inf = float("inf")
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        events.append((op.call, 0, i))
        events.append((inf if op.ret is None else op.ret, 1, i))
    # Calls sort before returns at equal times: such operations count as concurrent.
    events.sort()
    head = _Node(-1, False, ops[0])
    tail = head
    calls: dict[int, _Node] = {}
    for _t, kind, i in events:
        node = _Node(i, kind == 0, ops[i])
        if kind == 0:
            calls[i] = node
        else:
            calls[i].match = node
        tail.next = node
        node.prev = tail
        tail = node
    outputs = [UNKNOWN if op.ret is None else op.output for op in ops]
    state: S = model.init()
    linearized = 0
    cache: set[tuple[int, S]] = set()
    stack: list[tuple[_Node, S]] = []
    entry = head.next
    explored = 0
    step = model.step
    while head.next is not None:
        assert entry is not None
        if entry.is_call:
            ok, new_state = step(state, entry.op.input, outputs[entry.id])
            if ok:
                new_lin = linearized | (1 << entry.id)
                key = (new_lin, new_state)
                if key not in cache:
                    cache.add(key)
                    explored += 1
                    stack.append((entry, state))
                    state = new_state
                    linearized = new_lin
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not stack:
                return False, explored
            entry, state = stack.pop()
            linearized &= ~(1 << entry.id)
            _unlift(entry)
            entry = entry.next
    return True, explored


def _lift(call: _Node) -> None:
    assert call.prev is not None
    call.prev.next = call.next
    if call.next is not None:
        call.next.prev = call.prev
    ret = call.match
    assert ret is not None and ret.prev is not None
    ret.prev.next = ret.next
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(call: _Node) -> None:
    ret = call.match
    assert ret is not None and ret.prev is not None
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    assert call.prev is not None
    call.prev.next = call
    if call.next is not None:
        call.next.prev = call


def _prefix(ops: Sequence[Operation], t: float) -> list[Operation]:
    """Operations called at or before ``t``; those returning after ``t`` become unknown."""
    out = []
    for op in ops:
        if op.call > t:
            continue
        if op.ret is not None and op.ret > t:
            op = Operation(op.client, op.input, op.output, op.call, None)
        out.append(op)
    return out


def _shortest_failing_prefix(
    model: Model[S], ops: Sequence[Operation]
) -> tuple[list[Operation], Operation | None]:
    rets = sorted((op.ret, i) for i, op in enumerate(ops) if op.ret is not None)
    lo, hi = 0, len(rets) - 1  # invariant: the prefix ending at rets[hi] fails
    while lo < hi:
        mid = (lo + hi) // 2
        if _search(model, _prefix(ops, rets[mid][0]))[0]:
            lo = mid + 1
        else:
            hi = mid
    if not rets:
        return list(ops), None
    t, i = rets[lo]
    return _prefix(ops, t), ops[i]


def check(history: Iterable[Operation], model: Model[S]) -> CheckResult:
    """Decide whether ``history`` is linearizable with respect to ``model``.

    Args:
        history: the operations (any order).
        model: the sequential specification, e.g. :class:`KVModel` or :class:`RegisterModel`.

    Returns:
        A :class:`CheckResult`; for a failure it names the partition key and the
        shortest failing prefix.
    """
    ops = list(history)
    for op in ops:
        if op.ret is not None and op.ret < op.call:
            raise BadInputError(f"operation returns before it is called: {op!r}")
    parts = model.partition(ops)
    explored = 0
    for key, part in parts.items():
        ok, n = _search(model, part)
        explored += n
        if not ok:
            prefix, failed = _shortest_failing_prefix(model, part)
            prefix.sort(key=lambda o: o.call)
            return CheckResult(
                linearizable=False,
                key=key,
                failing_prefix=tuple(prefix),
                failed_op=next((o for o in prefix if failed is not None and o == failed), None),
                states_explored=explored,
                partitions=len(parts),
            )
    return CheckResult(linearizable=True, states_explored=explored, partitions=len(parts))


class History:
    """Records a concurrent history as it happens (call :meth:`invoke`, then one ending).

    Times are taken from an internal event counter, so the order of calls to this object
    is the real-time order.
    """

    def __init__(self) -> None:
        self._clock = 0
        self._open: dict[int, tuple[object, object, int]] = {}
        self._done: list[Operation] = []
        self._next_id = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def invoke(self, client: object, input: object) -> int:
        """Record a call; returns the operation id to finish it with."""
        op_id = self._next_id
        self._next_id += 1
        self._open[op_id] = (client, input, self._tick())
        return op_id

    def ok(self, op_id: int, output: object) -> None:
        """Record that the operation returned ``output``."""
        client, input, call = self._open.pop(op_id)
        self._done.append(Operation(client, input, output, call, self._tick()))

    def fail(self, op_id: int) -> None:
        """Record that the operation certainly did not take effect (it is dropped)."""
        self._open.pop(op_id)

    def info(self, op_id: int) -> None:
        """Record that the outcome is unknown (it may or may not have taken effect)."""
        client, input, call = self._open.pop(op_id)
        self._done.append(Operation(client, input, None, call, None))

    def operations(self) -> list[Operation]:
        """The recorded history; operations still open count as unknown."""
        pending = [Operation(c, i, None, t, None) for c, i, t in self._open.values()]
        return [*self._done, *pending]

    def __len__(self) -> int:
        return len(self._done) + len(self._open)


_JEPSEN_LINE = re.compile(r"^INFO\s+jepsen\.util\s+-\s+(\d+)\s+:(\w+)\s+:(\w+)\s+(.*?)\s*$")


def _jepsen_value(text: str) -> int | None:
    return None if text == "nil" else int(text)


def parse_jepsen_history(text: str, path: str = "<history>") -> list[Operation]:
    """Parse a Jepsen etcd register log (``INFO jepsen.util - P :TYPE :F VALUE`` lines).

    ``:ok`` ends an operation with its value, ``:fail`` means it did not take effect (a
    failed cas is kept as a cas that returned ``False``; a failed read is dropped),
    ``:info`` and a missing end line mean the outcome is unknown. Inputs are for
    :class:`RegisterModel`. Times are line numbers.

    Args:
        text: the log's text.
        path: where it came from, for error messages.

    Raises:
        BadInputError: a line does not follow the format.
    """
    ops: list[Operation] = []
    open_: dict[str, tuple[tuple[object, ...], int]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        m = _JEPSEN_LINE.match(line)
        if m is None:
            raise BadInputError(f"{path}:{lineno}: not a jepsen.util history line: {line!r}")
        proc, kind, f, value = m.groups()
        try:
            if kind == "invoke":
                if proc in open_:
                    raise BadInputError(f"{path}:{lineno}: process {proc} invoked twice")
                if f == "read":
                    inp: tuple[object, ...] = ("read",)
                elif f == "write":
                    inp = ("write", int(value))
                elif f == "cas":
                    a, b = value.strip("[]").split()
                    inp = ("cas", int(a), int(b))
                else:
                    raise BadInputError(f"{path}:{lineno}: unknown operation :{f}")
                open_[proc] = (inp, lineno)
                continue
            if proc not in open_:
                raise BadInputError(f"{path}:{lineno}: process {proc} ends an op it never invoked")
            inp, call = open_.pop(proc)
            if kind == "ok":
                out: object = None
                if inp[0] == "read":
                    out = _jepsen_value(value)
                elif inp[0] == "cas":
                    out = True
                ops.append(Operation(int(proc), inp, out, call, lineno))
            elif kind == "fail":
                if inp[0] == "cas":
                    ops.append(Operation(int(proc), inp, False, call, lineno))
                # a failed read or write had no effect: drop it
            elif kind == "info":
                ops.append(Operation(int(proc), inp, None, call, None))
            else:
                raise BadInputError(f"{path}:{lineno}: unknown type :{kind}")
        except ValueError as exc:
            if isinstance(exc, BadInputError):
                raise
            raise BadInputError(f"{path}:{lineno}: bad value in {line!r}: {exc}") from exc
    for proc, (inp, call) in open_.items():
        ops.append(Operation(int(proc), inp, None, call, None))
    return ops


__all__ = [
    "UNKNOWN",
    "CheckResult",
    "History",
    "KVModel",
    "Model",
    "Operation",
    "RegisterModel",
    "StreamModel",
    "check",
    "parse_jepsen_history",
]
