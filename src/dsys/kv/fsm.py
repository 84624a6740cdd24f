"""The replicated key-value state machine (pure: no I/O, no clock, no asyncio).

Theory of operation
-------------------
Every write is a *command* (:class:`Put`, :class:`Delete`, :class:`Tick`) encoded with
:func:`encode_command` into the data of one Raft log entry. Every replica applies the same
commands in the same order through :meth:`KVStateMachine.apply` and therefore reaches the
same state; nothing here reads a clock or a random source.

* **Revisions.** A global counter ``revision`` grows by one for every write that changes
  the store. Each key remembers the revision of its last change (``mod_revision``); this
  is the per-key revision that compare-and-set compares (``if_revision=0`` means "the key
  must not exist").
* **TTL.** The leader stamps each command with its wall-clock time ``now_ms``. The state
  machine keeps ``clock_ms = max(clock_ms, now_ms)`` and, before applying a command, drops
  every key whose ``expires_ms <= clock_ms``. Expiry is thus decided by the log, never by a
  replica's local clock at apply time, so all replicas expire the same keys at the same
  log position. The leader proposes a :class:`Tick` now and then so that idle TTL keys
  expire too.
* **Exactly-once.** A command carries ``(client_id, seq)``. The :class:`Sessions` table
  caches the result of recent sequence numbers per client, so a retried command that
  already committed returns its first result instead of being applied twice.
* **Snapshots.** :meth:`KVStateMachine.snapshot` encodes the whole state (data, revision,
  clock, sessions) as msgpack; :meth:`KVStateMachine.restore` replaces the state by it.
* **Change history (watch).** Every change appends one small tuple
  ``(revision, key, value, expired)`` to a bounded deque (``value`` is None for a
  delete; ``expired`` marks a delete decided by TTL expiry; all keys expiring at one log
  position share one revision). Old events are dropped beyond ``history_events`` events or
  ``history_bytes`` bytes of values; ``compacted_revision`` (the *floor*) is then the
  revision of the newest dropped event, and after :meth:`KVStateMachine.restore` it is
  the snapshot's revision (the history is not part of a snapshot). Events with a revision
  above the floor are all present, so :meth:`KVStateMachine.changes` answers a watcher
  from any revision above it, or :class:`Compacted`. Every replica keeps its own history
  of what it applied, so a watcher may read from any replica and resume on another.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
from sortedcontainers import SortedDict

from dsys.codec import decode, encode
from dsys.errors import ConfigError, RemoteProtocolError

_unpack = msgpack.unpackb

MAX_KEY_BYTES = 1024
"""Longest key accepted, in UTF-8 bytes."""

SNAPSHOT_MAX_BYTES = 1 << 30
"""Largest snapshot encoded or decoded (1 GiB)."""

MAX_COMMAND_BYTES = 16 * 1024 * 1024
"""Largest encoded command accepted."""

HISTORY_EVENTS = 100_000
"""Change events kept for watchers by default."""

HISTORY_BYTES = 64 * 1024 * 1024
"""Bytes of values (puts) kept in the change history by default."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Put:
    """Set ``key`` to ``value``; with ``if_revision`` only if the key's revision matches.

    Attributes:
        ttl_ms: the key expires ``ttl_ms`` after ``now_ms`` (0 = never).
        now_ms: the leader's wall-clock time when it accepted the command.
        client_id: the issuing client's session id ("" = no exactly-once tracking).
        seq: the client's sequence number for this command.
    """

    key: str
    value: bytes
    if_revision: int | None = None
    ttl_ms: int = 0
    now_ms: int = 0
    client_id: str = ""
    seq: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete:
    """Delete ``key``; with ``if_revision`` only if the key's revision matches."""

    key: str
    if_revision: int | None = None
    now_ms: int = 0
    client_id: str = ""
    seq: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """Advance the replicated clock to ``now_ms`` so that expired TTL keys are removed."""

    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SetMember:
    """Record (``addr`` given) or forget (``addr=""``) the address of cluster member ``id``.

    The cluster's address book is replicated state, so every node (and a node restored
    from a snapshot) knows how to reach members added at run time.
    """

    id: str
    addr: str


