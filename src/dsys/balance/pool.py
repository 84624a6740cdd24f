"""A dynamic pool of HTTP endpoints: strategy, health, ejection and draining in one place.

:class:`Pool` is the adapter around the pure pieces: it owns a :class:`Picker`
(:mod:`dsys.balance.strategies`), an :class:`ActiveHealth` per endpoint and an
:class:`OutlierDetector` (:mod:`dsys.balance.health`), reads the clock, and keeps the
picker's eligible set up to date as endpoints are added, removed, drained, ejected or
fail their health checks. Both the client-side :class:`dsys.balance.Session` and the
reverse proxy (:mod:`dsys.balance.proxy`) balance through a pool::

    pool = Pool(["http://127.0.0.1:9001", "http://127.0.0.1:9002"], config=PoolConfig())
    lease = pool.acquire()                  # raises NoHealthyBackendError when empty
    ...                                     # send the request to lease.endpoint
    pool.release(lease, ok=True)            # feeds latency to the strategy

Endpoint ids are base URLs without a trailing slash (``http://host:port``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp

from dsys.balance.health import (
    ActiveHealth,
    BecameHealthy,
    BecameUnhealthy,
    Ejected,
    HealthCheckConfig,
    OutlierConfig,
    OutlierDetector,
)
from dsys.balance.strategies import MAX_WEIGHT, STRATEGIES, Picker, make_picker
from dsys.clock import Clock, MonotonicClock
from dsys.errors import CircuitOpenError, ConfigError, NoHealthyBackendError
from dsys.observability import get_logger


def normalize_endpoint(url: str) -> str:
    """Check an endpoint URL and return it as ``scheme://host:port`` (no trailing slash).

    Raises:
        ConfigError: not an ``http``/``https`` URL with a host, or it has a path/query.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad endpoint URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"bad endpoint URL {url!r}: need http(s)://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"bad endpoint URL {url!r}: no path, query or fragment allowed")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """How a :class:`Pool` balances and watches its endpoints.

    Attributes:
        strategy: one of :data:`~dsys.balance.strategies.STRATEGIES`.
        seed: seed for randomized strategies (``None``: a fresh seed each run).
        health_check: active health checks, or ``None`` to rely on passive ones only.
        outlier: passive outlier detection, or ``None`` to disable ejections.
        circuit_breaker: give each endpoint its own circuit breaker.
        ewma_decay: seconds a latency peak takes to fade by 1/e (``p2c-ewma``).
    """

    strategy: str = "p2c-ewma"
    seed: int | None = None
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig | None = field(default_factory=OutlierConfig)
    circuit_breaker: bool = True
    ewma_decay: float = 2.0

    def __post_init__(self) -> None:
        if not self.ewma_decay > 0:
            raise ConfigError(f"ewma_decay must be > 0 (got {self.ewma_decay})")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}"
            )


T = TypeVar("T")


class Breaker(Protocol):
    """What the pool needs from a per-endpoint circuit breaker (as ``CircuitBreaker``)."""

    @property
    def state(self) -> Any:
        """The breaker's state; its ``value`` is ``"open"`` while it refuses calls."""
        ...

    @property
    def open_until(self) -> float | None:
        """When open: the time (on the breaker's clock) its open wait ends, else ``None``."""
        ...

    async def call_async(self, fn: Callable[[], Awaitable[T]], /) -> T:
        """Run ``fn()`` under the breaker; raises ``CircuitOpenError`` when refused."""
        ...

    def call(self, fn: Callable[[], T], /) -> T:
        """Run ``fn()`` under the breaker (sync); raises ``CircuitOpenError`` when refused."""
        ...


def _refusing(breaker: Breaker, now: float) -> bool:
    """Whether an open breaker still refuses calls at ``now``.

    ``CircuitBreaker.state`` stays ``OPEN`` until the first call after its open wait,
    so the pool also reads when that wait ends (``open_until``, on the same clock);
    once it has passed, the next request is the breaker's trial call.
    """
    if breaker.state.value != "open":
        return False
    until = breaker.open_until
    return until is None or now < until


class _EndpointFailed(Exception):
    """Reported to a breaker for an outcome observed outside its ``call``."""


def _succeeded() -> None:
    return None


def _failed() -> None:
    raise _EndpointFailed


def _is_server_error(result: object) -> bool:
    status = getattr(result, "status", 0)
    return isinstance(status, int) and status >= 500


DEFAULT_BREAKER_WINDOW = 20
"""Calls in the count window of :func:`default_breaker`."""


