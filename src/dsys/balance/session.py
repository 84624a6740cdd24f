"""Client-side load balancing: :class:`Session` spreads HTTP requests over a :class:`Pool`.

::

    async with Session(["http://127.0.0.1:9001", "http://127.0.0.1:9002"]) as s:
        resp = await s.get("/items/42")          # balanced, retried when safe
        resp.raise_for_status()
        item = resp.json()

Each request picks an endpoint with the pool's strategy (peak-EWMA by default) and
runs through that endpoint's circuit breaker. A failed try is retried on another
endpoint when that is safe and the shared retry budget allows it:

* connect errors: always (the request never reached a server);
* dropped connections, timeouts and 502/503/504 answers: idempotent methods only
  (``GET``, ``HEAD``, ``OPTIONS``, ``PUT``, ``DELETE``, ``TRACE``), or any method
  when the caller passes ``idempotent=True``.

Every try has its own timeout (``try_timeout``) and the whole call a deadline
(``deadline``); the last try gets whatever time is left. Bodies are read whole,
up to ``max_body`` bytes, so a :class:`Response` is plain data.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from dsys.balance.pool import Lease, Pool, PoolConfig
from dsys.clock import Clock
from dsys.errors import (
    BadInputError,
    CircuitOpenError,
    ClosedError,
    ConfigError,
    ConnectError,
    NoHealthyBackendError,
    RemoteProtocolError,
    RequestTimeout,
    TransportError,
)
from dsys.resilience import RetryBudget

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods retried by default (RFC 9110 section 9.2.2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """Retry, timeout and balancing settings of a :class:`Session`.

    Attributes:
        pool: strategy, health checks, ejection and circuit breakers.
        max_tries: attempts per request, the first included.
        try_timeout: seconds one try may take (connect, send, read the whole answer).
        deadline: seconds the whole request may take, retries included.
        retry_statuses: answers retried (idempotent requests only).
        retry_ratio: retries allowed as a fraction of requests (the retry budget).
        min_retries_per_second: retries always allowed, so a quiet client can retry.
        max_body: largest response body accepted, in bytes.
    """

    pool: PoolConfig = field(default_factory=PoolConfig)
    max_tries: int = 3
    try_timeout: float = 5.0
    deadline: float = 15.0
    retry_statuses: frozenset[int] = frozenset({502, 503, 504})
    retry_ratio: float = 0.2
    min_retries_per_second: float = 10.0
    max_body: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_tries < 1:
            raise ConfigError(f"max_tries must be >= 1 (got {self.max_tries})")
        if self.try_timeout <= 0 or self.deadline <= 0:
            raise ConfigError("try_timeout and deadline must be > 0")
        if self.max_body < 0:
            raise ConfigError("max_body must be >= 0")


@dataclass(frozen=True, slots=True)
class Response:
    """A complete HTTP answer and where it came from.

    Attributes:
        status: HTTP status code.
        headers: response headers.
        body: the whole body.
        endpoint: the endpoint that answered.
        tries: how many tries the request took.
    """

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    endpoint: str
    tries: int

    @property
    def ok(self) -> bool:
        """Whether the status is below 400."""
        return self.status < 400

    def text(self, encoding: str = "utf-8") -> str:
        """The body decoded as text."""
        return self.body.decode(encoding, errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            RemoteProtocolError: the body is not valid JSON.
        """
        try:
            return jsonlib.loads(self.body)
        except ValueError as exc:
            raise RemoteProtocolError(f"{self.endpoint} sent invalid JSON: {exc}") from None

    def raise_for_status(self) -> None:
        """Raise :class:`BadInputError` for 4xx and :class:`TransportError` for 5xx."""
        if 400 <= self.status < 500:
            raise BadInputError(f"{self.endpoint} answered {self.status}: {self.text()[:200]}")
        if self.status >= 500:
            raise TransportError(f"{self.endpoint} answered {self.status}: {self.text()[:200]}")


