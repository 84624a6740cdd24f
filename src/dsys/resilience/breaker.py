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
lock around the core, so a breaker can be shared by threads; only a closed breaker's
success count is updated without it, by bytecodes the GIL does not interleave (on a
free-threaded build a concurrent success may rarely go uncounted, never corrupting the
window). The async entry points take
no lock: use one breaker from one event loop (the usual case); do not mix the async entry
points of one breaker with sync calls from other threads.

Metrics are plain ints in the core, exposed at scrape time by a collector
(``dsys_resilience_breaker_state``, ``dsys_resilience_breaker_calls_total``,
``dsys_resilience_breaker_transitions_total``, all labelled ``breaker=<name>``; see
:mod:`dsys.resilience.metrics`), so the per-call cost of metrics is zero.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, Protocol, TypeVar, overload

from prometheus_client import CollectorRegistry

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
from dsys.resilience.metrics import DEFAULT_REGISTRY, collector_for

P = ParamSpec("P")
R = TypeVar("R")

Listener = Callable[["CircuitBreaker", StateTransition], None]
"""Called after each state transition with the breaker and the transition."""


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


def _clock_reader(clock: Clock | None) -> Callable[[], float]:
    if clock is None or type(clock) is MonotonicClock:
        return time.monotonic
    return clock.now


_NO_RESULT = object()  # a ``with`` block has no result for the result predicate

