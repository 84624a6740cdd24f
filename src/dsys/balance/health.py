"""Endpoint health: active checks and passive outlier detection (pure).

Theory of operation
-------------------
Two independent signals decide whether an endpoint may receive traffic:

**Active health checks** (:class:`ActiveHealth`): the adapter probes each endpoint
every ``interval`` seconds (e.g. ``GET /healthz``) and reports the outcome. An
endpoint turns *unhealthy* after ``unhealthy_threshold`` consecutive failed probes
and *healthy* again after ``healthy_threshold`` consecutive good ones::

    HEALTHY --(unhealthy_threshold failures in a row)--> UNHEALTHY
    UNHEALTHY --(healthy_threshold successes in a row)--> HEALTHY

**Passive outlier detection** (:class:`OutlierDetector`, after Envoy): real traffic
is watched. ``consecutive_errors`` failures in a row (5xx answers or connect
errors) eject the endpoint for ``base_ejection_time * n`` seconds, where ``n``
counts its ejections (capped at ``max_ejection_time``), so a flapping endpoint stays
out longer each time. The multiplier shrinks by one for every ``base_ejection_time``
the endpoint then spends in the pool without being ejected. At most
``max_ejection_percent`` of the endpoints are ejected at once, and never the last
one, so outlier detection can never empty the pool::

    IN --(consecutive_errors failures, room under the cap)--> EJECTED(until)
    EJECTED --(now >= until, on tick)--> IN

Both take ``now`` as an argument and return events instead of logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsys.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheckConfig:
    """How active health checks probe endpoints.

    Attributes:
        path: HTTP path probed with GET; a 2xx answer is a success.
        interval: seconds between probes of one endpoint.
        timeout: seconds one probe may take.
        healthy_threshold: consecutive successes that mark an endpoint healthy.
        unhealthy_threshold: consecutive failures that mark it unhealthy.
    """

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ConfigError(f"health check path must start with '/' (got {self.path!r})")
        if self.interval <= 0 or self.timeout <= 0:
            raise ConfigError("health check interval and timeout must be > 0")
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise ConfigError("health check thresholds must be >= 1")


@dataclass(frozen=True, slots=True)
class BecameHealthy:
    """An endpoint passed ``healthy_threshold`` probes in a row."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class BecameUnhealthy:
    """An endpoint failed ``unhealthy_threshold`` probes in a row."""

    endpoint: str
    reason: str


class ActiveHealth:
    """Consecutive-probe state of one endpoint.

    Args:
        endpoint: the endpoint's id (for events).
        config: thresholds.
        healthy: the starting state (healthy by default so traffic flows at once).
    """

    __slots__ = ("_config", "_fails", "_oks", "endpoint", "healthy")

    def __init__(self, endpoint: str, config: HealthCheckConfig, *, healthy: bool = True) -> None:
        self.endpoint = endpoint
        self._config = config
        self.healthy = healthy
        self._oks = 0
        self._fails = 0

    def record(self, ok: bool, reason: str = "") -> BecameHealthy | BecameUnhealthy | None:
        """Record one probe outcome; returns the transition it caused, if any."""
        if ok:
            self._fails = 0
            self._oks += 1
            if not self.healthy and self._oks >= self._config.healthy_threshold:
                self.healthy = True
                return BecameHealthy(self.endpoint)
        else:
            self._oks = 0
            self._fails += 1
            if self.healthy and self._fails >= self._config.unhealthy_threshold:
                self.healthy = False
                return BecameUnhealthy(self.endpoint, reason)
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierConfig:
    """When passive outlier detection ejects an endpoint.

    Attributes:
        consecutive_errors: failures in a row that eject (5xx or connect errors).
        base_ejection_time: seconds of the first ejection; the n-th lasts n times longer.
        max_ejection_time: cap on one ejection's length.
        max_ejection_percent: most endpoints (in percent) ejected at once; the last
            endpoint is never ejected whatever this says.
    """

    consecutive_errors: int = 5
    base_ejection_time: float = 10.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 50.0

    def __post_init__(self) -> None:
        if self.consecutive_errors < 1:
            raise ConfigError("consecutive_errors must be >= 1")
        if self.base_ejection_time <= 0 or self.max_ejection_time < self.base_ejection_time:
            raise ConfigError("need 0 < base_ejection_time <= max_ejection_time")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ConfigError("max_ejection_percent must be in 0..100")


