"""Hypothesis drives arbitrary requests at a live stream server: every request gets an
answer (an error saying what was wrong, or a result), and the server stays up."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st

from dsys.codec import decode, encode
from dsys.streams.server import StreamServer

from .helpers import cluster_configs, wait_leader

_ops = st.sampled_from(
    [
        "pub", "fetch", "ack", "add_stream", "del_stream", "purge", "del_msg", "add_consumer",
        "del_consumer", "claim", "sub", "unsub", "status", "streams", "stream_info",
        "consumers", "consumer_info", "pending", "get", "read", "bogus",
    ]
)  # fmt: skip
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=80),
    st.binary(max_size=80),
    st.sampled_from(["S", "C", "a.b", "a.>", "*", "", "x" * 300]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=8,
)
_fields = st.sampled_from(
    [
        "stream", "consumer", "subject", "data", "headers", "msg_id", "expected_last_seq",
        "batch", "expires_ms", "worker", "no_wait", "acks", "kind", "delay_ms", "reason",
        "config", "update", "seq", "start_seq", "limit", "reverse", "sid", "max_inflight",
        "min_idle_ms", "count", "junk",
    ]
)  # fmt: skip
_requests = st.builds(
    lambda op, rid, extra: {"op": op, "id": rid, **extra},
    _ops,
    st.integers(0, 10**6),
    st.dictionaries(_fields, _values, max_size=6),
)


def test_arbitrary_requests_are_answered_and_the_server_stays_up(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    server = StreamServer(cluster_configs(tmp_path, n=1)[0])
    run(server.start())
    run(wait_leader([server]))
    http = aiohttp.ClientSession(loop=loop)
    base = f"http://127.0.0.1:{server.port}"
    try:
        ws = run(http.ws_connect(f"{base}/v1/ws"))

        async def ask(reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            await ws.send_bytes(encode(reqs))
            want = {r["id"] for r in reqs}
            got = []
            while want:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.BINARY, msg
                for a in decode(msg.data):
                    if a.get("id") in want:
                        want.discard(a["id"])
                        got.append(a)
            return got

        # a stream and a consumer, so that requests naming them reach the deep code
        setup = [
            {"id": 1, "op": "add_stream", "config": {"name": "S", "subjects": ["a.>"]}},
            {"id": 2, "op": "add_consumer", "stream": "S", "config": {"name": "C"}},
        ]
        assert [a["status"] for a in run(ask(setup))] == ["ok", "ok"]

        @settings(max_examples=150, deadline=None)
        @given(st.lists(_requests, min_size=1, max_size=5))
        def one_frame(reqs: list[dict[str, Any]]) -> None:
            for i, r in enumerate(reqs):
                r["id"] = 1000 + i
                if r.get("op") == "fetch":
                    r["expires_ms"] = 0  # no long polls in a fuzz loop
            for a in run(ask(reqs)):
                assert a["status"] in {
                    "ok", "bad_request", "not_found", "conflict", "full", "too_large",
                }, a  # fmt: skip
                if a["status"] != "ok":
                    assert a["message"], a

        one_frame()
        assert run(ask([{"id": 1, "op": "status"}]))[0]["status"] == "ok"
        assert run(_get(http, f"{base}/healthz")) == 200
        run(ws.close())
    finally:
        run(http.close())
        run(server.close())
        loop.close()


async def _get(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as r:
        return r.status
