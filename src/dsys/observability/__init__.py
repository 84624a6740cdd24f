"""Logging, metrics and the ``/healthz`` + ``/metrics`` endpoints every dsys server exposes."""

from __future__ import annotations

from dsys.observability.http import (
    HealthCheck,
    add_observability_routes,
    error_middleware,
    json_error,
    parse_listen,
    run_app,
    start_site,
)
from dsys.observability.logging import configure_logging, get_logger
from dsys.observability.metrics import Metrics, RequestStats

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
