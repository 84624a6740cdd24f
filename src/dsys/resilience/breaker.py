"""``CircuitBreaker``: the adapter around :mod:`dsys.resilience.breaker_core`.

It reads the injected clock, asks the core for a permit, runs the call, classifies
the outcome, raises :class:`~dsys.errors.CircuitOpenError` on refusal, and on each
state transition logs a structlog event, calls the listeners and counts it.

Use it four ways::

    breaker = CircuitBreaker("payments", failure_rate_threshold=50, window=TimeWindow(seconds=30))

    breaker.call(requests_get, url)                 # sync
    await breaker.call_async(fetch, url)            # coroutine function
    @breaker                                        # decorates sync and async functions
    async def fetch(url: str) -> bytes: ...
    async with breaker:                             # a block (``with breaker:`` in sync code)
        await session.get(url)

Concurrency. The sync entry points (``call``, ``with``, sync decorated functions) hold a
lock around the core, so a breaker can be shared by threads. The async entry points take
no lock: use one breaker from one event loop (the usual case); do not mix the async entry
points of one breaker with sync calls from other threads.

Metrics are plain ints in the core, exposed at scrape time by a collector
(``dsys_resilience_breaker_state``, ``dsys_resilience_breaker_calls_total``,
``dsys_resilience_breaker_transitions_total``, all labelled ``breaker=<name>``), so the
per-call cost of metrics is zero.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, Protocol, TypeVar, overload

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dsys.clock import Clock, MonotonicClock
from dsys.errors import CircuitOpenError, ConfigError
from dsys.observability import Metrics, get_logger
from dsys.resilience.breaker_core import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    BreakerCore,
    BreakerState,
    CountWindow,
    Permit,
    Rejected,
    StateTransition,
    TimeWindow,
    WindowCounts,
)

P = ParamSpec("P")
R = TypeVar("R")

Listener = Callable[["CircuitBreaker", StateTransition], None]
"""Called after each state transition with the breaker and the transition."""

DEFAULT_REGISTRY = CollectorRegistry()
"""The registry breakers report to when given no ``metrics``/``registry``."""


@dataclass(frozen=True, slots=True)
class SharedState:
    """A breaker state as published to a :class:`BreakerStore`.

    Attributes:
        state: ``OPEN``, ``FORCED_OPEN``, ``CLOSED`` or ``DISABLED``.
        open_until: when ``OPEN``, the time (on the breakers' shared clock) it may admit
            trial calls.
        version: increases with every publication of this breaker name.
    """

    state: BreakerState
    open_until: float
    version: int


class BreakerStore(Protocol):
    """Where breakers of the same name share their state (e.g. open in one, open in all).

    A store only carries decisions (open until T, forced open, closed), never the
    per-call window: breakers publish on each transition and read the store at most
    every ``store_poll_interval`` seconds (a breaker without a store skips all this).
    """

    def publish(self, name: str, state: BreakerState, open_until: float) -> SharedState:
        """Record a new decision for ``name`` and return it with its version."""
        ...

    def fetch(self, name: str) -> SharedState | None:
        """The latest decision for ``name``, or ``None``."""
        ...


class MemoryBreakerStore:
    """A :class:`BreakerStore` inside one process (breakers share a clock).

    For tests, and for several breaker objects guarding the same dependency in one
    process. A store shared across processes (over the dsys KV service) is not part of
    this release.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, SharedState] = {}

    def publish(self, name: str, state: BreakerState, open_until: float) -> SharedState:
        """Record a new decision for ``name`` and return it with its version."""
        with self._lock:
            prev = self._states.get(name)
            shared = SharedState(state, open_until, (prev.version + 1) if prev else 1)
            self._states[name] = shared
            return shared

    def fetch(self, name: str) -> SharedState | None:
        """The latest decision for ``name``, or ``None``."""
        return self._states.get(name)


_OUTCOMES = ("successful", "failed", "slow", "rejected", "ignored")


