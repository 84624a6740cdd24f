"""The Raft consensus algorithm as a pure, sans-I/O state machine.

Theory of operation
-------------------
:class:`RaftCore` owns one node's Raft state: term, vote, log (a Python list with an
offset, after an optional snapshot), commit index, and the leader's per-follower
progress. It does no I/O and reads no clock. The caller drives it with four inputs:

* :meth:`RaftCore.tick` - one unit of logical time (heartbeats and election timeouts
  are counted in ticks, never seconds);
* :meth:`RaftCore.step` - an inbound :data:`~dsys.raft.messages.Message`;
* :meth:`RaftCore.propose` / :meth:`RaftCore.propose_conf_change` /
  :meth:`RaftCore.read_index` - client requests, on the leader;
* :meth:`RaftCore.advance` - "the last :class:`~dsys.raft.messages.Ready` was handled".

and collects one output, :meth:`RaftCore.ready`: what to persist (hard state, log
entries, a snapshot), which messages to send (only after persisting), which entries are
committed (apply them), which ReadIndex reads are confirmed, and events for logging.

Roles are swapped, not branched: becoming leader sets ``self._step_role`` to
``_step_leader`` and ``self._tick_role`` to ``_tick_heartbeat``::

    Follower --(election timeout)--> PreCandidate --(pre-vote quorum)--> Candidate
    Candidate --(vote quorum)--> Leader;  any --(higher term)--> Follower
    Leader --(check-quorum fails / removed from config)--> Follower

Safety rules implemented (Raft paper, figure 2 and section 5.4; dissertation ch. 4, 6):

* a vote is granted at most once per term, only to a candidate whose log is at least as
  up to date (last term, then last index);
* a follower accepts entries only after ``(prev_index, prev_term)`` matches, truncating
  the first conflicting suffix (never a committed entry);
* the leader commits an index only when a majority of voters store it **and** it belongs
  to the leader's current term (section 5.4.2); a new leader appends a no-op to get there;
* the leader writes its own log in parallel with replicating it (dissertation 10.2.1):
  its Ready says ``messages_before_persist`` so its AppendEntries may leave before its
  own fsync, but it counts itself toward a commit quorum only for entries that
  :meth:`RaftCore.advance` reported persisted (its *stable* index, not its last index);
  counting an unsynced entry would let "leader + one follower" commit with one durable
  copy, lost if the leader crashes. Followers still persist before they answer;
* a leader applies committed entries while its own write is in flight
  (:meth:`RaftCore.apply_ready`, etcd raft's asynchronous storage writes): committed
  means durable on a majority without its copy, so it may answer before its fsync ends.
  A snapshot (:meth:`RaftCore.compact`) is only taken at a persisted index, so a restart
  never finds a state machine ahead of a log it cannot replay;
* pre-vote: a node campaigns for real only after a majority says it could win, so a node
  returning from a partition does not bump terms; check-quorum: a leader that has not
  heard from a majority within an election timeout steps down, and followers that heard
  from a leader recently ignore vote requests (the "leader lease" on the voter side);
* ReadIndex: a read is served at the commit index once a heartbeat round started after
  the request is acknowledged by a majority, and only after the leader committed an
  entry of its term. Optional lease reads (``RaftConfig.lease_read``) skip the round;
* membership changes one node at a time; a configuration takes effect when appended;
  only one uncommitted change at a time, and not before the leader's no-op committed
  (the fix to the single-server change bug noted in the dissertation's errata);
* quiet ticks (``RaftConfig.quiet_ticks``, TiKV's hibernate regions): a leader that
  appended nothing for that many ticks, whose members all store its whole log and know
  its commit index, sends a last heartbeat marked ``quiet`` and stops heartbeating;
  followers that get it stop counting election ticks. Timers are liveness, never
  safety: a quiet follower votes for nobody (it is in its leader lease), a quiet leader's
  own lease still runs out by its ticks, and anything that needs the group wakes it: a
  proposal, a read, a transfer, a vote request or a rejected append on the leader; any
  message but a quiet heartbeat on a follower; and :meth:`RaftCore.wake` from the host
  when it lost the connection to the leader's process.
"""

from __future__ import annotations

import random
import zlib
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dsys.errors import (
    BadInputError,
    ConfigError,
    LocalProtocolError,
    NotLeaderError,
    ProposalDroppedError,
    RemoteProtocolError,
)
from dsys.raft.messages import (
    AppendRequest,
    AppendResponse,
    BecameCandidate,
    BecameFollower,
    BecameLeader,
    ConfChange,
    ConfChanged,
    ConfChangeType,
    ConfState,
    Entry,
    EntryKind,
    Event,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    Message,
    NodeId,
    ReadIndexDropped,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
    decode_conf,
    encode_batch,
    encode_conf,
)


@dataclass(frozen=True, kw_only=True)
class RaftConfig:
    """Static configuration of one Raft node.

    Attributes:
        id: this node's id.
        election_tick: base election timeout in ticks; the effective timeout is drawn
            uniformly from ``[election_tick, 2 * election_tick)`` after every reset.
        heartbeat_tick: ticks between leader heartbeats; must be < ``election_tick``.
        pre_vote: run the pre-vote phase before a real election (dissertation 9.6).
        check_quorum: a leader steps down when a majority was not heard from within an
            election timeout, and followers ignore vote requests while they have a leader.
        max_entries_per_msg: most entries in one AppendRequest.
        max_inflight_msgs: most unacknowledged AppendRequests per follower in pipeline mode.
        max_committed_per_ready: most committed entries handed out in one Ready (a
            restarted node with a long log applies it over several batches).
        lease_read: serve ``read_index`` without a heartbeat round while the leader's
            lease holds. **Clock assumption**: every node's tick rate is the same within a
            bounded drift, so that ``election_tick`` ticks on a follower never pass faster
            than ``election_tick - 1`` ticks on the leader. Requires ``check_quorum``.
        quiet_ticks: a leader idle for this many ticks quiets the group (see the module
            docstring); 0 turns quiet ticks off.
    """

    id: NodeId
    election_tick: int = 10
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_entries_per_msg: int = 256
    max_inflight_msgs: int = 256
    lease_read: bool = False
    max_committed_per_ready: int = 4096
    quiet_ticks: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"id must be a non-empty string, got {self.id!r}")
        if self.heartbeat_tick < 1:
            raise ConfigError(f"heartbeat_tick must be >= 1, got {self.heartbeat_tick}")
        if self.election_tick <= self.heartbeat_tick:
            raise ConfigError(
                f"election_tick ({self.election_tick}) must be greater than "
                f"heartbeat_tick ({self.heartbeat_tick})"
            )
        if self.max_entries_per_msg < 1:
            raise ConfigError(f"max_entries_per_msg must be >= 1, got {self.max_entries_per_msg}")
        if self.max_inflight_msgs < 1:
            raise ConfigError(f"max_inflight_msgs must be >= 1, got {self.max_inflight_msgs}")
        if self.max_committed_per_ready < 1:
            raise ConfigError(
                f"max_committed_per_ready must be >= 1, got {self.max_committed_per_ready}"
            )
        if self.lease_read and not self.check_quorum:
            raise ConfigError("lease_read requires check_quorum")
        if self.quiet_ticks < 0:
            raise ConfigError(f"quiet_ticks must be >= 0, got {self.quiet_ticks}")


