"""Differential test: CircuitBreaker (fast paths included) against a naive model of the spec."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from dsys.clock import ManualClock
from dsys.errors import CircuitOpenError
from dsys.resilience import BreakerState, CircuitBreaker, TimeWindow

SIZE, MIN, THRESHOLD, SLOW_THRESHOLD, SLOW_AT, N, WAIT, MULT, WAIT_MAX = (
    8,
    4,
    50.0,
    75.0,
    1.0,
    2,
    5.0,
    2.0,
    20.0,
)


SECONDS, BUCKETS = 10.0, 5


@dataclass
class Model:
    """The breaker spec written the obvious way: a list of outcomes, recomputed rates."""

    slow_detection: bool
    time_window: bool = False
    state: str = "closed"
    window: deque[tuple[bool, bool]] = field(default_factory=lambda: deque(maxlen=SIZE))
    timed: list[tuple[int, bool, bool]] = field(default_factory=list)  # (bucket, failed, slow)
    trial: list[tuple[bool, bool]] = field(default_factory=list)
    open_until: float = 0.0
    wait: float = WAIT

    def call(self, start: float, duration: float, failed: bool) -> str:
        if self.state == "open":
            if start < self.open_until:
                return "rejected"
            self.state = "half_open"
            self.trial = []
        end = start + duration
        slow = self.slow_detection and duration >= SLOW_AT
        if self.state == "closed":
            if self.time_window:
                head = int(end // (SECONDS / BUCKETS))
                self.timed.append((head, failed, slow))
                live = [(f, s) for b, f, s in self.timed if b > head - BUCKETS]
            else:
                self.window.append((failed, slow))
                live = list(self.window)
            if len(live) >= MIN:
                fr = 100 * sum(f for f, _ in live) / len(live)
                sr = 100 * sum(s for _, s in live) / len(live)
                if fr >= THRESHOLD or sr >= SLOW_THRESHOLD:
                    self._open(end)
        else:
            self.trial.append((failed, slow))
            if len(self.trial) == N:
                fr = 100 * sum(f for f, _ in self.trial) / N
                sr = 100 * sum(s for _, s in self.trial) / N
                if fr >= THRESHOLD or sr >= SLOW_THRESHOLD:
                    self.wait = min(self.wait * MULT, WAIT_MAX)
                    self._open(end)
                else:
                    self.wait = WAIT
                    self.state = "closed"
                    self.window.clear()
                    self.timed.clear()
        return "failed" if failed else "ok"

    def _open(self, now: float) -> None:
        self.state = "open"
        self.open_until = now + self.wait


class Boom(Exception):
    pass


ops = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.booleans()),
        st.tuples(st.just("advance"), st.sampled_from([1.0, 3.0, 5.0, 10.0, 30.0]), st.just(False)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    steps=ops,
    slow_detection=st.booleans(),
    time_window=st.booleans(),
    entry=st.sampled_from(["call", "decorator", "with", "call_async", "adecorator", "async_with"]),
)
def test_breaker_matches_the_model(
    steps: list[tuple[str, float, bool]], slow_detection: bool, time_window: bool, entry: str
) -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(
        "model",
        window=TimeWindow(seconds=SECONDS, buckets=BUCKETS) if time_window else SIZE,
        minimum_calls=MIN,
        failure_rate_threshold=THRESHOLD,
        slow_call_rate_threshold=SLOW_THRESHOLD,
        slow_call_duration=SLOW_AT if slow_detection else None,
        permitted_calls_in_half_open=N,
        open_wait=WAIT,
        open_wait_multiplier=MULT,
        open_wait_max=WAIT_MAX,
        clock=clock,
        metrics=CollectorRegistry(),
    )
    model = Model(slow_detection, time_window)

    def work(duration: float, failed: bool) -> str:
        clock.advance(duration)
        if failed:
            raise Boom()
        return "ok"

    async def awork(duration: float, failed: bool) -> str:
        return work(duration, failed)

    async def in_block(duration: float, failed: bool) -> str:
        async with breaker:
            return work(duration, failed)

    decorated = breaker(work)
    adecorated = breaker(awork)
    loop = asyncio.new_event_loop()

    try:
        for kind, amount, failed in steps:
            if kind == "advance":
                clock.advance(amount)
                continue
            expected = model.call(clock.now(), amount, failed)
            try:
                if entry == "call":
                    breaker.call(work, amount, failed)
                elif entry == "decorator":
                    decorated(amount, failed)
                elif entry == "with":
                    with breaker:
                        work(amount, failed)
                elif entry == "call_async":
                    loop.run_until_complete(breaker.call_async(awork, amount, failed))
                elif entry == "adecorator":
                    loop.run_until_complete(adecorated(amount, failed))
                else:
                    loop.run_until_complete(in_block(amount, failed))
                got = "ok"
            except Boom:
                got = "failed"
            except CircuitOpenError:
                got = "rejected"
            assert got == expected
            assert breaker.state is BreakerState(model.state)
    finally:
        loop.close()
