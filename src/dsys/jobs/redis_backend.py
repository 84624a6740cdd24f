"""A job backend on Redis Streams (``pip install 'dsys[redis]'``, Redis >= 6.2).

Layout (every key starts with ``prefix``, default ``dsys:jobs:``)::

    job:{id}              hash: spec (msgpack), state, attempt, tries, queue, band, sid,
                          worker, enq/start/fin/nb (ms), progress, result, error
    q:{queue}:{priority}  stream per priority 0..9, consumer group "workers";
                          an entry {id: job id} per hand-out-able job
    delayed:{queue}       sorted set: scheduled and retrying job ids by due time (ms)
    dead:{queue}          sorted set: dead-lettered job ids by time
    index:{queue}         sorted set: every job id by enqueue time (``dsys jobs ls``)
    queues                set of queue names
    lease:{name}          the scheduler lease (owner, with PX expiry)

Every state change is one Lua script, so it is atomic against every other worker and
client. A fetch moves due delayed jobs into their stream, takes over entries whose
holder has not sent a heartbeat for ``lease`` seconds (``XAUTOCLAIM``), reads new entries
(``XREADGROUP``, highest priority first) and hands each one out with ``attempt + 1``. A
heartbeat re-claims the entry for its holder (``XCLAIM ... JUSTID`` resets the idle time)
when the attempt still matches; complete, fail, release and progress check it too, so a
late worker gets ``"stale"``. When nothing is due the worker blocks in ``XREADGROUP
BLOCK`` (at most ``wait`` seconds, less when a delayed job is due sooner), so a new job
starts without polling delay.

Times are Redis's own clock (``TIME``), except ``at=`` which is the caller's wall clock.
Redis Cluster is not supported (the scripts touch keys of several slots).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

from dsys.errors import ConfigError, ConnectError, RequestTimeout, UnavailableError
from dsys.jobs.backend import AdminOutcome, Enqueued, HeartbeatOutcome, Lease, Outcome
from dsys.jobs.core import (
    FINAL_STATES,
    JobInfo,
    JobSpec,
    JobState,
    decode_spec,
    decode_value,
    parse_state,
)

GROUP = "workers"

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function stream(p, q, band) return p .. 'q:' .. q .. ':' .. band end
local function push(p, q, band, id, g)
  local s = stream(p, q, band)
  if redis.call('EXISTS', s) == 0 then
    redis.call('XGROUP', 'CREATE', s, g, '0', 'MKSTREAM')
  end
  return redis.call('XADD', s, '*', 'id', id)
end
local function unstream(p, jk, g)
  local r = redis.call('HMGET', jk, 'queue', 'band', 'sid')
  if r[3] then
    local s = stream(p, r[1], r[2])
    redis.call('XACK', s, g, r[3])
    redis.call('XDEL', s, r[3])
    redis.call('HDEL', jk, 'sid')
  end
end
-- the job's record when (state, attempt) show the lease is current, else nil
local function owned(jk, attempt)
  local r = redis.call('HMGET', jk, 'state', 'attempt', 'queue')
  if r[1] ~= 'running' or r[2] ~= attempt then return nil end
  return r
end
"""

ENQUEUE_LUA = (
    _COMMON
    + """
-- ARGV: prefix, queue, id, spec, band, at_ms, delay_ms, group
local p, q, id = ARGV[1], ARGV[2], ARGV[3]
local jk = p .. 'job:' .. id
local st = redis.call('HGET', jk, 'state')
if st then return {0, st} end
local now = now_ms()
local nb = math.max(tonumber(ARGV[6]), now + tonumber(ARGV[7]))
redis.call('HSET', jk, 'spec', ARGV[4], 'attempt', 0, 'tries', 0, 'queue', q,
           'band', ARGV[5], 'enq', now, 'nb', nb)
if nb > now then
  st = 'scheduled'
  redis.call('ZADD', p .. 'delayed:' .. q, nb, id)
  redis.call('HSET', jk, 'state', st)
else
  st = 'queued'
  redis.call('HSET', jk, 'state', st, 'sid', push(p, q, ARGV[5], id, ARGV[8]))
end
redis.call('ZADD', p .. 'index:' .. q, now, id)
redis.call('SADD', p .. 'queues', q)
return {1, st}
"""
)

