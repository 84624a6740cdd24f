"""RedisStore: the token bucket in Redis, one atomic Lua script per decision.

Install the extra: ``pip install 'dsys[redis]'`` (redis-py with asyncio support).

Each decision is one ``EVALSHA`` of a GCRA script (falling back to loading the script
when Redis answers ``NOSCRIPT``, e.g. after a restart or ``SCRIPT FLUSH``). The script
reads Redis's own clock (``TIME``), so app instances with different clocks agree, and
stores one value per key: the theoretical arrival time, with a ``PX`` expiry at the
moment the bucket is full again, so idle keys vanish by themselves at no semantic cost.

Only the token bucket is offered here; use :class:`~dsys.ratelimit.MemoryStore` for the
window algorithms.
"""

from __future__ import annotations

import math
from typing import Any

from dsys.errors import ConfigError, ConnectError, RequestTimeout, UnavailableError
from dsys.ratelimit.core import EPSILON, Decision, Policy, TokenBucket

GCRA_LUA = """
-- KEYS[1] bucket key; ARGV: interval (s/token), tolerance (s), cost, epsilon (s)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]))
if (not tat) or tat < now then tat = now end
local new_tat = tat + cost * interval
if new_tat - now <= tolerance + tonumber(ARGV[4]) then
  local ttl = math.ceil((new_tat - now) * 1000)
  if ttl < 1 then ttl = 1 end
  redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl)
  return string.format('1 %d 0 %d', math.floor((now - new_tat + tolerance) / interval + 1e-9),
                       math.ceil((new_tat - now) * 1000000))
end
return string.format('0 %d %d %d', math.floor((now - tat + tolerance) / interval + 1e-9),
                     math.ceil((new_tat - tolerance - now) * 1000000),
                     math.ceil((tat - now) * 1000000))
"""
"""The GCRA decision script. It answers one string ``"allowed remaining retry_us reset_us"``
(one reply to read instead of a four-element array) with times in whole microseconds,
rounded up so a client never retries too early."""


_EPS = repr(EPSILON)


class RedisStore:
    """Token buckets in Redis for limiters shared by many processes.

    Args:
        url: a ``redis://`` or ``rediss://`` URL (``unix://`` works too).
        prefix: prepended to every key, so limits can share a Redis with other data.
        timeout: seconds for connecting and for each command.
        client: an existing ``redis.asyncio.Redis`` to use instead of ``url``.

    Raises:
        ConfigError: redis-py is not installed, or the URL is not a Redis URL.
    """

    algorithms = ("token_bucket",)

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "dsys:rl:",
        timeout: float = 1.0,
        client: Any = None,
    ) -> None:
        try:
            import redis.asyncio as aioredis
            from redis import exceptions
        except ImportError as exc:  # pragma: no cover - the dev extra installs it
            raise ConfigError("RedisStore needs redis-py: pip install 'dsys[redis]'") from exc
        if not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number, got {timeout!r}")
        self._exc = exceptions
        if client is None:
            if not isinstance(url, str) or url.split("://", 1)[0] not in (
                "redis",
                "rediss",
                "unix",
            ):
                raise ConfigError(f"not a Redis URL: {url!r} (use redis://host:port/db)")
            try:
                client = aioredis.Redis.from_url(
                    url, socket_timeout=timeout, socket_connect_timeout=timeout
                )
            except ValueError as exc:
                raise ConfigError(f"bad Redis URL {url!r}: {exc}") from exc
        self.url = url
        self.prefix = prefix
        self._client = client
        self._sha: str | None = None
        self._policy_args: dict[int, tuple[TokenBucket, str, str]] = {}

    async def _load(self) -> str:
        sha: str = await self._client.script_load(GCRA_LUA)
        self._sha = sha
        return sha

    async def hit(self, policy: Policy, key: str, cost: int) -> Decision:
        """Run the GCRA script for ``key`` (cost already validated).

        Raises:
            ConfigError: the policy is not a token bucket.
            ConnectError, RequestTimeout, UnavailableError: Redis failed.
        """
        if not isinstance(policy, TokenBucket):
            raise ConfigError(f"RedisStore supports token_bucket only, not {policy.kind}")
        cached = self._policy_args.get(id(policy))
        if cached is None or cached[0] is not policy:
            cached = (policy, repr(policy.interval), repr(policy.tolerance))
            self._policy_args[id(policy)] = cached
        text_key = self.prefix + key
        # Lone surrogates (undecodable header bytes) are keys too: encode them ourselves.
        full_key = text_key if text_key.isascii() else text_key.encode("utf-8", "surrogatepass")
        exc_mod = self._exc
        try:
            sha = self._sha or await self._load()
            try:
                res = await self._client.evalsha(sha, 1, full_key, cached[1], cached[2], cost, _EPS)
            except exc_mod.NoScriptError:
                sha = await self._load()
                res = await self._client.evalsha(sha, 1, full_key, cached[1], cached[2], cost, _EPS)
        except exc_mod.TimeoutError as exc:
            raise RequestTimeout(f"redis at {self.url}: {exc}") from exc
        except exc_mod.ConnectionError as exc:
            raise ConnectError(f"redis at {self.url}: {exc}") from exc
        except (exc_mod.RedisError, OSError) as exc:
            raise UnavailableError(f"redis at {self.url}: {exc}") from exc
        try:
            allowed, tokens, retry_us, reset_us = map(int, res.split())
        except (AttributeError, ValueError) as exc:
            raise UnavailableError(f"redis at {self.url}: unexpected reply {res!r}") from exc
        return Decision(
            allowed == 1, max(0, tokens), max(0, retry_us) / 1e6, max(0, reset_us) / 1e6
        )

    async def close(self) -> None:
        """Close the Redis connection pool."""
        await self._client.aclose()

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


__all__ = ["GCRA_LUA", "RedisStore"]
