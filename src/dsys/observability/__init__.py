"""Logging, metrics and the ``/healthz`` + ``/metrics`` endpoints every dsys server exposes."""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

from dsys.observability.logging import configure_logging, get_logger
from dsys.observability.metrics import Metrics, RequestStats

if _TYPE_CHECKING:
    from dsys.observability.http import (
        HealthCheck,
        add_observability_routes,
        error_middleware,
        json_error,
        parse_listen,
        run_app,
        start_site,
    )

# The HTTP helpers import aiohttp (a quarter of a second): loaded on first use, so that a
# CLI that only logs (``dsys jobs --help``, ``dsys jobs ls`` on redis) starts without it.
_HTTP = frozenset(
    {
        "HealthCheck",
        "add_observability_routes",
        "error_middleware",
        "json_error",
        "parse_listen",
        "run_app",
        "start_site",
    }
)


def __getattr__(name: str) -> object:
    """Load an HTTP helper on first access and keep it as a module attribute."""
    if name not in _HTTP:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module("dsys.observability.http"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _HTTP)


__all__ = [
    "HealthCheck",
    "Metrics",
    "RequestStats",
    "add_observability_routes",
    "configure_logging",
    "error_middleware",
    "get_logger",
    "json_error",
    "parse_listen",
    "run_app",
    "start_site",
]