FETCH_LUA = (
    _COMMON
    + """
-- ARGV: prefix, queue, consumer, count, lease_ms, group, claim (1: take over expired
-- leases), then (band, entry id) pairs already read by a blocking XREADGROUP of this consumer
local p, q, c, n, lease, g = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local claim = ARGV[7] == '1'
local now = now_ms()
local dk = p .. 'delayed:' .. q
local due = redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  redis.call('ZREM', dk, id)
  local jk = p .. 'job:' .. id
  local r = redis.call('HMGET', jk, 'state', 'band')
  if r[1] == 'scheduled' or r[1] == 'retrying' then
    redis.call('HSET', jk, 'state', 'queued', 'sid', push(p, q, r[2], id, g))
  end
end
local out = {}
local function start(s, sid, id)
  local jk = id and (p .. 'job:' .. id)
  local r = jk and redis.call('HMGET', jk, 'state', 'sid') or {}
  if (r[1] == 'queued' or r[1] == 'running') and r[2] == sid then
    local attempt = redis.call('HINCRBY', jk, 'attempt', 1)
    local tries = redis.call('HINCRBY', jk, 'tries', 1)
    redis.call('HSET', jk, 'state', 'running', 'worker', c, 'start', now)
    local x = redis.call('HMGET', jk, 'spec', 'enq')
    out[#out + 1] = {x[1], attempt, tries, sid, x[2]}
  else
    redis.call('XACK', s, g, sid)
    redis.call('XDEL', s, sid)
  end
end
for i = 8, #ARGV, 2 do
  local s = stream(p, q, ARGV[i])
  local e = redis.call('XRANGE', s, ARGV[i + 1], ARGV[i + 1])
  if e[1] then start(s, e[1][1], e[1][2][2]) else redis.call('XACK', s, g, ARGV[i + 1]) end
end
local bands = {}
for band = 9, 0, -1 do
  local s = stream(p, q, band)
  if redis.call('EXISTS', s) == 1 then
    bands[#bands + 1] = band
    if claim and #out < n then
      local r = redis.call('XAUTOCLAIM', s, g, c, lease, '0-0', 'COUNT', n - #out)
      for _, e in ipairs(r[2]) do
        if e[2] then start(s, e[1], e[2][2]) else redis.call('XACK', s, g, e[1]) end
      end
    end
    if #out < n then
      local r = redis.call('XREADGROUP', 'GROUP', g, c, 'COUNT', n - #out, 'STREAMS', s, '>')
      if r then
        for _, e in ipairs(r[1][2]) do start(s, e[1], e[2] and e[2][2]) end
      end
    end
  end
end
local nxt = redis.call('ZRANGE', dk, 0, 0, 'WITHSCORES')
return {out, nxt[2] or '', bands, now}
"""
)

HEARTBEAT_LUA = (
    _COMMON
    + """
-- ARGV: prefix, group, consumer, then (id, attempt) pairs
local p, g, c = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV, 2 do
  local jk = p .. 'job:' .. ARGV[i]
  local r = redis.call('HMGET', jk, 'state', 'attempt', 'queue', 'band', 'sid', 'worker')
  if r[1] == 'cancelled' then
    out[#out + 1] = 'cancelled'
  elseif r[1] ~= 'running' or r[2] ~= ARGV[i + 1] or r[6] ~= c then
    out[#out + 1] = 'stale'
  else
    redis.call('XCLAIM', stream(p, r[3], r[4]), g, c, 0, r[5], 'JUSTID')
    out[#out + 1] = 'ok'
  end
end
return out
"""
)

COMPLETE_LUA = (
    _COMMON
    + """
-- ARGV: prefix, group, id, attempt, result, ttl_ms
local p, g, id = ARGV[1], ARGV[2], ARGV[3]
local jk = p .. 'job:' .. id
if not owned(jk, ARGV[4]) then return 'stale' end
unstream(p, jk, g)
redis.call('HSET', jk, 'state', 'succeeded', 'result', ARGV[5], 'fin', now_ms())
redis.call('HDEL', jk, 'error')
if tonumber(ARGV[6]) > 0 then redis.call('PEXPIRE', jk, ARGV[6]) end
return 'ok'
"""
)

