"""Scans with a cursor: ``after=`` (the last key of a page) continues a listing past the
10,000 keys one scan answers, over HTTP (a ``Link`` header), the WebSocket channel and
``KVClient.scan_iter``."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from dsys.errors import BadInputError
from dsys.kv.api import (
    MAX_SCAN_LIMIT,
    ScanRequest,
    scan_answer,
    scan_page,
    scan_request,
    ws_scan_answer,
)
from dsys.kv.client import KVClient
from dsys.kv.fsm import KeyValue

from .helpers import running_cluster, wait_leader


def kvs(*keys: str) -> list[KeyValue]:
    return [KeyValue(key=k, value=b"", create_revision=i, mod_revision=i)
            for i, k in enumerate(keys, 1)]  # fmt: skip


def test_scan_request_checks_the_cursor_and_the_limit() -> None:
    assert scan_request("a/", 10) == ScanRequest("a/", 10, None)
    assert scan_request("a/", 10, "a/5") == ScanRequest("a/", 10, "a/5")
    for prefix, limit, after, words in [
        ("a/", 10, "b/1", "not a key under prefix"),  # another scan's cursor
        ("a/", 10, "", "bad cursor"),
        ("a/", 10, 7, "bad cursor"),
        ("a/", 10, "a/" + "x" * 5000, "bad cursor"),
        ("a/", 0, None, "limit"),
        ("a/", MAX_SCAN_LIMIT + 1, None, "limit"),
        ("a/", True, None, "limit"),
        (3, 10, None, "prefix"),
    ]:
        with pytest.raises(BadInputError, match=words):
            scan_request(prefix, limit, after)


def test_a_page_says_whether_there_is_more_and_where_to_continue() -> None:
    req = scan_request("a/", 2)
    page = scan_page(req, kvs("a/1", "a/2", "a/3"))  # limit + 1 read: there is more
    assert ([kv.key for kv in page.items], page.more, page.next) == (["a/1", "a/2"], True, "a/2")
    last = scan_page(req, kvs("a/3"))
    assert (last.more, last.next) == (False, None)
    ans = scan_answer(req, page)
    assert ans.status == 200 and ans.body.startswith(b'[{"key": "a/1"')
    assert ans.after == ((b"Link", b'</v1/kv?prefix=a%2F&limit=2&after=a%2F2>; rel="next"'),)
    assert scan_answer(req, last).after == ()
    ws = ws_scan_answer(5, page, 42)
    assert ws == {"id": 5, "status": "ok", "items": [["a/1", 1], ["a/2", 2]], "revision": 42,
                  "more": True, "next": "a/2"}  # fmt: skip


async def test_scan_pages_over_http_websocket_and_scan_iter(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, n=1) as cluster:
        leader = await wait_leader(cluster)
        base = f"http://127.0.0.1:{leader.port}"
        async with KVClient([f"127.0.0.1:{leader.port}"]) as kv:
            keys = [f"p/{i:04d}" for i in range(25)]
            for k in keys:
                await kv.put(k, b"v")
            await kv.put("q/other", b"v")
            # the client: pages and an iterator over all of them
            page = await kv.scan_page("p/", limit=10)
            assert [i.key for i in page.items] == keys[:10] and page.more
            assert page.next == keys[9]
            page = await kv.scan_page("p/", limit=10, after=keys[19])
            assert [i.key for i in page.items] == keys[20:] and not page.more
            assert page.next is None
            assert [i.key async for i in kv.scan_iter("p/", page=7)] == keys
            assert [i.key for i in await kv.scan("p/", limit=3, after="p/0010")] == keys[11:14]
            with pytest.raises(BadInputError, match="not a key under prefix"):
                await kv.scan_page("p/", after="q/other")  # a bad cursor over the WebSocket
            # HTTP: follow the Link header to the end
            async with aiohttp.ClientSession() as http:
                got: list[str] = []
                url: str | None = f"{base}/v1/kv?prefix=p/&limit=10"
                while url is not None:
                    async with http.get(url) as r:
                        assert r.status == 200
                        got += [i["key"] for i in await r.json()]
                        nxt = r.links.get("next")
                        url = None if nxt is None else str(nxt["url"])  # resolved
                assert got == keys
                for q in ("prefix=p/&after=q/other", "prefix=p/&after=" + "x" * 5000):
                    async with http.get(f"{base}/v1/kv?{q}") as r:
                        assert r.status == 400
                        body = await r.json()
                        assert body["error"] == "bad_request" and "bad cursor" in body["message"]
                async with http.get(f"{base}/v1/status") as r:
                    assert r.status == 200  # still serving