_Entry = tuple[Permit, float, Any]  # (permit, start, the enclosing entry or None)


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
            A predicate that raises hands the permit back (no outcome is recorded) and
            its exception propagates to the caller.
        listeners: called on each state transition.
        clock: monotonic time source (default: ``time.monotonic``).
        metrics: a :class:`dsys.observability.Metrics` whose registry receives the
            breaker metrics, or a ``CollectorRegistry``; default: :data:`DEFAULT_REGISTRY`.
            The registry holds the breaker weakly: it is reported while it is alive.
        store: share open/closed decisions with other breakers of the same name.
        store_poll_interval: how often (seconds) to read the store.
        config: a ready :class:`BreakerConfig` instead of the threshold arguments.

    Raises:
        ConfigError: a setting is out of range (the message names it).
    """

    __slots__ = (
        "__weakref__",
        "_buckets",
        "_core",
        "_failure_exceptions",
        "_failure_predicate",
        "_ignore_exceptions",
        "_listeners",
        "_lock",
        "_log",
        "_mode",
        "_next_poll",
        "_now",
        "_result_predicate",
        "_ring",
        "_slow_at",
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
        if (
            isinstance(store_poll_interval, bool)
            or not isinstance(store_poll_interval, (int, float))
            or not store_poll_interval > 0
        ):
            raise ConfigError(
                f"store_poll_interval must be seconds > 0, got {store_poll_interval!r}"
            )
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
        # the open ``with`` blocks of this task (or thread), innermost first: a linked
        # list of immutable entries, so child tasks that copy the context cannot disturb
        # their parent's blocks
        self._stack: contextvars.ContextVar[_Entry | None] = contextvars.ContextVar(
            f"dsys_breaker_{name}", default=None
        )
        self._store = store
        self._store_poll_interval = float(store_poll_interval)
        self._store_version = 0
        self._next_poll = -float("inf")
        collector_for(metrics).breakers.add(self)
        # the lock-free fast path (see "sync" below) needs no result predicate, no store
        self._ring = self._core.ring
        # the time window: a success before ``buckets.until`` is ``buckets.fast += 1``
        self._buckets = self._core.buckets
        self._slow_at = config.slow_call_duration or float("inf")
        if result_predicate is not None or store is not None:
            self._mode = 0
        elif self._ring is None:
            self._mode = 3
        else:
            self._mode = 2 if self._timed else 1

    # -- reading ---------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state (``OPEN`` until the first call after the open wait)."""
        return self._core.state

    @property
    def config(self) -> BreakerConfig:
        """The breaker's configuration."""
        return self._core.config

    @property
    def open_until(self) -> float | None:
        """When ``OPEN``: the time (on the breaker's clock) from which a call becomes a
        trial call; ``None`` in any other state."""
        core = self._core
        return core.open_until if core.state is OPEN else None

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
    # Each entry point has a fast path for the closed state when there is no result
    # predicate and no store: run the call and, if it succeeded (and was not slow) and
    # core.fast says a success cannot open the breaker, count it with a couple of integer
    # increments that cannot be interrupted under the GIL (see BreakerCore "Fast path").
    # Everything else (failures, other states, a time bucket that moved on) goes through
    # the core under the lock (sync) or directly (async: one event loop, no lock).
    # Modes: 0 no fast path, 1 count window, 2 count window with slow-call timing,
    # 3 time window.

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` through the breaker (thread-safe).

        Raises:
            CircuitOpenError: the breaker refused the call; ``fn`` did not run.
        """
        core = self._core
        permit = core.permit
        mode = self._mode
        if mode and core.state is CLOSED:
            if mode == 1:
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    self._sync_exception(permit, exc, 0.0)
                    raise
                if core.fast and permit is core.permit:
                    self._ring.seq += 1  # type: ignore[union-attr]
                else:
                    self._sync_result(permit, result, 0.0, fast=False)
                return result
            now = self._now
            start = now() if self._timed else 0.0
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                self._sync_exception(permit, exc, start)
                raise
            end = now()
            if end - start < self._slow_at and core.fast and permit is core.permit:
                if mode == 2:
                    self._ring.seq += 1  # type: ignore[union-attr]
                    return result
                buckets = self._buckets
                if end < buckets.until:  # type: ignore[union-attr]
                    buckets.fast += 1  # type: ignore[union-attr]
                    return result
            self._sync_result(permit, result, start, fast=False)
            return result
        permit, start = self._sync_acquire()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._sync_exception(permit, exc, start)
            raise
        self._sync_result(permit, result, start)
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
        try:
            failed = self._is_failure(exc)  # user predicates run outside the lock
        except BaseException:
            with self._lock:
                self._core.release(permit)  # a predicate failed: no outcome, free the slot
            raise
        with self._lock:
            self._record(permit, failed, start)
        if self._core.events:
            self._emit()

    def _sync_result(self, permit: Permit, result: object, start: float, fast: bool = True) -> None:
        if fast and self._mode >= 2 and self._fast_success(permit, start):
            return
        try:
            failed = self._is_bad_result(result)
        except BaseException:
            with self._lock:
                self._core.release(permit)
            raise
        with self._lock:
            self._record(permit, failed, start)
        if self._core.events:
            self._emit()

    def _fast_success(self, permit: Permit, start: float) -> bool:
        """Record a success on the fast path if possible (modes 2 and 3); else False."""
        core = self._core
        end = self._now()
        if end - start < self._slow_at and core.fast and permit is core.permit:
            if self._mode == 2:
                self._ring.seq += 1  # type: ignore[union-attr]
                return True
            buckets = self._buckets
            if end < buckets.until:  # type: ignore[union-attr]
                buckets.fast += 1  # type: ignore[union-attr]
                return True
        return False

    def __enter__(self) -> CircuitBreaker:
        core = self._core
        if self._mode and core.state is CLOSED:
            permit, start = core.permit, (self._now() if self._timed else 0.0)
        else:
            permit, start = self._sync_acquire()
        self._stack.set((permit, start, self._stack.get()))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry = self._stack.get()
        if entry is None:
            raise RuntimeError(f"{self!r}: __exit__ without a matching __enter__")
        permit, start, prev = entry
        self._stack.set(prev)
        if exc is not None:
            self._sync_exception(permit, exc, start)
        elif self._mode == 1 and self._core.fast and permit is self._core.permit:
            self._ring.seq += 1  # type: ignore[union-attr]
        else:
            self._sync_result(permit, _NO_RESULT, start)

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
        permit = core.permit
        mode = self._mode
        if mode and core.state is CLOSED:
            if mode == 1:
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    self._async_exception(permit, exc, 0.0)
                    raise
                if core.fast and permit is core.permit:
                    self._ring.seq += 1  # type: ignore[union-attr]
                else:
                    self._async_result(permit, result, 0.0, fast=False)
                return result
            now = self._now
            start = now() if self._timed else 0.0
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                self._async_exception(permit, exc, start)
                raise
            end = now()
            if end - start < self._slow_at and core.fast and permit is core.permit:
                if mode == 2:
                    self._ring.seq += 1  # type: ignore[union-attr]
                    return result
                buckets = self._buckets
                if end < buckets.until:  # type: ignore[union-attr]
                    buckets.fast += 1  # type: ignore[union-attr]
                    return result
            self._async_result(permit, result, start, fast=False)
            return result
        permit, start = self._async_acquire()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self._async_exception(permit, exc, start)
            raise
        self._async_result(permit, result, start)
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

    def _async_exception(self, permit: Permit, exc: BaseException, start: float) -> None:
        try:
            failed = self._is_failure(exc)
        except BaseException:
            self._core.release(permit)  # a predicate failed: no outcome, free the slot
            raise
        self._record(permit, failed, start)
        if self._core.events:
            self._emit()

    def _async_result(
        self, permit: Permit, result: object, start: float, fast: bool = True
    ) -> None:
        if fast and self._mode >= 2 and self._fast_success(permit, start):
            return
        try:
            failed = self._is_bad_result(result)
        except BaseException:
            self._core.release(permit)
            raise
        self._record(permit, failed, start)
        if self._core.events:
            self._emit()

    async def __aenter__(self) -> CircuitBreaker:
        core = self._core
        if self._mode and core.state is CLOSED:
            permit, start = core.permit, (self._now() if self._timed else 0.0)
        else:
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
            raise RuntimeError(f"{self!r}: __aexit__ without a matching __aenter__")
        permit, start, prev = entry
        self._stack.set(prev)
        if exc is not None:
            self._async_exception(permit, exc, start)
        elif self._mode == 1 and self._core.fast and permit is self._core.permit:
            self._ring.seq += 1  # type: ignore[union-attr]
        else:
            self._async_result(permit, _NO_RESULT, start)

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
        mode = self._mode
        core = self._core
        ring = self._ring
        now = self._now
        timed = self._timed
        slow_at = self._slow_at
        buckets = self._buckets
        if inspect.iscoroutinefunction(fn):
            call_async = self.call_async
            async_exception = self._async_exception
            async_result = self._async_result

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                permit = core.permit
                if mode and core.state is CLOSED:
                    start = now() if timed else 0.0
                    try:
                        result = await fn(*args, **kwargs)
                    except BaseException as exc:
                        async_exception(permit, exc, start)
                        raise
                    if mode == 1:
                        if core.fast and permit is core.permit:
                            ring.seq += 1  # type: ignore[union-attr]
                        else:
                            async_result(permit, result, start, fast=False)
                        return result
                    end = now()
                    if end - start < slow_at and core.fast and permit is core.permit:
                        if mode == 2:
                            ring.seq += 1  # type: ignore[union-attr]
                            return result
                        if end < buckets.until:  # type: ignore[union-attr]
                            buckets.fast += 1  # type: ignore[union-attr]
                            return result
                    async_result(permit, result, start, fast=False)
                    return result
                return await call_async(fn, *args, **kwargs)

            return async_wrapper
        call = self.call
        sync_exception = self._sync_exception
        sync_result = self._sync_result

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            permit = core.permit
            if mode and core.state is CLOSED:
                start = now() if timed else 0.0
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    sync_exception(permit, exc, start)
                    raise
                if mode == 1:
                    if core.fast and permit is core.permit:
                        ring.seq += 1  # type: ignore[union-attr]
                    else:
                        sync_result(permit, result, start, fast=False)
                    return result
                end = now()
                if end - start < slow_at and core.fast and permit is core.permit:
                    if mode == 2:
                        ring.seq += 1  # type: ignore[union-attr]
                        return result
                    if end < buckets.until:  # type: ignore[union-attr]
                        buckets.fast += 1  # type: ignore[union-attr]
                        return result
                sync_result(permit, result, start, fast=False)
                return result
            return call(fn, *args, **kwargs)

        return wrapper

    # -- internals -------------------------------------------------------------------

    def _refuse(self, rejected: Rejected) -> None:
        raise CircuitOpenError(
            f"circuit breaker {self.name!r} is {rejected.state.value}",
            retry_after=rejected.retry_after,
        )

    def _is_failure(self, exc: BaseException) -> bool | None:
        """True: a failure; None: neither success nor failure (hand the permit back)."""
        if (
            isinstance(exc, self._failure_exceptions)
            and not isinstance(exc, self._ignore_exceptions)
            and (self._failure_predicate is None or self._failure_predicate(exc))
        ):
            return True
        return None

    def _is_bad_result(self, result: object) -> bool:
        rp = self._result_predicate
        return rp is not None and result is not _NO_RESULT and bool(rp(result))

    def _record(self, permit: Permit, failed: bool | None, start: float) -> None:
        """Report an outcome to the core (under the lock in sync code)."""
        if failed is None:
            self._core.release(permit)
            return
        now = self._now()
        duration = now - start if self._timed else 0.0
        if failed:
            self._core.on_failure(permit, now, duration)
        else:
            self._core.on_success(permit, now, duration)

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


__all__ = [
    "DEFAULT_REGISTRY",
    "BreakerStore",
    "CircuitBreaker",
    "Listener",
    "MemoryBreakerStore",
    "SharedState",
]