class _BreakerCollector(Collector):
    """Exposes the counters of every live breaker of one registry at scrape time."""

    def __init__(self) -> None:
        self.breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        state = GaugeMetricFamily(
            "dsys_resilience_breaker_state",
            "1 for the breaker's current state, 0 for the others",
            labels=["breaker", "state"],
        )
        calls = CounterMetricFamily(
            "dsys_resilience_breaker_calls",
            "Calls by outcome (slow calls are also counted as successful or failed)",
            labels=["breaker", "outcome"],
        )
        transitions = CounterMetricFamily(
            "dsys_resilience_breaker_transitions",
            "State transitions",
            labels=["breaker", "from_state", "to_state"],
        )
        for b in list(self.breakers):
            core = b._core
            for s in BreakerState:
                state.add_metric([b.name, s.value], 1.0 if core.state is s else 0.0)
            values = (
                core.calls_successful,
                core.calls_failed,
                core.calls_slow,
                core.calls_rejected,
                core.calls_ignored,
            )
            for outcome, value in zip(_OUTCOMES, values, strict=True):
                calls.add_metric([b.name, outcome], float(value))
            for (frm, to), n in list(core.transitions.items()):
                transitions.add_metric([b.name, frm.value, to.value], float(n))
        return [state, calls, transitions]


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _BreakerCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def _collector_for(registry: CollectorRegistry) -> _BreakerCollector:
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _BreakerCollector()
            registry.register(collector)
            _collectors[registry] = collector
        return collector


def _clock_reader(clock: Clock | None) -> Callable[[], float]:
    if clock is None or type(clock) is MonotonicClock:
        return time.monotonic
    return clock.now


_Entry = tuple[Permit, float, Any]


