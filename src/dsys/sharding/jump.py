"""Jump consistent hash (Lamping and Veach, 2014).

``jump_hash(key, n)`` maps a key to a bucket in ``range(n)`` with no state at all and
perfect balance. Growing ``n`` to ``n + 1`` moves exactly the keys that land in the new
bucket (about ``1/(n+1)`` of them), but buckets can only be added or removed at the end,
so jump hash suits numbered shards (as :class:`dsys.sharding.ShardRouter`'s key space
does) rather than named nodes that come and go in any order. For those, use
:class:`~dsys.sharding.HashRing` or :class:`~dsys.sharding.RendezvousHash`.

This module is pure: no I/O, no clocks.
"""

from __future__ import annotations

import mmh3

from dsys.errors import BadInputError
from dsys.sharding.ring import safe_key

__all__ = ["MAX_BUCKETS", "jump_hash", "key_to_u64"]

MAX_BUCKETS = 2**31 - 1
"""The largest bucket count: the algorithm draws 31-bit random numbers."""

_MASK64 = 2**64 - 1
_hash64 = mmh3.hash64


def key_to_u64(key: int | str | bytes) -> int:
    """Turn a key into the unsigned 64-bit integer jump hash consumes.

    Integers in ``[0, 2**64)`` are used as they are (so results match other jump
    hash implementations); ``str`` (UTF-8) and ``bytes`` go through 64-bit
    MurmurHash3 (the first half of x64 128-bit mmh3, seed 0).

    Raises:
        BadInputError: for any other type, or an integer outside ``[0, 2**64)``.
    """
    if isinstance(key, str | bytes):
        return int(_hash64(safe_key(key), 0, signed=False)[0])
    if isinstance(key, int) and not isinstance(key, bool):
        if 0 <= key <= _MASK64:
            return key
        raise BadInputError(f"integer keys must be in [0, 2**64), got {key}")
    raise BadInputError(f"key must be an int, str or bytes, got {type(key).__name__}: {key!r:.60}")


def jump_hash(key: int | str | bytes, n: int) -> int:
    """Return the bucket in ``range(n)`` that ``key`` belongs to.

    Example:
        >>> jump_hash(123456789, 10)
        7
        >>> 0 <= jump_hash("user:42", 64) < 64
        True

    Args:
        key: an unsigned 64-bit integer, or a ``str``/``bytes`` key (hashed with mmh3).
        n: the number of buckets, ``1 <= n <= 2**31 - 1``.

    Raises:
        BadInputError: if ``key`` has the wrong type or range, or ``n`` is not an
            integer in ``1..2**31 - 1``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BUCKETS:
        raise BadInputError(f"number of buckets must be an integer in 1..2**31-1, got {n!r}")
    if key.__class__ is str and key.isascii():
        k = _hash64(key, 0, signed=False)[0]  # the common case, without a call
    else:
        k = key_to_u64(key)
    b, j = -1, 0
    while j < n:
        b = j
        k = (k * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        # In floating point, as the reference does: exact integer division can round
        # differently near integers and would break compatibility.
        j = int((b + 1) * (2147483648.0 / ((k >> 33) + 1)))
    return b
