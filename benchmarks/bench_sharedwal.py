"""Benchmark: the storage layer alone, shared WAL against one WAL per group.

G groups (1, 2, 4, 8) on one event loop each persist R Readies of E entries (60-byte
values) plus a hard state, as a Raft node does: with the shared WAL, queue the records
and await ``GroupLog.sync_async`` (one write and one fsync per loop turn for all
groups); with per-group WALs, ``asyncio.to_thread`` of ``append + save_hard_state +
sync`` on each group's own :class:`~dsys.raft.wal.WriteAheadLog` (what ``RaftNode``
does). Real files and fsync in a temp dir. Reported: process CPU per Ready (the
event-loop thread and the fsync threads), fsyncs, wall time. The modes alternate over
rounds; medians.

    .venv/bin/python benchmarks/bench_sharedwal.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from dsys.raft.messages import Entry, HardState
from dsys.raft.sharedwal import SharedWAL
from dsys.raft.wal import WriteAheadLog


def _entries(lo: int, n: int) -> list[Entry]:
    return [Entry(term=1, index=i, kind=0, data=b"v" * 60) for i in range(lo, lo + n)]


async def shared(base: Path, groups: int, readies: int, per: int) -> tuple[float, float, int]:
    wal = SharedWAL(base / "shared")
    logs = [wal.group(rid) for rid in range(groups)]

    async def run(g: object) -> None:
        assert hasattr(g, "sync_async")
        idx = 1
        for _ in range(readies):
            g.append(_entries(idx, per))  # type: ignore[attr-defined]
            g.save_hard_state(HardState(1, "n1", idx))  # type: ignore[attr-defined]
            idx += per
            await g.sync_async()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(run(g) for g in logs))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    fsyncs = wal.fsync_count
    await wal.aclose()
    return cpu, wall, fsyncs


async def per_group(base: Path, groups: int, readies: int, per: int) -> tuple[float, float, int]:
    wals = [WriteAheadLog(base / f"g{k}") for k in range(groups)]

    def persist(w: WriteAheadLog, idx: int) -> None:
        w.append(_entries(idx, per))
        w.save_hard_state(HardState(1, "n1", idx))
        w.sync()

    async def run(w: WriteAheadLog) -> None:
        idx = 1
        for _ in range(readies):
            await asyncio.to_thread(persist, w, idx)
            idx += per

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(run(w) for w in wals))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    fsyncs = sum(w.fsync_count for w in wals)
    for w in wals:
        w.close()
    return cpu, wall, fsyncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--readies", type=int, default=500, help="Readies per group")
    parser.add_argument("--entries", type=int, default=8, help="entries per Ready")
    args = parser.parse_args()
    modes = {"shared": shared, "per-group": per_group}
    res: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
    for r in range(args.rounds):
        for groups in (1, 2, 4, 8):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for mode in order:
                with tempfile.TemporaryDirectory(prefix="bench-swal-") as tmp:
                    run = modes[mode](Path(tmp), groups, args.readies, args.entries)
                    res.setdefault((mode, groups), []).append(asyncio.run(run))
    load = os.getloadavg()
    print(
        f"\nbench_sharedwal: {args.readies} Readies of {args.entries} entries (60-byte values)"
        f" + a hard state per group, fsync on, {args.rounds} alternating rounds, medians; "
        f"Python {platform.python_version()}, {os.cpu_count()} cores; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )
    print("| groups | WAL | CPU us per Ready | fsyncs | Readies/s |")
    print("|---:|---|---:|---:|---:|")
    for groups in (1, 2, 4, 8):
        for mode in modes:
            runs = res[(mode, groups)]
            n = groups * args.readies
            cpu = statistics.median(x[0] for x in runs) / n * 1e6
            wall = statistics.median(x[1] for x in runs)
            fsyncs = statistics.median(x[2] for x in runs)
            print(f"| {groups} | {mode} | {cpu:.0f} | {fsyncs:,.0f} | {n / wall:,.0f} |")


if __name__ == "__main__":
    main()