Command = Put | Delete | Tick | SetMember
"""A state-machine command."""

_PUT, _DEL, _TICK, _MEMBER = 1, 2, 3, 4


def encode_command(cmd: Command) -> bytes:
    """Encode a command compactly as a msgpack list (the data of one log entry)."""
    if isinstance(cmd, Put):
        plain: list[Any] = [
            _PUT,
            cmd.key,
            cmd.value,
            cmd.if_revision,
            cmd.ttl_ms,
            cmd.now_ms,
            cmd.client_id,
            cmd.seq,
        ]
    elif isinstance(cmd, Delete):
        plain = [_DEL, cmd.key, cmd.if_revision, cmd.now_ms, cmd.client_id, cmd.seq]
    elif isinstance(cmd, SetMember):
        plain = [_MEMBER, cmd.id, cmd.addr]
    else:
        plain = [_TICK, cmd.now_ms]
    return encode(plain, max_size=MAX_COMMAND_BYTES)


def _no_ext(code: int, data: bytes) -> object:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise RemoteProtocolError(f"expected an integer, got {type(v).__name__}")
    return v


def _opt(v: Any) -> int | None:
    return None if v is None else _int(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise RemoteProtocolError(f"expected a string, got {type(v).__name__}")
    return v


def decode_command(data: bytes) -> Command:
    """Decode :func:`encode_command` output, checking every field's type.

    Raises:
        RemoteProtocolError: the bytes are not a valid command.
    """
    v = decode(data, max_size=MAX_COMMAND_BYTES)
    if not isinstance(v, list) or not v:
        raise RemoteProtocolError("a command must be a non-empty msgpack list")
    kind = v[0]
    if kind == _PUT and len(v) == 8:
        if not isinstance(v[2], bytes):
            raise RemoteProtocolError("put value must be bytes")
        return Put(
            key=_str(v[1]),
            value=v[2],
            if_revision=_opt(v[3]),
            ttl_ms=_int(v[4]),
            now_ms=_int(v[5]),
            client_id=_str(v[6]),
            seq=_int(v[7]),
        )
    if kind == _DEL and len(v) == 6:
        return Delete(
            key=_str(v[1]),
            if_revision=_opt(v[2]),
            now_ms=_int(v[3]),
            client_id=_str(v[4]),
            seq=_int(v[5]),
        )
    if kind == _TICK and len(v) == 2:
        return Tick(now_ms=_int(v[1]))
    if kind == _MEMBER and len(v) == 3:
        return SetMember(id=_str(v[1]), addr=_str(v[2]))
    raise RemoteProtocolError(f"unknown command {kind!r} with {len(v)} fields")


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """The outcome of applying one command.

    Attributes:
        ok: the write happened (or, for :class:`Tick`, always True).
        revision: the store revision after the write (when ok), else the current one.
        status: ``"ok"``, ``"conflict"`` (CAS revision mismatch), ``"not_found"``
            (delete of a missing key) or ``"expired_session"`` (a retry too old to answer).
        key_revision: on a conflict, the key's current revision (0 = missing).
    """

    ok: bool
    revision: int
    status: str = "ok"
    key_revision: int = 0

    def to_plain(self) -> list[Any]:
        """A compact list form for snapshots and the wire."""
        return [self.ok, self.revision, self.status, self.key_revision]

    @classmethod
    def from_plain(cls, value: Any) -> Result:
        """The inverse of :meth:`to_plain`."""
        ok, revision, status, key_revision = value
        return cls(
            ok=bool(ok), revision=int(revision), status=str(status), key_revision=key_revision
        )


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One stored key.

    Attributes:
        mod_revision: revision of the last change; the value compare-and-set compares.
        create_revision: revision at which the key was (last) created.
        expires_ms: replicated-clock time at which the key expires (0 = never).
    """

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    expires_ms: int = 0


def validate_key(key: object) -> str:
    """Check that ``key`` is a non-empty string of at most :data:`MAX_KEY_BYTES` bytes.

    Raises:
        RemoteProtocolError: the key is not acceptable (a BadInputError, maps to 400).
    """
    if not isinstance(key, str):
        raise RemoteProtocolError(f"key must be a string, got {type(key).__name__}")
    if not key:
        raise RemoteProtocolError("key must not be empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise RemoteProtocolError(f"key is longer than {MAX_KEY_BYTES} bytes")
    return key


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change of the store, as a watcher sees it.

    Attributes:
        revision: the store revision of the change (keys expiring together share one).
        type: ``"put"``, ``"delete"`` or ``"expire"`` (a delete decided by TTL expiry).
        key: the changed key.
        value: the new value of a put; None for a delete or an expiry.
    """

    revision: int
    type: str
    key: str
    value: bytes | None = None


@dataclass(frozen=True, slots=True)
class Changes:
    """What :meth:`KVStateMachine.changes` found.

    Attributes:
        events: matching events in revision order (never part of a revision's events).
        next_revision: where the next call continues (every event below it was looked at).
    """

    events: list[WatchEvent]
    next_revision: int


@dataclass(frozen=True, slots=True)
class Compacted:
    """The requested revision is no longer in the change history.

    Attributes:
        revision: the oldest revision still available (``compacted_revision + 1``):
            refetch the state (e.g. a scan) and watch from its revision + 1, at least this.
    """

    revision: int


def _event(ev: tuple[int, str, bytes | None, bool]) -> WatchEvent:
    rev, key, value, expired = ev
    kind = "put" if value is not None else ("expire" if expired else "delete")
    return WatchEvent(rev, kind, key, value)


class Sessions:
    """Exactly-once table: the recent results of each client, bounded in clients and seqs.

    Each client keeps the results of its last ``per_client`` sequence numbers. A command
    whose ``seq`` is cached returns the cached result; one older than the oldest cached
    seq of that client is answered ``expired_session`` (it cannot be told apart from a
    new command safely). When more than ``max_clients`` clients are known, the one least
    recently active (by replicated clock, then by id) is forgotten; the choice is
    deterministic, so every replica forgets the same one.

    Args:
        max_clients: how many client sessions to keep.
        per_client: how many results to keep per client (>= the client's max in flight).
    """

    def __init__(self, *, max_clients: int = 10_000, per_client: int = 1024) -> None:
        if max_clients < 1 or per_client < 1:
            raise ConfigError("max_clients and per_client must be >= 1")
        self.max_clients = max_clients
        self.per_client = per_client
        # client_id -> (last activity clock_ms, floor seq, seq -> result)
        self._clients: dict[str, tuple[int, int, OrderedDict[int, Result]]] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def check(self, client_id: str, seq: int) -> Result | None:
        """The cached result of ``(client_id, seq)``; ``expired_session`` if too old; else None."""
        entry = self._clients.get(client_id)
        if entry is None:
            return None
        _, floor, results = entry
        cached = results.get(seq)
        if cached is not None:
            return cached
        if seq < floor:
            return Result(ok=False, revision=0, status="expired_session")
        return None

    def record(self, client_id: str, seq: int, result: Result, now_ms: int) -> None:
        """Remember ``result`` as the answer to ``(client_id, seq)``."""
        entry = self._clients.get(client_id)
        if entry is None:
            results: OrderedDict[int, Result] = OrderedDict()
            floor = 0
        else:
            _, floor, results = entry
        results[seq] = result
        while len(results) > self.per_client:
            old, _ = results.popitem(last=False)
            floor = max(floor, old + 1)
        self._clients[client_id] = (now_ms, floor, results)
        if len(self._clients) > self.max_clients:
            victim = min(self._clients, key=lambda c: (self._clients[c][0], c))
            del self._clients[victim]

    def to_plain(self) -> list[Any]:
        """Plain values for a snapshot."""
        return [
            [cid, at, floor, [[s, r.to_plain()] for s, r in results.items()]]
            for cid, (at, floor, results) in sorted(self._clients.items())
        ]

    def load_plain(self, value: Any) -> None:
        """Replace the table by a :meth:`to_plain` value."""
        self._clients = {}
        for cid, at, floor, items in value:
            results: OrderedDict[int, Result] = OrderedDict()
            for s, r in items:
                results[int(s)] = Result.from_plain(r)
            self._clients[str(cid)] = (int(at), int(floor), results)


class KVStateMachine:
    """The deterministic KV store every replica applies committed commands to.

    Args:
        max_clients: exactly-once sessions kept (see :class:`Sessions`).
        per_client: results kept per client session.
        history_events: change events kept for watchers (at least 1).
        history_bytes: bytes of put values kept in the change history (the newest event
            is kept whatever its size).
    """

    def __init__(
        self,
        *,
        max_clients: int = 10_000,
        per_client: int = 1024,
        history_events: int = HISTORY_EVENTS,
        history_bytes: int = HISTORY_BYTES,
    ) -> None:
        if history_events < 1 or history_bytes < 0:
            raise ConfigError("history_events must be >= 1 and history_bytes >= 0")
        self._history_events = history_events
        self._history_bytes = history_bytes
        # (revision, key, value or None, expired) in revision order
        self._history: deque[tuple[int, str, bytes | None, bool]] = deque()
        self._hbytes = 0  # bytes of the values in _history
        # invariant: every event with revision > compacted_revision is in _history
        self.compacted_revision = 0
        """Revisions up to this one are gone from the change history (the floor)."""
        self._data: SortedDict = SortedDict()  # key -> KeyValue
        self._ttl: SortedDict = SortedDict()  # (expires_ms, key) -> None
        self.revision = 0
        self.clock_ms = 0
        self.sessions = Sessions(max_clients=max_clients, per_client=per_client)
        self.members: dict[str, str] = {}
        """Address book of members added at run time: node id -> ``host:port``."""
        self.on_members_changed: Callable[[dict[str, str]], None] | None = None
        """Called after the address book changed (set by the server to update peers)."""

    # -- reads ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> KeyValue | None:
        """The live value of ``key`` (None if missing or expired by the replicated clock)."""
        kv: KeyValue | None = self._data.get(key)
        if kv is None or (kv.expires_ms and kv.expires_ms <= self.clock_ms):
            return None
        return kv

    def scan(self, prefix: str = "", limit: int = 1000, after: str | None = None) -> list[KeyValue]:
        """Live keys starting with ``prefix`` in key order, at most ``limit`` of them;
        with ``after``, only keys after that one (where the previous page ended)."""
        out: list[KeyValue] = []
        if limit <= 0:
            return out
        if after is not None and after >= prefix:
            keys = self._data.irange(minimum=after, inclusive=(False, True))
        else:
            keys = self._data.irange(minimum=prefix)
        for key in keys:
            if not key.startswith(prefix):
                break
            kv = self.get(key)
            if kv is not None:
                out.append(kv)
                if len(out) >= limit:
                    break
        return out

    def items(self) -> Iterator[KeyValue]:
        """Every live key in key order."""
        for key in self._data:
            kv = self.get(key)
            if kv is not None:
                yield kv

    # -- change history (watch) -------------------------------------------------------

    def changes(
        self, start_revision: int, prefix: str = "", limit: int = 1000, max_bytes: int = 1 << 20
    ) -> Changes | Compacted:
        """Events at or after ``start_revision`` whose key starts with ``prefix``.

        At most ``limit`` events are looked at (matching or not), and looking stops once
        the returned values exceed ``max_bytes``; but a revision's events are never split,
        so a call may return a few more. ``start_revision`` beyond the
        current revision is allowed: nothing is returned yet and ``next_revision`` stays.

        Returns:
            :class:`Changes` (continue from its ``next_revision``), or :class:`Compacted`
            when events at ``start_revision`` were already dropped.
        """
        if start_revision <= self.compacted_revision:
            return Compacted(self.compacted_revision + 1)
        h = self._history
        if start_revision > self.revision:
            return Changes([], start_revision)
        i = bisect_left(h, start_revision, key=_rev_of)
        n = len(h)
        end = min(n, i + max(1, limit))
        events: list[WatchEvent] = []
        size = 0
        j = i
        while j < n:
            ev = h[j]
            if (j >= end or size > max_bytes) and ev[0] != h[j - 1][0]:
                break  # only whole revisions
            if ev[1].startswith(prefix):
                events.append(_event(ev))
                if ev[2] is not None:
                    size += len(ev[2])
            j += 1
        next_revision = h[j][0] if j < n else self.revision + 1
        return Changes(events, next_revision)

    def _trim_history(self) -> None:
        """Drop the oldest events beyond the bounds (always keeps the newest one)."""
        h = self._history
        while len(h) > 1 and (len(h) > self._history_events or self._hbytes > self._history_bytes):
            rev, _, value, _ = h.popleft()
            if value is not None:
                self._hbytes -= len(value)
            self.compacted_revision = rev

    @property
    def history_len(self) -> int:
        """Events in the change history."""
        return len(self._history)

    # -- writes -----------------------------------------------------------------------

    def apply(self, data: bytes) -> Result:
        """Decode and apply one committed command; returns its result.

        A command that cannot be decoded is a replicated no-op with status ``"invalid"``
        (every replica decides the same), so a bad entry can never wedge the log.
        """
        # The hot case, a well-formed Put, without building a Put: exactly what
        # decode_command + apply_command decide, field checks included.
        if len(data) <= MAX_COMMAND_BYTES:
            try:
                v = _unpack(data, raw=False, strict_map_key=True, ext_hook=_no_ext)
            except Exception:  # malformed: the general path below says so
                v = None
            if type(v) is list and len(v) == 8 and v[0] == _PUT:
                _, key, value, if_revision, ttl_ms, now_ms, client_id, seq = v
                if (
                    type(key) is str
                    and type(value) is bytes
                    and (if_revision is None or type(if_revision) is int)
                    and type(ttl_ms) is int
                    and type(now_ms) is int
                    and type(client_id) is str
                    and type(seq) is int
                ):
                    return self._apply_put(key, value, if_revision, ttl_ms, now_ms, client_id, seq)
        try:
            cmd = decode_command(data)
        except RemoteProtocolError:
            return Result(ok=False, revision=self.revision, status="invalid")
        return self.apply_command(cmd)

    def apply_command(self, cmd: Command) -> Result:
        """Apply one decoded command (see :meth:`apply`)."""
        if isinstance(cmd, Put):
            return self._apply_put(
                cmd.key, cmd.value, cmd.if_revision, cmd.ttl_ms, cmd.now_ms, cmd.client_id, cmd.seq
            )
        if isinstance(cmd, SetMember):
            if cmd.addr:
                self.members[cmd.id] = cmd.addr
            else:
                self.members.pop(cmd.id, None)
            if self.on_members_changed is not None:
                self.on_members_changed(dict(self.members))
            return Result(ok=True, revision=self.revision)
        if cmd.now_ms > self.clock_ms:
            self.clock_ms = cmd.now_ms
            self._expire()
        if isinstance(cmd, Tick):
            return Result(ok=True, revision=self.revision)
        if cmd.client_id:
            cached = self.sessions.check(cmd.client_id, cmd.seq)
            if cached is not None:
                return cached
        result = self._delete(cmd)
        if cmd.client_id:
            self.sessions.record(cmd.client_id, cmd.seq, result, self.clock_ms)
        return result

    def _apply_put(
        self,
        key: str,
        value: bytes,
        if_revision: int | None,
        ttl_ms: int,
        now_ms: int,
        client_id: str,
        seq: int,
    ) -> Result:
        if now_ms > self.clock_ms:
            self.clock_ms = now_ms
            if self._ttl:
                self._expire()
        sessions = self.sessions
        if client_id:
            cached = sessions.check(client_id, seq)
            if cached is not None:
                return cached
        old: KeyValue | None = self._data.get(key)
        current = old.mod_revision if old is not None else 0
        if current and old is not None and old.expires_ms and old.expires_ms <= self.clock_ms:
            current = 0  # expired by the replicated clock: as if missing
        if if_revision is not None and if_revision != current:
            result = Result(
                ok=False, revision=self.revision, status="conflict", key_revision=current
            )
        else:
            self.revision = revision = self.revision + 1
            if old is not None and old.expires_ms:
                self._ttl.pop((old.expires_ms, key), None)
            create = old.create_revision if (old is not None and current) else revision
            expires = self.clock_ms + ttl_ms if ttl_ms > 0 else 0
            self._data[key] = KeyValue(key, value, revision, create, expires)
            if expires:
                self._ttl[(expires, key)] = None
            # the change history: one tuple per put, one event dropped per put once full
            h = self._history
            h.append((revision, key, value, False))
            self._hbytes += len(value)
            if len(h) > self._history_events:
                gone = h.popleft()
                self.compacted_revision = gone[0]
                if gone[2] is not None:
                    self._hbytes -= len(gone[2])
            if self._hbytes > self._history_bytes:
                self._trim_history()
            result = Result(ok=True, revision=revision)
        if client_id:
            sessions.record(client_id, seq, result, self.clock_ms)
        return result

    def _current_revision(self, key: str) -> int:
        kv = self.get(key)
        return kv.mod_revision if kv is not None else 0

    def _delete(self, cmd: Delete) -> Result:
        current = self._current_revision(cmd.key)
        if cmd.if_revision is not None and cmd.if_revision != current:
            return Result(ok=False, revision=self.revision, status="conflict", key_revision=current)
        if not current:
            return Result(ok=False, revision=self.revision, status="not_found")
        old = self._data.pop(cmd.key)
        if old.expires_ms:
            self._ttl.pop((old.expires_ms, cmd.key), None)
        self.revision += 1
        self._history.append((self.revision, cmd.key, None, False))
        if len(self._history) > self._history_events:
            self._trim_history()
        return Result(ok=True, revision=self.revision)

    def _expire(self) -> None:
        removed = False
        revision = self.revision + 1  # every key expiring now changes at this revision
        h = self._history
        while self._ttl:
            expires, key = self._ttl.keys()[0]
            if expires > self.clock_ms:
                break
            del self._ttl[(expires, key)]
            if self._data.pop(key, None) is not None:
                h.append((revision, key, None, True))
            removed = True
        if removed:
            self.revision = revision
            if len(h) > self._history_events:
                self._trim_history()

    @property
    def has_ttl_keys(self) -> bool:
        """Whether any key has a TTL (the leader then proposes :class:`Tick` periodically)."""
        return bool(self._ttl)

    # -- snapshots --------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Encode the whole state (data, revision, clock, sessions) as msgpack."""
        value = {
            "rev": self.revision,
            "clock": self.clock_ms,
            "kv": [
                [kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.expires_ms]
                for kv in self._data.values()
            ],
            "sessions": self.sessions.to_plain(),
            "members": dict(self.members),
        }
        return encode(value, max_size=SNAPSHOT_MAX_BYTES)

    def restore(self, data: bytes) -> None:
        """Replace the whole state by a :meth:`snapshot`.

        Raises:
            RemoteProtocolError: the snapshot is malformed.
        """
        value = decode(data, max_size=SNAPSHOT_MAX_BYTES)
        try:
            data_map: SortedDict = SortedDict()
            ttl: SortedDict = SortedDict()
            for key, val, mod, create, expires in value["kv"]:
                data_map[key] = KeyValue(str(key), bytes(val), int(mod), int(create), int(expires))
                if expires:
                    ttl[(int(expires), key)] = None
            sessions = Sessions(
                max_clients=self.sessions.max_clients, per_client=self.sessions.per_client
            )
            sessions.load_plain(value["sessions"])
            revision, clock = int(value["rev"]), int(value["clock"])
            members = {str(k): str(v) for k, v in value.get("members", {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteProtocolError(f"malformed KV snapshot: {exc}") from exc
        self._data, self._ttl, self.sessions = data_map, ttl, sessions
        self.revision, self.clock_ms = revision, clock
        # the events before the snapshot are unknown here: watchers resume above it
        self._history.clear()
        self._hbytes = 0
        self.compacted_revision = revision
        self.members = members
        if self.on_members_changed is not None:
            self.on_members_changed(dict(self.members))


def _rev_of(ev: tuple[int, str, bytes | None, bool]) -> int:
    return ev[0]


__all__ = [
    "HISTORY_BYTES",
    "HISTORY_EVENTS",
    "MAX_COMMAND_BYTES",
    "MAX_KEY_BYTES",
    "Changes",
    "Command",
    "Compacted",
    "Delete",
    "KVStateMachine",
    "KeyValue",
    "Put",
    "Result",
    "Sessions",
    "SetMember",
    "Tick",
    "WatchEvent",
    "decode_command",
    "encode_command",
    "validate_key",
]