def default_breaker(endpoint: str, clock: Clock) -> Breaker:
    """A :class:`dsys.resilience.CircuitBreaker` for one endpoint.

    It opens when at least half of the last 20 calls (10 at least) failed, where a
    failure is a connect/transport error or a 5xx answer, and lets trial calls
    through after 5 seconds (growing up to 60 s while trials fail).
    """
    from dsys.resilience import CircuitBreaker

    return CircuitBreaker(
        f"balance:{endpoint}",
        failure_rate_threshold=50.0,
        window=DEFAULT_BREAKER_WINDOW,
        minimum_calls=10,
        open_wait=5.0,
        open_wait_multiplier=2.0,
        open_wait_max=60.0,
        permitted_calls_in_half_open=2,
        result_predicate=_is_server_error,
        clock=clock,
    )


@dataclass(slots=True)
class EndpointState:
    """Everything the pool knows about one endpoint (read-only for callers)."""

    url: str
    weight: int
    health: ActiveHealth
    breaker: Breaker | None = None
    draining: bool = False
    requests: int = 0
    failures: int = 0
    last_error: str = ""
    clean_window: int | None = None  # count-window size of the breaker, when known
    clean: int = 0  # successes reported to the breaker since its last failure


@dataclass(slots=True)
class Lease:
    """One request's hold on an endpoint; give it back with :meth:`Pool.release`."""

    endpoint: str
    started: float
    state: EndpointState


