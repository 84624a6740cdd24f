"""Scrape-time metrics of breakers, bulkheads and retries."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dsys.errors import BulkheadFullError, ConfigError, ConnectError
from dsys.observability import Metrics
from dsys.resilience import Backoff, Bulkhead, CircuitBreaker, Retry, RetryBudget
from dsys.resilience.metrics import DEFAULT_REGISTRY, collector_for


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_breakers_of_the_same_name_are_aggregated() -> None:
    registry = CollectorRegistry()
    a = CircuitBreaker("db", metrics=registry)
    b = CircuitBreaker("db", metrics=registry)
    a.call(lambda: 1)
    b.call(lambda: 1)
    b.force_open()
    text = scrape(registry)
    assert 'dsys_resilience_breaker_calls_total{breaker="db",outcome="successful"} 2.0' in text
    assert 'dsys_resilience_breaker_state{breaker="db",state="closed"} 1.0' in text
    assert 'dsys_resilience_breaker_state{breaker="db",state="forced_open"} 1.0' in text
    assert text.count('dsys_resilience_breaker_state{breaker="db",state="closed"}') == 1


def test_dead_objects_stop_being_reported() -> None:
    registry = CollectorRegistry()
    b = CircuitBreaker("gone", metrics=registry)
    b.call(lambda: 1)
    assert 'breaker="gone"' in scrape(registry)
    del b
    assert 'breaker="gone"' not in scrape(registry)


async def test_bulkhead_metrics() -> None:
    m = Metrics("svc")
    bulkhead = Bulkhead(1, name="db", metrics=m)
    gate = asyncio.Event()
    holder = asyncio.create_task(bulkhead.call_async(gate.wait))
    await asyncio.sleep(0)
    with pytest.raises(BulkheadFullError):
        await bulkhead.acquire()
    text = m.render().decode()
    assert 'dsys_resilience_bulkhead_active{bulkhead="db"} 1.0' in text
    assert 'dsys_resilience_bulkhead_rejected_total{bulkhead="db"} 1.0' in text
    gate.set()
    await holder
    text = m.render().decode()
    assert 'dsys_resilience_bulkhead_active{bulkhead="db"} 0.0' in text
    assert 'dsys_resilience_bulkhead_completed_total{bulkhead="db"} 1.0' in text


def test_retry_metrics_count_retries_give_ups_and_budget_denials() -> None:
    registry = CollectorRegistry()
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10.0)  # 1 retry
    retry = Retry(
        max_attempts=3,
        backoff=Backoff(initial=0.0, maximum=0.0),
        budget=budget,
        sync_sleep=lambda _: None,
        name="inventory",
        metrics=registry,
    )

    def down() -> None:
        raise ConnectError("refused")

    for _ in range(2):
        with pytest.raises(ConnectError):
            retry.call(down)
    text = scrape(registry)
    assert 'dsys_resilience_retry_retries_total{retry="inventory"} 1.0' in text
    assert 'dsys_resilience_retry_gave_up_total{retry="inventory"} 2.0' in text
    assert 'dsys_resilience_retry_budget_denied_total{retry="inventory"} 2.0' in text


def test_collector_is_registered_once_per_registry() -> None:
    registry = CollectorRegistry()
    assert collector_for(registry) is collector_for(registry)
    assert collector_for(None) is collector_for(DEFAULT_REGISTRY)
    with pytest.raises(ConfigError, match="metrics must be"):
        collector_for("nope")  # type: ignore[arg-type]