# Progress states of a follower as seen by the leader (etcd's names).
_PROBE = 0  # one AppendRequest at a time until the follower's match index is found
_REPLICATE = 1  # pipelined AppendRequests, bounded by max_inflight_msgs
_SNAPSHOT = 2  # an InstallSnapshot is in flight
# Heartbeat responses without replication progress before the leader assumes lost appends.
_STALL_LIMIT = 3


class _Progress:
    """The leader's view of one member's log."""

    __slots__ = (
        "active",
        "inflight",
        "match",
        "next",
        "probe_sent",
        "snapshot_wait",
        "stall",
        "stall_match",
        "state",
    )

    def __init__(self, next_index: int) -> None:
        self.match = 0  # invariant: match < next
        self.next = next_index
        self.state = _PROBE
        self.probe_sent = False
        self.inflight: deque[int] = deque()  # last index of each unacknowledged append
        self.active = True  # heard from since the last check-quorum round
        self.snapshot_wait = 0  # heartbeat responses seen while in _SNAPSHOT
        self.stall = 0  # heartbeat responses without progress while entries are unacked
        self.stall_match = 0

    def become_probe(self) -> None:
        self.state = _PROBE
        self.stall = 0
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = _REPLICATE
        self.stall = 0
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()


@dataclass(slots=True)
class _PendingRead:
    seq: int
    ctx: bytes
    index: int


def _quorum(n: int) -> int:
    return n // 2 + 1


