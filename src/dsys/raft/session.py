"""Client session table for exactly-once command application (Raft dissertation 6.3).

A client tags every command with its ``client_id`` and a sequence number that grows by
one per new command (a retry reuses the number). The state machine, while applying
committed entries in log order, asks the table first::

    hit = table.check(client_id, seq)
    if hit is not None:
        return hit.result            # duplicate: answer again, do not re-execute
    result = execute(command)
    table.record(client_id, seq, result)

Because it is only touched while applying the log, every replica holds the same table;
it belongs in the snapshot (:meth:`SessionTable.to_plain` / :meth:`SessionTable.from_plain`).
Pure: no I/O, no clocks. Sessions are evicted least-recently-used (in log order), which is
deterministic across replicas.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from dsys.errors import BadInputError, ConfigError

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class SessionHit(Generic[R]):
    """A command that was already applied.

    Attributes:
        result: the cached result (``None`` when ``expired``).
        expired: the command was applied but its result was discarded (the client has
            since moved past it, or too many newer results were kept); answer with an
            error rather than re-executing.
    """

    result: R | None
    expired: bool = False


class _Session(Generic[R]):
    __slots__ = ("low", "results")

    def __init__(self) -> None:
        self.results: OrderedDict[int, R] = OrderedDict()
        self.low = 0  # every seq < low was applied and its result discarded


class SessionTable(Generic[R]):
    """Remembers the latest results per client so retried commands are not re-applied.

    Args:
        max_sessions: most clients remembered; the least recently active is evicted.
        max_results_per_client: most results kept per client (for pipelining clients);
            older ones are discarded and reported as expired.
    """

    def __init__(self, *, max_sessions: int = 10_000, max_results_per_client: int = 16) -> None:
        if max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, got {max_sessions}")
        if max_results_per_client < 1:
            raise ConfigError(f"max_results_per_client must be >= 1, got {max_results_per_client}")
        self._max_sessions = max_sessions
        self._max_results = max_results_per_client
        self._sessions: OrderedDict[str, _Session[R]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def check(self, client_id: str, seq: int) -> SessionHit[R] | None:
        """Return a hit if ``(client_id, seq)`` was already applied, else ``None``.

        Raises:
            BadInputError: ``seq`` is negative.
        """
        if seq < 0:
            raise BadInputError(f"sequence number must be >= 0, got {seq}")
        s = self._sessions.get(client_id)
        if s is None:
            return None
        if seq in s.results:
            return SessionHit(result=s.results[seq])
        if seq < s.low:
            return SessionHit(result=None, expired=True)
        return None

    def record(self, client_id: str, seq: int, result: R) -> None:
        """Remember the result of applying ``(client_id, seq)``.

        Raises:
            BadInputError: ``seq`` is negative.
        """
        if seq < 0:
            raise BadInputError(f"sequence number must be >= 0, got {seq}")
        s = self._sessions.get(client_id)
        if s is None:
            s = _Session()
            self._sessions[client_id] = s
            while len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(client_id)
        s.results[seq] = result
        while len(s.results) > self._max_results:
            old, _ = s.results.popitem(last=False)
            s.low = max(s.low, old + 1)

    def ack(self, client_id: str, below: int) -> None:
        """The client received every result with ``seq < below``: forget them."""
        s = self._sessions.get(client_id)
        if s is None:
            return
        for seq in [q for q in s.results if q < below]:
            del s.results[seq]
        s.low = max(s.low, below)

    def to_plain(self) -> list[list[object]]:
        """A plain-value form for snapshots (results must be plain values themselves)."""
        return [
            [cid, s.low, [[seq, r] for seq, r in s.results.items()]]
            for cid, s in self._sessions.items()
        ]

    @classmethod
    def from_plain(
        cls,
        plain: list[list[object]],
        *,
        max_sessions: int = 10_000,
        max_results_per_client: int = 16,
    ) -> SessionTable[R]:
        """Rebuild a table from :meth:`to_plain` output."""
        table: SessionTable[R] = cls(
            max_sessions=max_sessions, max_results_per_client=max_results_per_client
        )
        for row in plain:
            cid, low, results = row
            assert isinstance(cid, str) and isinstance(low, int) and isinstance(results, list)
            s: _Session[R] = _Session()
            s.low = low
            for seq, r in results:
                s.results[int(seq)] = r
            table._sessions[cid] = s
        return table


__all__ = ["SessionHit", "SessionTable"]