class CircuitBreaker:
    """A circuit breaker guarding calls to one dependency.

    Args:
        name: names the dependency in logs, metrics and errors.
        failure_rate_threshold: percent of failed calls that opens the breaker.
        slow_call_rate_threshold: percent of slow calls that opens the breaker.
        slow_call_duration: seconds from which a call counts as slow (``None``: off).
        window: ``CountWindow(size=...)``, ``TimeWindow(seconds=..., buckets=...)`` or an
            int (count window of that size).
        minimum_calls: calls in the window before the rates can open the breaker.
        open_wait: seconds the breaker stays open before trial calls.
        open_wait_multiplier: growth of the open wait after each failed trial (1: fixed).
        open_wait_max: upper bound of the open wait.
        permitted_calls_in_half_open: trial calls let through when half-open.
        failure_exceptions: exceptions that count as failures (default: ``Exception``).
            Any other exception (e.g. ``asyncio.CancelledError``) neither counts nor
            fails: the permit is handed back.
        ignore_exceptions: exceptions that never count, even if they match
            ``failure_exceptions`` (e.g. ``dsys.errors.BadInputError``: the caller's fault).
        failure_predicate: further filter on failure exceptions: return False to ignore.
        result_predicate: a returned value for which this returns True counts as a
            failure (e.g. ``lambda r: r.status >= 500``); the value is still returned.
        listeners: called on each state transition.
        clock: monotonic time source (default: ``time.monotonic``).
        metrics: a :class:`dsys.observability.Metrics` whose registry receives the
            breaker metrics, or a ``CollectorRegistry``; default: :data:`DEFAULT_REGISTRY`.
        store: share open/closed decisions with other breakers of the same name.
        store_poll_interval: how often (seconds) to read the store.
        config: a ready :class:`BreakerConfig` instead of the threshold arguments.

    Raises:
        ConfigError: a setting is out of range (the message names it).
    """

    __slots__ = (
        "__weakref__",
        "_core",
        "_failure_exceptions",
        "_failure_predicate",
        "_ignore_exceptions",
        "_listeners",
        "_lock",
        "_log",
        "_next_poll",
        "_now",
        "_result_predicate",
        "_ring",
        "_stack",
        "_store",
        "_store_poll_interval",
        "_store_version",
        "_timed",
        "name",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_rate_threshold: float = 50.0,
        slow_call_rate_threshold: float = 100.0,
        slow_call_duration: float | None = None,
        window: CountWindow | TimeWindow | int = 100,
        minimum_calls: int = 10,
        open_wait: float = 30.0,
        open_wait_multiplier: float = 1.0,
        open_wait_max: float | None = None,
        permitted_calls_in_half_open: int = 3,
        failure_exceptions: Sequence[type[BaseException]] = (Exception,),
        ignore_exceptions: Sequence[type[BaseException]] = (),
        failure_predicate: Callable[[BaseException], bool] | None = None,
        result_predicate: Callable[[Any], bool] | None = None,
        listeners: Iterable[Listener] = (),
        clock: Clock | None = None,
        metrics: Metrics | CollectorRegistry | None = None,
        store: BreakerStore | None = None,
        store_poll_interval: float = 1.0,
        config: BreakerConfig | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a circuit breaker needs a non-empty name, got {name!r}")
        if config is None:
            config = BreakerConfig(
                failure_rate_threshold=failure_rate_threshold,
                slow_call_rate_threshold=slow_call_rate_threshold,
                slow_call_duration=slow_call_duration,
                window=window,
                minimum_calls=minimum_calls,
                open_wait=open_wait,
                open_wait_multiplier=open_wait_multiplier,
                open_wait_max=open_wait_max,
                permitted_calls_in_half_open=permitted_calls_in_half_open,
            )
        for label, excs in (
            ("failure_exceptions", failure_exceptions),
            ("ignore_exceptions", ignore_exceptions),
        ):
            if not all(isinstance(e, type) and issubclass(e, BaseException) for e in excs):
                raise ConfigError(f"{label} must be exception classes, got {excs!r}")
        if not (store_poll_interval > 0):
            raise ConfigError(f"store_poll_interval must be > 0, got {store_poll_interval!r}")
        self.name = name
        self._now = _clock_reader(clock)
        self._core = BreakerCore(config, self._now())
        self._timed = config.slow_call_duration is not None
        self._failure_exceptions = tuple(failure_exceptions)
        self._ignore_exceptions = tuple(ignore_exceptions)
        self._failure_predicate = failure_predicate
        self._result_predicate = result_predicate
        self._listeners = list(listeners)
        self._lock = threading.Lock()
        self._log = get_logger("resilience", breaker=name)
        self._stack: contextvars.ContextVar[_Entry | None] = contextvars.ContextVar(
            f"dsys_breaker_{name}", default=None
        )
        self._store = store
        self._store_poll_interval = float(store_poll_interval)
        self._store_version = 0
        self._next_poll = -float("inf")
        if isinstance(metrics, Metrics):
            registry = metrics.registry
        elif metrics is None:
            registry = DEFAULT_REGISTRY
        else:
            registry = metrics
        _collector_for(registry).breakers.add(self)
        # the lock-free fast path applies only to this simple (and default) set-up
        fast = not self._timed and result_predicate is None and store is None
        self._ring = self._core.ring if fast else None

    # -- reading ---------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state (``OPEN`` until the first call after the open wait)."""
        return self._core.state

    @property
    def config(self) -> BreakerConfig:
        """The breaker's configuration."""
        return self._core.config

    def counts(self) -> WindowCounts:
        """Calls, failures and slow calls in the window now (the trial's when half-open)."""
        with self._lock:
            return self._core.counts(self._now())

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(breaker, transition)`` after each state transition."""
        self._listeners.append(listener)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._core.state.value})"

    # -- manual control --------------------------------------------------------------

    def force_open(self) -> None:
        """Reject every call until :meth:`reset` (e.g. during maintenance)."""
        self._control(BreakerCore.force_open)

    def disable(self) -> None:
        """Let every call through and record nothing until :meth:`reset`."""
        self._control(BreakerCore.disable)

    def reset(self) -> None:
        """Close the breaker with an empty window."""
        self._control(BreakerCore.reset)

    def trip(self) -> None:
        """Open the breaker now, as if the failure threshold had been reached."""
        self._control(BreakerCore.trip)

    def _control(self, op: Callable[[BreakerCore, float], None]) -> None:
        with self._lock:
            op(self._core, self._now())
        self._emit()

    # -- sync ------------------------------------------------------------------------
    #
    # Each entry point has a fast path for the common case (closed, count window, no
    # slow-call timing, no result predicate, no store): read the permit, run the call,
    # count the success with one integer increment (atomic under the GIL; see
    # BreakerCore). Everything else (failures, other states, time windows) goes through
    # the core under the lock (sync) or directly (async, one event loop).

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` through the breaker (thread-safe).

        Raises:
            CircuitOpenError: the breaker refused the call; ``fn`` did not run.
        """
        core = self._core
        ring = self._ring
        permit = core.permit
        if ring is not None and core.state is CLOSED:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                self._sync_exception(permit, exc, 0.0)
                raise
            if permit is core.permit:
                ring.seq += 1
            return result
        permit, start = self._sync_acquire()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._sync_exception(permit, exc, start)
            raise
        lock = self._lock
        lock.acquire()
        try:
            self._record_result(permit, result, start)
        finally:
            lock.release()
        if core.events:
            self._emit()
        return result

    def _sync_acquire(self) -> tuple[Permit, float]:
        core = self._core
        if self._store is not None:
            self._poll_store()
        with self._lock:
            permit = core.acquire(self._now())
        if core.events:
            self._emit()
        if permit.__class__ is not Permit:
            self._refuse(permit)  # type: ignore[arg-type]
        return permit, (self._now() if self._timed else 0.0)  # type: ignore[return-value]

    def _sync_exception(self, permit: Permit, exc: BaseException, start: float) -> None:
        with self._lock:
            self._record_exception(permit, exc, start)
        if self._core.events:
            self._emit()

    def __enter__(self) -> CircuitBreaker:
        entry = self._sync_acquire()
        self._stack.set((entry[0], entry[1], self._stack.get()))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry = self._stack.get()
        if entry is None:
            raise RuntimeError(f"{self!r}: __exit__ without __enter__")
        permit, start, prev = entry
        self._stack.set(prev)
        with self._lock:
            if exc is None:
                self._record_success(permit, start)
            else:
                self._record_exception(permit, exc, start)
        if self._core.events:
            self._emit()

    # -- async -----------------------------------------------------------------------

    async def call_async(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)`` through the breaker (no lock; one event loop).

        A cancelled call hands its permit back (it frees a half-open trial slot).

        Raises:
            CircuitOpenError: the breaker refused the call; ``fn`` was not called.
        """
        core = self._core
        ring = self._ring
        permit = core.permit
        if ring is not None and core.state is CLOSED:
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                self._record_exception(permit, exc, 0.0)
                if core.events:
                    self._emit()
                raise
            if permit is core.permit:
                ring.seq += 1
            return result
        permit, start = self._async_acquire()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self._record_exception(permit, exc, start)
            if core.events:
                self._emit()
            raise
        self._record_result(permit, result, start)
        if core.events:
            self._emit()
        return result

    def _async_acquire(self) -> tuple[Permit, float]:
        core = self._core
        if self._store is not None:
            self._poll_store()
        permit = core.acquire(self._now())
        if core.events:
            self._emit()
        if permit.__class__ is not Permit:
            self._refuse(permit)  # type: ignore[arg-type]
        return permit, (self._now() if self._timed else 0.0)  # type: ignore[return-value]

    async def __aenter__(self) -> CircuitBreaker:
        permit, start = self._async_acquire()
        self._stack.set((permit, start, self._stack.get()))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry = self._stack.get()
        if entry is None:
            raise RuntimeError(f"{self!r}: __aexit__ without __aenter__")
        permit, start, prev = entry
        self._stack.set(prev)
        if exc is None:
            self._record_success(permit, start)
        else:
            self._record_exception(permit, exc, start)
        if self._core.events:
            self._emit()

    # -- decorator -------------------------------------------------------------------

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate a sync or async function so every call goes through the breaker.

        The wrappers repeat the fast path of :meth:`call` / :meth:`call_async` inline
        (one Python frame less per call).
        """
        core = self._core
        ring = self._ring
        if inspect.iscoroutinefunction(fn):
            call_async = self.call_async
            record_exception = self._record_exception
            emit = self._emit

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                permit = core.permit
                if ring is not None and core.state is CLOSED:
                    try:
                        result = await fn(*args, **kwargs)
                    except BaseException as exc:
                        record_exception(permit, exc, 0.0)
                        if core.events:
                            emit()
                        raise
                    if permit is core.permit:
                        ring.seq += 1
                    return result
                return await call_async(fn, *args, **kwargs)

            return async_wrapper
        call = self.call
        sync_exception = self._sync_exception

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            permit = core.permit
            if ring is not None and core.state is CLOSED:
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    sync_exception(permit, exc, 0.0)
                    raise
                if permit is core.permit:
                    ring.seq += 1
                return result
            return call(fn, *args, **kwargs)

        return wrapper

    # -- internals -------------------------------------------------------------------

    def _refuse(self, rejected: Rejected) -> None:
        raise CircuitOpenError(
            f"circuit breaker {self.name!r} is {rejected.state.value}",
            retry_after=rejected.retry_after,
        )

    def _record_success(self, permit: Permit, start: float) -> None:
        now = self._now()
        self._core.on_success(permit, now, now - start if self._timed else 0.0)

    def _record_result(self, permit: Permit, result: object, start: float) -> None:
        rp = self._result_predicate
        if rp is not None and rp(result):
            self._record_failure(permit, start)
        else:
            self._record_success(permit, start)

    def _record_failure(self, permit: Permit, start: float) -> None:
        now = self._now()
        self._core.on_failure(permit, now, now - start if self._timed else 0.0)

    def _record_exception(self, permit: Permit, exc: BaseException, start: float) -> None:
        if (
            isinstance(exc, self._failure_exceptions)
            and not isinstance(exc, self._ignore_exceptions)
            and (self._failure_predicate is None or self._failure_predicate(exc))
        ):
            self._record_failure(permit, start)
        else:
            self._core.release(permit)

    def _emit(self) -> None:
        with self._lock:
            events = self._core.events
            if not events:
                return
            self._core.events = []
            open_until = self._core.open_until
        for ev in events:
            log = self._log.warning if ev.to_state is OPEN else self._log.info
            log(
                "breaker_transition",
                from_state=ev.from_state.value,
                to_state=ev.to_state.value,
                reason=ev.reason,
                failure_rate=round(ev.failure_rate, 2) if ev.failure_rate >= 0 else None,
                slow_call_rate=round(ev.slow_call_rate, 2) if ev.slow_call_rate >= 0 else None,
            )
            for listener in list(self._listeners):
                try:
                    listener(self, ev)
                except Exception as exc:
                    self._log.error("breaker_listener_failed", error=f"{type(exc).__name__}: {exc}")
            if (
                self._store is not None
                and ev.to_state is not HALF_OPEN
                and ev.reason != "shared state"
            ):
                shared = self._store.publish(self.name, ev.to_state, open_until)
                self._store_version = shared.version
        if self._store is not None:
            self._poll_store()

    def _poll_store(self) -> None:
        """Adopt a newer decision from the store (at most every poll interval)."""
        store = self._store
        if store is None:
            return
        now = self._now()
        if now < self._next_poll:
            return
        self._next_poll = now + self._store_poll_interval
        shared = store.fetch(self.name)
        if shared is None or shared.version <= self._store_version:
            return
        self._store_version = shared.version
        with self._lock:
            self._core.adopt(shared.state, now, shared.open_until)
        if self._core.events:
            self._emit()

    def sync_with_store(self) -> None:
        """Read the shared store now (calls read it at most every poll interval)."""
        self._next_poll = -float("inf")
        self._poll_store()


def breakers_in(registry: CollectorRegistry) -> Iterator[CircuitBreaker]:
    """The live breakers reporting to ``registry`` (for diagnostics and tests)."""
    collector = _collectors.get(registry)
    return iter(list(collector.breakers) if collector else [])


__all__ = [
    "DEFAULT_REGISTRY",
    "BreakerStore",
    "CircuitBreaker",
    "Listener",
    "MemoryBreakerStore",
    "SharedState",
    "breakers_in",
]