FAIL_LUA = (
    _COMMON
    + """
-- ARGV: prefix, group, id, attempt, error, delay_ms (-1: dead letter)
local p, g, id = ARGV[1], ARGV[2], ARGV[3]
local jk = p .. 'job:' .. id
local r = owned(jk, ARGV[4])
if not r then return 'stale' end
unstream(p, jk, g)
local now = now_ms()
local delay = tonumber(ARGV[6])
if delay < 0 then
  redis.call('HSET', jk, 'state', 'dead', 'error', ARGV[5], 'fin', now)
  redis.call('ZADD', p .. 'dead:' .. r[3], now, id)
else
  redis.call('HSET', jk, 'state', 'retrying', 'error', ARGV[5], 'nb', now + delay)
  redis.call('ZADD', p .. 'delayed:' .. r[3], now + delay, id)
end
return 'ok'
"""
)

RELEASE_LUA = (
    _COMMON
    + """
-- ARGV: prefix, group, id, attempt, delay_ms
local p, g, id = ARGV[1], ARGV[2], ARGV[3]
local jk = p .. 'job:' .. id
local r = owned(jk, ARGV[4])
if not r then return 'stale' end
unstream(p, jk, g)
local nb = now_ms() + tonumber(ARGV[5])
redis.call('HINCRBY', jk, 'tries', -1)
redis.call('HSET', jk, 'state', 'scheduled', 'nb', nb)
redis.call('ZADD', p .. 'delayed:' .. r[3], nb, id)
return 'ok'
"""
)

PROGRESS_LUA = (
    _COMMON
    + """
-- ARGV: prefix, id, attempt, value
local jk = ARGV[1] .. 'job:' .. ARGV[2]
if not owned(jk, ARGV[3]) then return 'stale' end
redis.call('HSET', jk, 'progress', ARGV[4])
return 'ok'
"""
)

CANCEL_LUA = (
    _COMMON
    + """
-- ARGV: prefix, group, id
local p, g, id = ARGV[1], ARGV[2], ARGV[3]
local jk = p .. 'job:' .. id
local r = redis.call('HMGET', jk, 'state', 'queue')
if not r[1] then return 'not_found' end
if r[1] == 'succeeded' or r[1] == 'dead' or r[1] == 'cancelled' then return 'wrong_state' end
redis.call('ZREM', p .. 'delayed:' .. r[2], id)
unstream(p, jk, g)
redis.call('HSET', jk, 'state', 'cancelled', 'fin', now_ms())
return 'ok'
"""
)

REQUEUE_LUA = (
    _COMMON
    + """
-- ARGV: prefix, group, id
local p, g, id = ARGV[1], ARGV[2], ARGV[3]
local jk = p .. 'job:' .. id
local r = redis.call('HMGET', jk, 'state', 'queue', 'band')
if not r[1] then return 'not_found' end
if r[1] ~= 'dead' and r[1] ~= 'cancelled' then return 'wrong_state' end
redis.call('ZREM', p .. 'dead:' .. r[2], id)
redis.call('PERSIST', jk)
redis.call('HSET', jk, 'state', 'queued', 'tries', 0, 'fin', 0,
           'sid', push(p, r[2], r[3], id, g))
return 'ok'
"""
)

