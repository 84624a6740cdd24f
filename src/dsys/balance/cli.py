"""``dsys lb serve``: run the load-balancing reverse proxy from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from dsys.balance.health import HealthCheckConfig, OutlierConfig
from dsys.balance.pool import PoolConfig, normalize_endpoint
from dsys.balance.proxy import ProxyConfig, serve
from dsys.balance.strategies import STRATEGIES
from dsys.errors import ConfigError
from dsys.observability import get_logger, parse_listen


def _backend(value: str) -> tuple[str, int]:
    url, _, weight = value.partition(",weight=")
    try:
        w = int(weight) if weight else 1
        return normalize_endpoint(url), w
    except (ValueError, ConfigError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dsys lb ...`` (alias ``dsys balance ...``) to the CLI."""
    lb = subparsers.add_parser(
        "lb",
        aliases=["balance"],
        help="load-balancing HTTP/WebSocket reverse proxy",
        description="Run a load-balancing HTTP/1.1 and WebSocket reverse proxy with health "
        "checks, outlier ejection, circuit breakers and an admin API.",
    )
    lb.set_defaults(block_parser=lb)
    verbs = lb.add_subparsers(dest="verb", metavar="<verb>")
    s = verbs.add_parser(
        "serve",
        help="run the reverse proxy",
        description="Proxy requests on --listen to the --backend endpoints with the chosen "
        "strategy; /_dsys/ (or --admin-listen) serves the admin API, /healthz and /metrics.",
    )
    s.add_argument("--listen", default="127.0.0.1:7301", help="HOST:PORT (port 0: any)")
    s.add_argument(
        "--backend",
        action="append",
        type=_backend,
        default=[],
        metavar="URL[,weight=N]",
        help="an upstream endpoint, e.g. http://127.0.0.1:9001 (repeat; more via the admin API)",
    )
    s.add_argument(
        "--strategy", default="p2c-ewma", choices=STRATEGIES, help="how to pick an endpoint"
    )
    s.add_argument(
        "--ewma-decay", type=float, default=2.0, help="p2c-ewma: seconds for a peak to fade"
    )
    s.add_argument("--seed", type=int, default=None, help="seed for randomized strategies")
    s.add_argument("--admin-listen", default=None, help="separate HOST:PORT for the admin API")
    s.add_argument(
        "--admin-prefix", default="/_dsys", help="admin path prefix on the proxy port ('' = off)"
    )
    s.add_argument("--health-path", default="/healthz", help="active health-check path")
    s.add_argument("--health-interval", type=float, default=5.0, help="seconds between probes")
    s.add_argument("--no-health-check", action="store_true", help="disable active checks")
    s.add_argument("--max-tries", type=int, default=3, help="tries per request (retries safe)")
    s.add_argument(
        "--connect-timeout", type=float, default=2.0, help="seconds to open an upstream connection"
    )
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to response headers")
    s.add_argument("--eject-after", type=int, default=5, help="consecutive errors that eject")
    s.add_argument("--ejection-time", type=float, default=10.0, help="base ejection seconds")
    s.add_argument(
        "--max-ejection-percent",
        type=float,
        default=50.0,
        help="most endpoints (percent) outlier detection may eject at once",
    )
    s.add_argument(
        "--admin-token",
        default=os.environ.get("DSYS_LB_ADMIN_TOKEN"),
        help="bearer token admin changes need (env DSYS_LB_ADMIN_TOKEN); "
        "without one, only loopback clients may change endpoints",
    )
    s.add_argument(
        "--no-circuit-breaker", action="store_true", help="no per-endpoint circuit breaker"
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on shutdown",
    )
    s.add_argument("--max-connections", type=int, default=512, help="upstream connections")
    s.add_argument("--no-fast-path", action="store_true", help="send every request through aiohttp")
    s.add_argument(
        "--ws-mode",
        choices=("splice", "frames"),
        default=os.environ.get("DSYS_LB_WS_MODE", "splice"),
        help="WebSockets: splice (check the handshake, then copy bytes both ways; needs the "
        "fast path) or frames (aiohttp both sides: message size limit, 1001 on shutdown); "
        "env DSYS_LB_WS_MODE",
    )
    s.add_argument(
        "--ws-idle-timeout",
        type=float,
        default=0.0,
        help="splice mode: close a WebSocket after this many seconds without a byte "
        "either way (0: never)",
    )
    s.add_argument(
        "--uvloop", action="store_true", help="run on uvloop when it is installed (faster)"
    )
    s.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen, default_port=7301)
    admin = parse_listen(args.admin_listen) if args.admin_listen else None
    health = (
        None
        if args.no_health_check
        else HealthCheckConfig(path=args.health_path, interval=args.health_interval)
    )
    config = ProxyConfig(
        backends=tuple(args.backend),
        pool=PoolConfig(
            strategy=args.strategy,
            seed=args.seed,
            ewma_decay=args.ewma_decay,
            health_check=health,
            outlier=OutlierConfig(
                consecutive_errors=args.eject_after,
                base_ejection_time=args.ejection_time,
                max_ejection_time=max(300.0, args.ejection_time),
                max_ejection_percent=args.max_ejection_percent,
            ),
            circuit_breaker=not args.no_circuit_breaker,
        ),
        max_tries=args.max_tries,
        connect_timeout=args.connect_timeout,
        timeout=args.timeout,
        shutdown_timeout=args.shutdown_timeout,
        max_connections=args.max_connections,
        admin_prefix=args.admin_prefix,
        admin_token=args.admin_token or None,
        fast_path=not args.no_fast_path,
        ws_mode=args.ws_mode,
        ws_idle_timeout=args.ws_idle_timeout or None,
    )
    log = get_logger("balance")

    def started(bound: int, admin_port: int | None) -> None:
        # One JSON line on stdout so scripts and tests can find the ports.
        print(
            json.dumps({"listening": f"{host}:{bound}", "port": bound, "admin_port": admin_port}),
            flush=True,
        )
        log.info(
            "lb_listening",
            port=bound,
            admin_port=admin_port,
            backends=len(config.backends),
            strategy=args.strategy,
        )

    main = serve(config, host=host, port=port, admin=admin, on_started=started)
    if args.uvloop:
        try:
            import uvloop  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            print("dsys: uvloop is not installed; using asyncio's loop", file=sys.stderr)
        else:
            uvloop.run(main)
            return 0
    asyncio.run(main)
    return 0


__all__ = ["register"]
