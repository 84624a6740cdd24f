"""Public test tooling: a deterministic Raft cluster simulator and a linearizability checker.

* :mod:`dsys.testing.sim` - :class:`SimNetwork`, :func:`run_campaign`.
* :mod:`dsys.testing.linearizability` - :func:`check`, :class:`KVModel`,
  :class:`RegisterModel`, :class:`StreamModel`, :class:`History`, :func:`parse_jepsen_history`.
* :mod:`dsys.testing.jepsen` - :func:`load_jepsen_history` (reads the file).
"""

from __future__ import annotations

from dsys.testing.jepsen import load_jepsen_history
from dsys.testing.linearizability import (
    CheckResult,
    History,
    KVModel,
    Operation,
    RegisterModel,
    StreamModel,
    check,
    parse_jepsen_history,
)
from dsys.testing.sim import InvariantViolation, SimNetwork, run_campaign

__all__ = [
    "CheckResult",
    "History",
    "InvariantViolation",
    "KVModel",
    "Operation",
    "RegisterModel",
    "SimNetwork",
    "StreamModel",
    "check",
    "load_jepsen_history",
    "parse_jepsen_history",
    "run_campaign",
]
