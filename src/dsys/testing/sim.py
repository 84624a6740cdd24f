"""Deterministic network simulation of a Raft cluster, with invariant checks.

:class:`SimNetwork` runs N :class:`~dsys.raft.RaftCore` nodes in one thread: no sockets,
no sleeps, no wall clock. One seeded ``random.Random`` decides everything (message
delays, drops, duplicates, delivery order, the nodes' election-timeout seeds), so a seed
replays exactly. Each node's *durable store* holds only what ``Ready`` told it to persist
(snapshot, hard state, log entries), applied exactly as a real store would; a crashed
node restarts from that store alone. A leader's Ready marked ``messages_before_persist``
is, with probability ``unsynced_p``, persisted only on a later tick: its messages are
delivered and answered first, and a crash in between loses those entries, as a crash
during a real leader's fsync would. Meanwhile that leader applies what commits
(``RaftCore.apply_ready``, when ``early_apply``) and answers its clients, so a crash
between the apply and the persist is part of the schedule.

Safety invariants are checked as the simulation runs and raise :class:`InvariantViolation`
(an ``AssertionError``) naming the seed:

* election safety: at most one leader per term;
* log matching: two persisted entries with the same index and term have the same
  content and the same predecessor term (so, by induction, identical prefixes);
* leader completeness: a new leader holds every committed entry;
* state machine safety: no two nodes apply different entries at the same index;
* durability: at every tick and crash/restart, no majority of any configuration that
  could still elect a leader (the committed one, or one appended after it on a log that
  holds the committed prefix) lacks the last committed entry in its durable stores, so
  committed entries survive crashes and restarts.

:func:`run_campaign` adds clients (put/delete/cas through the log, get through ReadIndex,
retries with exactly-once sessions) and a random fault schedule, then heals everything
and checks liveness (a leader, every pending request answered, within a bound) and the
linearizability of the recorded client history.

Example::

    net = SimNetwork(node_ids=["a", "b", "c"], seed=7)
    old = net.tick_until(net.leader, max_ticks=100)
    net.isolate(old)
    net.tick_until(lambda: net.leader() not in (None, old), max_ticks=200)
    net.propose_via_leader(b"x=1")
    net.heal()
    net.tick_until(lambda: net.node(old).role is Role.FOLLOWER, max_ticks=50)
    net.assert_logs_match()

Pure: no I/O, no clocks, no threads.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from dsys.codec import decode, encode
from dsys.errors import NotLeaderError, ProposalDroppedError
from dsys.raft.core import RaftConfig, RaftCore
from dsys.raft.messages import (
    CODEC,
    BecameLeader,
    ConfChange,
    ConfChangeType,
    Entry,
    EntryKind,
    HardState,
    Message,
    NodeId,
    ReadIndexDropped,
    Ready,
    Role,
    Snapshot,
    decode_batch,
    decode_conf,
)
from dsys.raft.session import SessionTable
from dsys.testing.linearizability import CheckResult, History, KVModel, check

T = TypeVar("T")


class InvariantViolation(AssertionError):
    """A Raft safety or liveness property failed in the simulation (a bug in the core)."""


@dataclass
class DurableStore:
    """What a node has durably persisted, exactly as told by its Ready batches."""

    hard_state: HardState | None = None
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)  # entries after the snapshot

    @property
    def snap_index(self) -> int:
        """Index covered by the stored snapshot (0 without one)."""
        return self.snapshot.meta.index if self.snapshot is not None else 0

    def term_at(self, index: int) -> int | None:
        """Term of the stored entry at ``index`` (snapshot included), else ``None``."""
        s = self.snap_index
        if index == s:
            return self.snapshot.meta.term if self.snapshot is not None else 0
        if index < s or index > s + len(self.entries):
            return None
        return self.entries[index - s - 1].term

    def covers(self, index: int, term: int) -> bool:
        """True when the store holds entry ``(index, term)`` or a snapshot beyond it."""
        return self.snap_index >= index or self.term_at(index) == term

    def persist(self, rd: Ready) -> None:
        """Apply the persistence part of a Ready, like a durable store with fsync."""
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot
            self.entries = []
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state
        if rd.entries:
            first = rd.entries[0].index
            s = self.snap_index
            if first <= s:
                raise InvariantViolation(f"Ready entry {first} is at or before snapshot {s}")
            if first > s + len(self.entries) + 1:
                raise InvariantViolation(
                    f"Ready entries start at {first}, store ends at {s + len(self.entries)}"
                )
            del self.entries[first - s - 1 :]
            self.entries.extend(rd.entries)

    def compact(self, snap: Snapshot) -> None:
        """Store a snapshot taken locally and drop the log entries it covers."""
        drop = snap.meta.index - self.snap_index
        self.snapshot = snap
        self.entries = self.entries[drop:]


class SimKV:
    """The replicated state machine of the simulation: a dict plus a session table.

    Commands are ``encode([client, seq, op, key, value, expected])``; results are the
    get value, ``True``/``False`` for cas, ``None`` otherwise.
    """

    def __init__(self) -> None:
        self.data: dict[str, int] = {}
        self.sessions: SessionTable[object] = SessionTable(max_results_per_client=4)
        self.opaque = 0

    def apply(self, cmd: bytes) -> tuple[str, int, object]:
        """Apply a command once (duplicates answered from the session table).

        Entries that are not client commands (opaque test payloads) are recorded in
        ``opaque`` and otherwise ignored.
        """
        try:
            client, seq, op, key, value, expected = decode(cmd)
        except (ValueError, TypeError):
            self.opaque += 1
            return "", -1, None
        hit = self.sessions.check(client, seq)
        if hit is not None:
            return client, seq, hit.result
        result: object = None
        if op == "put":
            self.data[key] = value
        elif op == "delete":
            self.data.pop(key, None)
        elif op == "cas":
            if self.data.get(key) == expected:
                self.data[key] = value
                result = True
            else:
                result = False
        elif op == "get":
            result = self.data.get(key)
        self.sessions.record(client, seq, result)
        return client, seq, result

    def snapshot(self) -> bytes:
        """Serialize the whole state machine."""
        return encode({"data": self.data, "sessions": self.sessions.to_plain()})

    def restore(self, data: bytes) -> None:
        """Replace the state with a snapshot."""
        plain = decode(data)
        self.data = dict(plain["data"])
        self.sessions = SessionTable.from_plain(plain["sessions"], max_results_per_client=4)


@dataclass
class _Client:
    id: str
    seq: int = 0
    op: tuple[object, ...] | None = None  # ("put", key, value) ...
    op_id: int = -1
    target: NodeId | None = None
    sent_at: int = 0
    retry_at: int = 0
    done: int = 0


@dataclass
class _InFlight:
    at: int
    order: int
    msg: Message


class SimNode:
    """One simulated node: its core, its durable store, its state machine."""

    def __init__(self, net: SimNetwork, node_id: NodeId, voters: Sequence[NodeId] | None) -> None:
        self.id = node_id
        self.net = net
        self.voters = voters
        self.store = DurableStore()
        self.alive = True
        self.fsm = SimKV()
        self.applied = 0
        self.core = self._make_core()
        # A leader's Ready whose messages went out before its persist (lost on crash).
        self.unsynced: Ready | None = None
        # client bookkeeping (volatile: lost on crash)
        self.pending_writes: dict[int, tuple[int, str, int]] = {}
        self.pending_reads: dict[bytes, str] = {}
        self.read_waits: list[tuple[int, bytes]] = []

    def _make_core(self) -> RaftCore:
        st = self.store
        return RaftCore(
            self.net.config_for(self.id),
            voters=self.voters,
            hard_state=st.hard_state,
            snapshot=st.snapshot,
            entries=list(st.entries),
            applied=st.snap_index,
            rng_seed=self.net.rng.randrange(2**32),
        )

    def restart(self) -> None:
        """Rebuild everything volatile from the durable store."""
        self.alive = True
        self.unsynced = None
        self.fsm = SimKV()
        if self.store.snapshot is not None:
            self.fsm.restore(self.store.snapshot.data)
        self.applied = self.store.snap_index
        self.core = self._make_core()
        self.pending_writes = {}
        self.pending_reads = {}
        self.read_waits = []


class SimNetwork:
    """A seeded, deterministic simulated cluster of Raft cores (see the module docs).

    ``election_tick``, ``heartbeat_tick``, ``pre_vote``, ``check_quorum``, ``lease_read``,
    ``max_entries_per_msg`` and ``max_inflight_msgs`` are passed to every node's
    :class:`~dsys.raft.RaftConfig` (small message limits exercise more paths).

    Args:
        node_ids: the initial voters (3 or 5 are typical).
        seed: seed of the single random generator driving the whole simulation.
        max_delay: messages are delayed by 0..max_delay ticks (uniformly).
        trace_limit: how many trace lines to keep for failure reports.
    """

    def __init__(
        self,
        node_ids: Sequence[NodeId],
        seed: int,
        *,
        election_tick: int = 10,
        heartbeat_tick: int = 1,
        pre_vote: bool = True,
        check_quorum: bool = True,
        lease_read: bool = False,
        max_entries_per_msg: int = 64,
        max_inflight_msgs: int = 16,
        max_delay: int = 0,
        trace_limit: int = 400,
        quiet_ticks: int = 0,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0
        self._cfg_kw = {
            "election_tick": election_tick,
            "heartbeat_tick": heartbeat_tick,
            "pre_vote": pre_vote,
            "check_quorum": check_quorum,
            "lease_read": lease_read,
            "max_entries_per_msg": max_entries_per_msg,
            "max_inflight_msgs": max_inflight_msgs,
            "quiet_ticks": quiet_ticks,
        }
        self.voters = list(node_ids)
        self.max_delay = max_delay
        self.drop_p = 0.0
        self.dup_p = 0.0
        self.reorder = True
        self._cut: set[tuple[NodeId, NodeId]] = set()
        self._link_drop: dict[tuple[NodeId, NodeId], float] = {}
        self._inflight: list[_InFlight] = []
        self._order = 0
        self._trace: list[str] = []
        self._trace_limit = trace_limit
        self.nodes: dict[NodeId, SimNode] = {}
        for nid in node_ids:
            self.nodes[nid] = SimNode(self, nid, self.voters)
        # -- invariant state
        self.leaders: dict[int, NodeId] = {}
        self._entry_seen: dict[tuple[int, int], tuple[int, int, bytes]] = {}
        self.committed: list[Entry] = []  # the global committed log, index i at [i - 1]
        self.committed_voters: list[NodeId] = list(node_ids)
        self.committed_conf_index = 0
        # -- clients
        self.history = History()
        self.clients: list[_Client] = []
        self.client_timeout = 4 * election_tick
        self.snapshot_threshold = 0  # compact when this many entries are applied (0: never)
        # How often a leader's Ready marked messages_before_persist is persisted on a later
        # tick instead of at once (its messages leave first; a crash loses the entries).
        self.unsynced_p = 0.5
        self.early_apply = True  # a leader applies committed entries during its persist
        self.messages_delivered = 0
        self.codec_roundtrip = False  # encode/decode every message with the wire codec
        self.issue_ops = True  # clients start new operations (False: only finish pending)
        self._keys: list[str] = ["x", "y"]
        self._recent_values: list[int | None] = []

    # -- construction helpers ----------------------------------------------------------

    def config_for(self, node_id: NodeId) -> RaftConfig:
        """The RaftConfig every node gets."""
        return RaftConfig(id=node_id, **self._cfg_kw)  # type: ignore[arg-type]

    def add_node(self, node_id: NodeId) -> SimNode:
        """Start a fresh node that is not yet a member (it learns the config from the leader)."""
        n = SimNode(self, node_id, None)
        self.nodes[node_id] = n
        self.trace(f"add node {node_id}")
        return n

    # -- observation -------------------------------------------------------------------

    def node(self, node_id: NodeId) -> RaftCore:
        """The core of ``node_id``."""
        return self.nodes[node_id].core

    def leader(self) -> NodeId | None:
        """The alive leader with the highest term, if any."""
        best: tuple[int, NodeId] | None = None
        for n in self.nodes.values():
            if n.alive and n.core.role is Role.LEADER and (best is None or n.core.term > best[0]):
                best = (n.core.term, n.id)
        return best[1] if best else None

    def trace(self, line: str) -> None:
        """Append a line to the (bounded) trace."""
        self._trace.append(f"t={self.now} {line}")
        if len(self._trace) > 2 * self._trace_limit:
            del self._trace[: self._trace_limit]

    def trace_text(self) -> str:
        """The last trace lines, for failure reports."""
        return "\n".join(self._trace[-self._trace_limit :])

    def fail(self, what: str) -> InvariantViolation:
        """Build an InvariantViolation naming the seed and the recent trace."""
        return InvariantViolation(
            f"{what}\nseed={self.seed} (replay: run_campaign({self.seed}) or "
            f"pytest tests/raft -m sim --sim-seed {self.seed})\n"
            f"--- last trace lines ---\n{self.trace_text()}"
        )

    # -- faults ------------------------------------------------------------------------

    def cut(self, a: NodeId, b: NodeId, *, symmetric: bool = True) -> None:
        """Drop every message from ``a`` to ``b`` (and back when ``symmetric``)."""
        self._cut.add((a, b))
        if symmetric:
            self._cut.add((b, a))
        self.trace(f"cut {a}->{b}{' (both ways)' if symmetric else ''}")
        self._lost_connection(a, b)
        self._lost_connection(b, a)

    def isolate(self, node_id: NodeId) -> None:
        """Cut ``node_id`` from every other node, both ways."""
        for other in self.nodes:
            if other != node_id:
                self._cut.add((node_id, other))
                self._cut.add((other, node_id))
        self.trace(f"isolate {node_id}")
        for other in self.nodes:
            if other != node_id:
                self._lost_connection(node_id, other)
                self._lost_connection(other, node_id)

    def drop(self, a: NodeId, b: NodeId, p: float) -> None:
        """Drop messages from ``a`` to ``b`` with probability ``p``."""
        self._link_drop[(a, b)] = p
        self.trace(f"drop {a}->{b} p={p}")

    def _lost_connection(self, node_id: NodeId, peer: NodeId) -> None:
        """``node_id``'s host lost its connection to ``peer``'s process: it wakes the
        group when ``peer`` leads it (quiet ticks), as a multi-Raft host does."""
        n = self.nodes.get(node_id)
        if n is not None and n.alive and n.core.quiet and n.core.leader_id == peer:
            n.core.wake()
            self.trace(f"wake {node_id} (lost {peer})")

    def heal(self) -> None:
        """Remove every cut and per-link drop rate (global drop/dup rates stay)."""
        self._cut.clear()
        self._link_drop.clear()
        self.trace("heal")

    def crash(self, node_id: NodeId) -> None:
        """Stop a node; everything not in its durable store is lost."""
        n = self.nodes[node_id]
        if not n.alive:
            return
        n.alive = False
        for other in self.nodes:
            if other != node_id:
                self._lost_connection(other, node_id)
        if n.unsynced is not None:
            self.trace(
                f"crash {node_id} loses {len(n.unsynced.entries)} unsynced entries "
                f"(applied {n.applied}, persisted {n.core.stable_index})"
            )
            n.unsynced = None
        else:
            self.trace(f"crash {node_id}")
        self._check_durability()

    def restart(self, node_id: NodeId) -> None:
        """Restart a crashed node from its durable store only."""
        n = self.nodes[node_id]
        if n.alive:
            return
        n.restart()
        self.trace(
            f"restart {node_id} term={n.core.term} last={n.core.last_index} "
            f"commit={n.core.commit_index} snap={n.store.snap_index}"
        )
        self._check_node_committed(n)
        self._check_durability()

    # -- driving -----------------------------------------------------------------------

    def tick(self) -> None:
        """Advance time by one tick on every alive node, run clients, then stabilize."""
        self.now += 1
        for n in self.nodes.values():
            if n.unsynced is not None and n.alive and self.rng.random() < 0.5:
                self._finish_ready(n, n.unsynced, sent=True)
        for n in self.nodes.values():
            if n.alive:
                was = (n.core.role, n.core.term)
                n.core.tick()
                self._maybe_new_leader(n, was)
        if self.clients:
            self._clients_tick()
        self.stabilize()
        self._check_durability()

    def stabilize(self, max_rounds: int = 10_000) -> None:
        """Process Readies and deliver due messages until nothing is left to do now."""
        for _ in range(max_rounds):
            progressed = False
            for n in self.nodes.values():
                guard = 0
                while n.alive and n.core.has_ready():
                    self._handle_ready(n)
                    progressed = True
                    guard += 1
                    if guard > 1000:
                        raise self.fail(f"{n.id} keeps producing Ready batches")
                if n.alive and n.unsynced is not None and self.early_apply:
                    progressed = self._apply_early(n, n.unsynced) or progressed
            due = [m for m in self._inflight if m.at <= self.now]
            if due:
                self._inflight = [m for m in self._inflight if m.at > self.now]
                if self.reorder:
                    self.rng.shuffle(due)
                else:
                    due.sort(key=lambda m: m.order)
                for m in due:
                    self._deliver(m.msg)
            if not due and not progressed:
                return
        raise self.fail("the cluster did not stabilize")

    def tick_until(self, cond: Callable[[], T], *, max_ticks: int) -> T:
        """Tick until ``cond()`` is truthy and return it.

        Raises:
            InvariantViolation: not reached within ``max_ticks``.
        """
        self.stabilize()
        for _ in range(max_ticks + 1):
            v = cond()
            if v:
                return v
            self.tick()
        raise self.fail(f"condition not reached within {max_ticks} ticks")

    def run(self, ticks: int) -> None:
        """Tick ``ticks`` times."""
        for _ in range(ticks):
            self.tick()

    def propose_via_leader(self, data: bytes) -> int:
        """Propose ``data`` on the current leader and return its index.

        Raises:
            NotLeaderError: there is no leader right now.
        """
        lead = self.leader()
        if lead is None:
            raise NotLeaderError("no leader in the simulation")
        idx = self.nodes[lead].core.propose(data)
        self.trace(f"propose on {lead} idx={idx}")
        return idx

    def propose_conf_change_via_leader(self, change: ConfChange) -> int:
        """Propose a membership change on the current leader."""
        lead = self.leader()
        if lead is None:
            raise NotLeaderError("no leader in the simulation")
        idx = self.nodes[lead].core.propose_conf_change(change)
        self.trace(f"conf change {change} on {lead} idx={idx}")
        return idx

    def compact(self, node_id: NodeId) -> None:
        """Snapshot ``node_id``'s state machine at its applied index and compact its log."""
        n = self.nodes[node_id]
        if not n.alive or n.applied <= n.core.first_index - 1:
            return
        if n.applied > n.core.stable_index:  # applied early, not in its own log yet
            return
        n.core.compact(n.applied, n.fsm.snapshot())
        snap = n.core.snapshot
        assert snap is not None
        n.store.compact(snap)
        self.trace(f"compact {node_id} to {snap.meta.index}")

    # -- checks ------------------------------------------------------------------------

    def assert_logs_match(self) -> None:
        """Every alive node's log agrees with the others on every index both still hold."""
        alive = [n for n in self.nodes.values() if n.alive]
        for a in alive:
            for b in alive:
                if a.id >= b.id:
                    continue
                lo = max(a.core.first_index, b.core.first_index)
                hi = min(a.core.last_index, b.core.last_index)
                ea = a.core.entries(lo, hi + 1) if lo <= hi else []
                eb = b.core.entries(lo, hi + 1) if lo <= hi else []
                # Logs may diverge only after the last index where the terms agree.
                agree = 0
                for x, y in zip(ea, eb, strict=True):
                    if x.term == y.term:
                        agree = x.index
                for x, y in zip(ea, eb, strict=True):
                    if x.index <= agree and x != y:
                        raise self.fail(f"logs of {a.id} and {b.id} differ at {x.index}")

    def assert_converged(self) -> None:
        """All alive members hold the same committed log up to the leader's commit."""
        lead = self.leader()
        if lead is None:
            raise self.fail("no leader")
        ci = self.nodes[lead].core.commit_index
        conf = self.nodes[lead].core.conf
        members = conf.voters + conf.learners
        for n in self.nodes.values():
            if n.alive and n.id in members and (n.core.commit_index != ci or n.applied != ci):
                raise self.fail(
                    f"{n.id} commit={n.core.commit_index} applied={n.applied}, leader {ci}"
                )
        self.assert_logs_match()

    def _check_durability(self) -> None:
        if not self.committed:
            return
        last = self.committed[-1]
        # A committed entry must never be missing from a majority of any configuration
        # that could still elect a leader: the committed configuration, or one appended
        # after it on some node (configurations take effect on append). With one change
        # at a time the entry may be on a majority of an appended configuration only,
        # which still intersects every majority of its predecessor.
        confs = {tuple(self.committed_voters)}
        for n in self.nodes.values():
            core = n.core
            if core.conf_index > self.committed_conf_index and (
                core.term_at(last.index) == last.term or core.first_index > last.index
            ):
                # Only a log that holds the committed prefix can ever lead, so only
                # its configuration can still be used; a diverged log's cannot.
                confs.add(tuple(core.conf.voters))
        for voters in confs:
            lacking = [
                v
                for v in voters
                if v not in self.nodes or not self.nodes[v].store.covers(last.index, last.term)
            ]
            if len(lacking) >= len(voters) // 2 + 1:
                raise self.fail(
                    f"committed entry {last.index} (term {last.term}) is missing from a "
                    f"majority {sorted(lacking)} of configuration {voters}"
                )

    def _check_node_committed(self, n: SimNode) -> None:
        ci = n.core.commit_index
        if ci > len(self.committed):
            return
        if ci > n.store.snap_index and ci > 0:
            want = self.committed[ci - 1]
            if n.core.term_at(ci) != want.term:
                raise self.fail(f"{n.id} restarted with commit {ci} not matching committed log")

    def _check_leader(self, n: SimNode, term: int) -> None:
        other = self.leaders.get(term)
        if other is not None and other != n.id:
            raise self.fail(f"election safety: {other} and {n.id} both led term {term}")
        self.leaders[term] = n.id
        if self.committed:
            last = self.committed[-1]
            core = n.core
            ok = core.term_at(last.index) == last.term or (core.first_index - 1 >= last.index)
            if not ok:
                raise self.fail(
                    f"leader completeness: new leader {n.id} of term {term} lacks committed "
                    f"entry {last.index} (term {last.term}); its last index {core.last_index}"
                )

    def _check_persisted(self, n: SimNode, entries: Iterable[Entry]) -> None:
        for e in entries:
            prev_term = n.store.term_at(e.index - 1)
            if prev_term is None:
                raise self.fail(f"{n.id} persisted entry {e.index} without its predecessor")
            key = (e.index, e.term)
            val = (prev_term, e.kind, e.data)
            seen = self._entry_seen.setdefault(key, val)
            if seen != val:
                raise self.fail(
                    f"log matching: entry (index={e.index}, term={e.term}) on {n.id} differs "
                    f"from another node's (prev term / content)"
                )

    # -- internals ---------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        if self.codec_roundtrip:
            # What a real transport does: the receiver gets a decoded copy.
            msg = CODEC.decode(CODEC.encode(msg))
        link = (msg.src, msg.dst)
        if link in self._cut:
            return
        p = self._link_drop.get(link, 0.0)
        if (p and self.rng.random() < p) or (self.drop_p and self.rng.random() < self.drop_p):
            return
        copies = 2 if self.dup_p and self.rng.random() < self.dup_p else 1
        for _ in range(copies):
            delay = self.rng.randint(0, self.max_delay) if self.max_delay else 0
            self._order += 1
            self._inflight.append(_InFlight(self.now + delay, self._order, msg))

    def _deliver(self, msg: Message) -> None:
        n = self.nodes.get(msg.dst)
        if n is None or not n.alive or (msg.src, msg.dst) in self._cut:
            return
        self.messages_delivered += 1
        was = (n.core.role, n.core.term)
        n.core.step(msg)
        self._maybe_new_leader(n, was)

    def _maybe_new_leader(self, n: SimNode, was: tuple[Role, int]) -> None:
        # Checked when the core becomes leader, not when its Ready's event is handled: a
        # leader's Ready may wait (unsynced) while a later term commits entries it lacks.
        core = n.core
        if core.role is Role.LEADER and (was[0] is not Role.LEADER or was[1] != core.term):
            self._check_leader(n, core.term)

    def _handle_ready(self, n: SimNode) -> None:
        rd = n.core.ready()
        if (
            rd.messages_before_persist
            and self.unsynced_p
            and (rd.entries or rd.hard_state is not None)
            and self.rng.random() < self.unsynced_p
        ):
            # A leader replicating while its own fsync runs: the messages leave now, the
            # persist (and advance) happen on a later tick, or never if it crashes first.
            for m in rd.messages:
                self._send(m)
            n.unsynced = rd
            return
        self._finish_ready(n, rd, sent=False)

    def _finish_ready(self, n: SimNode, rd: Ready, *, sent: bool) -> None:
        core = n.core
        n.unsynced = None
        # 1. persist
        n.store.persist(rd)
        if rd.entries:
            self._check_persisted(n, rd.entries)
        for ev in rd.events:
            if isinstance(ev, BecameLeader):
                self.trace(f"{n.id} became leader of term {ev.term} last={core.last_index}")
            elif isinstance(ev, ReadIndexDropped):
                client = n.pending_reads.pop(ev.ctx, None)
                if client is not None:
                    self._retry_soon(client)
        # 2. send
        if not sent:
            for m in rd.messages:
                self._send(m)
        # 3. apply
        if rd.snapshot is not None:
            n.fsm.restore(rd.snapshot.data)
            n.applied = rd.snapshot.meta.index
            self.trace(f"{n.id} installed snapshot {n.applied}")
            n.pending_writes = {i: v for i, v in n.pending_writes.items() if i > n.applied}
        for e in rd.committed:
            if e.index > n.applied:  # else applied early, while the persist ran
                self._apply(n, e)
        for rs in rd.read_states:
            n.read_waits.append((rs.index, rs.ctx))
        core.advance(rd)
        if n.read_waits:
            self._serve_reads(n)
        if (
            self.snapshot_threshold
            and n.applied - (core.first_index - 1) >= self.snapshot_threshold
            and self.rng.random() < 0.5
        ):
            self.compact(n.id)

    def _apply_early(self, n: SimNode, rd: Ready) -> bool:
        """A leader whose persist of ``rd`` is in flight applies what committed meanwhile."""
        core, did = n.core, False
        for e in rd.committed:
            if e.index > n.applied:
                self._apply(n, e)
                did = True
        if did:
            core.applied_to(n.applied)
        while committed := core.apply_ready():
            for e in committed:
                self._apply(n, e)
            core.applied_to(committed[-1].index)
            self.trace(f"{n.id} applied {committed[-1].index} before its persist")
            did = True
        if did and n.read_waits:
            self._serve_reads(n)
        return did

    def _apply(self, n: SimNode, e: Entry) -> None:
        if e.index != n.applied + 1:
            raise self.fail(f"{n.id} applies {e.index} after {n.applied}")
        n.applied = e.index
        if e.index <= len(self.committed):
            if self.committed[e.index - 1] != e:
                raise self.fail(
                    f"state machine safety: {n.id} applies {e} but "
                    f"{self.committed[e.index - 1]} was applied at index {e.index} before"
                )
        else:
            if e.index != len(self.committed) + 1:
                raise self.fail(f"{n.id} applies {e.index} past the known committed log")
            self.committed.append(e)
            if e.kind == EntryKind.CONFIG:
                self.committed_voters = list(decode_conf(e.data).voters)
                self.committed_conf_index = e.index
        pending = n.pending_writes.pop(e.index, None)
        if e.kind == EntryKind.NORMAL:
            commands = [e.data]
        elif e.kind == EntryKind.BATCH:
            commands = decode_batch(e.data)
        else:
            return
        answered = False
        for data in commands:
            client, seq, result = n.fsm.apply(data)
            if pending is None:
                continue
            term, pclient, pseq = pending
            c = self._client(pclient)
            if term == e.term and (pclient, pseq) == (client, seq):
                answered = True
                if c is not None and c.seq == seq and c.op is not None:
                    self._complete(c, result)
        if pending is not None and not answered:
            c = self._client(pending[1])
            if c is not None and c.seq == pending[2] and c.op is not None:
                self._retry_soon(pending[1])

    def _serve_reads(self, n: SimNode) -> None:
        keep = []
        for index, ctx in n.read_waits:
            if index > n.applied:
                keep.append((index, ctx))
                continue
            client = n.pending_reads.pop(ctx, None)
            c = self._client(client) if client is not None else None
            if c is None or c.op is None:
                continue
            _cid, seq = decode(ctx)
            if seq == c.seq:
                self._complete(c, n.fsm.data.get(str(c.op[1])))
        n.read_waits = keep

    # -- clients -----------------------------------------------------------------------

    def add_clients(self, count: int, *, keys: Sequence[str] = ("x", "y")) -> None:
        """Start ``count`` clients issuing random operations on ``keys``."""
        self._keys = list(keys)
        for i in range(count):
            self.clients.append(_Client(id=f"c{i}"))

    def _client(self, cid: str | None) -> _Client | None:
        for c in self.clients:
            if c.id == cid:
                return c
        return None

    def _retry_soon(self, cid: str) -> None:
        c = self._client(cid)
        if c is not None and c.op is not None:
            c.retry_at = self.now + 1
            c.target = None

    def _complete(self, c: _Client, result: object) -> None:
        assert c.op is not None
        out = result if c.op[0] in ("get", "cas") else None
        self.history.ok(c.op_id, out)
        self.trace(f"client {c.id} seq={c.seq} {c.op} -> {out!r}")
        c.op = None
        c.done += 1

    def _clients_tick(self) -> None:
        for c in self.clients:
            if c.op is None:
                if not self.issue_ops or self.rng.random() < 0.5:
                    continue
                c.seq += 1
                key = self.rng.choice(self._keys)
                r = self.rng.random()
                val = c.seq * 100 + int(c.id[1:])
                if r < 0.35:
                    c.op = ("get", key)
                elif r < 0.65:
                    c.op = ("put", key, val)
                elif r < 0.9:
                    old = self.rng.choice([None, *range(max(0, val - 300), val, 100)])
                    # usually CAS from a value that was recently written by someone
                    known = [v for v in self._recent_values if v is not None]
                    if known and self.rng.random() < 0.7:
                        old = self.rng.choice(known)
                    c.op = ("cas", key, old, val)
                else:
                    c.op = ("delete", key)
                c.op_id = self.history.invoke(c.id, c.op)
                if c.op[0] == "put":
                    self._recent_values.append(val)
                    del self._recent_values[:-6]
                c.retry_at = self.now
                c.target = None
            if c.op is not None and self.now >= c.retry_at:
                self._submit(c)

    def _submit(self, c: _Client) -> None:
        assert c.op is not None
        alive = [nid for nid, n in self.nodes.items() if n.alive]
        if not alive:
            c.retry_at = self.now + 1
            return
        sticky = c.target in alive and self.rng.random() < 0.8
        target = c.target if sticky and c.target is not None else self.rng.choice(alive)
        n = self.nodes[target]
        c.retry_at = self.now + self.rng.randint(self.client_timeout // 4, self.client_timeout)
        c.target = target
        op = c.op
        try:
            if op[0] == "get" and self.rng.random() < 0.8:
                ctx = encode([c.id, c.seq])
                n.core.read_index(ctx)
                n.pending_reads[ctx] = c.id
                self.trace(f"client {c.id} seq={c.seq} read_index on {target}")
            else:
                key = op[1]
                value = op[2] if op[0] in ("put", "cas") else None
                expected = op[2] if op[0] == "cas" else None
                if op[0] == "cas":
                    value = op[3]
                cmd = encode([c.id, c.seq, op[0], key, value, expected])
                if self.rng.random() < 0.3:
                    # a BATCH entry: the command with a no-op of another client around it
                    noop = encode(["batch-filler", self.rng.randint(1, 10**9), "get", key])
                    idx = n.core.propose_batch([noop, cmd] if self.rng.random() < 0.5 else [cmd])
                else:
                    idx = n.core.propose(cmd)
                n.pending_writes[idx] = (n.core.term, c.id, c.seq)
                self.trace(f"client {c.id} seq={c.seq} {op} proposed on {target} idx={idx}")
        except NotLeaderError as exc:
            hint = exc.leader_hint
            c.target = hint if hint in alive else None
            c.retry_at = self.now + 1
        except ProposalDroppedError:
            c.target = None
            c.retry_at = self.now + 1

    def pending_clients(self) -> int:
        """How many clients wait for an answer."""
        return sum(1 for c in self.clients if c.op is not None)

    def finish_history(self) -> None:
        """Mark every unanswered client operation as unknown (it may have applied)."""
        for c in self.clients:
            if c.op is not None:
                self.history.info(c.op_id)
                c.op = None

    def check_linearizable(self) -> CheckResult:
        """Check the recorded client history against the KV model."""
        return check(self.history.operations(), KVModel())


def _random_conf_change(net: SimNetwork, ids: Sequence[NodeId]) -> None:
    """Remove a voter (keeping at least three), or add back / promote a removed node."""
    lead = net.leader()
    if lead is None:
        return
    core = net.node(lead)
    conf = core.conf
    outside = [i for i in ids if i not in conf.voters and i not in conf.learners]
    if conf.learners and net.rng.random() < 0.7:
        change = ConfChange(type=ConfChangeType.ADD_VOTER, node_id=net.rng.choice(conf.learners))
    elif outside and net.rng.random() < 0.6:
        kind = ConfChangeType.ADD_LEARNER if net.rng.random() < 0.7 else ConfChangeType.ADD_VOTER
        change = ConfChange(type=kind, node_id=net.rng.choice(outside))
    elif len(conf.voters) > 3:
        change = ConfChange(type=ConfChangeType.REMOVE_NODE, node_id=net.rng.choice(conf.voters))
    else:
        return
    try:
        net.propose_conf_change_via_leader(change)
    except ProposalDroppedError as exc:
        net.trace(f"conf change {change} refused: {exc}")


@dataclass(frozen=True)
class CampaignResult:
    """Summary of one simulated campaign (for reporting)."""

    seed: int
    nodes: int
    ticks: int
    ops_completed: int
    ops_unknown: int
    elections: int
    messages: int


def run_campaign(
    seed: int,
    *,
    nodes: int | None = None,
    fault_ticks: int | None = None,
    recovery_ticks: int = 400,
    clients: int = 3,
    membership: bool | None = None,
    codec_roundtrip: bool = False,
) -> CampaignResult:
    """One randomized fault campaign; raises :class:`InvariantViolation` on any failure.

    The seed picks the cluster size (3 or 5), the fault rates, and every fault:
    message drops, duplicates, delays (reordering), symmetric and asymmetric partitions,
    crashes and restarts, snapshots. Then all faults stop and the cluster must elect a
    leader, answer every pending client request and converge within ``recovery_ticks``;
    finally the client history must be linearizable.
    """
    rng = random.Random(seed ^ 0x5EED)
    n = nodes if nodes is not None else rng.choice([3, 5])
    ids = [f"n{i}" for i in range(1, n + 1)]
    check_quorum = rng.random() < 0.8
    churn = rng.random() < 0.2
    if fault_ticks is None:
        fault_ticks = rng.choice([150, 300, 500])
    net = SimNetwork(
        ids,
        seed,
        election_tick=rng.choice([5, 8, 10]),
        heartbeat_tick=rng.choice([1, 2]),
        pre_vote=rng.random() < 0.8,
        check_quorum=check_quorum,
        lease_read=check_quorum and rng.random() < 0.25,
        max_entries_per_msg=1 if churn else rng.choice([1, 4, 64]),
        max_inflight_msgs=rng.choice([1, 4, 16]),
        max_delay=rng.choice([0, 1, 2, 3]),
        # quiet ticks in half the campaigns (own generator: the other choices stay)
        quiet_ticks=random.Random(seed ^ 0x0917).choice([0, 0, 3, 20]),
    )
    net.drop_p = rng.choice([0.0, 0.02, 0.1])
    net.dup_p = rng.choice([0.0, 0.05])
    net.reorder = rng.random() < 0.8
    net.snapshot_threshold = rng.choice([0, 5, 20])
    net.unsynced_p = rng.choice([0.0, 0.3, 0.7])
    net.codec_roundtrip = codec_roundtrip
    net.add_clients(clients)
    crash_p = rng.choice([0.0, 0.01, 0.03])
    # "Churn" profile: leaders crash and come back all the time, one entry per message,
    # so leaders often die with their entries on a minority (paper figure 8 territory).
    revive_p = 0.0
    if churn:
        crash_p, revive_p = 0.06, 0.15
    transfer_p = rng.choice([0.0, 0.01])
    member_p = 0.02 if (membership if membership is not None else rng.random() < 0.3) else 0.0
    part_p = rng.choice([0.0, 0.02, 0.05])
    for _ in range(fault_ticks):
        if revive_p:
            for nid in ids:
                if not net.nodes[nid].alive and net.rng.random() < revive_p:
                    net.restart(nid)
        r = net.rng.random()
        if r < crash_p:
            lead = net.leader()
            victim = lead if lead is not None and net.rng.random() < 0.5 else net.rng.choice(ids)
            if net.nodes[victim].alive:
                net.crash(victim)
            else:
                net.restart(victim)
        elif r < crash_p + part_p:
            kind = net.rng.random()
            if kind < 0.3:
                net.heal()
            elif kind < 0.6:
                net.isolate(net.rng.choice(ids))
            elif kind < 0.8:
                a, b = net.rng.sample(ids, 2)
                net.cut(a, b, symmetric=False)
            else:
                lead = net.leader()
                if lead is not None:
                    net.isolate(lead)
        elif r < crash_p + part_p + 0.01:
            for nid in ids:
                net.restart(nid)
        elif r < crash_p + part_p + 0.01 + member_p:
            _random_conf_change(net, ids)
        elif r < crash_p + part_p + 0.01 + member_p + transfer_p:
            lead = net.leader()
            if lead is not None:
                to = net.rng.choice(net.node(lead).conf.voters)
                net.trace(f"transfer leadership {lead} -> {to}")
                net.node(lead).transfer_leadership(to)
        net.tick()
    # Faults stop: heal, restart everyone, no more drops/dups; delays stay.
    net.heal()
    net.drop_p = 0.0
    net.dup_p = 0.0
    for nid in ids:
        net.restart(nid)
    net.trace("faults stop")
    net.issue_ops = False
    start = net.now
    net.tick_until(
        lambda: net.leader() is not None and net.pending_clients() == 0,
        max_ticks=recovery_ticks,
    )

    # Everyone catches up within a bound too.
    def converged() -> bool:
        lead = net.leader()
        if lead is None:
            return False
        core = net.nodes[lead].core
        ci = core.commit_index
        members = core.conf.voters + core.conf.learners
        return all(
            x.core.commit_index == ci and x.applied == ci
            for x in net.nodes.values()
            if x.id in members
        )

    net.tick_until(converged, max_ticks=recovery_ticks - (net.now - start) + 100)
    net.assert_converged()
    net.finish_history()
    result = net.check_linearizable()
    if not result.linearizable:
        raise net.fail("client history is not linearizable:\n" + result.explain())
    ops = net.history.operations()
    return CampaignResult(
        seed=seed,
        nodes=n,
        ticks=net.now,
        ops_completed=sum(1 for o in ops if o.ret is not None),
        ops_unknown=sum(1 for o in ops if o.ret is None),
        elections=len(net.leaders),
        messages=net.messages_delivered,
    )


__all__ = [
    "CampaignResult",
    "DurableStore",
    "InvariantViolation",
    "SimKV",
    "SimNetwork",
    "SimNode",
    "run_campaign",
]
