"""structlog set-up: readable key-value lines on a console, JSON lines on request.

JSON is chosen by ``configure_logging(json=True)``, the CLI's ``--log-json`` flag, or
the environment variable ``DSYS_LOG_FORMAT=json``. The level comes from the argument
or ``DSYS_LOG_LEVEL`` (default ``info``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _LiveStderr:
    """A file-like object that writes to whatever ``sys.stderr`` is at write time.

    Binding the logger to the ``sys.stderr`` object of the moment breaks when that
    object is later closed or swapped (pytest's capture, daemonizing tools).
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, json: bool | None = None, level: str | None = None) -> None:
    """Configure structlog for the whole process (call once, early, from a CLI or app).

    Args:
        json: emit one JSON object per line; ``None`` reads ``DSYS_LOG_FORMAT``.
        level: minimum level name; ``None`` reads ``DSYS_LOG_LEVEL`` (default ``info``).
    """
    if json is None:
        json = os.environ.get("DSYS_LOG_FORMAT", "").lower() == "json"
    level_name = (level or os.environ.get("DSYS_LOG_LEVEL", "info")).lower()
    if level_name not in _LEVELS:
        from dsys.errors import ConfigError

        raise ConfigError(f"unknown log level {level_name!r}; use one of {sorted(_LEVELS)}")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level_name]),
        logger_factory=structlog.PrintLoggerFactory(file=_LiveStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get_logger(component: str, **bound: Any) -> Any:
    """Return a structlog logger bound to ``component`` and any extra key-values."""
    return structlog.get_logger("dsys").bind(component=component, **bound)


__all__ = ["configure_logging", "get_logger"]
