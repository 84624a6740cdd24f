"""``Policy``: compose fallback, timeout, retry, circuit breaker and bulkhead.

A policy is an immutable chain built by naming the pieces **from the outside in**: the
first one named wraps everything after it, the last one sits right around the call::

    policy = (
        Policy.fallback(lambda exc: CACHED)        # 1. last resort: a cached answer
        .timeout(2.0)                              # 2. the whole operation, retries included
        .retry(max_attempts=3, budget=budget)      # 3. retry each failed attempt...
        .breaker(breaker)                          # 4. ...through the breaker (sees each attempt)
        .bulkhead(10)                              # 5. at most 10 attempts in flight
        .timeout(0.5)                              # 6. each attempt on its own
    )
    value = await policy.call_async(fetch, url)

That is the recommended order (it is Polly's and resilience4j's): the breaker inside the
retry sees every attempt and the retry stops on ``CircuitOpenError``; a per-attempt
timeout inside the breaker turns hangs into failures the breaker counts; the bulkhead
innermost limits attempts actually in flight. Any other order is allowed and means
exactly what it says. Policies are async (timeouts and bulkheads need the event loop);
for sync code use ``CircuitBreaker.call`` and ``Retry.call`` directly.

``Policy.timeout(...)`` starts a chain from the class; every method returns a new
policy, so a chain can be shared and extended safely.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from dsys.errors import ConfigError
from dsys.resilience.backoff import Backoff, RetryBudget
from dsys.resilience.breaker import CircuitBreaker
from dsys.resilience.bulkhead import Bulkhead
from dsys.resilience.retry import Retry
from dsys.resilience.timeout import Timeout

P = ParamSpec("P")
Q = ParamSpec("Q")
R = TypeVar("R")

Thunk = Callable[[], Awaitable[Any]]
Step = Callable[[Thunk], Awaitable[Any]]


class Fallback:
    """Turn failures into a value: ``handler(exc)`` (sync or async) answers instead.

    Args:
        handler: called with the exception; its (awaited) return value is the result.
        on: exception classes handled (default ``Exception``; never cancellation).
    """

    __slots__ = ("_handler", "_on")

    def __init__(
        self,
        handler: Callable[[BaseException], Any],
        *,
        on: Sequence[type[BaseException]] = (Exception,),
    ) -> None:
        if not callable(handler):
            raise ConfigError(f"fallback handler must be callable, got {handler!r}")
        if not all(isinstance(e, type) and issubclass(e, Exception) for e in on):
            raise ConfigError(f"fallback 'on' must be Exception subclasses, got {on!r}")
        self._handler = handler
        self._on = tuple(on)

    async def call_async(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)``; on a handled exception return the handler's value."""
        try:
            return await fn(*args, **kwargs)
        except self._on as exc:
            value = self._handler(exc)
            if inspect.isawaitable(value):
                value = await value
            return value  # type: ignore[no-any-return]


class _Builder(Generic[Q]):
    """Makes a Policy method callable on the class (starting a chain) or an instance."""

    def __init__(self, fn: Callable[Concatenate[Policy, Q], Policy]) -> None:
        self._fn = fn
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __get__(self, obj: Policy | None, owner: type[Policy]) -> Callable[Q, Policy]:
        fn = self._fn
        target = obj if obj is not None else owner()

        @functools.wraps(fn)
        def bound(*args: Q.args, **kwargs: Q.kwargs) -> Policy:
            return fn(target, *args, **kwargs)

        return bound


class Policy:
    """An immutable chain of resilience steps, outermost first (see the module doc)."""

    __slots__ = ("_names", "_steps")

    def __init__(self, steps: tuple[Step, ...] = (), names: tuple[str, ...] = ()) -> None:
        self._steps = steps
        self._names = names

    def __repr__(self) -> str:
        return "Policy(" + " -> ".join(self._names) + ")"

    @property
    def steps(self) -> tuple[str, ...]:
        """Descriptions of the steps, outermost first."""
        return self._names

    def _then(self, step: Step, name: str) -> Policy:
        return Policy((*self._steps, step), (*self._names, name))

    def _timeout(self, seconds: float | Timeout) -> Policy:
        """Add a time limit around everything that follows (see :class:`Timeout`)."""
        t = seconds if isinstance(seconds, Timeout) else Timeout(seconds)

        async def step(inner: Thunk) -> Any:
            async with t:
                return await inner()

        return self._then(step, f"timeout({t.seconds:g})")

    def _retry(
        self,
        retry: Retry | None = None,
        *,
        max_attempts: int = 3,
        backoff: Backoff | None = None,
        max_elapsed: float | None = None,
        budget: RetryBudget | None = None,
    ) -> Policy:
        """Retry everything that follows: a ready :class:`Retry`, or one built from the args."""
        r = (
            retry
            if retry is not None
            else Retry(
                max_attempts=max_attempts, backoff=backoff, max_elapsed=max_elapsed, budget=budget
            )
        )

        async def step(inner: Thunk) -> Any:
            return await r.call_async(inner)

        return self._then(step, f"retry({r.max_attempts})")

    def _breaker(self, breaker: CircuitBreaker) -> Policy:
        """Send everything that follows through ``breaker``."""
        if not isinstance(breaker, CircuitBreaker):
            raise ConfigError(f"breaker must be a CircuitBreaker, got {breaker!r}")

        async def step(inner: Thunk) -> Any:
            return await breaker.call_async(inner)

        return self._then(step, f"breaker({breaker.name})")

    def _bulkhead(self, bulkhead: Bulkhead | int, *, max_queue: int = 0) -> Policy:
        """Limit the concurrency of everything that follows (a Bulkhead or a slot count)."""
        b = bulkhead if isinstance(bulkhead, Bulkhead) else Bulkhead(bulkhead, max_queue=max_queue)

        async def step(inner: Thunk) -> Any:
            return await b.call_async(inner)

        return self._then(step, f"bulkhead({b.max_concurrent})")

    def _fallback(
        self,
        handler: Callable[[BaseException], Any],
        *,
        on: Sequence[type[BaseException]] = (Exception,),
    ) -> Policy:
        """On a failure of everything that follows, answer ``handler(exc)`` (see Fallback)."""
        fb = Fallback(handler, on=on)

        async def step(inner: Thunk) -> Any:
            return await fb.call_async(inner)

        return self._then(step, "fallback")

    timeout = _Builder(_timeout)
    """``timeout(seconds | Timeout)``: a time limit around everything that follows."""
    retry = _Builder(_retry)
    """``retry(Retry | None, *, max_attempts=3, backoff=None, max_elapsed=None, budget=None)``:
    retry everything that follows."""
    breaker = _Builder(_breaker)
    """``breaker(CircuitBreaker)``: send everything that follows through the breaker."""
    bulkhead = _Builder(_bulkhead)
    """``bulkhead(Bulkhead | int, *, max_queue=0)``: bound the concurrency of what follows."""
    fallback = _Builder(_fallback)
    """``fallback(handler, *, on=(Exception,))``: answer ``handler(exc)`` on failure."""

    async def call_async(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)`` through every step, outermost first."""
        thunk: Thunk = functools.partial(fn, *args, **kwargs)
        for step in reversed(self._steps):
            thunk = functools.partial(step, thunk)
        return await thunk()  # type: ignore[no-any-return]

    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        """Decorate a coroutine function so each call goes through the policy."""

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return await self.call_async(fn, *args, **kwargs)

        return wrapper


__all__ = ["Fallback", "Policy"]
