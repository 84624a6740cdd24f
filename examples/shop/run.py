"""Start the whole shop on loopback as real processes, and stop it again.

``python -m examples.shop`` (or ``make shop``) runs :func:`main`: a Raft KV cluster, a
Raft stream cluster, every service of :mod:`examples.shop.services` as its own process
(two instances of each stateless one; the gateways, catalog, orders and history each
behind a ``dsys lb``; a ``dsys ratelimit serve`` node for the gateways' shared limits),
then a short scripted visit, and waits for Ctrl-C. ``--seconds N`` stops after N seconds
instead (the demo uses it).

:class:`Shop` is the same thing as a context manager for tests: ``shop.url`` is the
public entry point, ``shop.urls[name]`` each process (``shop.urls["orders"]``: the orders
service's load balancer), ``shop.kill(name)`` / ``shop.restart(name)`` for chaos.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from dsys.streams.client import StreamClient
from dsys.testing.procs import free_port, wait_healthy

from .common import setup_streams

REPO = Path(__file__).resolve().parents[2]
STATELESS = ("catalog", "inventory", "cart", "orders", "payment", "delivery", "history")
"""Services run as several instances (their state is in the KV and the streams)."""
BALANCED = ("catalog", "orders", "history")
"""The ones the gateway calls over HTTP, each behind a ``dsys lb`` of its own (the cart
instances are picked by the gateway's hash ring; the rest only consume streams)."""


@dataclass
class Proc:
    """One service process and how to start it again."""

    name: str
    argv: list[str]
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: str = ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Shop:
    """The shop's processes (see the module docstring).

    Args:
        kv_nodes: size of the KV cluster.
        stream_nodes: size of the stream cluster.
        gateways: gateway instances behind the load balancer.
        instances: instances of each other stateless service (see :data:`STATELESS`).
        reservation_ttl: seconds a reservation is held.
        delivery_step: seconds between delivery stages.
        provider_error_rate: how often the simulated provider fails (0..1).
        provider_latency: the provider's (min, max) latency in seconds.
        rate: gateway requests/s per client.
        fsync: "always" or "none" (the Raft logs; "none" is faster and unsafe).
    """

    kv_nodes: int = 3
    stream_nodes: int = 3
    gateways: int = 2
    instances: int = 2
    reservation_ttl: float = 300.0
    delivery_step: float = 1.0
    provider_error_rate: float = 0.2
    provider_latency: tuple[float, float] = (0.02, 0.2)
    rate: float = 50.0
    fsync: str = "always"
    seed_stock: bool = True
    quiet: bool = False
    procs: dict[str, Proc] = field(default_factory=dict)
    kv: list[str] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)
    url: str = ""
    tmp: str = ""
    balancers: dict[str, str] = field(default_factory=dict)

    @property
    def urls(self) -> dict[str, str]:
        """Each process's base URL; a service kind's name (``orders``) is its load
        balancer, or its first instance when it has none (``payment``)."""
        urls = {n: p.url for n, p in self.procs.items()}
        for kind in STATELESS:
            urls.setdefault(kind, self.balancers.get(kind) or urls.get(f"{kind}-1", ""))
        return urls

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    # -- start / stop -------------------------------------------------------------------

    def start(self) -> Shop:
        self.tmp = tempfile.mkdtemp(prefix="dsys-shop-")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _cluster(self, block: str, n: int) -> list[str]:
        addrs = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        for i, addr in enumerate(addrs):
            peers = [
                a for j, other in enumerate(addrs) if j != i for a in ("--peer", f"n{j}={other}")
            ]
            argv = [sys.executable, "-m", "dsys", block, "serve", "--id", f"n{i}", "--listen",
                    addr, "--data-dir", f"{self.tmp}/{block}-n{i}", "--fsync", self.fsync,
                    *peers]  # fmt: skip
            self._spawn(Proc(f"{block}-n{i}", argv, f"http://{addr}"), wait=False)
        for addr in addrs:
            wait_healthy(addr, timeout=20)
        return addrs

    def _start(self) -> None:
        t0 = time.monotonic()
        self.kv = self._cluster("kv", self.kv_nodes)
        self.streams = self._cluster("streams", self.stream_nodes)
        asyncio.run(self._setup_streams())
        self.say(
            f"  raft KV on {', '.join(self.kv)}; streams on {', '.join(self.streams)} "
            f"({time.monotonic() - t0:.1f} s)"
        )
        rl = f"127.0.0.1:{free_port()}"  # the gateways' shared rate limits
        self._spawn(Proc("ratelimit", [sys.executable, "-m", "dsys", "ratelimit", "serve",
                                       "--listen", rl], f"http://{rl}"), wait=False)  # fmt: skip
        common = ["--kv", ",".join(self.kv), "--streams", ",".join(self.streams)]
        n = self.instances
        names = [
            "provider",
            *(f"{kind}-{i}" for kind in STATELESS for i in range(1, n + 1)),
            *(f"gateway-{i}" for i in range(1, self.gateways + 1)),
        ]
        url = {n: f"http://127.0.0.1:{free_port()}" for n in names}  # fixed: restarts keep them
        for kind in BALANCED:  # each kind the gateway calls has its own `dsys lb`
            self.balancers[kind] = f"http://127.0.0.1:{free_port()}"
        extra: dict[str, list[str]] = {
            "provider": ["--provider-error-rate", str(self.provider_error_rate),
                         "--provider-latency", *map(str, self.provider_latency)],
            "inventory": ["--reservation-ttl", str(self.reservation_ttl),
                          *(["--seed"] if self.seed_stock else [])],
            "payment": ["--provider", url["provider"]],
            "delivery": ["--delivery-step", str(self.delivery_step)],
            "gateway": ["--catalog", self.balancers["catalog"],
                        "--orders", self.balancers["orders"],
                        "--history", self.balancers["history"],
                        "--cart", ",".join(url[f"cart-{i}"] for i in range(1, n + 1)),
                        "--rate", str(self.rate), "--ratelimit", rl],
        }  # fmt: skip
        started = [
            self.service(name, url[name], *common, *extra.get(name.split("-")[0], []))
            for name in names
        ]
        for kind, lb in self.balancers.items():
            backends = [f"{kind}-{i}" for i in range(1, n + 1)]
            self._balancer(f"lb-{kind}", lb, [url[b] for b in backends], internal=True)
        for p in started:  # they start in parallel; now wait for each
            self._wait(p)
        wait_healthy(rl, timeout=20)
        self.url = f"http://127.0.0.1:{free_port()}"
        gateways = [url[f"gateway-{i}"] for i in range(1, self.gateways + 1)]
        self._balancer("lb", self.url, gateways, internal=False)
        for lb in (*self.balancers.values(), self.url):
            wait_healthy(f"{lb.removeprefix('http://')}/_dsys", timeout=20)
        self.say(f"  {len(self.procs)} processes up in {time.monotonic() - t0:.1f} s")

    def _balancer(self, name: str, url: str, backends: list[str], *, internal: bool) -> None:
        """Start ``dsys lb serve`` on ``url`` in front of ``backends``."""
        argv = [sys.executable, "-m", "dsys", "lb", "serve", "--listen",
                url.removeprefix("http://"), "--strategy", "p2c-ewma", "--health-interval", "1",
                *(a for b in backends for a in ("--backend", b))]  # fmt: skip
        if not internal:
            # the gateways pass on their dependencies' 503s; ejecting a gateway or opening
            # its breaker for them would only send the same 503s to the other one (and,
            # with one gateway down, leave none). The 1 s health checks find a dead
            # gateway instead.
            argv += ["--eject-after", "1000000", "--no-circuit-breaker"]
        self._spawn(Proc(name, argv, url), wait=False)

    def instances_of(self, kind: str) -> list[str]:
        """The process names of service ``kind`` (``orders`` -> ``orders-1``, ``orders-2``)."""
        return [n for n in self.procs if n.rsplit("-", 1)[0] == kind and n[-1].isdigit()]

    async def _setup_streams(self) -> None:
        async with StreamClient(self.streams, timeout=20.0) as sc:
            await setup_streams(sc)

    def service(self, name: str, url: str, *args: str) -> Proc:
        """Start service ``name`` on ``url`` (``cart-2`` runs the ``cart`` service)."""
        kind = name.split("-")[0]
        argv = [sys.executable, "-m", "examples.shop.services", kind, "--listen",
                url.removeprefix("http://"), *args]  # fmt: skip
        return self._spawn(Proc(name, argv, url), wait=False, pipe=True)

    def _spawn(self, p: Proc, wait: bool = True, pipe: bool = False) -> Proc:
        p.log = os.path.join(self.tmp, f"{p.name}.log")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "DSYS_LOG_LEVEL": "warning",
            "DSYS_SHOP_SECRET": os.environ.get("DSYS_SHOP_SECRET", self._secret()),
        }
        with open(p.log, "ab") as log:
            p.proc = subprocess.Popen(
                p.argv, stdout=subprocess.PIPE if wait or pipe else subprocess.DEVNULL, stderr=log,
                env=env, cwd=REPO, start_new_session=True,
            )  # fmt: skip
        self.procs[p.name] = p
        if wait:
            self._wait(p)
        return p

    def _wait(self, p: Proc) -> None:
        assert p.proc is not None
        line = _first_line(p.proc, time.monotonic() + 30)
        if b"listening on " not in line:
            tail = Path(p.log).read_text()[-3000:]
            raise RuntimeError(f"{p.name} did not start ({line!r}); its log:\n{tail}")
        p.url = line.split(b"listening on ")[1].strip().decode()
        wait_healthy(p.url.removeprefix("http://"), timeout=20)

    def _secret(self) -> str:
        if not hasattr(self, "_secret_value"):
            self._secret_value = secrets.token_hex(16)
        return self._secret_value

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL by default) to process ``name`` and reap it."""
        p = self.procs[name]
        if p.proc is not None and p.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.proc.pid, sig)
            p.proc.wait(10)
        if p.proc is not None and p.proc.stdout is not None:
            p.proc.stdout.close()

    def restart(self, name: str) -> None:
        """Start process ``name`` again with the same command line (a new port for services)."""
        p = self.procs[name]
        self.kill(name)
        if name.split("-")[0] in ("kv", "streams"):
            self._spawn(Proc(p.name, p.argv, p.url), wait=False)
            wait_healthy(p.url.removeprefix("http://"), timeout=20)
            return
        self._spawn(Proc(p.name, p.argv, p.url))
        kind = name.rsplit("-", 1)[0]
        lb = self.url if kind == "gateway" else self.balancers.get(kind)
        if lb:  # back in rotation once its load balancer's health checks see it
            _wait_up(lb, p.url)

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and remove the data directory."""
        for p in reversed(list(self.procs.values())):
            if p.proc is not None and p.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs.values():
            if p.proc is None:
                continue
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait()
            if p.proc.stdout is not None:
                p.proc.stdout.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Shop:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _wait_up(lb: str, backend: str, timeout: float = 20.0) -> None:
    """Wait until the ``dsys lb`` at ``lb`` lists ``backend`` as up."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"{lb}/_dsys/endpoints", timeout=2) as r:
                eps = json.loads(r.read())["endpoints"]
            if any(e["url"].rstrip("/") == backend and e["state"] == "up" for e in eps):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{backend} is not up behind {lb} after {timeout} s")
        time.sleep(0.1)


def _first_line(proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                break
            line += chunk
    return line


# -- a short scripted visit ---------------------------------------------------------------


class Api:
    """A tiny client of the gateway's public API (used by the visit, tests and the load test)."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.token = ""

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(kw.pop("headers", {}))
        async with self.http.request(
            method, self.url + path, json=body, headers=headers, **kw
        ) as r:
            return r.status, await r.json(content_type=None)

    async def signup(self, user: str, password: str = "correct horse") -> None:
        status, data = await self.call("POST", "/api/signup", {"user": user, "password": password})
        if status == 409:
            status, data = await self.call(
                "POST", "/api/login", {"user": user, "password": password}
            )
        assert status in (200, 201), (status, data)
        self.token = data["token"]

    async def wait_final(self, oid: str, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while True:
            status, data = await self.call("GET", f"/api/orders/{oid}")
            if status == 200 and data["status"] in ("delivered", "cancelled", "refunded"):
                return dict(data)
            if time.monotonic() > deadline:
                raise TimeoutError(f"order {oid} not final after {timeout} s: {data}")
            await asyncio.sleep(0.2)


async def visit(shop: Shop, out: Any = print) -> None:
    """Sign up, browse, fill a cart, pay, watch the order get delivered; then a declined card."""
    async with aiohttp.ClientSession() as http:
        api = Api(http, shop.url)
        await api.signup(f"alice{secrets.token_hex(2)}")
        _, products = await api.call("GET", "/api/products")
        first = products[0]
        out(f"  browse: {len(products)} products, e.g. {first['name']} ${first['price'] / 100:.2f}")
        for pid, qty in (("mug", 2), ("sunglasses", 1)):
            status, cart = await api.call("POST", "/api/cart/items", {"product": pid, "qty": qty})
        out(f"  cart: {cart['items']}")
        status, order = await api.call("POST", "/api/checkout", {})
        total = order["amount"] / 100
        out(f"  checkout -> {status} order {order['id']} ({order['status']}), ${total:.2f}")
        start = time.monotonic()
        seen: list[str] = []
        while time.monotonic() - start < 30:
            _, o = await api.call("GET", f"/api/orders/{order['id']}")
            if o.get("status") and (not seen or seen[-1] != o["status"]):
                seen.append(o["status"])
            if o.get("status") in ("delivered", "cancelled", "refunded"):
                break
            await asyncio.sleep(0.1)
        out(f"  order went {' -> '.join(seen)} in {time.monotonic() - start:.1f} s")
        await api.call("POST", "/api/cart/items", {"product": "watch", "qty": 1})
        _, bad = await api.call("POST", "/api/checkout", {"card": "4000000000000002"})
        final = await api.wait_final(bad["id"])
        out(f"  a declined card -> {final['status']} ({final['reason']}); nothing charged")
        status, err = await api.call("POST", "/api/cart/items", {"product": "mug", "qty": -3})
        out(f"  qty -3 -> {status} {err['error']}")
        summed: dict[str, Any] = {}
        payments = shop.instances_of("payment")
        for name in payments:  # each instance counts what it did
            async with http.get(f"{shop.urls[name]}/admin/stats") as r:
                for k, v in (await r.json()).items():
                    summed[k] = summed.get(k, 0) + v if isinstance(v, int) else v
        out(f"  payment service ({len(payments)} instances): {summed}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.shop", description=__doc__)
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--kv-nodes", type=int, default=3)
    p.add_argument("--stream-nodes", type=int, default=3)
    p.add_argument("--error-rate", type=float, default=0.2, help="payment provider failures")
    args = p.parse_args(argv)
    print("dsys shop: an e-commerce system of dsys blocks, on 127.0.0.1 (Ctrl-C stops it)")
    shop = Shop(kv_nodes=args.kv_nodes, stream_nodes=args.stream_nodes,
                provider_error_rate=args.error_rate, delivery_step=0.5)  # fmt: skip
    started = time.monotonic()
    try:
        shop.start()
        for name, proc in shop.procs.items():
            if not name.startswith(("kv", "streams")):
                print(f"  {name:11} {proc.url}")
        print(f"\n  storefront: {shop.url}/\n")
        asyncio.run(visit(shop))
        if args.seconds is None:
            print("\n  running; Ctrl-C stops every process")
            while True:
                time.sleep(1)
        else:
            time.sleep(max(0.0, args.seconds - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    finally:
        shop.stop()
        print("  every process stopped")
    return 0


def demo(seconds: float = 1.0) -> int:
    """Run the shop briefly for ``make demo`` (1-node clusters; call it outside an event
    loop): start everything, make the scripted visit, stop every process."""
    return main(["--seconds", str(seconds), "--kv-nodes", "1", "--stream-nodes", "1"])
