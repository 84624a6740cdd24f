"""Load balancing: strategies, endpoint health, a client-side Session and a reverse proxy.

* :mod:`dsys.balance.strategies` (pure): round robin (nginx's smooth weighted), random,
  least outstanding, power of two choices, peak-EWMA, consistent hash with bounded loads.
* :mod:`dsys.balance.health` (pure): active health-check thresholds and passive
  outlier detection with growing ejections and a max-ejection percentage.
* :class:`Pool`: a dynamic endpoint set (add/remove/drain) tying the two together,
  with a circuit breaker per endpoint.
* :class:`Session`: client-side balancing over an aiohttp ``ClientSession`` with
  retries under a retry budget, per-try timeouts and a total deadline.
* :class:`LoadBalancer` / ``dsys lb serve``: an HTTP/1.1 + WebSocket reverse proxy.
"""

from __future__ import annotations

from dsys.balance.health import HealthCheckConfig, OutlierConfig, OutlierDetector
from dsys.balance.pool import Pool, PoolConfig
from dsys.balance.proxy import LoadBalancer, ProxyConfig
from dsys.balance.session import Response, Session, SessionConfig
from dsys.balance.strategies import STRATEGIES, Picker, make_picker

__all__ = [
    "STRATEGIES",
    "HealthCheckConfig",
    "LoadBalancer",
    "OutlierConfig",
    "OutlierDetector",
    "Picker",
    "Pool",
    "PoolConfig",
    "ProxyConfig",
    "Response",
    "Session",
    "SessionConfig",
    "make_picker",
]
