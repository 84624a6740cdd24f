"""The leader applies the commands it built; followers apply what decoding gives.

Both must be the same command, field by field and type by type (``True == 1``, so
plain equality is not enough), or the replicas diverge.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dsys.errors import DsysError
from dsys.kv.fsm import decode_command, encode_command
from dsys.kv.server import KVServer

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=2**64),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
)
requests = st.fixed_dictionaries(
    {"key": st.one_of(st.text(min_size=1, max_size=8), scalars)},
    optional={
        "value": scalars,
        "if_revision": scalars,
        "ttl_ms": scalars,
        "cid": scalars,
        "seq": scalars,
    },
)


def typed(cmd: object) -> list[tuple[type, Any]]:
    return [(type(v), v) for v in dataclasses.astuple(cmd)]  # type: ignore[call-overload]


@given(op=st.sampled_from(["put", "del"]), req=requests)
def test_a_request_command_survives_encoding_exactly(op: str, req: dict[str, Any]) -> None:
    try:
        cmd = KVServer._ws_write_cmd(op, req)
        data = encode_command(cmd)
    except DsysError:
        return  # refused before it could be proposed
    assert typed(decode_command(data)) == typed(cmd)


def test_a_bool_is_not_a_revision() -> None:
    for field in ("if_revision", "seq", "ttl_ms"):
        req: dict[str, Any] = {"key": "k", "value": b"v", field: True}
        try:
            cmd = KVServer._ws_write_cmd("put", req)
        except DsysError:
            continue
        raise AssertionError(f"{field}=True was accepted as {cmd}")
