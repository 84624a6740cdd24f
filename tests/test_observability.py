from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from dsys.errors import BadInputError, ConfigError, ConflictError, NotLeaderError
from dsys.observability import (
    Metrics,
    add_observability_routes,
    configure_logging,
    error_middleware,
    parse_listen,
    start_site,
)


async def _client(app: web.Application) -> TestClient:  # type: ignore[type-arg]
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def test_healthz_and_metrics_endpoints() -> None:
    metrics = Metrics("demo")
    hits = metrics.counter("hits_total", "Hits", ["route"])
    hits.labels(route="/x").inc(3)
    healthy = {"ok": True, "role": "leader"}

    async def health() -> Mapping[str, object]:
        return healthy

    app = web.Application()
    add_observability_routes(app, metrics, health)
    client = await _client(app)
    try:
        resp = await client.get("/healthz")
        assert resp.status == 200
        assert (await resp.json())["role"] == "leader"
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert 'dsys_demo_hits_total{route="/x"} 3.0' in await resp.text()
        healthy["ok"] = False
        assert (await client.get("/healthz")).status == 503
    finally:
        await client.close()


async def test_error_middleware_maps_errors_to_statuses() -> None:
    errors: dict[str, Exception] = {
        "bad": BadInputError("key too long"),
        "conflict": ConflictError("revision is 4, not 3"),
        "redirect": NotLeaderError(leader_hint="http://127.0.0.1:7102"),
        "noleader": NotLeaderError(),
    }

    async def handler(request: web.Request) -> web.Response:
        raise errors[request.match_info["kind"]]

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/{kind}", handler)
    client = await _client(app)
    try:
        resp = await client.get("/bad")
        assert resp.status == 400
        assert json.loads(await resp.text())["message"] == "key too long"
        assert (await client.get("/conflict")).status == 409
        resp = await client.get("/redirect?x=1", allow_redirects=False)
        assert resp.status == 307
        assert resp.headers["Location"] == "http://127.0.0.1:7102/redirect?x=1"
        resp = await client.get("/noleader")
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
    finally:
        await client.close()


async def test_start_site_binds_a_free_loopback_port() -> None:
    app = web.Application()
    add_observability_routes(app, Metrics("x"))
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        assert port > 0
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7101", ("127.0.0.1", 7101)),
        (":7201", ("127.0.0.1", 7201)),
        ("7301", ("127.0.0.1", 7301)),
        ("[::1]:80", ("::1", 80)),
        ("0.0.0.0", ("0.0.0.0", 0)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["host:abc", "host:70000", "[::1"])
def test_parse_listen_refuses_bad_addresses(text: str) -> None:
    with pytest.raises(ConfigError, match="bad listen address"):
        parse_listen(text)


def test_configure_logging_json_and_bad_level(capsys: pytest.CaptureFixture[str]) -> None:
    from dsys.observability import get_logger

    configure_logging(json=True, level="info")
    get_logger("test", node_id="n1").info("hello", x=1)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["event"] == "hello"
    assert record["node_id"] == "n1"
    assert record["x"] == 1
    with pytest.raises(ConfigError, match="unknown log level"):
        configure_logging(level="loud")
    configure_logging(json=False)


def test_logging_follows_a_replaced_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """A logger configured earlier writes to the current sys.stderr, not a stale one."""
    import io
    import sys

    from dsys.observability import get_logger

    configure_logging(json=True)
    old = sys.stderr
    replacement = io.StringIO()
    sys.stderr = replacement
    try:
        get_logger("test").warning("swapped")
    finally:
        sys.stderr = old
    assert '"event": "swapped"' in replacement.getvalue()
    configure_logging(json=False)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["get", "put", "ws_put"]),
            st.sampled_from([200, 404, "ok", "conflict"]),
            st.floats(min_value=0, max_value=20, allow_nan=False),
        ),
        max_size=40,
    )
)
def test_request_stats_export_what_prometheus_counter_and_histogram_would(
    events: list[tuple[str, int | str, float]],
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    fast = Metrics("t")
    stats = fast.request_stats("requests_total", "Requests", "request_seconds", "Latency")
    slow = Metrics("t")
    count = slow.counter("requests_total", "Requests", labels=("op", "status"))
    latency = slow.histogram("request_seconds", "Latency", labels=("op",))
    for op, status, seconds in events:
        stats.observe(op, status, seconds)
        count.labels(op, str(status)).inc()
        latency.labels(op).observe(seconds)

    def samples(m: Metrics) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        out = []
        for family in text_string_to_metric_families(m.render().decode()):
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out.append((s.name, tuple(sorted(s.labels.items())), round(s.value, 9)))
        return sorted(out)

    assert samples(fast) == samples(slow)


@given(st.lists(st.floats(min_value=0, max_value=600, allow_nan=False), max_size=40))
def test_fast_histogram_exports_what_a_prometheus_histogram_would(values: list[float]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    fast, slow = Metrics("t"), Metrics("t")
    h1 = fast.fast_histogram("batch", "Batch sizes", buckets=(1, 2, 4, 64, 512))
    h2 = slow.histogram("batch", "Batch sizes", buckets=(1, 2, 4, 64, 512))
    for v in values:
        h1.observe(v)
        h2.observe(v)

    def samples(m: Metrics) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        return sorted(
            (s.name, tuple(sorted(s.labels.items())), round(s.value, 6))
            for family in text_string_to_metric_families(m.render().decode())
            for s in family.samples
            if not s.name.endswith("_created")
        )

    assert samples(fast) == samples(slow)