class Pool:
    """A dynamic set of endpoints balanced by a strategy, with health and ejection.

    Args:
        endpoints: initial endpoint URLs, or ``(url, weight)`` pairs.
        config: strategy and health settings.
        clock: time source (``ManualClock`` in tests).
        breaker_factory: builds a circuit breaker for an endpoint URL; the default
            uses :class:`dsys.resilience.CircuitBreaker` when ``config.circuit_breaker``.
        on_event: called with every health/ejection event (for metrics).
    """

    def __init__(
        self,
        endpoints: Iterable[str | tuple[str, int]] = (),
        *,
        config: PoolConfig | None = None,
        clock: Clock | None = None,
        breaker_factory: Callable[[str], Breaker] | None = None,
        on_event: Callable[[object], None] | None = None,
    ) -> None:
        self.config = config or PoolConfig()
        self.clock: Clock = clock or MonotonicClock()
        self._picker: Picker = make_picker(
            self.config.strategy, seed=self.config.seed, decay=self.config.ewma_decay
        )
        self._hc = self.config.health_check or HealthCheckConfig()
        self._outliers = OutlierDetector(self.config.outlier or OutlierConfig())
        self._eject = self.config.outlier is not None
        self._breaker_factory = breaker_factory
        self._on_event = on_event
        self._endpoints: dict[str, EndpointState] = {}
        self._next_return = float("inf")
        self._log = get_logger("balance")
        self._checks: asyncio.Task[None] | None = None
        for item in endpoints:
            url, weight = (item, 1) if isinstance(item, str) else item
            self._add(url, weight)
        self._refresh()

    # ---- membership ---------------------------------------------------------

    def _add(self, url: str, weight: int) -> str:
        ep = normalize_endpoint(url)
        if not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            raise ConfigError(f"weight must be an integer in 1..{MAX_WEIGHT} (got {weight!r})")
        old = self._endpoints.get(ep)
        if old is not None:
            old.weight, old.draining = weight, False
            return ep
        breaker: Breaker | None = None
        window: int | None = None
        if self._breaker_factory is not None:
            breaker = self._breaker_factory(ep)
        elif self.config.circuit_breaker:
            breaker = default_breaker(ep, self.clock)
            window = DEFAULT_BREAKER_WINDOW
        self._endpoints[ep] = EndpointState(
            url=ep,
            weight=weight,
            health=ActiveHealth(ep, self._hc),
            breaker=breaker,
            clean_window=window,
        )
        self._outliers.add(ep)
        return ep

    def add(self, url: str, weight: int = 1) -> str:
        """Add an endpoint (or update its weight and undrain it); returns its id."""
        ep = self._add(url, weight)
        self._refresh()
        self._log.info("endpoint_added", endpoint=ep, weight=weight)
        return ep

    def remove(self, url: str) -> None:
        """Remove an endpoint at once; its in-flight requests still finish.

        Raises:
            ConfigError: no such endpoint.
        """
        ep = self._get(url).url
        del self._endpoints[ep]
        self._outliers.remove(ep)
        self._refresh()
        self._log.info("endpoint_removed", endpoint=ep)

    def drain(self, url: str, draining: bool = True) -> None:
        """Stop (or with ``draining=False`` resume) sending new requests to an endpoint.

        Raises:
            ConfigError: no such endpoint.
        """
        st = self._get(url)
        st.draining = draining
        self._refresh()
        self._log.info("endpoint_drain", endpoint=st.url, draining=draining)

    def _get(self, url: str) -> EndpointState:
        try:
            ep = normalize_endpoint(url)
        except ConfigError:
            ep = url
        st = self._endpoints.get(ep)
        if st is None:
            raise ConfigError(f"no endpoint {url!r} in the pool")
        return st

    def __contains__(self, url: object) -> bool:
        return isinstance(url, str) and url in self._endpoints

    def __len__(self) -> int:
        return len(self._endpoints)

    @property
    def urls(self) -> list[str]:
        """Ids of every endpoint, eligible or not."""
        return list(self._endpoints)

    def eligible(self) -> list[str]:
        """Endpoints that may get new requests (healthy, not ejected, not draining)."""
        return [ep for ep, st in self._endpoints.items() if self._is_eligible(ep, st)]

    def _is_eligible(self, ep: str, st: EndpointState) -> bool:
        return not st.draining and st.health.healthy and not self._outliers.is_ejected(ep)

    def _refresh(self) -> None:
        self._picker.update(
            {ep: st.weight for ep, st in self._endpoints.items() if self._is_eligible(ep, st)}
        )

    # ---- per request --------------------------------------------------------

    def acquire(self, *, key: str | None = None, exclude: Collection[str] = ()) -> Lease:
        """Choose an endpoint for one request and count it as in flight.

        A circuit breaker that is open makes the pool pass over its endpoint.

        Args:
            key: request key for the consistent-hash strategy.
            exclude: endpoints not to use (those a retry already tried).

        Raises:
            NoHealthyBackendError: every endpoint is excluded, draining, ejected,
                unhealthy or behind an open circuit breaker.
        """
        now = self.clock.now()
        if now >= self._next_return:
            self._tick(now)
        picker = self._picker
        ep = picker.pick(now=now, key=key, exclude=exclude)
        skipped: set[str] | None = None
        while ep is not None:
            st = self._endpoints[ep]
            if st.breaker is None or not _refusing(st.breaker, now):
                picker.started(ep, now=now)
                st.requests += 1
                return Lease(ep, now, st)
            if skipped is None:
                skipped = set(exclude)
            skipped.add(ep)
            ep = picker.pick(now=now, key=key, exclude=skipped)
        raise NoHealthyBackendError(self._why_empty(exclude))

    def _why_empty(self, exclude: Collection[str]) -> str:
        if not self._endpoints:
            return "the pool has no endpoints"
        counts = {"draining": 0, "unhealthy": 0, "ejected": 0, "circuit open": 0, "tried": 0}
        for ep, st in self._endpoints.items():
            if ep in exclude:
                counts["tried"] += 1
            elif st.draining:
                counts["draining"] += 1
            elif not st.health.healthy:
                counts["unhealthy"] += 1
            elif self._outliers.is_ejected(ep):
                counts["ejected"] += 1
            else:
                counts["circuit open"] += 1
        detail = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        return f"no endpoint can take the request ({len(self._endpoints)} endpoints: {detail})"

    def release(
        self, lease: Lease, *, ok: bool, error: str = "", feed_breaker: bool = False
    ) -> None:
        """Give back a lease; ``ok=False`` for a 5xx answer or a connect/timeout error.

        Failures feed passive outlier detection, which may eject the endpoint.

        Args:
            lease: what :meth:`acquire` returned.
            ok: whether the endpoint served the request well.
            error: what went wrong, for the admin API.
            feed_breaker: also report the outcome to the endpoint's circuit breaker
                (for callers that did not run the try through :meth:`call`).
        """
        now = self.clock.now()
        ep = lease.endpoint
        self._picker.finished(ep, now=now, latency=now - lease.started, ok=ok)
        st = lease.state
        breaker = st.breaker
        if feed_breaker and breaker is not None:
            if not ok:
                st.clean = 0
            elif st.clean_window is not None and st.clean >= st.clean_window:
                # The breaker's count window holds only successes already and one
                # more changes nothing (a failure is still reported exactly).
                if breaker.state.value == "closed":
                    breaker = None
            else:
                st.clean += 1
            if breaker is not None:
                # The breaker only offers call(): report the outcome as a call that
                # succeeds or raises. An open breaker refuses it, which changes nothing.
                with contextlib.suppress(_EndpointFailed, CircuitOpenError):
                    breaker.call(_succeeded if ok else _failed)
        if ok:
            if self._eject:
                self._outliers.record_success(ep, now=now)
            return
        lease.state.failures += 1
        lease.state.last_error = error
        if self._eject and ep in self._endpoints:
            ev = self._outliers.record_failure(ep, now=now)
            if ev is not None:
                self._next_return = min(self._next_return, ev.until)
                self._refresh()
                self._emit(ev)

    async def call(self, lease: Lease, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` (one try on ``lease``'s endpoint) under its circuit breaker.

        Raises:
            CircuitOpenError: the breaker refused the call; ``fn`` did not run.
        """
        breaker = lease.state.breaker
        if breaker is None:
            return await fn()
        return await breaker.call_async(fn)

    def release_neutral(self, lease: Lease) -> None:
        """Give back a lease without judging the endpoint (e.g. the client went away)."""
        now = self.clock.now()
        self._picker.finished(lease.endpoint, now=now, latency=now - lease.started, ok=True)

    def _tick(self, now: float) -> None:
        returned = self._outliers.tick(now=now)
        nxt = float("inf")
        for ep in self._endpoints:
            until = self._outliers.ejected_until(ep)
            if until is not None and until < nxt:
                nxt = until
        self._next_return = nxt
        if returned:
            self._refresh()
            for ev in returned:
                self._emit(ev)

    def _emit(self, ev: object) -> None:
        self._log.warning(type(ev).__name__.lower(), **_fields(ev))
        if self._on_event is not None:
            self._on_event(ev)

    # ---- active health checks ----------------------------------------------

    def record_probe(self, url: str, ok: bool, reason: str = "") -> None:
        """Feed one active health-check outcome for ``url`` (ignored if it left)."""
        st = self._endpoints.get(url)
        if st is None:
            return
        ev = st.health.record(ok, reason)
        if ev is not None:
            self._refresh()
            self._emit(ev)

    async def check_once(self, session: aiohttp.ClientSession) -> None:
        """Probe every endpoint once, concurrently, and record the outcomes."""
        cfg = self._hc
        timeout = aiohttp.ClientTimeout(total=cfg.timeout)

        async def probe(ep: str) -> None:
            try:
                async with session.get(ep + cfg.path, timeout=timeout) as resp:
                    await resp.read()
                    ok = 200 <= resp.status < 300
                    self.record_probe(ep, ok, "" if ok else f"status {resp.status}")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.record_probe(ep, False, f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(probe(ep) for ep in list(self._endpoints)))

    def start_health_checks(self, session: aiohttp.ClientSession) -> None:
        """Run :meth:`check_once` every ``health_check.interval`` seconds in a task.

        Does nothing when the config has no ``health_check``. Stop with :meth:`close`.
        """
        if self.config.health_check is None or self._checks is not None:
            return

        async def loop() -> None:
            while True:
                try:
                    await self.check_once(session)
                except Exception as exc:  # a probe bug must not end the checks
                    self._log.error("health_check_failed", error=repr(exc))
                await asyncio.sleep(self._hc.interval)

        self._checks = asyncio.create_task(loop(), name="dsys-balance-health")

    async def close(self) -> None:
        """Stop the health-check task, if any."""
        task, self._checks = self._checks, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- introspection ------------------------------------------------------

    def snapshot(self) -> list[dict[str, object]]:
        """Every endpoint with its state, for admin APIs and dashboards."""
        now = self.clock.now()
        if now >= self._next_return:
            self._tick(now)
        out: list[dict[str, object]] = []
        for ep, st in self._endpoints.items():
            until = self._outliers.ejected_until(ep)
            if st.draining:
                state = "draining"
            elif until is not None:
                state = "ejected"
            elif not st.health.healthy:
                state = "unhealthy"
            elif st.breaker is not None and _refusing(st.breaker, now):
                state = "circuit_open"
            else:
                state = "up"
            out.append(
                {
                    "url": ep,
                    "state": state,
                    "weight": st.weight,
                    "healthy": st.health.healthy,
                    "draining": st.draining,
                    "ejected_for": None if until is None else round(max(until - now, 0.0), 3),
                    "ejections": self._outliers.ejections(ep),
                    "circuit": None if st.breaker is None else str(st.breaker.state.value),
                    "outstanding": self._picker.outstanding(ep),
                    "requests": st.requests,
                    "failures": st.failures,
                    "last_error": st.last_error,
                }
            )
        return out

    def outstanding(self, url: str) -> int:
        """Requests in flight on ``url``."""
        return self._picker.outstanding(url)


def _fields(ev: object) -> dict[str, object]:
    if isinstance(ev, Ejected):
        return {"endpoint": ev.endpoint, "until": ev.until, "count": ev.count}
    if isinstance(ev, BecameUnhealthy):
        return {"endpoint": ev.endpoint, "reason": ev.reason}
    if isinstance(ev, BecameHealthy):
        return {"endpoint": ev.endpoint}
    return {"endpoint": getattr(ev, "endpoint", "")}


__all__ = [
    "Breaker",
    "EndpointState",
    "Lease",
    "Pool",
    "PoolConfig",
    "default_breaker",
    "normalize_endpoint",
]