class RaftCore:
    """One Raft node's consensus state, driven by ticks and messages (sans-I/O).

    Args:
        config: static configuration.
        voters: the initial voters of a brand-new cluster (also pass them on every
            restart: the bootstrap membership is not written to the log). A node joining
            an existing cluster passes ``None`` and learns the membership from the leader.
        hard_state: the last persisted :class:`HardState` (restart).
        snapshot: the last persisted snapshot (restart); the caller has restored the
            state machine from it.
        entries: the persisted log entries after the snapshot (restart), in order.
        applied: the highest index already applied to the state machine (at least the
            snapshot index; a state machine rebuilt from the snapshot passes 0 or it).
        rng_seed: seed of this node's private ``random.Random`` (election timeouts);
            ``None`` derives a seed from the node id. Never the global random state.

    Raises:
        ConfigError: the persisted pieces are inconsistent (gap in the log, commit index
            beyond the log, ...).
    """

    def __init__(
        self,
        config: RaftConfig,
        *,
        voters: Sequence[NodeId] | None = None,
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
        applied: int = 0,
        rng_seed: int | None = None,
    ) -> None:
        self._cfg = config
        self._id = config.id
        self._rng = random.Random(zlib.crc32(config.id.encode()) if rng_seed is None else rng_seed)
        hs = hard_state if hard_state is not None else HardState(term=0, vote=None, commit=0)
        self._term = hs.term
        self._vote: NodeId | None = hs.vote
        self._lead: NodeId | None = None
        # -- log: entry with index i lives at self._entries[i - self._snap_index - 1]
        self._snap_index = 0
        self._snap_term = 0
        self._snapshot: Snapshot | None = None
        base_conf = ConfState(voters=tuple(dict.fromkeys(voters or ())))
        if snapshot is not None:
            self._snap_index = snapshot.meta.index
            self._snap_term = snapshot.meta.term
            self._snapshot = snapshot
            base_conf = snapshot.meta.conf
        self._entries: list[Entry] = []
        expect = self._snap_index + 1
        for e in entries:
            if e.index <= self._snap_index:
                continue
            if e.index != expect:
                raise ConfigError(f"log has a gap: expected index {expect}, got {e.index}")
            self._entries.append(e)
            expect += 1
        self._conf = base_conf
        self._conf_history: list[tuple[int, ConfState]] = [(self._snap_index, base_conf)]
        for e in self._entries:
            if e.kind == EntryKind.CONFIG:
                self._conf = decode_conf(e.data)
                self._conf_history.append((e.index, self._conf))
        # The persisted commit index is only a hint (it is volatile state in the paper):
        # a crash between writing the hard state and the entries may leave it ahead of
        # the log, so clamp it.
        self._commit = min(max(hs.commit, self._snap_index), self.last_index)
        self._applied = min(max(applied, self._snap_index), self._commit)
        self._applying = self._applied  # committed entries up to here were handed out
        self._stable = self.last_index  # entries up to here are persisted
        self._prev_hs = hs
        self._pending_snapshot: Snapshot | None = None
        self._msgs: list[Message] = []
        self._events: list[Event] = []
        self._read_states: list[ReadState] = []
        self._ready_out = False
        # -- timers
        self._now = 0
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = config.election_tick
        # -- candidate state
        self._votes: dict[NodeId, bool] = {}
        # -- leader state
        self._prs: dict[NodeId, _Progress] = {}
        self._pending_conf_index = 0
        self._bcast_pending = False
        self._commit_pending = False
        self._read_seq = 0
        self._read_acks: dict[NodeId, int] = {}
        self._quorum_seq = 0
        self._seq_ticks: deque[tuple[int, int]] = deque()
        self._reads: deque[_PendingRead] = deque()
        self._reads_before_commit: list[bytes] = []
        self._transferee: NodeId | None = None
        self._transfer_elapsed = 0
        self._lease_broken = False
        # -- quiet ticks: no heartbeats (leader) or election ticks (follower) while quiet
        self._quiet = False
        self._idle = 0  # leader ticks since the last append, read or transfer
        self._role = Role.FOLLOWER
        self._step_role: Callable[[Message], None] = self._step_follower
        self._tick_role: Callable[[], None] = self._tick_election
        self._become_follower(self._term, None)

    # -- read-only state ------------------------------------------------------------------

    @property
    def id(self) -> NodeId:
        """This node's id."""
        return self._id

    @property
    def quiet(self) -> bool:
        """Whether the group is quiet here (see ``RaftConfig.quiet_ticks``)."""
        return self._quiet

    @property
    def role(self) -> Role:
        """Current role; a follower that is a learner in the configuration reports LEARNER."""
        if self._role is Role.FOLLOWER and self._id in self._conf.learners:
            return Role.LEARNER
        return self._role

    @property
    def term(self) -> int:
        """Current term."""
        return self._term

    @property
    def vote(self) -> NodeId | None:
        """Who this node voted for in the current term."""
        return self._vote

    @property
    def leader_id(self) -> NodeId | None:
        """The leader of the current term, if known."""
        return self._lead

    @property
    def commit_index(self) -> int:
        """Highest log index known to be committed."""
        return self._commit

    @property
    def applied_index(self) -> int:
        """Highest index the caller reported applied (through :meth:`advance`)."""
        return self._applied

    @property
    def last_index(self) -> int:
        """Index of the last log entry (the snapshot index when the log is empty)."""
        return self._snap_index + len(self._entries)

    @property
    def last_term(self) -> int:
        """Term of the last log entry."""
        return self._entries[-1].term if self._entries else self._snap_term

    @property
    def stable_index(self) -> int:
        """The last log index :meth:`advance` reported persisted on this node."""
        return self._stable

    @property
    def first_index(self) -> int:
        """Index of the first entry still held in the log (after the snapshot)."""
        return self._snap_index + 1

    @property
    def conf(self) -> ConfState:
        """Membership in effect (the latest appended configuration)."""
        return self._conf

    @property
    def conf_index(self) -> int:
        """Index of the entry (or snapshot) that set the configuration in effect."""
        return self._conf_history[-1][0]

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest snapshot this node holds (from :meth:`compact` or the leader)."""
        return self._snapshot

    @property
    def hard_state(self) -> HardState:
        """The current hard state (term, vote, commit)."""
        return HardState(term=self._term, vote=self._vote, commit=self._commit)

    def progress(self) -> dict[NodeId, int]:
        """On the leader: each member's match index (empty on other roles).

        Use it to wait until a learner caught up before promoting it.
        """
        return {nid: pr.match for nid, pr in self._prs.items()}

    def term_at(self, index: int) -> int | None:
        """Term of the entry at ``index``; ``None`` when compacted away or beyond the log."""
        if index == self._snap_index:
            return self._snap_term
        if index < self._snap_index or index > self.last_index:
            return None
        return self._entries[index - self._snap_index - 1].term

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Log entries with ``lo <= index < hi`` (``lo`` must be after the snapshot)."""
        if lo <= self._snap_index:
            raise LocalProtocolError(
                f"entries from {lo} were compacted (snapshot at {self._snap_index})"
            )
        off = self._snap_index + 1
        return self._entries[lo - off : max(hi - off, lo - off)]

    # -- inputs ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance logical time by one tick (election and heartbeat timers)."""
        self._now += 1
        self._tick_role()

    def step(self, msg: Message) -> None:
        """Feed one inbound message. Messages addressed to another node are ignored.

        Raises:
            RemoteProtocolError: the message is malformed (negative term or index,
                entries that do not follow ``prev_index`` or carry a newer term than the
                message, ...) or breaks the protocol (a second leader in one term, an
                attempt to overwrite a committed entry). The message is refused.
        """
        if msg.dst != self._id or msg.src == self._id:
            return
        _validate(msg)
        if self._quiet and self._wakes(msg):
            self.wake()
        if msg.term > self._term:
            if isinstance(msg, VoteRequest):
                if not msg.transfer and self._in_lease():
                    return  # a leader is alive: do not let this candidate disrupt it
                if not msg.pre_vote:
                    self._become_follower(msg.term, None)
            elif isinstance(msg, VoteResponse) and msg.pre_vote and msg.granted:
                pass  # granted pre-votes carry the term we would campaign in
            elif isinstance(msg, AppendRequest | Heartbeat | SnapshotRequest):
                self._become_follower(msg.term, msg.src)
            else:
                self._become_follower(msg.term, None)
        elif msg.term < self._term:
            if isinstance(msg, AppendRequest | Heartbeat) and (
                self._cfg.check_quorum or self._cfg.pre_vote
            ):
                # A stale leader: tell it our term so it steps down. Without this, a node
                # whose term was bumped could never be reached again under pre-vote.
                self._send(
                    AppendResponse(
                        src=self._id, dst=msg.src, term=self._term, success=False, match_index=0
                    )
                )
            elif isinstance(msg, VoteRequest) and msg.pre_vote:
                self._send(
                    VoteResponse(
                        src=self._id, dst=msg.src, term=self._term, pre_vote=True, granted=False
                    )
                )
            return
        if isinstance(msg, VoteRequest):
            self._handle_vote_request(msg)
            return
        self._step_role(msg)

    def wake(self) -> None:
        """Leave quiet mode (no-op when not quiet): a leader heartbeats again at once, a
        follower counts election ticks again. The host calls it when it lost the
        connection to the leader's process."""
        if not self._quiet:
            return
        self._quiet = False
        self._idle = 0
        if self._role is Role.LEADER:
            # check-quorum starts afresh: activity from before the quiet spell is stale
            for nid, pr in self._prs.items():
                pr.active = nid == self._id
            self._election_elapsed = 0
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat()

    def _wakes(self, msg: Message) -> bool:
        """Whether ``msg`` wakes this quiet node."""
        if self._role is Role.LEADER:
            return isinstance(msg, VoteRequest) or (
                isinstance(msg, AppendResponse) and not msg.success
            )
        return not (isinstance(msg, Heartbeat) and msg.quiet)

    def _may_quiet(self) -> bool:
        """A leader may quiet the group: idle, everything committed, stored and known by
        every member, and nothing in flight."""
        if (
            self._transferee is not None
            or self._reads
            or self._reads_before_commit
            or self._commit != self.last_index
            or self._stable != self.last_index
            or self._pending_conf_index > self._commit
        ):
            return False
        return all(pr.match == self.last_index for pr in self._prs.values())

    def _go_quiet(self) -> None:
        self._quiet = True
        for nid, pr in self._prs.items():
            if nid != self._id:
                self._send(
                    Heartbeat(
                        src=self._id,
                        dst=nid,
                        term=self._term,
                        commit=min(pr.match, self._commit),
                        quiet=True,
                    )
                )

    def propose(self, data: bytes) -> int:
        """Append a command to the leader's log.

        Returns:
            The index of the new entry. The proposal succeeded iff the entry committed at
            that index has the term this node had when proposing (``core.term``).

        Raises:
            NotLeaderError: this node is not the leader (``leader_hint`` names it if known).
            ProposalDroppedError: a leadership transfer is in progress.
        """
        if self._role is not Role.LEADER:
            raise NotLeaderError(leader_hint=self._lead)
        if self._transferee is not None:
            raise ProposalDroppedError("leadership transfer in progress")
        return self._append_leader(EntryKind.NORMAL, bytes(data))

    def propose_batch(self, commands: Sequence[bytes]) -> int:
        """Append several commands as one BATCH entry (one log slot, one replication).

        Same contract as :meth:`propose`; every command of the batch commits or none does.
        """
        if self._role is not Role.LEADER:
            raise NotLeaderError(leader_hint=self._lead)
        if self._transferee is not None:
            raise ProposalDroppedError("leadership transfer in progress")
        return self._append_leader(EntryKind.BATCH, encode_batch(commands))

    def propose_conf_change(self, change: ConfChange) -> int:
        """Propose adding/removing one node (or promoting a learner); returns the index.

        The new configuration takes effect as soon as it is appended.

        Raises:
            NotLeaderError: not the leader.
            ProposalDroppedError: another configuration change is not yet committed, or
                the leader has not committed an entry of its own term yet.
            BadInputError: the change makes no sense for the current membership.
        """
        if self._role is not Role.LEADER:
            raise NotLeaderError(leader_hint=self._lead)
        if self._transferee is not None:
            raise ProposalDroppedError("leadership transfer in progress")
        if self._pending_conf_index > self._commit:
            raise ProposalDroppedError(
                f"configuration change at index {self._pending_conf_index} is not committed yet"
            )
        if self.term_at(self._commit) != self._term:
            raise ProposalDroppedError("the leader has not committed an entry of its term yet")
        new = _apply_change(self._conf, change)
        idx = self._append_leader(EntryKind.CONFIG, encode_conf(new))
        self._pending_conf_index = idx
        return idx

    def read_index(self, ctx: bytes) -> None:
        """Ask for a linearizable read point; the answer comes as a ReadState in a Ready.

        ``ctx`` identifies the request (unique per outstanding read). The read is safe to
        serve once the state machine applied ``ReadState.index``. If leadership is lost
        first, a :class:`~dsys.raft.messages.ReadIndexDropped` event reports it.

        Raises:
            NotLeaderError: this node is not the leader.
        """
        if self._role is not Role.LEADER:
            raise NotLeaderError(leader_hint=self._lead)
        self.wake()
        self._idle = 0
        if self.term_at(self._commit) != self._term:
            # A new leader does not know the commit index of earlier terms until its
            # own no-op commits; queue the read until then.
            self._reads_before_commit.append(ctx)
            return
        self._start_read(ctx)

    def transfer_leadership(self, to: NodeId) -> None:
        """Hand leadership to voter ``to`` once its log is up to date (TimeoutNow).

        Proposals are refused while the transfer runs; it is abandoned after an election
        timeout.

        Raises:
            NotLeaderError: not the leader.
            BadInputError: ``to`` is not a voter.
        """
        if self._role is not Role.LEADER:
            raise NotLeaderError(leader_hint=self._lead)
        if to == self._id:
            return
        if to not in self._conf.voters:
            raise BadInputError(f"{to!r} is not a voter")
        self.wake()
        self._transferee = to
        self._transfer_elapsed = 0
        pr = self._prs[to]
        if pr.match == self.last_index:
            self._send_timeout_now(to)
        else:
            self._send_append(to)

    def compact(self, index: int, data: bytes) -> None:
        """Record a state-machine snapshot taken at applied ``index`` and drop the log up to it.

        The caller persists the snapshot and truncates its own log store up to ``index``.
        Followers that later need entries at or before ``index`` receive the snapshot.

        Raises:
            LocalProtocolError: ``index`` was not applied yet.
        """
        if index <= self._snap_index:
            return
        if index > self._applied:
            raise LocalProtocolError(f"cannot compact to {index}: only {self._applied} applied")
        if index > self._stable:
            # An entry applied early (apply_ready) may not be in our own durable log yet:
            # a snapshot past it would leave a log store that ends before the snapshot.
            raise LocalProtocolError(f"cannot compact to {index}: only {self._stable} persisted")
        term = self.term_at(index)
        assert term is not None, f"entry {index} missing from log"
        conf = self._conf_at(index)
        self._snapshot = Snapshot(meta=SnapshotMeta(index=index, term=term, conf=conf), data=data)
        del self._entries[: index - self._snap_index]
        self._snap_index = index
        self._snap_term = term
        self._conf_history = [(index, conf)] + [h for h in self._conf_history if h[0] > index]

    # -- output ---------------------------------------------------------------------------

    def apply_ready(self) -> tuple[Entry, ...]:
        """Committed entries not handed out yet; may be called while a Ready is out.

        A leader applies and answers these while its own log write is still running
        (etcd raft's asynchronous storage writes): committed means durable on a majority,
        and the leader's unsynced copy is never counted toward that majority. Apply them
        after the outstanding Ready's ``committed`` and report them with
        :meth:`applied_to`. Empty while a snapshot waits to be installed.
        """
        if self._pending_snapshot is not None:
            return ()
        lo = self._applying + 1
        if self._commit < lo:
            return ()
        hi = min(self._commit, lo + self._cfg.max_committed_per_ready - 1)
        committed = tuple(self.entries(lo, hi + 1))
        self._applying = hi
        return committed

    def applied_to(self, index: int) -> None:
        """Report that the entries :meth:`apply_ready` handed out up to ``index`` were applied.

        Raises:
            LocalProtocolError: ``index`` was never handed out.
        """
        if index > self._applying:
            raise LocalProtocolError(f"applied {index} but only {self._applying} handed out")
        self._applied = max(self._applied, index)

    def has_ready(self) -> bool:
        """True when :meth:`ready` has something to do."""
        if self._ready_out:
            return False
        self._flush()
        return bool(
            self._msgs
            or self._events
            or self._read_states
            or self._pending_snapshot is not None
            or self._stable < self.last_index
            or self._applying < self._commit
            or self.hard_state != self._prev_hs
        )

    def ready(self) -> Ready:
        """Collect what must be persisted, sent and applied (see :class:`Ready`).

        Call :meth:`advance` with the result before calling ``ready()`` again; other
        inputs may be fed in between.

        Raises:
            LocalProtocolError: the previous Ready was not advanced.
        """
        if self._ready_out:
            raise LocalProtocolError("ready() called again before advance()")
        self._flush()
        hs = self.hard_state
        snap = self._pending_snapshot
        start = self._stable + 1
        if snap is not None:
            start = max(start, snap.meta.index + 1)
        unstable = (
            tuple(self._entries[start - self._snap_index - 1 :]) if start <= self.last_index else ()
        )
        lo = self._applying + 1
        committed: tuple[Entry, ...] = ()
        if self._commit >= lo:
            hi = min(self._commit, lo + self._cfg.max_committed_per_ready - 1)
            committed = tuple(self.entries(lo, hi + 1))
            self._applying = hi
        prev = self._prev_hs
        rd = Ready(
            hard_state=hs if hs != prev else None,
            entries=unstable,
            snapshot=snap,
            messages=tuple(self._msgs),
            committed=committed,
            read_states=tuple(self._read_states),
            events=tuple(self._events),
            # A leader's messages depend on nothing it has not persisted yet, as long as
            # its term and vote are durable: its unsynced entries are not counted.
            messages_before_persist=(
                self._role is Role.LEADER
                and snap is None
                and hs.term == prev.term
                and hs.vote == prev.vote
            ),
        )
        self._msgs = []
        self._events = []
        self._read_states = []
        self._ready_out = True
        return rd

    def advance(self, ready: Ready) -> None:
        """Report that ``ready`` was persisted, sent and applied.

        A leader counts its own copy of ``ready.entries`` toward a commit only from here.
        """
        self._ready_out = False
        if ready.hard_state is not None:
            self._prev_hs = ready.hard_state
        if ready.snapshot is not None:
            if self._pending_snapshot is ready.snapshot:
                self._pending_snapshot = None
            self._applied = max(self._applied, ready.snapshot.meta.index)
            self._stable = max(self._stable, ready.snapshot.meta.index)
        if ready.entries:
            last = ready.entries[-1]
            if self.term_at(last.index) == last.term:
                self._stable = max(self._stable, last.index)
        if ready.committed:
            self._applied = max(self._applied, ready.committed[-1].index)
        if self._role is Role.LEADER:
            me = self._prs.get(self._id)
            if me is not None and self._stable > me.match:
                me.match = self._stable
                if self._maybe_commit() and self._role is Role.LEADER:
                    self._commit_pending = True

    # -- role changes ---------------------------------------------------------------------

    def _become_follower(self, term: int, lead: NodeId | None) -> None:
        was_leader = self._role is Role.LEADER
        if term != self._term:
            self._term = term
            self._vote = None
        self._lead = lead
        self._role = Role.FOLLOWER
        self._step_role = self._step_follower
        self._tick_role = self._tick_election
        self._reset_election()
        if was_leader:
            self._drop_leader_state()
        self._events.append(BecameFollower(term=term, leader=lead))

    def _become_pre_candidate(self) -> None:
        self._role = Role.PRE_CANDIDATE
        self._step_role = self._step_candidate
        self._tick_role = self._tick_election
        self._lead = None
        self._reset_election()
        self._events.append(BecameCandidate(term=self._term + 1, pre_vote=True))

    def _become_candidate(self) -> None:
        self._term += 1
        self._vote = self._id
        self._lead = None
        self._role = Role.CANDIDATE
        self._step_role = self._step_candidate
        self._tick_role = self._tick_election
        self._reset_election()
        self._events.append(BecameCandidate(term=self._term, pre_vote=False))

    def _become_leader(self) -> None:
        self._role = Role.LEADER
        self._lead = self._id
        self._step_role = self._step_leader
        self._tick_role = self._tick_heartbeat
        self._reset_election()
        self._prs = {}
        for nid in self._members():
            self._prs[nid] = _Progress(self.last_index + 1)
        self._prs.setdefault(self._id, _Progress(self.last_index + 1))
        self._prs[self._id].match = self._stable  # only what is durable here counts
        self._read_seq = 0
        self._read_acks = {}
        self._quorum_seq = 0
        self._seq_ticks.clear()
        self._lease_broken = False
        self._transferee = None
        # Conservatively treat any config entry in the uncommitted tail as pending.
        self._pending_conf_index = 0
        for idx, _conf in self._conf_history:
            if idx > self._commit:
                self._pending_conf_index = idx
        self._events.append(BecameLeader(term=self._term))
        self._append_leader(EntryKind.NOOP, b"")

    def _drop_leader_state(self) -> None:
        for r in self._reads:
            self._events.append(ReadIndexDropped(ctx=r.ctx))
        for ctx in self._reads_before_commit:
            self._events.append(ReadIndexDropped(ctx=ctx))
        self._reads.clear()
        self._reads_before_commit = []
        self._prs = {}
        self._transferee = None
        self._bcast_pending = False

    def _reset_election(self) -> None:
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._quiet = False
        self._idle = 0
        self._votes = {}
        e = self._cfg.election_tick
        self._randomized_timeout = e + self._rng.randrange(e)

    # -- ticks ----------------------------------------------------------------------------

    def _tick_election(self) -> None:
        if self._quiet:
            return  # the leader is quiet, its process reachable: expect no heartbeats
        self._election_elapsed += 1
        if self._promotable() and self._election_elapsed >= self._randomized_timeout:
            self._campaign(pre_vote=self._cfg.pre_vote)

    def _tick_heartbeat(self) -> None:
        if self._quiet:
            return  # no heartbeats; the lease (by self._now) still runs out
        quiet_ticks = self._cfg.quiet_ticks
        if quiet_ticks:
            self._idle += 1
            if self._idle >= quiet_ticks and self._may_quiet():
                self._go_quiet()
                return
        self._election_elapsed += 1
        self._heartbeat_elapsed += 1
        if self._transferee is not None:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= self._cfg.election_tick:
                self._transferee = None
        if self._election_elapsed >= self._cfg.election_tick:
            self._election_elapsed = 0
            if self._cfg.check_quorum:
                if not self._quorum_active():
                    self._become_follower(self._term, None)
                    return
                for nid, pr in self._prs.items():
                    pr.active = nid == self._id
        if self._heartbeat_elapsed >= self._cfg.heartbeat_tick:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat()

    # -- elections ------------------------------------------------------------------------

    def _campaign(self, *, pre_vote: bool, transfer: bool = False) -> None:
        if pre_vote:
            self._become_pre_candidate()
            term = self._term + 1
        else:
            self._become_candidate()
            term = self._term
        voters = self._conf.voters
        self._votes[self._id] = True
        if self._tally() >= _quorum(len(voters)):
            self._won(pre_vote=pre_vote)
            return
        for nid in voters:
            if nid == self._id:
                continue
            self._send(
                VoteRequest(
                    src=self._id,
                    dst=nid,
                    term=term,
                    pre_vote=pre_vote,
                    last_log_index=self.last_index,
                    last_log_term=self.last_term,
                    transfer=transfer,
                )
            )

    def _won(self, *, pre_vote: bool) -> None:
        if pre_vote:
            self._campaign(pre_vote=False)
        else:
            self._become_leader()

    def _tally(self) -> int:
        return sum(1 for nid, ok in self._votes.items() if ok and nid in self._conf.voters)

    def _handle_vote_request(self, msg: VoteRequest) -> None:
        can_vote = (
            self._vote == msg.src
            or (self._vote is None and self._lead is None)
            or (msg.pre_vote and msg.term > self._term)
        )
        up_to_date = (msg.last_log_term, msg.last_log_index) >= (self.last_term, self.last_index)
        granted = can_vote and up_to_date
        if granted and not msg.pre_vote:
            self._vote = msg.src
            self._election_elapsed = 0
        self._send(
            VoteResponse(
                src=self._id,
                dst=msg.src,
                term=msg.term if granted else self._term,
                pre_vote=msg.pre_vote,
                granted=granted,
            )
        )

    def _in_lease(self) -> bool:
        if not self._cfg.check_quorum or self._election_elapsed >= self._cfg.election_tick:
            return False
        if self._lead is not None:
            return True
        # With lease reads a restarted node must not vote before an election timeout has
        # passed: it may have acknowledged a leader's heartbeat just before crashing.
        return self._cfg.lease_read and self._now < self._cfg.election_tick

    def _promotable(self) -> bool:
        return self._id in self._conf.voters

    # -- step functions -------------------------------------------------------------------

    def _step_follower(self, msg: Message) -> None:
        if isinstance(msg, AppendRequest):
            self._election_elapsed = 0
            self._set_lead(msg.src)
            self._handle_append(msg)
        elif isinstance(msg, Heartbeat):
            self._election_elapsed = 0
            self._set_lead(msg.src)
            self._commit_to(min(msg.commit, self.last_index))
            if msg.quiet:
                self._quiet = True  # until a message other than a quiet heartbeat
            if msg.ctx:
                # ctx 0 only carries a new commit index (see _flush): no answer, so a
                # commit notice costs the leader no message in and no step
                self._send(
                    HeartbeatResponse(src=self._id, dst=msg.src, term=self._term, ctx=msg.ctx)
                )
        elif isinstance(msg, SnapshotRequest):
            self._election_elapsed = 0
            self._set_lead(msg.src)
            self._handle_snapshot(msg)
        elif isinstance(msg, TimeoutNow) and self._promotable():
            self._campaign(pre_vote=False, transfer=True)
        # Votes responses and append responses are stale here: ignore.

    def _step_candidate(self, msg: Message) -> None:
        if isinstance(msg, AppendRequest | Heartbeat | SnapshotRequest):
            self._become_follower(msg.term, msg.src)
            self._step_follower(msg)
        elif isinstance(msg, VoteResponse):
            if msg.pre_vote != (self._role is Role.PRE_CANDIDATE):
                return
            if msg.pre_vote and msg.granted and msg.term != self._term + 1:
                return  # a grant from an earlier pre-vote round
            self._votes.setdefault(msg.src, msg.granted)
            q = _quorum(len(self._conf.voters))
            if self._tally() >= q:
                self._won(pre_vote=msg.pre_vote)
            else:
                rejected = sum(
                    1 for nid, ok in self._votes.items() if not ok and nid in self._conf.voters
                )
                if rejected >= q:
                    self._become_follower(self._term, None)

    def _step_leader(self, msg: Message) -> None:
        if isinstance(msg, AppendResponse):
            self._handle_append_response(msg)
        elif isinstance(msg, HeartbeatResponse):
            self._handle_heartbeat_response(msg)
        elif isinstance(msg, AppendRequest | Heartbeat | SnapshotRequest):
            raise RemoteProtocolError(
                f"{self._id}: leader of term {self._term} got {type(msg).__name__} "
                f"from {msg.src} in the same term (two leaders in one term?)"
            )

    def _set_lead(self, lead: NodeId) -> None:
        if self._lead != lead:
            self._lead = lead
            self._events.append(BecameFollower(term=self._term, leader=lead))

    # -- follower side of replication -----------------------------------------------------

    def _handle_append(self, msg: AppendRequest) -> None:
        prev_index, prev_term, ents = msg.prev_index, msg.prev_term, msg.entries
        if prev_index < self._commit:
            # Our committed prefix matches the leader's; skip what we already hold.
            skip = self._commit - prev_index
            if skip >= len(ents):
                self._send(
                    AppendResponse(
                        src=self._id,
                        dst=msg.src,
                        term=self._term,
                        success=True,
                        match_index=self._commit,
                    )
                )
                return
            ents = ents[skip:]
            prev_index = self._commit
            t = self.term_at(prev_index)
            assert t is not None
            prev_term = t
        t = self.term_at(prev_index)
        if t != prev_term:
            if t is None:
                ci, ct = self.last_index + 1, 0
            else:
                ct = t
                ci = self._first_index_of_term(t, prev_index)
            self._send(
                AppendResponse(
                    src=self._id,
                    dst=msg.src,
                    term=self._term,
                    success=False,
                    match_index=0,
                    reject_index=msg.prev_index,
                    conflict_index=ci,
                    conflict_term=ct,
                )
            )
            return
        last_new = prev_index + len(ents)
        for i, e in enumerate(ents):
            have = self.term_at(e.index)
            if have != e.term:
                if have is not None:
                    self._truncate_from(e.index)
                self._append_entries(ents[i:])
                break
        self._commit_to(min(msg.commit, last_new))
        self._send(
            AppendResponse(
                src=self._id, dst=msg.src, term=self._term, success=True, match_index=last_new
            )
        )

    def _handle_snapshot(self, msg: SnapshotRequest) -> None:
        meta = msg.snapshot.meta
        if meta.index <= self._commit:
            match = self._commit
        elif self.term_at(meta.index) == meta.term:
            self._commit_to(meta.index)
            match = meta.index
        else:
            self._restore(msg.snapshot)
            match = meta.index
        self._send(
            AppendResponse(
                src=self._id, dst=msg.src, term=self._term, success=True, match_index=match
            )
        )

    def _restore(self, snap: Snapshot) -> None:
        meta = snap.meta
        self._entries = []
        self._snap_index = meta.index
        self._snap_term = meta.term
        self._snapshot = snap
        self._pending_snapshot = snap
        self._commit = meta.index
        self._applying = max(self._applying, meta.index)
        self._stable = meta.index
        self._conf = meta.conf
        self._conf_history = [(meta.index, meta.conf)]
        self._events.append(ConfChanged(conf=meta.conf, index=meta.index))

    def _first_index_of_term(self, term: int, upto: int) -> int:
        # Terms never decrease along the log, so binary search works.
        hi = upto - self._snap_index
        pos = bisect_left(self._entries, term, 0, hi, key=lambda e: e.term)
        return self._snap_index + 1 + pos

    def _truncate_from(self, index: int) -> None:
        if index <= self._commit:
            raise RemoteProtocolError(
                f"{self._id}: leader asked to overwrite committed entry {index} "
                f"(commit {self._commit})"
            )
        del self._entries[index - self._snap_index - 1 :]
        self._stable = min(self._stable, index - 1)
        if self._conf_history[-1][0] >= index:
            while self._conf_history[-1][0] >= index:
                self._conf_history.pop()
            self._set_conf(self._conf_history[-1][1], self._conf_history[-1][0])

    def _append_entries(self, ents: Sequence[Entry]) -> None:
        expect = self.last_index + 1
        for e in ents:
            assert e.index == expect, f"{self._id}: appending {e.index}, expected {expect}"
            expect += 1
            self._entries.append(e)
            if e.kind == EntryKind.CONFIG:
                conf = decode_conf(e.data)
                self._conf_history.append((e.index, conf))
                self._set_conf(conf, e.index)

    def _commit_to(self, index: int) -> None:
        if index > self._commit:
            assert index <= self.last_index, f"{self._id}: commit {index} beyond log"
            self._commit = index

    def _set_conf(self, conf: ConfState, index: int) -> None:
        self._conf = conf
        self._events.append(ConfChanged(conf=conf, index=index))
        if self._role is Role.LEADER:
            members = set(self._members())
            for nid in list(self._prs):
                if nid not in members and nid != self._id:
                    del self._prs[nid]
                    self._read_acks.pop(nid, None)
            for nid in members:
                if nid not in self._prs:
                    self._prs[nid] = _Progress(self.last_index + 1)
        elif self._role in (Role.CANDIDATE, Role.PRE_CANDIDATE) and not self._promotable():
            self._become_follower(self._term, None)

    def _members(self) -> list[NodeId]:
        return list(self._conf.voters) + list(self._conf.learners)

    def _conf_at(self, index: int) -> ConfState:
        conf = self._conf_history[0][1]
        for idx, c in self._conf_history:
            if idx <= index:
                conf = c
        return conf

    # -- leader side of replication -------------------------------------------------------

    def _append_leader(self, kind: EntryKind, data: bytes) -> int:
        self.wake()
        self._idle = 0
        idx = self.last_index + 1
        self._append_entries([Entry(term=self._term, index=idx, kind=int(kind), data=data)])
        # Our own match index moves only when advance() reports the entry persisted.
        self._prs[self._id].next = idx + 1
        self._bcast_pending = True
        return idx

    def _flush(self) -> None:
        if self._role is not Role.LEADER:
            return
        if self._bcast_pending:
            self._bcast_pending = False
            for nid in self._prs:
                if nid != self._id:
                    self._send_append(nid)
        if self._commit_pending:
            # Followers that hold everything learn the new commit index now rather than
            # at the next heartbeat (ctx 0: not a read round, not a repair signal).
            self._commit_pending = False
            last = self.last_index
            for nid, pr in self._prs.items():
                if nid != self._id and pr.match == last:
                    self._send(
                        Heartbeat(src=self._id, dst=nid, term=self._term, commit=self._commit)
                    )

    def _send_append(self, to: NodeId, *, allow_empty: bool = False) -> None:
        pr = self._prs[to]
        if pr.state == _SNAPSHOT:
            return
        if pr.state == _PROBE and pr.probe_sent:
            return
        if pr.state == _REPLICATE and len(pr.inflight) >= self._cfg.max_inflight_msgs:
            return
        prev = pr.next - 1
        prev_term = self.term_at(prev)
        if prev_term is None:
            self._send_snapshot(to, pr)
            return
        hi = min(self.last_index + 1, pr.next + self._cfg.max_entries_per_msg)
        ents = tuple(self.entries(pr.next, hi)) if pr.next < hi else ()
        if not ents and not (allow_empty or pr.state == _PROBE):
            return
        self._send(
            AppendRequest(
                src=self._id,
                dst=to,
                term=self._term,
                prev_index=prev,
                prev_term=prev_term,
                entries=ents,
                commit=self._commit,
            )
        )
        if pr.state == _REPLICATE:
            if ents:
                pr.next = ents[-1].index + 1
                pr.inflight.append(ents[-1].index)
        else:
            pr.probe_sent = True

    def _send_snapshot(self, to: NodeId, pr: _Progress) -> None:
        snap = self._snapshot
        assert snap is not None, f"{self._id}: log compacted to {self._snap_index} without snapshot"
        pr.state = _SNAPSHOT
        pr.snapshot_wait = 0
        pr.inflight.clear()
        self._send(SnapshotRequest(src=self._id, dst=to, term=self._term, snapshot=snap))

    def _handle_append_response(self, msg: AppendResponse) -> None:
        pr = self._prs.get(msg.src)
        if pr is None:
            return
        pr.active = True
        if msg.success:
            if msg.match_index > self.last_index:
                raise RemoteProtocolError(
                    f"AppendResponse from {msg.src!r} acknowledges index {msg.match_index} "
                    f"beyond the leader's log ({self.last_index})"
                )
            if msg.match_index > pr.match:
                pr.match = msg.match_index
                if pr.state != _REPLICATE:
                    pr.become_replicate()
                else:
                    pr.next = max(pr.next, pr.match + 1)
                    while pr.inflight and pr.inflight[0] <= pr.match:
                        pr.inflight.popleft()
                if self._maybe_commit():
                    if self._role is not Role.LEADER:
                        return  # the committed configuration removed us
                    self._commit_pending = True
            elif pr.state == _PROBE:
                pr.become_replicate()
            elif pr.state == _SNAPSHOT:
                pr.become_probe()
            if msg.src == self._transferee and pr.match == self.last_index:
                self._send_timeout_now(msg.src)
            self._send_append(msg.src)
            return
        # Rejected: ignore stale rejections, otherwise back off using the conflict hint.
        if pr.state == _REPLICATE and msg.reject_index <= pr.match:
            return
        if pr.state == _PROBE and msg.reject_index != pr.next - 1:
            return
        if pr.state == _SNAPSHOT:
            return
        nxt = msg.conflict_index
        if msg.conflict_term > 0:
            idx = self._last_index_of_term(
                msg.conflict_term, min(msg.reject_index, self.last_index)
            )
            if idx is not None:
                nxt = idx + 1
        nxt = max(min(nxt, msg.reject_index, self.last_index + 1), pr.match + 1)
        pr.become_probe()
        pr.next = nxt
        self._send_append(msg.src)

    def _last_index_of_term(self, term: int, upto: int) -> int | None:
        hi = max(0, upto - self._snap_index)
        pos = bisect_right(self._entries, term, 0, hi, key=lambda e: e.term)
        if pos > 0:
            idx = self._snap_index + pos
            return idx if self._entries[pos - 1].term == term else None
        return self._snap_index if self._snap_term == term else None

    def _handle_heartbeat_response(self, msg: HeartbeatResponse) -> None:
        pr = self._prs.get(msg.src)
        if pr is None:
            return
        pr.active = True
        if msg.ctx == 0:
            return  # answer to a commit notification
        if pr.state == _PROBE:
            pr.probe_sent = False
        elif pr.state == _REPLICATE:
            if pr.match < self.last_index and pr.match == pr.stall_match:
                pr.stall += 1
                if pr.stall >= _STALL_LIMIT:
                    # Appends in flight were probably lost: find the match point again.
                    pr.become_probe()
            else:
                pr.stall = 0
                pr.stall_match = pr.match
        elif pr.state == _SNAPSHOT:
            pr.snapshot_wait += 1
            if pr.snapshot_wait >= self._cfg.election_tick:
                pr.become_probe()  # the snapshot was probably lost: try again
        if pr.match < self.last_index:
            self._send_append(msg.src)
        elif msg.src == self._transferee:
            # The target is up to date but has not campaigned: the TimeoutNow was lost
            # (an extra one is harmless: it only starts an election, in this term + 1).
            self._send_timeout_now(msg.src)
        if msg.src in self._conf.voters and msg.ctx > self._read_acks.get(msg.src, 0):
            self._read_acks[msg.src] = msg.ctx
            self._advance_reads()

    def _maybe_commit(self) -> bool:
        voters = self._conf.voters
        if not voters:
            return False
        matches = sorted(
            (self._prs[v].match if v in self._prs else 0 for v in voters), reverse=True
        )
        q = matches[_quorum(len(voters)) - 1]
        # Paper 5.4.2: only entries of the current term are committed by counting replicas.
        if q > self._commit and self.term_at(q) == self._term:
            self._commit = q
            self._on_leader_commit()
            return True
        return False

    def _on_leader_commit(self) -> None:
        if self._reads_before_commit and self.term_at(self._commit) == self._term:
            waiting, self._reads_before_commit = self._reads_before_commit, []
            for ctx in waiting:
                self._start_read(ctx)
        if self._id not in self._conf.voters and self._conf_history[-1][0] <= self._commit:
            # The configuration removing us is committed: hand over by stepping down.
            self._become_follower(self._term, None)

    def _quorum_active(self) -> bool:
        voters = self._conf.voters
        active = sum(1 for v in voters if v == self._id or (v in self._prs and self._prs[v].active))
        return active >= _quorum(len(voters))

    # -- heartbeats and reads -------------------------------------------------------------

    def _bcast_heartbeat(self) -> None:
        self._read_seq += 1
        self._seq_ticks.append((self._read_seq, self._now))
        for nid, pr in self._prs.items():
            if nid == self._id:
                continue
            self._send(
                Heartbeat(
                    src=self._id,
                    dst=nid,
                    term=self._term,
                    commit=min(pr.match, self._commit),
                    ctx=self._read_seq,
                )
            )
        self._advance_reads()

    def _start_read(self, ctx: bytes) -> None:
        if (
            self._cfg.lease_read
            and self._transferee is None
            and not self._lease_broken
            and self._lease_valid()
        ):
            self._read_states.append(ReadState(ctx=ctx, index=self._commit))
            return
        self._reads.append(_PendingRead(seq=self._read_seq + 1, ctx=ctx, index=self._commit))
        self._heartbeat_elapsed = 0
        self._bcast_heartbeat()

    def _advance_reads(self) -> None:
        voters = self._conf.voters
        if not voters:
            return
        acks = sorted(
            (self._read_seq if v == self._id else self._read_acks.get(v, 0) for v in voters),
            reverse=True,
        )
        qseq = acks[_quorum(len(voters)) - 1]
        if qseq > self._quorum_seq:
            self._quorum_seq = qseq
            while len(self._seq_ticks) > 1 and self._seq_ticks[1][0] <= qseq:
                self._seq_ticks.popleft()
        while self._reads and self._reads[0].seq <= qseq:
            r = self._reads.popleft()
            self._read_states.append(ReadState(ctx=r.ctx, index=r.index))

    def _lease_valid(self) -> bool:
        if not self._seq_ticks or self._seq_ticks[0][0] > self._quorum_seq:
            return False
        sent = self._seq_ticks[0][1]
        return self._now - sent < self._cfg.election_tick - 1

    def _send_timeout_now(self, to: NodeId) -> None:
        # The target's campaign bypasses the followers' lease, so this leader's lease
        # can no longer be trusted for the rest of its term.
        self._lease_broken = True
        self._send(TimeoutNow(src=self._id, dst=to, term=self._term))

    def _send(self, msg: Message) -> None:
        self._msgs.append(msg)


