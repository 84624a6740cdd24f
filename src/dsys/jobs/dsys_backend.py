"""A job backend on dsys's own blocks: ``dsys.streams`` for delivery, ``dsys.kv`` for state.

Layout::

    stream  <stream>            work-queue retention, captures "<stream>.>"; one message
                                per run of a job, subject "<stream>.<queue>.<priority>",
                                headers dsys-job (id), dsys-job-run (run number) and, for
                                delayed jobs, dsys-not-before
    consumers <queue>-p<N>      one durable consumer per queue and priority used (0..9),
                                created by workers; ack wait = the lease (the first
                                worker's); many workers share each (a consumer group)
    stream  <stream>-dlq        where dead-lettered jobs' messages go (``term``)
    KV      <prefix>job/<h>/<id> the job's record (msgpack; h = crc32(id) % 16, a hex digit):
                                spec, state, attempt, tries,
                                run, seq, progress, result, error, times; results expire
                                with the KV's TTL
    KV      <prefix>lease/<n>   the cron scheduler's lease (owner, with a TTL)
    KV      <prefix>bands/<queue>/<priority>  marks the priorities a queue has had jobs
                                of (workers create a consumer for each)

The stream does the delivery: it holds delayed messages back until their
``dsys-not-before`` time, redelivers a message whose ack deadline passed (a worker that
stopped sending ``in_progress`` heartbeats lost its lease), and ``nak(delay)`` schedules a
retry. The KV record is the job's truth and its fence: every state change is a
compare-and-set on the record's revision, and a hand-over increments ``attempt``; a
report naming an older attempt is refused as ``"stale"`` whatever the stream says.
A stream message is handed out only if its run number is the record's current run and
its sequence is the one the run was first delivered as, so a message left over from an
earlier run (a requeue, a re-publish after a crash) is acknowledged and dropped.

Enqueue writes the record first (``cas(revision=0)``: the job id dedups), then publishes;
if the enqueuer dies in between, enqueueing the same id again publishes the missing
message (the stream's message-id window and the sequence check drop duplicates).
Listing (``dsys jobs ls``) pages through the 16 record prefixes with KV scan cursors and
reads the records of the page asked for, in key order (not time order); every record is
seen, however many there are.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from dsys.errors import ConfigError, ConflictError, NotFoundError, RemoteProtocolError
from dsys.jobs.backend import AdminOutcome, Enqueued, HeartbeatOutcome, Lease, Outcome
from dsys.jobs.core import (
    FINAL_STATES,
    MAX_PRIORITY,
    JobInfo,
    JobSpec,
    JobState,
    check_queue_name,
    decode_spec,
    decode_value,
    parse_state,
)
from dsys.kv.client import KVClient
from dsys.observability import get_logger
from dsys.streams import ConsumerConfig, StreamConfig
from dsys.streams.client import StreamClient
from dsys.streams.fsm import NOT_BEFORE_HEADER, validate_name

JOB_HEADER = "dsys-job"
RUN_HEADER = "dsys-job-run"
_RUNNABLE = ("queued", "scheduled", "retrying", "running")
_BAND_REFRESH_S = 2.0
_BUCKETS = 16  # job records are spread over 16 key prefixes (kept: stored keys use them)
_SCAN_PAGE = 1000  # keys per KV scan page when listing


def _now_ms() -> int:
    return int(time.time() * 1000)


def _pack(rec: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(rec, use_bin_type=True)
    return data


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        rec = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise RemoteProtocolError(f"a job record is not valid msgpack: {exc}") from exc
    if not isinstance(rec, dict) or "spec" not in rec:
        raise RemoteProtocolError("a job record has an unknown layout")
    return rec


@dataclass(slots=True)
class _Held:
    """What this process last wrote to a record it holds (for compare-and-set)."""

    revision: int
    record: dict[str, Any]


class DsysBackend:
    """Jobs on a dsys streams cluster and a dsys KV cluster (see the module docstring).

    Args:
        streams: ``host:port`` of the stream servers.
        kv: ``host:port`` of the KV servers.
        stream: the stream's name (its subjects are ``<stream>.>``).
        prefix: prepended to every KV key.
        lease: seconds a worker holds a job without a heartbeat (the consumers' ack wait).
        token: the streams cluster token, if it checks one.
        timeout: seconds per request, retries included.

    Raises:
        ConfigError: no endpoints, a bad stream name or a bad number.
    """

    def __init__(
        self,
        streams: Sequence[str],
        kv: Sequence[str],
        *,
        stream: str = "JOBS",
        prefix: str = "jobs/",
        lease: float = 30.0,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not streams or not kv:
            raise ConfigError("DsysBackend needs stream servers and KV servers")
        try:
            validate_name(stream)
        except Exception as exc:
            raise ConfigError(str(exc)) from None
        if stream.endswith("-dlq"):
            raise ConfigError("the jobs stream's name cannot end in -dlq")
        if isinstance(lease, bool) or not isinstance(lease, int | float) or not lease >= 0.01:
            raise ConfigError(f"lease must be a number of seconds >= 0.01, got {lease!r}")
        self.lease = float(lease)
        self.stream = stream
        self.prefix = prefix
        self._streams = StreamClient(list(streams), timeout=timeout, token=token)
        self._kv = KVClient(list(kv), timeout=timeout)
        self._ready: set[tuple[str, int]] = set()  # (queue, priority) with a consumer
        self._marked: set[tuple[str, int]] = set()  # (queue, priority) marked as used
        self._log = get_logger("jobs.dsys", stream=stream)
        self._stream_ready = False
        self._setup = asyncio.Lock()
        self._bands: dict[str, tuple[float, list[int]]] = {}
        self._held: dict[tuple[str, int], _Held] = {}

    @classmethod
    def from_url(cls, url: str, *, lease: float = 30.0) -> DsysBackend:
        """``dsys://HOST:PORT,...?kv=HOST:PORT,...&stream=JOBS&prefix=jobs/&token=T``.

        Raises:
            ConfigError: no stream or KV servers in the URL.
        """
        parsed = urllib.parse.urlsplit(url)
        q = urllib.parse.parse_qs(parsed.query)
        streams = [e for e in parsed.netloc.split(",") if e]
        kv = [e for v in q.get("kv", []) for e in v.split(",") if e]
        if not streams or not kv:
            raise ConfigError(
                f"expected dsys://STREAMS_HOST:PORT,...?kv=KV_HOST:PORT,..., got {url!r}"
            )
        return cls(
            streams,
            kv,
            stream=q.get("stream", ["JOBS"])[0],
            prefix=q.get("prefix", ["jobs/"])[0],
            lease=lease,
            token=q.get("token", [None])[0],
        )

    # -- names ------------------------------------------------------------------------

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job/{zlib.crc32(job_id.encode()) % _BUCKETS:x}/{job_id}"

    def _subject(self, queue: str, band: int) -> str:
        return f"{self.stream}.{queue}.{band}"

    @staticmethod
    def _consumer(queue: str, band: int) -> str:
        return f"{queue}-p{band}"

    async def _ensure_stream(self) -> None:
        if self._stream_ready:
            return
        await self._streams.add_stream(
            StreamConfig(name=self.stream, subjects=(f"{self.stream}.>",), retention="workqueue")
        )
        self._stream_ready = True

    async def _mark_band(self, queue: str, band: int) -> None:
        """Record (once per process) that ``queue`` has jobs of priority ``band``, so that
        workers create its consumer; producers never create consumers."""
        if (queue, band) in self._marked:
            return
        await self._ensure_stream()
        await self._kv.put(f"{self.prefix}bands/{queue}/{band}", b"")
        self._marked.add((queue, band))

    async def _ensure_consumer(self, queue: str, band: int) -> None:
        """Create the consumer of ``queue``'s priority ``band`` with ack wait = the lease.

        The first worker sets a queue's lease; a worker configured with another one adopts
        the existing consumer's (its heartbeats follow ``self.lease``).
        """
        if (queue, band) in self._ready:
            return
        async with self._setup:
            if (queue, band) in self._ready:
                return
            await self._ensure_stream()
            name = self._consumer(queue, band)
            try:
                await self._streams.add_consumer(
                    self.stream,
                    ConsumerConfig(
                        name=name,
                        filter_subject=self._subject(queue, band),
                        ack_wait_ms=max(1, int(self.lease * 1000)),
                        max_deliver=0,  # the core decides when to give up
                        max_ack_pending=100_000,
                    ),
                )
            except ConflictError:
                info = await self._streams.consumer_info(self.stream, name)
                wait_ms = int(((info or {}).get("config") or {}).get("ack_wait_ms", 0))
                if wait_ms and wait_ms != int(self.lease * 1000):
                    self._log.warning(
                        "the queue's consumer has another lease; using it",
                        consumer=name,
                        lease=wait_ms / 1000,
                        configured=self.lease,
                    )
                    self.lease = wait_ms / 1000
            self._ready.add((queue, band))

    # -- records ----------------------------------------------------------------------

    async def _get(self, job_id: str) -> tuple[dict[str, Any], int] | None:
        r = await self._kv.get(self._key(job_id))
        if r is None:
            return None
        return _unpack(r.value), r.revision

    async def _cas(
        self, job_id: str, rec: dict[str, Any], revision: int, ttl: float | None = None
    ) -> int:
        return await self._kv.cas(self._key(job_id), _pack(rec), revision=revision, ttl=ttl)

    async def _update_held(
        self, lease: Lease, change: dict[str, Any], ttl: float | None = None
    ) -> _Held | None:
        """Apply ``change`` to the record ``lease`` holds; None when the lease is stale."""
        key = (lease.spec.id, lease.attempt)
        held = self._held.get(key)
        for _ in range(8):
            if held is None:
                got = await self._get(lease.spec.id)
                if got is None:
                    return None
                held = _Held(got[1], got[0])
            rec = held.record
            if rec.get("attempt") != lease.attempt or rec.get("state") != "running":
                self._held.pop(key, None)
                return None
            new = {**rec, **change}
            try:
                rev = await self._cas(lease.spec.id, new, held.revision, ttl)
            except ConflictError:
                held = None  # changed meanwhile (our own earlier write, a cancel ...)
                continue
            held = _Held(rev, new)
            if new.get("state") == "running":
                self._held[key] = held
            else:
                self._held.pop(key, None)
            return held
        return None

    async def _publish(self, spec: JobSpec, run: int, not_before_ms: int) -> None:
        headers = {JOB_HEADER: spec.id, RUN_HEADER: str(run)}
        if not_before_ms:
            headers[NOT_BEFORE_HEADER] = str(not_before_ms)
        await self._streams.publish(
            self._subject(spec.queue, spec.priority),
            spec.id.encode(),
            headers=headers,
            msg_id=f"{spec.id}:{run}",
        )

    # -- Backend ----------------------------------------------------------------------

    async def enqueue(self, spec: JobSpec, data: bytes, *, delay: float, at_ms: int) -> Enqueued:
        """Write the record (the id dedups), then publish the job's message."""
        await self._mark_band(spec.queue, spec.priority)
        now = _now_ms()
        nb = max(at_ms, now + int(delay * 1000))
        state: JobState = "scheduled" if nb > now else "queued"
        rec = {
            "spec": data,
            "state": state,
            "attempt": 0,
            "tries": 0,
            "run": 1,
            "seq": 0,
            "queue": spec.queue,
            "enq": now,
            "nb": nb,
        }
        try:
            await self._cas(spec.id, rec, 0)
        except ConflictError:
            got = await self._get(spec.id)
            if got is None:  # expired or purged just now: the id is free again
                return await self.enqueue(spec, data, delay=delay, at_ms=at_ms)
            old = got[0]
            st = parse_state(old["state"])
            if st in ("queued", "scheduled") and old.get("seq", 0) == 0:
                # never handed out: its message may be missing (the enqueuer died)
                await self._publish(decode_spec(old["spec"]), old["run"], old.get("nb", 0))
            return Enqueued(spec.id, False, st)
        await self._publish(spec, 1, nb if nb > now else 0)
        return Enqueued(spec.id, True, state)

    async def _bands_of(self, queue: str) -> list[int]:
        """The priorities ``queue`` has had jobs of, highest first, each with its consumer
        (refreshed every few seconds)."""
        now = time.monotonic()
        cached = self._bands.get(queue)
        if cached is not None and now - cached[0] < _BAND_REFRESH_S:
            return cached[1]
        bands = {0}
        for item in await self._kv.scan(f"{self.prefix}bands/{queue}/", limit=100):
            tail = item.key.rsplit("/", 1)[1]
            if tail.isdigit() and int(tail) <= MAX_PRIORITY:
                bands.add(int(tail))
        ordered = sorted(bands, reverse=True)
        for band in ordered:
            await self._ensure_consumer(queue, band)
        self._bands[queue] = (now, ordered)
        return ordered

    async def fetch(self, queue: str, worker: str, batch: int, wait: float) -> list[Lease]:
        """Lease up to ``batch`` jobs, highest priority first (see the module docstring)."""
        check_queue_name(queue)
        bands = await self._bands_of(queue)
        out: list[Lease] = []
        for band in bands:
            if len(out) >= batch:
                break
            msgs = await self._streams.fetch(
                self.stream,
                self._consumer(queue, band),
                batch=batch - len(out),
                worker=worker,
                no_wait=True,
            )
            out += await self._start(msgs, worker)
        if not out and wait > 0:
            # long-poll the default priority; other priorities are polled each round
            expires = wait if bands == [0] else min(wait, 0.1)
            msgs = await self._streams.fetch(
                self.stream,
                self._consumer(queue, 0),
                batch=batch,
                expires=expires,
                worker=worker,
            )
            out += await self._start(msgs, worker)
        return out

    async def _start(self, msgs: Sequence[Any], worker: str) -> list[Lease]:
        leases = await asyncio.gather(*(self._start_one(m, worker) for m in msgs))
        return [x for x in leases if x is not None]

    async def _start_one(self, msg: Any, worker: str) -> Lease | None:
        job_id = msg.headers.get(JOB_HEADER, "")
        run = msg.headers.get(RUN_HEADER, "")
        for _ in range(8):
            got = await self._get(job_id) if job_id else None
            if got is None:
                await msg.ack()  # purged or expired: nothing to run
                return None
            rec, rev = got
            if (
                str(rec.get("run")) != run
                or rec.get("state") not in _RUNNABLE
                or rec.get("seq", 0) not in (0, msg.seq)
            ):
                await msg.ack()  # a message of an earlier run, a duplicate, or cancelled
                return None
            attempt = int(rec["attempt"]) + 1
            tries = int(rec["tries"]) + 1
            new = {
                **rec,
                "state": "running",
                "attempt": attempt,
                "tries": tries,
                "seq": msg.seq,
                "dl": msg.deliveries,
                "worker": worker,
                "start": _now_ms(),
            }
            try:
                rev = await self._cas(job_id, new, rev)
            except ConflictError:
                continue
            spec = decode_spec(rec["spec"])
            self._held[(job_id, attempt)] = _Held(rev, new)
            return Lease(
                spec,
                attempt,
                tries,
                f"{msg.seq}:{msg.deliveries}",
                int(rec.get("enq", 0)),
                worker,
            )
        return None

    def _delivery(self, lease: Lease) -> tuple[str, tuple[int, int]]:
        seq, _, deliveries = lease.handle.partition(":")
        return self._consumer(lease.spec.queue, lease.spec.priority), (int(seq), int(deliveries))

    async def _answer(self, lease: Lease, kind: str, **kw: Any) -> None:
        consumer, delivery = self._delivery(lease)
        with contextlib.suppress(NotFoundError):
            await self._streams.ack(self.stream, consumer, [delivery], kind=kind, **kw)

    async def heartbeat(self, leases: Sequence[Lease]) -> list[HeartbeatOutcome]:
        """Check each record and extend each delivery's ack deadline (``in_progress``)."""
        recs = await asyncio.gather(*(self._get(lease.spec.id) for lease in leases))
        out: list[HeartbeatOutcome] = []
        renew: dict[str, list[tuple[int, tuple[int, int]]]] = {}
        for i, (lease, got) in enumerate(zip(leases, recs, strict=True)):
            rec = got[0] if got else None
            if rec is not None and rec.get("state") == "cancelled":
                out.append("cancelled")
            elif rec is None or rec.get("state") != "running" or rec["attempt"] != lease.attempt:
                out.append("stale")
            else:
                out.append("ok")
                consumer, delivery = self._delivery(lease)
                renew.setdefault(consumer, []).append((i, delivery))
        for consumer, items in renew.items():
            try:
                statuses = await self._streams.ack(
                    self.stream, consumer, [d for _, d in items], kind="progress"
                )
            except NotFoundError:
                statuses = ["stale"] * len(items)
            for (i, _), status in zip(items, statuses, strict=True):
                if status != "ok":
                    out[i] = "stale"  # redelivered meanwhile: another worker has it
        return out

    async def complete(self, lease: Lease, result: bytes, result_ttl: float) -> Outcome:
        """Mark the record succeeded (with the result and its TTL), then ack the message."""
        held = await self._update_held(
            lease,
            {"state": "succeeded", "result": result, "fin": _now_ms(), "error": None},
            ttl=result_ttl,
        )
        if held is None:
            return "stale"
        await self._answer(lease, "ack")
        return "ok"

    async def fail(self, lease: Lease, error: str, retry_delay: float | None) -> Outcome:
        """Record the failure, then nak the message (retry) or term it (dead letter)."""
        now = _now_ms()
        if retry_delay is None:
            change: dict[str, Any] = {"state": "dead", "error": error, "fin": now}
        else:
            change = {"state": "retrying", "error": error, "nb": now + int(retry_delay * 1000)}
        if await self._update_held(lease, change) is None:
            return "stale"
        if retry_delay is None:
            await self._answer(lease, "term", reason=error[:500])
        else:
            await self._answer(lease, "nak", delay_ms=max(0, int(retry_delay * 1000)))
        return "ok"

    async def release(self, lease: Lease, delay: float) -> Outcome:
        """Give the job back without counting the try (``nak`` after ``delay``)."""
        got = self._held.get((lease.spec.id, lease.attempt))
        tries = int(got.record["tries"]) - 1 if got else max(0, lease.tries - 1)
        change = {"state": "scheduled", "tries": tries, "nb": _now_ms() + int(delay * 1000)}
        if await self._update_held(lease, change) is None:
            return "stale"
        await self._answer(lease, "nak", delay_ms=max(0, int(delay * 1000)))
        return "ok"

    async def progress(self, lease: Lease, value: bytes) -> Outcome:
        """Record progress unless the lease is stale."""
        return "ok" if await self._update_held(lease, {"progress": value}) else "stale"

    async def get(self, job_id: str) -> JobInfo | None:
        """The job's record, or ``None``."""
        got = await self._get(job_id)
        return None if got is None else _info(got[0])

    async def _admin(self, job_id: str, requeue: bool) -> AdminOutcome:
        for _ in range(8):
            got = await self._get(job_id)
            if got is None:
                return "not_found"
            rec, rev = got
            st = rec.get("state")
            if requeue:
                if st not in ("dead", "cancelled"):
                    return "wrong_state"
                run = int(rec["run"]) + 1
                new = {**rec, "state": "queued", "tries": 0, "run": run, "seq": 0, "fin": 0}
            else:
                if st in FINAL_STATES:
                    return "wrong_state"
                new = {**rec, "state": "cancelled", "fin": _now_ms()}
            try:
                await self._cas(job_id, new, rev)
            except ConflictError:
                continue
            if requeue:
                spec = decode_spec(rec["spec"])
                await self._mark_band(spec.queue, spec.priority)
                await self._publish(spec, int(new["run"]), 0)
            return "ok"
        return "wrong_state"

    async def cancel(self, job_id: str) -> AdminOutcome:
        """Cancel a job that is not final (its message is dropped when next delivered)."""
        return await self._admin(job_id, requeue=False)

    async def requeue(self, job_id: str) -> AdminOutcome:
        """Queue a dead or cancelled job again: a new run with a new message."""
        return await self._admin(job_id, requeue=True)

    async def _keys(self) -> AsyncIterator[str]:
        """Every record's key in key order, a page of keys at a time (no cap)."""
        for b in range(_BUCKETS):
            async for item in self._kv.scan_iter(f"{self.prefix}job/{b:x}/", page=_SCAN_PAGE):
                yield item.key

    async def list_jobs(
        self, queue: str, state: JobState | None, offset: int, limit: int
    ) -> list[JobInfo]:
        """Jobs of ``queue`` in key order (job id), optionally only those in ``state``."""
        keys: list[str] = []
        seen = 0
        async for key in self._keys():
            if seen >= offset + limit:
                break
            if seen >= offset:
                keys.append(key)
            seen += 1
        got = await asyncio.gather(*(self._get(k.rsplit("/", 1)[1]) for k in keys))
        infos = [_info(g[0]) for g in got if g is not None]
        return [i for i in infos if i.spec.queue == queue and (state is None or i.state == state)]

    async def count(self, queue: str, state: JobState | None) -> int:
        """Number of job records (of every queue: an upper bound)."""
        n = 0
        async for _ in self._keys():
            n += 1
        return n

    async def purge(self, queue: str, states: Sequence[JobState]) -> int:
        """Delete the records of ``queue``'s final jobs in ``states``."""
        wanted = {s for s in states if s in FINAL_STATES}
        removed = 0
        async for key in self._keys():
            got = await self._get(key.rsplit("/", 1)[1])
            if got is None:
                continue
            rec, rev = got
            if rec.get("queue") == queue and rec.get("state") in wanted:
                with contextlib.suppress(ConflictError):
                    if await self._kv.delete(key, revision=rev) is not None:
                        removed += 1
        return removed

    async def hold_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew a lease key in the KV (compare-and-set with a TTL)."""
        key = f"{self.prefix}lease/{name}"
        got = await self._kv.get(key)
        try:
            if got is None:
                await self._kv.cas(key, owner.encode(), revision=0, ttl=ttl)
                return True
            if got.value == owner.encode():
                await self._kv.cas(key, owner.encode(), revision=got.revision, ttl=ttl)
                return True
        except ConflictError:
            return False
        return False

    async def queues(self) -> list[str]:
        """Queue names that have had jobs."""
        names = set()
        async for it in self._kv.scan_iter(f"{self.prefix}bands/", page=_SCAN_PAGE):
            names.add(it.key[len(self.prefix) :].split("/")[1])
        return sorted(names)

    async def close(self) -> None:
        """Close both clients."""
        await self._streams.close()
        await self._kv.close()

    async def __aenter__(self) -> DsysBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _info(rec: dict[str, Any]) -> JobInfo:
    def num(name: str) -> int:
        v = rec.get(name)
        return int(v) if v else 0

    return JobInfo(
        spec=decode_spec(rec["spec"]),
        state=parse_state(rec.get("state")),
        attempt=num("attempt"),
        tries=num("tries"),
        progress=decode_value(rec.get("progress")),
        result=decode_value(rec.get("result")),
        error=rec.get("error"),
        enqueued_ms=num("enq"),
        started_ms=num("start"),
        finished_ms=num("fin"),
        not_before_ms=num("nb"),
        worker=rec.get("worker"),
    )


__all__ = ["JOB_HEADER", "RUN_HEADER", "DsysBackend"]
