"""The whole dsys exception tree.

Every error dsys raises on purpose is a :class:`DsysError`, so callers can catch
one base class. Subclasses name the failure kind, not the module that raised it::

    DsysError
    ├── ConfigError (also ValueError)        bad configuration given to a constructor
    ├── BadInputError (also ValueError)      bad input from a caller or client (4xx)
    │   └── PayloadTooLargeError             a body or message is larger than allowed (413)
    ├── ProtocolError                        bytes that break the wire protocol
    │   ├── LocalProtocolError               we were asked to send something invalid:
    │   │                                    our own bug, so a 500, never a 4xx
    │   └── RemoteProtocolError              a peer sent malformed or oversized data;
    │                                        also a BadInputError, so a 4xx
    ├── ConflictError                        a precondition failed (CAS revision, exists)
    │   └── StreamFullError                  a stream at a limit refuses new messages (507)
    ├── NotFoundError (also LookupError)     the named stream, consumer or key is absent (404)
    ├── ClosedError                          the resource was closed
    ├── CompactedError(revision)             a watch start revision is gone (HTTP 410)
    ├── RangeError(ranges)                   a request reached the wrong range (HTTP 421)
    │   ├── KeyNotInRangeError(key)          no range here owns the key
    │   └── EpochNotMatchError(range_id)     the request's range epoch is stale
    ├── UnavailableError                     no one can serve the request right now
    │   ├── NotLeaderError(leader_hint)      ask the leader instead (a redirect)
    │   ├── NoHealthyBackendError            every backend is down or ejected
    │   ├── CircuitOpenError(retry_after)    a circuit breaker refused the call
    │   ├── BulkheadFullError                a concurrency limit refused the call
    │   └── RateLimitedError(retry_after)    a rate limit refused the call
    ├── TransportError                       the network failed
    │   ├── ConnectError                     could not connect
    │   └── RequestTimeout (also TimeoutError) no answer before the deadline
    └── RaftError                            consensus-level failures
        ├── ProposalDroppedError             a proposal was dropped (leader change)
        └── CorruptLogError                  the write-ahead log is damaged
                                             (defined in dsys.raft.wal)

Cores return expected outcomes as values; adapters raise these. A broken invariant
is a bug and raises ``AssertionError``, never a ``DsysError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsys.kv.ranges import RangeDescriptor


class DsysError(Exception):
    """Base class of every error dsys raises on purpose."""


class ConfigError(DsysError, ValueError):
    """A constructor or CLI got configuration that cannot work (e.g. a negative rate)."""


class BadInputError(DsysError, ValueError):
    """Input from a caller or a network client was invalid; maps to HTTP 4xx."""


class ProtocolError(DsysError):
    """Bytes on the wire do not follow the protocol (malformed, oversized, wrong types).

    Not a :class:`BadInputError` by itself: whose fault it is depends on the side. The
    peer's (:class:`RemoteProtocolError`, a 4xx) or ours (:class:`LocalProtocolError`,
    a bug, answered 500).
    """


class LocalProtocolError(ProtocolError):
    """We were asked to encode or send something the protocol cannot carry (our bug)."""


class RemoteProtocolError(ProtocolError, BadInputError):
    """A peer or client sent bytes we cannot accept.

    Attributes:
        status_hint: the HTTP status a server should answer (400 unless the input was
            too large, 413/414/431, or asked for something unsupported, 501/505).
    """

    def __init__(self, message: str = "", *, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class ConflictError(DsysError):
    """A precondition did not hold, e.g. a compare-and-set revision mismatch (HTTP 409)."""


class PayloadTooLargeError(BadInputError):
    """A request body or message is larger than the server accepts (HTTP 413)."""


class StreamFullError(ConflictError):
    """A stream with ``discard="new"`` is at a limit and refused a message (HTTP 507)."""


class NotFoundError(DsysError, LookupError):
    """The named resource (stream, consumer, message) does not exist (HTTP 404)."""


class ClosedError(DsysError):
    """The client, server or resource was already closed."""


class UnavailableError(DsysError):
    """Nobody can serve the request right now; retrying later may succeed (HTTP 503).

    Attributes:
        retry_after: seconds after which a retry may succeed, when known.
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotLeaderError(UnavailableError):
    """This node is not the Raft leader; ``leader_hint`` names the one to ask, if known."""

    def __init__(
        self,
        message: str = "not the leader",
        *,
        leader_hint: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.leader_hint = leader_hint


class NoHealthyBackendError(UnavailableError):
    """Every backend of a pool is down, ejected or draining."""


class CircuitOpenError(UnavailableError):
    """A circuit breaker is open and refused the call without running it."""


class BulkheadFullError(UnavailableError):
    """A bulkhead's concurrency limit and wait queue are full."""


class RateLimitedError(UnavailableError):
    """A rate limit refused the request; ``retry_after`` says when it may pass."""


class TransportError(DsysError):
    """The network failed between us and a peer."""


class ConnectError(TransportError):
    """A connection could not be established."""


class RequestTimeout(TransportError, TimeoutError):
    """No answer arrived before the deadline."""


class RaftError(DsysError):
    """A consensus-level failure."""


class ProposalDroppedError(RaftError):
    """A proposal was dropped before it committed (e.g. leadership changed)."""


class CompactedError(DsysError):
    """A watch asked for revisions the server no longer keeps (HTTP 410 Gone).

    The changes before ``revision`` were dropped from the change history (it is bounded,
    and starts afresh at a snapshot's revision). Refetch the current state (a get or a
    scan) and watch again from that read's revision + 1, which is at least ``revision``.

    Attributes:
        revision: the oldest revision still available to watch from.
    """

    def __init__(self, message: str = "", *, revision: int = 0) -> None:
        super().__init__(message or f"revisions before {revision} were compacted")
        self.revision = revision


class RangeError(DsysError):
    """A request reached a range that cannot serve it (HTTP 421 Misdirected Request).

    Attributes:
        ranges: the current descriptors the answering node knows (refresh with them).
        map_version: the version of the range map the node knows (0 when unknown).
    """

    def __init__(
        self,
        message: str,
        *,
        ranges: Sequence[RangeDescriptor] = (),
        map_version: int = 0,
    ) -> None:
        super().__init__(message)
        self.ranges = tuple(ranges)
        self.map_version = map_version


class KeyNotInRangeError(RangeError):
    """No range on the answering node owns ``key`` (it moved, or was never here)."""

    def __init__(
        self,
        key: str,
        *,
        ranges: Sequence[RangeDescriptor] = (),
        map_version: int = 0,
        message: str = "",
    ) -> None:
        super().__init__(
            message or f"key {key!r} is in no range of this node",
            ranges=ranges,
            map_version=map_version,
        )
        self.key = key


class EpochNotMatchError(RangeError):
    """A request named range ``range_id`` with an epoch that is no longer current.

    Attributes:
        range_id: the range the request named.
        epoch: the ``(conf_ver, version)`` the request carried.
    """

    def __init__(
        self,
        range_id: int,
        epoch: tuple[int, int],
        *,
        ranges: Sequence[RangeDescriptor] = (),
        map_version: int = 0,
    ) -> None:
        cur = next((r for r in ranges if r.range_id == range_id), None)
        now = f"{tuple(cur.epoch)}" if cur is not None else "gone"
        super().__init__(
            f"range {range_id} epoch {tuple(epoch)} is stale (now {now}); refresh the range map",
            ranges=ranges,
            map_version=map_version,
        )
        self.range_id = range_id
        self.epoch = epoch


__all__ = [
    "BadInputError",
    "BulkheadFullError",
    "CircuitOpenError",
    "ClosedError",
    "CompactedError",
    "ConfigError",
    "ConflictError",
    "ConnectError",
    "DsysError",
    "EpochNotMatchError",
    "KeyNotInRangeError",
    "LocalProtocolError",
    "NoHealthyBackendError",
    "NotFoundError",
    "NotLeaderError",
    "PayloadTooLargeError",
    "ProposalDroppedError",
    "ProtocolError",
    "RaftError",
    "RangeError",
    "RateLimitedError",
    "RemoteProtocolError",
    "RequestTimeout",
    "StreamFullError",
    "TransportError",
    "UnavailableError",
]