def _validate(msg: Message) -> None:
    """Refuse messages no correct peer sends, before they touch any state."""
    if msg.term < 0:
        raise RemoteProtocolError(f"{type(msg).__name__} from {msg.src!r}: negative term")
    if isinstance(msg, AppendRequest):
        if msg.prev_index < 0 or msg.prev_term < 0 or msg.commit < 0:
            raise RemoteProtocolError(f"AppendRequest from {msg.src!r}: negative index or term")
        if msg.prev_term > msg.term:
            raise RemoteProtocolError(f"AppendRequest from {msg.src!r}: prev_term beyond term")
        expect, term = msg.prev_index + 1, msg.prev_term
        for e in msg.entries:
            if e.index != expect or e.term < term or e.term > msg.term:
                raise RemoteProtocolError(
                    f"AppendRequest from {msg.src!r}: entry (index={e.index}, term={e.term}) "
                    f"does not follow (index={expect - 1}, term={term}) in term {msg.term}"
                )
            if e.kind not in _KINDS:
                raise RemoteProtocolError(f"AppendRequest from {msg.src!r}: entry kind {e.kind}")
            if e.kind == EntryKind.CONFIG:
                decode_conf(e.data)  # raises RemoteProtocolError if malformed
            expect, term = expect + 1, e.term
    elif isinstance(msg, Heartbeat):
        if msg.commit < 0:
            raise RemoteProtocolError(f"Heartbeat from {msg.src!r}: negative commit")
    elif isinstance(msg, SnapshotRequest):
        meta = msg.snapshot.meta
        if meta.index < 0 or meta.term < 0 or meta.term > msg.term:
            raise RemoteProtocolError(f"SnapshotRequest from {msg.src!r}: bad metadata {meta}")
    elif isinstance(msg, VoteRequest):
        if msg.last_log_index < 0 or msg.last_log_term < 0:
            raise RemoteProtocolError(f"VoteRequest from {msg.src!r}: negative log position")
    elif isinstance(msg, AppendResponse) and (
        msg.match_index < 0 or msg.reject_index < 0 or msg.conflict_index < 0
    ):
        raise RemoteProtocolError(f"AppendResponse from {msg.src!r}: negative index")