@dataclass(frozen=True, slots=True)
class Ejected:
    """An endpoint was ejected until ``until`` (its ``count``-th ejection in a row)."""

    endpoint: str
    until: float
    count: int


@dataclass(frozen=True, slots=True)
class Returned:
    """An ejected endpoint's time is up; it takes traffic again."""

    endpoint: str


@dataclass(slots=True)
class _Outlier:
    failures: int = 0
    multiplier: int = 0  # invariant: >= 0
    ejected_until: float | None = None
    calm_since: float = 0.0  # when it last returned or the multiplier last shrank
    total_ejections: int = 0


@dataclass(slots=True)
class OutlierDetector:
    """Passive outlier detection over a set of endpoints.

    Args:
        config: thresholds and ejection times.
    """

    config: OutlierConfig = field(default_factory=OutlierConfig)
    _state: dict[str, _Outlier] = field(default_factory=dict)
    _ejected: int = 0  # invariant: == number of states with ejected_until set

    def add(self, endpoint: str) -> None:
        """Start watching ``endpoint`` (no-op when already watched)."""
        self._state.setdefault(endpoint, _Outlier())

    def remove(self, endpoint: str) -> None:
        """Stop watching ``endpoint``."""
        st = self._state.pop(endpoint, None)
        if st is not None and st.ejected_until is not None:
            self._ejected -= 1

    def is_ejected(self, endpoint: str) -> bool:
        """Whether ``endpoint`` is currently ejected (until the next :meth:`tick`)."""
        st = self._state.get(endpoint)
        return st is not None and st.ejected_until is not None

    def ejected_until(self, endpoint: str) -> float | None:
        """When ``endpoint``'s current ejection ends, or ``None`` if it is in."""
        st = self._state.get(endpoint)
        return None if st is None else st.ejected_until

    def ejections(self, endpoint: str) -> int:
        """How many times ``endpoint`` has been ejected since it was added."""
        st = self._state.get(endpoint)
        return 0 if st is None else st.total_ejections

    @property
    def ejected_count(self) -> int:
        """Number of endpoints ejected right now."""
        return self._ejected

    def _room(self) -> bool:
        total = len(self._state)
        if self._ejected + 1 >= total:  # never eject the last endpoint in
            return False
        if self._ejected == 0 and self.config.max_ejection_percent > 0:
            return True  # one ejection is always allowed when >= 2 are in
        return (self._ejected + 1) * 100 <= self.config.max_ejection_percent * total

    def record_success(self, endpoint: str, *, now: float) -> None:
        """A request to ``endpoint`` succeeded: reset its error run."""
        st = self._state.get(endpoint)
        if st is not None:
            st.failures = 0

    def record_failure(self, endpoint: str, *, now: float) -> Ejected | None:
        """A request to ``endpoint`` failed (5xx or connect error).

        Returns:
            :class:`Ejected` when this failure ejected it, else ``None``.
        """
        st = self._state.get(endpoint)
        if st is None or st.ejected_until is not None:
            return None
        st.failures += 1
        if st.failures < self.config.consecutive_errors or not self._room():
            return None
        self._decay(st, now)
        st.multiplier += 1
        st.total_ejections += 1
        st.failures = 0
        length = min(self.config.base_ejection_time * st.multiplier, self.config.max_ejection_time)
        st.ejected_until = now + length
        self._ejected += 1
        return Ejected(endpoint, st.ejected_until, st.multiplier)

    def _decay(self, st: _Outlier, now: float) -> None:
        base = self.config.base_ejection_time
        while st.multiplier > 0 and now - st.calm_since >= base:
            st.multiplier -= 1
            st.calm_since += base

    def tick(self, *, now: float) -> list[Returned]:
        """Return endpoints whose ejection is over; call every second or so."""
        out: list[Returned] = []
        for ep, st in self._state.items():
            if st.ejected_until is not None and now >= st.ejected_until:
                st.ejected_until = None
                st.failures = 0
                st.calm_since = now
                self._ejected -= 1
                out.append(Returned(ep))
        return out


__all__ = [
    "ActiveHealth",
    "BecameHealthy",
    "BecameUnhealthy",
    "Ejected",
    "HealthCheckConfig",
    "OutlierConfig",
    "OutlierDetector",
    "Returned",
]
