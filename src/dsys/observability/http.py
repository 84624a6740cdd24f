"""aiohttp helpers shared by every dsys server.

* :func:`add_observability_routes` adds ``GET /healthz`` and ``GET /metrics``.
* :func:`error_middleware` turns :class:`~dsys.errors.DsysError` and malformed
  requests into JSON error bodies with the right 4xx/5xx status, so a bad request
  never takes a server down and always says what was wrong.
* :func:`parse_listen`, :func:`start_site` and :func:`run_app` bind a server to
  ``HOST:PORT`` (127.0.0.1 unless told otherwise; port 0 picks a free port).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from dsys.errors import (
    BadInputError,
    ConfigError,
    ConflictError,
    DsysError,
    NotFoundError,
    NotLeaderError,
    PayloadTooLargeError,
    RemoteProtocolError,
    RequestTimeout,
    StreamFullError,
    UnavailableError,
)
from dsys.observability.metrics import CONTENT_TYPE, Metrics

HealthCheck = Callable[[], Awaitable[Mapping[str, object]]]
"""An async callable returning health details; ``{"ok": False, ...}`` or raising means unhealthy."""

DEFAULT_HOST = "127.0.0.1"


def json_error(status: int, kind: str, message: str, **extra: object) -> web.Response:
    """A JSON error response ``{"error": kind, "message": message, ...}``."""
    return web.json_response({"error": kind, "message": message, **extra}, status=status)


def add_observability_routes(
    app: web.Application, metrics: Metrics, health: HealthCheck | None = None
) -> None:
    """Add ``GET /healthz`` (200 or 503 with JSON details) and ``GET /metrics`` to ``app``."""

    async def healthz(request: web.Request) -> web.Response:
        details: dict[str, object] = {"ok": True}
        if health is not None:
            try:
                details = {"ok": True, **dict(await health())}
            except Exception as exc:
                details = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return web.json_response(details, status=200 if details.get("ok") else 503)

    async def metrics_handler(request: web.Request) -> web.Response:
        body = metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map dsys errors to HTTP statuses with a JSON body; the server stays up.

    BadInputError -> 400 (a RemoteProtocolError's ``status_hint``; PayloadTooLargeError
    -> 413), NotFoundError -> 404, ConflictError -> 409 (StreamFullError -> 507),
    NotLeaderError -> 307 (with ``Location`` when the leader is known) or 503,
    UnavailableError -> 503 with ``Retry-After``, RequestTimeout -> 504, an oversized
    body -> 413, any other DsysError (e.g. a LocalProtocolError: our own bug) -> 500.
    The KV's fast path gives the same answers from :func:`dsys.kv.api.error_answer`
    (a test compares them).
    """
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except PayloadTooLargeError as exc:
        return json_error(413, "too_large", str(exc))
    except BadInputError as exc:
        status = exc.status_hint if isinstance(exc, RemoteProtocolError) else 400
        return json_error(status, "bad_request", str(exc))
    except NotFoundError as exc:
        return json_error(404, "not_found", str(exc))
    except StreamFullError as exc:
        return json_error(507, "full", str(exc))
    except ConflictError as exc:
        return json_error(409, "conflict", str(exc))
    except NotLeaderError as exc:
        if exc.leader_hint:
            location = exc.leader_hint.rstrip("/") + request.path_qs
            resp = json_error(307, "not_leader", str(exc), leader=exc.leader_hint)
            resp.headers["Location"] = location
            return resp
        resp = json_error(503, "no_leader", str(exc) or "no leader is known")
        resp.headers["Retry-After"] = str(max(1, round(exc.retry_after or 1)))
        return resp
    except UnavailableError as exc:
        resp = json_error(503, "unavailable", str(exc))
        if exc.retry_after is not None:
            resp.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return resp
    except RequestTimeout as exc:
        return json_error(504, "timeout", str(exc))
    except DsysError as exc:
        return json_error(500, type(exc).__name__, str(exc))


def parse_listen(value: str, *, default_port: int = 0) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (or ``:PORT``, ``PORT``, ``[::1]:PORT``) into a (host, port) pair.

    Raises:
        ConfigError: the port is not an integer in 0..65535.
    """
    value = value.strip()
    host, port_text = DEFAULT_HOST, ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ConfigError(f"bad listen address {value!r}: missing ']'")
        host = value[1:end]
        port_text = value[end + 2 :] if value[end + 1 : end + 2] == ":" else ""
    elif ":" in value:
        h, _, port_text = value.rpartition(":")
        host = h or DEFAULT_HOST
    elif value.isdigit():
        port_text = value
    else:
        host = value or DEFAULT_HOST
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad listen address {value!r}: port is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad listen address {value!r}: port {port} is out of range")
    return host, port


async def start_site(
    app: web.Application, host: str = DEFAULT_HOST, port: int = 0, **runner_kwargs: object
) -> tuple[web.AppRunner, int]:
    """Start ``app`` on ``host:port`` and return the runner and the bound port.

    Port 0 binds a free port; the returned port is the one the OS chose. Call
    ``await runner.cleanup()`` to stop.
    """
    runner = web.AppRunner(app, access_log=None, **runner_kwargs)  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    sockets = getattr(site._server, "sockets", None)
    if sockets:
        bound = int(sockets[0].getsockname()[1])
    return runner, bound


async def run_app(
    app: web.Application,
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    on_started: Callable[[int], None] | None = None,
    shutdown_timeout: float = 10.0,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut down gracefully.

    Args:
        on_started: called with the bound port once the server listens.
        shutdown_timeout: seconds in-flight requests get to finish on shutdown.
    """
    runner, bound = await start_site(app, host, port, shutdown_timeout=shutdown_timeout)
    if on_started is not None:
        on_started(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # non-main thread
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


__all__ = [
    "DEFAULT_HOST",
    "HealthCheck",
    "add_observability_routes",
    "error_middleware",
    "json_error",
    "parse_listen",
    "run_app",
    "start_site",
]