class _Retryable(Exception):
    def __init__(self, error: TransportError, *, always: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.always = always  # safe to retry whatever the method


class Session:
    """Balanced HTTP requests over a pool of endpoints, with safe retries.

    Args:
        endpoints: endpoint URLs or ``(url, weight)`` pairs; or pass ``pool``.
        config: retry, timeout and balancing settings.
        pool: an existing :class:`Pool` to balance over (shared with others).
        session: an existing aiohttp ``ClientSession`` (not closed by :meth:`close`).
        clock: time source for the pool (ignored when ``pool`` is given).
    """

    def __init__(
        self,
        endpoints: Iterable[str | tuple[str, int]] = (),
        *,
        config: SessionConfig | None = None,
        pool: Pool | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config or SessionConfig()
        self.pool = (
            pool if pool is not None else Pool(endpoints, config=self.config.pool, clock=clock)
        )
        self._session = session
        self._own_session = session is None
        self._closed = False
        self.budget = RetryBudget(
            ratio=self.config.retry_ratio,
            min_retries_per_second=self.config.min_retries_per_second,
        )

    async def __aenter__(self) -> Session:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClosedError("the balanced session is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256), raise_for_status=False
            )
            self.pool.start_health_checks(self._session)
        return self._session

    async def close(self) -> None:
        """Stop health checks and close the aiohttp session if this object made it."""
        if self._closed:
            return
        self._closed = True
        await self.pool.close()
        if self._session is not None and self._own_session:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
    ) -> Response:
        """Send one request to a balanced endpoint, retrying when safe.

        Args:
            method: HTTP method.
            path: path and query, starting with ``/``.
            key: request key for the consistent-hash strategy.
            params: query parameters.
            json: a JSON body (exclusive with ``data``).
            data: a raw body.
            headers: extra request headers.
            idempotent: whether retries after the request may have reached a server
                are safe; default: by method.

        Returns:
            The first answer that is not retried (which may be a 4xx or 5xx).

        Raises:
            NoHealthyBackendError: no endpoint could take the request.
            ConnectError: every try failed to connect.
            RequestTimeout: the deadline passed, or the last try timed out.
            TransportError: the last try failed otherwise.
            RemoteProtocolError: the body exceeded ``max_body``.
        """
        if not path.startswith("/"):
            raise BadInputError(f"path must start with '/' (got {path!r})")
        if json is not None and data is not None:
            raise BadInputError("pass either json or data, not both")
        session = self._ensure_session()
        method = method.upper()
        safe = method in IDEMPOTENT if idempotent is None else idempotent
        body: bytes | None
        hdrs: CIMultiDict[str] = CIMultiDict(headers or {})
        if json is not None:
            body = jsonlib.dumps(json).encode()
            hdrs.setdefault("Content-Type", "application/json")
        else:
            body = data.encode() if isinstance(data, str) else data
        cfg = self.config
        clock = self.pool.clock
        start = clock.now()
        deadline = start + cfg.deadline
        self.budget.record_request(start)
        tried: list[str] = []
        tries = 0
        last: TransportError | None = None
        last_response: Response | None = None
        skips = 0
        while tries < cfg.max_tries:
            now = clock.now()
            remaining = deadline - now
            if remaining <= 0:
                raise RequestTimeout(
                    f"{method} {path}: deadline of {cfg.deadline} s passed after {tries} tries"
                )
            if tries and not self.budget.try_spend(now):
                break
            try:
                lease = self.pool.acquire(key=key, exclude=tried)
            except NoHealthyBackendError:
                if last is None and last_response is None:
                    raise
                break
            tried.append(lease.endpoint)
            timeout = min(cfg.try_timeout, remaining)
            try:
                resp = await self._guarded(
                    session, lease, method, path, params, hdrs, body, timeout
                )
            except CircuitOpenError:
                # Refused before sending: not a try; bounded by the pool's size.
                self.pool.release_neutral(lease)
                skips += 1
                if skips > len(self.pool):
                    break
                continue
            except _Retryable as exc:
                tries += 1
                last = exc.error
                if not (exc.always or safe):
                    raise exc.error from None
                continue
            tries += 1
            resp = Response(resp.status, resp.headers, resp.body, lease.endpoint, tries)
            if resp.status in cfg.retry_statuses and safe:
                last_response = resp
                continue
            return resp
        if last_response is not None:
            return last_response
        if last is None:
            raise NoHealthyBackendError(f"{method} {path}: every endpoint's circuit is open")
        raise last

    async def _guarded(
        self,
        session: aiohttp.ClientSession,
        lease: Lease,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        headers: CIMultiDict[str],
        body: bytes | None,
        per_try: float,
    ) -> Response:
        try:
            resp = await self.pool.call(
                lease,
                lambda: self._once(
                    session, lease.endpoint, method, path, params, headers, body, per_try
                ),
            )
        except CircuitOpenError:
            raise  # the caller hands the lease back without judging the endpoint
        except _Retryable as exc:
            self.pool.release(lease, ok=False, error=str(exc))
            raise
        except BaseException:
            self.pool.release_neutral(lease)
            raise
        ok = resp.status < 500
        self.pool.release(lease, ok=ok, error="" if ok else f"status {resp.status}")
        return resp

    async def _once(
        self,
        session: aiohttp.ClientSession,
        ep: str,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        headers: CIMultiDict[str],
        body: bytes | None,
        per_try: float,
    ) -> Response:
        try:
            async with asyncio.timeout(per_try):
                async with session.request(
                    method,
                    ep + path,
                    params=params,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                ) as resp:
                    if (
                        resp.content_length is not None
                        and resp.content_length > self.config.max_body
                    ):
                        raise RemoteProtocolError(
                            f"{ep} answered with {resp.content_length} bytes "
                            f"(max_body is {self.config.max_body})"
                        )
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in resp.content.iter_chunked(256 * 1024):
                        size += len(chunk)
                        if size > self.config.max_body:
                            raise RemoteProtocolError(
                                f"{ep} answered with more than {self.config.max_body} bytes"
                            )
                        chunks.append(chunk)
                    return Response(resp.status, resp.headers, b"".join(chunks), ep, 0)
        except aiohttp.ClientConnectorError as exc:
            raise _Retryable(ConnectError(f"{ep}: cannot connect: {exc}"), always=True) from None
        except TimeoutError:
            raise _Retryable(
                RequestTimeout(f"{ep}: no complete answer within {per_try:.3g} s"), always=False
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Retryable(TransportError(f"{ep}: {exc!r}"), always=False) from None

    async def get(self, path: str, **kwargs: Any) -> Response:
        """``GET path`` (see :meth:`request` for the keyword arguments)."""
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Response:
        """``POST path`` (not retried once sent unless ``idempotent=True``)."""
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> Response:
        """``PUT path``."""
        return await self.request("PUT", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Response:
        """``DELETE path``."""
        return await self.request("DELETE", path, **kwargs)


__all__ = ["IDEMPOTENT", "Response", "Session", "SessionConfig"]
