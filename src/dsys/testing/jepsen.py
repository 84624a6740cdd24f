"""Reading Jepsen histories from files (the I/O beside the pure checker)."""

from __future__ import annotations

from pathlib import Path

from dsys.testing.linearizability import Operation, parse_jepsen_history


def load_jepsen_history(path: str | Path) -> list[Operation]:
    """Read and parse a Jepsen etcd register log (see :func:`parse_jepsen_history`).

    Raises:
        BadInputError: a line does not follow the format.
        OSError: the file cannot be read.
    """
    return parse_jepsen_history(Path(path).read_text(), str(path))


__all__ = ["load_jepsen_history"]