_KINDS = frozenset(int(k) for k in EntryKind)


def _apply_change(conf: ConfState, change: ConfChange) -> ConfState:
    voters = list(conf.voters)
    learners = list(conf.learners)
    nid = change.node_id
    if not isinstance(nid, str) or not nid:
        raise BadInputError(f"invalid node id {nid!r}")
    if change.type == ConfChangeType.ADD_VOTER:
        if nid in voters:
            raise BadInputError(f"{nid!r} is already a voter")
        if nid in learners:
            learners.remove(nid)
        voters.append(nid)
    elif change.type == ConfChangeType.ADD_LEARNER:
        if nid in voters:
            raise BadInputError(f"{nid!r} is a voter; demoting to learner is not supported")
        if nid in learners:
            raise BadInputError(f"{nid!r} is already a learner")
        learners.append(nid)
    elif change.type == ConfChangeType.REMOVE_NODE:
        if nid in voters:
            if len(voters) == 1:
                raise BadInputError("cannot remove the last voter")
            voters.remove(nid)
        elif nid in learners:
            learners.remove(nid)
        else:
            raise BadInputError(f"{nid!r} is not a member")
    else:
        raise BadInputError(f"unknown configuration change type {change.type!r}")
    return ConfState(voters=tuple(voters), learners=tuple(learners))


__all__ = ["RaftConfig", "RaftCore"]
