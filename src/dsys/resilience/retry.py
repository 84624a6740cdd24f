"""``Retry``: retry a call with exponential backoff, jitter and a retry budget.

::

    budget = RetryBudget(ratio=0.2, min_retries_per_second=5)     # shared per dependency
    retry = Retry(max_attempts=4, backoff=Backoff(initial=0.05, maximum=2.0), budget=budget)
    value = await retry.call_async(fetch, url)
    value = retry.call(requests_get, url)                          # sync: sleeps the thread

Rules, in order, after a failed attempt:

1. an exception matching ``abort_on`` (default: the caller's own mistakes
   ``BadInputError``, ``ConflictError``, and ``CircuitOpenError``, since retrying into an
   open breaker only adds load) or not matching ``retry_on`` propagates at once;
2. no attempts left (``max_attempts``) propagates the last exception (or returns the
   last result when ``retry_on_result`` asked for a retry);
3. the delay is the backoff's, raised to the error's ``retry_after`` when it carries
   one; if it would end past ``max_elapsed`` or past the enclosing
   :class:`~dsys.resilience.Timeout` deadline, give up now;
4. the retry budget must allow one more retry, else give up (the exception gets a note).

Every call counts as one request in the budget; every retry spends from it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, overload

from prometheus_client import CollectorRegistry

from dsys.clock import Clock
from dsys.errors import BadInputError, CircuitOpenError, ConfigError, ConflictError
from dsys.observability import Metrics
from dsys.resilience.backoff import Backoff, Random, RetryBudget
from dsys.resilience.metrics import collector_for
from dsys.resilience.timeout import remaining

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_ABORT_ON: tuple[type[BaseException], ...] = (
    BadInputError,
    ConflictError,
    CircuitOpenError,
)
"""Exceptions never retried unless ``abort_on`` is given explicitly."""


@dataclass(frozen=True, slots=True)
class RetryAttempt:
    """Passed to ``on_retry`` before sleeping: which retry, after what, sleeping how long."""

    retry: int
    delay: float
    exception: BaseException | None
    result: object = None


class _GiveUp(Exception):
    pass


class Retry:
    """Retries failed calls with backoff (see module doc for the exact rules).

    Args:
        max_attempts: total attempts including the first (>= 1).
        backoff: the delay schedule (default ``Backoff()``: 0.1 s doubling to 10 s, full
            jitter).
        max_elapsed: give up instead of starting a retry that would begin more than this
            many seconds after the first attempt (``None``: no limit).
        retry_on: exception classes to retry, or a predicate on the exception.
        abort_on: exception classes never retried (checked first).
        retry_on_result: return True for a result that should be retried (e.g. a 503).
        budget: a shared :class:`RetryBudget`; ``None`` for no budget.
        clock: time source for ``max_elapsed`` and the budget (default monotonic).
        sleep: async sleep (default ``asyncio.sleep``), injectable for tests.
        sync_sleep: sleep for :meth:`call` (default ``time.sleep``).
        rng: randomness for jitter (default a fresh ``random.Random()``).
        on_retry: called before each retry's sleep.
        name: names the retry in metrics (``dsys_resilience_retry_*{retry=name}``).
        metrics: where the counters are reported (see :mod:`dsys.resilience.metrics`).

    Raises:
        ConfigError: a setting is out of range.
    """

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        backoff: Backoff | None = None,
        max_elapsed: float | None = None,
        retry_on: Sequence[type[BaseException]] | Callable[[BaseException], bool] = (Exception,),
        abort_on: Sequence[type[BaseException]] = DEFAULT_ABORT_ON,
        retry_on_result: Callable[[Any], bool] | None = None,
        budget: RetryBudget | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        sync_sleep: Callable[[float], None] | None = None,
        rng: Random | None = None,
        on_retry: Callable[[RetryAttempt], None] | None = None,
        name: str = "retry",
        metrics: Metrics | CollectorRegistry | None = None,
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
        if max_elapsed is not None and (
            isinstance(max_elapsed, bool)
            or not isinstance(max_elapsed, (int, float))
            or not math.isfinite(max_elapsed)
            or max_elapsed <= 0
        ):
            raise ConfigError(f"max_elapsed must be None or seconds > 0, got {max_elapsed!r}")
        if callable(retry_on) and not isinstance(retry_on, (tuple, list)):
            if isinstance(retry_on, type):
                raise ConfigError("retry_on must be a sequence of exception classes or a predicate")
            self._retry_pred: Callable[[BaseException], bool] | None = retry_on
            self._retry_on: tuple[type[BaseException], ...] = ()
        else:
            self._retry_pred = None
            self._retry_on = _exc_tuple("retry_on", retry_on)
        self._abort_on = _exc_tuple("abort_on", abort_on)
        self.max_attempts = max_attempts
        self.backoff = backoff if backoff is not None else Backoff()
        self.max_elapsed = max_elapsed
        self.retry_on_result = retry_on_result
        self.budget = budget
        self._now = clock.now if clock is not None else time.monotonic
        self._sleep = sleep if sleep is not None else asyncio.sleep
        self._sync_sleep = sync_sleep if sync_sleep is not None else time.sleep
        self._rng: Random = rng if rng is not None else random.Random()
        self._on_retry = on_retry
        self.retries = 0
        """Retries made so far (cumulative)."""
        self.gave_up = 0
        """Calls that failed after giving up on retrying (cumulative)."""
        self.budget_denied = 0
        """Retries the budget refused (cumulative)."""
        self.name = name
        collector_for(metrics).retries.add(self)

    def __repr__(self) -> str:
        return f"Retry(max_attempts={self.max_attempts}, backoff={self.backoff!r})"

    def _retryable(self, exc: BaseException) -> bool:
        if not isinstance(exc, Exception) or isinstance(exc, self._abort_on):
            return False
        if self._retry_pred is not None:
            return self._retry_pred(exc)
        return isinstance(exc, self._retry_on)

    def _next_delay(
        self, attempt: int, started: float, previous: float, exc: BaseException | None
    ) -> float:
        """The delay before the next attempt; raises _GiveUp when there must be none."""
        if attempt >= self.max_attempts:
            raise _GiveUp("no attempts left")
        delay = self.backoff.delay(attempt, previous, self._rng)
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, (int, float)) and retry_after > delay:
            delay = float(retry_after)
        now = self._now()
        if self.max_elapsed is not None and now + delay - started > self.max_elapsed:
            raise _GiveUp(f"max_elapsed {self.max_elapsed:g} s would be exceeded")
        if self.budget is not None and not self.budget.try_spend(now):
            self.budget_denied += 1
            raise _GiveUp("retry budget exhausted")
        return delay

    def _deadline_allows(self, delay: float) -> bool:
        try:
            left = remaining()
        except RuntimeError:  # no running loop: sync call
            return True
        return left is None or delay < left

    def _retry_delay(
        self,
        attempt: int,
        started: float,
        previous: float,
        exc: BaseException | None,
        result: object,
        *,
        deadline: bool,
    ) -> float | None:
        """After a failed attempt: the delay before the next one (announced), or ``None``
        to give up (counted; the exception, if any, gets a note saying why)."""
        try:
            delay = self._next_delay(attempt, started, previous, exc)
            if deadline and not self._deadline_allows(delay):
                raise _GiveUp("the deadline is too close")
        except _GiveUp as stop:
            self.gave_up += 1
            if exc is not None:
                exc.add_note(f"dsys Retry gave up after {attempt} attempt(s): {stop}")
            return None
        self._announce(attempt, delay, exc, result)
        return delay

    async def call_async(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)``, retrying per the rules in the module doc."""
        started = self._now()
        if self.budget is not None:
            self.budget.record_request(started)
        attempt = 0
        previous = 0.0
        while True:
            attempt += 1
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                if not self._retryable(exc):
                    raise
                delay = self._retry_delay(attempt, started, previous, exc, None, deadline=True)
                if delay is None:
                    raise exc from None
            else:
                rr = self.retry_on_result
                if rr is None or not rr(result):
                    return result
                delay = self._retry_delay(attempt, started, previous, None, result, deadline=True)
                if delay is None:
                    return result
            await self._sleep(delay)
            previous = delay

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` (sync), retrying and sleeping the thread between."""
        started = self._now()
        if self.budget is not None:
            self.budget.record_request(started)
        attempt = 0
        previous = 0.0
        while True:
            attempt += 1
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not self._retryable(exc):
                    raise
                delay = self._retry_delay(attempt, started, previous, exc, None, deadline=False)
                if delay is None:
                    raise exc from None
            else:
                rr = self.retry_on_result
                if rr is None or not rr(result):
                    return result
                delay = self._retry_delay(attempt, started, previous, None, result, deadline=False)
                if delay is None:
                    return result
            self._sync_sleep(delay)
            previous = delay

    def _announce(
        self, attempt: int, delay: float, exc: BaseException | None, result: object
    ) -> None:
        self.retries += 1
        if self._on_retry is not None:
            self._on_retry(RetryAttempt(attempt, delay, exc, result))

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate a sync or async function so each call is retried."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.call_async(fn, *args, **kwargs)

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            return self.call(fn, *args, **kwargs)

        return wrapper


def _exc_tuple(label: str, excs: object) -> tuple[type[BaseException], ...]:
    if not isinstance(excs, (tuple, list)) or not all(
        isinstance(e, type) and issubclass(e, BaseException) for e in excs
    ):
        raise ConfigError(f"{label} must be a sequence of exception classes, got {excs!r}")
    return tuple(excs)


__all__ = ["DEFAULT_ABORT_ON", "Retry", "RetryAttempt"]