LEASE_LUA = """
-- KEYS[1] lease key; ARGV: owner, ttl_ms
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def _ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisBackend:
    """Jobs in Redis Streams (see the module docstring for the layout).

    Args:
        url: a ``redis://`` (or ``rediss://``, ``unix://``) URL.
        prefix: prepended to every key.
        lease: seconds without a heartbeat after which a running job is handed out
            again (workers send one every ``lease / 3``).
        timeout: seconds for connecting and for each non-blocking command.
        client: an existing ``redis.asyncio.Redis`` (``decode_responses=False``) to use
            instead of ``url``.

    Raises:
        ConfigError: redis-py is missing, or a bad URL or number.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "dsys:jobs:",
        lease: float = 30.0,
        timeout: float = 5.0,
        client: Any = None,
    ) -> None:
        try:
            import redis.asyncio as aioredis
            from redis import exceptions
        except ImportError as exc:  # pragma: no cover - the dev extra installs it
            raise ConfigError("RedisBackend needs redis-py: pip install 'dsys[redis]'") from exc
        for name, v in (("lease", lease), ("timeout", timeout)):
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or v <= 0
            ):
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a string, got {prefix!r}")
        self._exc = exceptions
        if client is None:
            if not isinstance(url, str) or url.split("://", 1)[0] not in (
                "redis",
                "rediss",
                "unix",
            ):
                raise ConfigError(f"not a Redis URL: {url!r} (use redis://host:port/db)")
            try:
                client = aioredis.Redis.from_url(url, socket_connect_timeout=timeout)
            except ValueError as exc:
                raise ConfigError(f"bad Redis URL {url!r}: {exc}") from exc
        self.url = url
        self.prefix = prefix
        self.lease = float(lease)
        self.timeout = float(timeout)
        self._r = client
        self._enqueue = client.register_script(ENQUEUE_LUA)
        self._fetch = client.register_script(FETCH_LUA)
        self._heartbeat = client.register_script(HEARTBEAT_LUA)
        self._complete = client.register_script(COMPLETE_LUA)
        self._fail = client.register_script(FAIL_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._progress = client.register_script(PROGRESS_LUA)
        self._cancel = client.register_script(CANCEL_LUA)
        self._requeue = client.register_script(REQUEUE_LUA)
        self._lease = client.register_script(LEASE_LUA)
        self._bands: dict[str, list[bytes]] = {}
        self._pending: list[tuple[Any, list[Any], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Future[None]] = set()
        self._last_claim: dict[str, float] = {}

    def _translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, self._exc.ConnectionError):
            return ConnectError(f"redis at {self.url}: {exc}")
        if isinstance(exc, self._exc.TimeoutError):
            return RequestTimeout(f"redis at {self.url}: {exc}")
        if isinstance(exc, self._exc.RedisError):
            return UnavailableError(f"redis at {self.url}: {exc}")
        return exc

    async def _call(self, script: Any, args: Sequence[Any], keys: Sequence[str] = ()) -> Any:
        try:
            return await script(keys=list(keys), args=list(args))
        except self._exc.RedisError as exc:
            raise self._translate(exc) from exc

    def _batched(self, script: Any, args: list[Any]) -> asyncio.Future[Any]:
        """Run ``script`` (no keys) in the next pipeline: the calls made in one event-loop
        iteration (many producers' enqueues, many jobs' completions) share one round
        trip and one system call."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((script, args, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Any, list[Any], asyncio.Future[Any]]]) -> None:
        results: list[Any]
        try:
            if len(batch) == 1:
                script, args, _ = batch[0]
                try:
                    results = [await script(keys=[], args=args)]
                except self._exc.RedisError as exc:
                    results = [exc]
            else:
                pipe = self._r.pipeline(transaction=False)
                for script, args, _ in batch:
                    pipe.evalsha(script.sha, 0, *args)
                results = await pipe.execute(raise_on_error=False)
                for i, (script, args, _) in enumerate(batch):
                    if isinstance(results[i], self._exc.NoScriptError):
                        try:  # loads the script (after a restart or SCRIPT FLUSH)
                            results[i] = await script(keys=[], args=args)
                        except self._exc.RedisError as exc:
                            results[i] = exc
        except BaseException as exc:  # the connection failed: every call fails
            results = [exc] * len(batch)
        for (_, _, fut), r in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(r, BaseException):
                fut.set_exception(self._translate(r))
            else:
                fut.set_result(r)

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    async def enqueue(self, spec: JobSpec, data: bytes, *, delay: float, at_ms: int) -> Enqueued:
        """Store a new job unless its id exists (see :class:`~dsys.jobs.backend.Backend`)."""
        created, state = await self._batched(
            self._enqueue,
            [
                self.prefix,
                spec.queue,
                spec.id,
                data,
                spec.priority,
                at_ms,
                _ms(delay),
                GROUP,
            ],
        )
        return Enqueued(spec.id, bool(created), parse_state(_text(state)))

    async def fetch(self, queue: str, worker: str, batch: int, wait: float) -> list[Lease]:
        """Lease up to ``batch`` jobs, blocking up to ``wait`` seconds when none is due."""
        now = time.monotonic()
        # taking over expired leases scans the pending entries: every lease / 4 is enough
        claim = now - self._last_claim.get(queue, 0.0) >= self.lease / 4
        if claim:
            self._last_claim[queue] = now
        args: list[Any] = [self.prefix, queue, worker, batch, _ms(self.lease), GROUP, int(claim)]
        out, nxt, bands, redis_now = await self._call(self._fetch, args)
        self._bands[queue] = [b if isinstance(b, bytes) else str(b).encode() for b in bands]
        if out or wait <= 0 or not bands:
            return self._leases(out, worker)
        block = _ms(wait)
        if nxt:
            block = max(1, min(block, int(float(nxt)) - int(redis_now)))
        streams = {f"{self.prefix}q:{queue}:{_text(b)}": ">" for b in bands}
        try:
            got = await self._r.xreadgroup(GROUP, worker, streams, count=batch, block=block)
        except self._exc.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise UnavailableError(f"redis at {self.url}: {exc}") from exc
            got = None
        except self._exc.ConnectionError as exc:
            raise ConnectError(f"redis at {self.url}: {exc}") from exc
        except self._exc.TimeoutError as exc:
            raise RequestTimeout(f"redis at {self.url}: {exc}") from exc
        for name, entries in got or []:
            band = _text(name).rsplit(":", 1)[1]
            for entry_id, _fields in entries:
                args += [band, entry_id]
        args[6] = 0
        out, _nxt, _bands, _now = await self._call(self._fetch, args)
        return self._leases(out, worker)

    @staticmethod
    def _leases(out: list[Any], worker: str) -> list[Lease]:
        return [
            Lease(decode_spec(spec), int(attempt), int(tries), _text(sid), int(enq or 0), worker)
            for spec, attempt, tries, sid, enq in out
        ]

    async def heartbeat(self, leases: Sequence[Lease]) -> list[HeartbeatOutcome]:
        """Renew each lease held by one worker (``"ok"``, ``"stale"`` or ``"cancelled"``)."""
        if not leases:
            return []
        out: list[HeartbeatOutcome] = []
        by_worker: dict[str, list[Lease]] = {}
        for lease in leases:
            by_worker.setdefault(lease.worker, []).append(lease)
        answers: dict[int, HeartbeatOutcome] = {}
        for worker, group in by_worker.items():
            args: list[Any] = [self.prefix, GROUP, worker]
            for lease in group:
                args += [lease.spec.id, lease.attempt]
            for lease, v in zip(group, await self._call(self._heartbeat, args), strict=True):
                t = _text(v)
                answers[id(lease)] = (
                    "ok" if t == "ok" else "cancelled" if t == "cancelled" else "stale"
                )
        out = [answers[id(lease)] for lease in leases]
        return out

    async def complete(self, lease: Lease, result: bytes, result_ttl: float) -> Outcome:
        """Record success unless the lease is stale."""
        r = await self._batched(
            self._complete,
            [self.prefix, GROUP, lease.spec.id, lease.attempt, result, _ms(result_ttl)],
        )
        return "ok" if _text(r) == "ok" else "stale"

    async def fail(self, lease: Lease, error: str, retry_delay: float | None) -> Outcome:
        """Record a failed try (retry after ``retry_delay``, or dead-letter on ``None``)."""
        delay = -1 if retry_delay is None else _ms(retry_delay)
        r = await self._batched(
            self._fail, [self.prefix, GROUP, lease.spec.id, lease.attempt, error, delay]
        )
        return "ok" if _text(r) == "ok" else "stale"

    async def release(self, lease: Lease, delay: float) -> Outcome:
        """Give the job back without counting the try."""
        r = await self._call(
            self._release, [self.prefix, GROUP, lease.spec.id, lease.attempt, _ms(delay)]
        )
        return "ok" if _text(r) == "ok" else "stale"

    async def progress(self, lease: Lease, value: bytes) -> Outcome:
        """Record progress unless the lease is stale."""
        r = await self._batched(self._progress, [self.prefix, lease.spec.id, lease.attempt, value])
        return "ok" if _text(r) == "ok" else "stale"

    async def get(self, job_id: str) -> JobInfo | None:
        """The job's record, or ``None``."""
        try:
            h = await self._r.hgetall(self._job_key(job_id))
        except self._exc.RedisError as exc:
            raise UnavailableError(f"redis at {self.url}: {exc}") from exc
        return _info(h)

    async def cancel(self, job_id: str) -> AdminOutcome:
        """Cancel a job that is not final."""
        r = _text(await self._call(self._cancel, [self.prefix, GROUP, job_id]))
        return "ok" if r == "ok" else "not_found" if r == "not_found" else "wrong_state"

    async def requeue(self, job_id: str) -> AdminOutcome:
        """Queue a dead or cancelled job again."""
        r = _text(await self._call(self._requeue, [self.prefix, GROUP, job_id]))
        return "ok" if r == "ok" else "not_found" if r == "not_found" else "wrong_state"

    async def list_jobs(
        self, queue: str, state: JobState | None, offset: int, limit: int
    ) -> list[JobInfo]:
        """Jobs of ``queue``, newest first (dead letters from their own index)."""
        key = f"{self.prefix}{'dead' if state == 'dead' else 'index'}:{queue}"
        try:
            ids = await self._r.zrevrange(key, offset, offset + limit - 1)
            if not ids:
                return []
            pipe = self._r.pipeline(transaction=False)
            for i in ids:
                pipe.hgetall(self._job_key(_text(i)))
            records = await pipe.execute()  # expired records stay indexed until a purge
        except self._exc.RedisError as exc:
            raise UnavailableError(f"redis at {self.url}: {exc}") from exc
        infos = [x for x in (_info(h) for h in records) if x is not None]
        return [x for x in infos if state is None or x.state == state]

    async def count(self, queue: str, state: JobState | None) -> int:
        """Size of the index :meth:`list_jobs` walks."""
        key = f"{self.prefix}{'dead' if state == 'dead' else 'index'}:{queue}"
        try:
            return int(await self._r.zcard(key))
        except self._exc.RedisError as exc:
            raise UnavailableError(f"redis at {self.url}: {exc}") from exc

    async def purge(self, queue: str, states: Sequence[JobState]) -> int:
        """Delete the records of final jobs in ``states``."""
        wanted = {s for s in states if s in FINAL_STATES}
        index = f"{self.prefix}index:{queue}"
        dead = f"{self.prefix}dead:{queue}"
        removed = 0
        try:
            cursor = 0
            while True:
                ids = await self._r.zrange(index, cursor, cursor + 499)
                if not ids:
                    break
                pipe = self._r.pipeline(transaction=False)
                for i in ids:
                    pipe.hget(self._job_key(_text(i)), "state")
                got = await pipe.execute()
                doomed = [
                    i for i, st in zip(ids, got, strict=True) if st is None or _text(st) in wanted
                ]
                cursor += len(ids)
                if doomed:
                    pipe = self._r.pipeline(transaction=True)
                    for i in doomed:
                        pipe.delete(self._job_key(_text(i)))
                    pipe.zrem(index, *doomed)
                    pipe.zrem(dead, *doomed)
                    deleted = await pipe.execute()
                    removed += sum(int(d) for d in deleted[: len(doomed)])
                    cursor -= len(doomed)
        except self._exc.RedisError as exc:
            raise UnavailableError(f"redis at {self.url}: {exc}") from exc
        return removed

    async def hold_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the named lease (``SET NX PX`` / ``PEXPIRE`` when ours)."""
        r = await self._call(self._lease, [owner, _ms(ttl)], keys=[f"{self.prefix}lease:{name}"])
        return bool(r)

    async def queues(self) -> list[str]:
        """Queue names that have had jobs."""
        try:
            return sorted(_text(q) for q in await self._r.smembers(f"{self.prefix}queues"))
        except self._exc.RedisError as exc:
            raise UnavailableError(f"redis at {self.url}: {exc}") from exc

    async def close(self) -> None:
        """Wait for batched calls in flight, then close the connection pool."""
        if self._pending:
            self._flush()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        await self._r.aclose()

    async def __aenter__(self) -> RedisBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _info(h: dict[bytes, bytes]) -> JobInfo | None:
    if not h or b"spec" not in h:
        return None

    def num(name: bytes) -> int:
        v = h.get(name)
        return int(v) if v else 0

    return JobInfo(
        spec=decode_spec(h[b"spec"]),
        state=parse_state(_text(h.get(b"state", b""))),
        attempt=num(b"attempt"),
        tries=num(b"tries"),
        progress=decode_value(h.get(b"progress")),
        result=decode_value(h.get(b"result")),
        error=_text(h[b"error"]) if h.get(b"error") is not None else None,
        enqueued_ms=num(b"enq"),
        started_ms=num(b"start"),
        finished_ms=num(b"fin"),
        not_before_ms=num(b"nb"),
        worker=_text(h[b"worker"]) if h.get(b"worker") is not None else None,
    )


__all__ = ["GROUP", "RedisBackend"]
