"""Pure cores import no I/O, clocks, asyncio, logging or metrics (see STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "dsys"

FORBIDDEN = {
    "asyncio",
    "aiohttp",
    "time",
    "structlog",
    "prometheus_client",
    "socket",
    "threading",
    "dsys.observability",
}

# Pure modules, relative to src/dsys. Each block adds its cores here.
PURE = [
    "errors.py",
    "codec.py",
    "resilience/breaker_core.py",
    "resilience/backoff.py",
    "ratelimit/core.py",
    "sharding/ring.py",
    "balance/strategies.py",
    "balance/health.py",
    "sharding/jump.py",
    "sharding/rendezvous.py",
    "sharding/bounded.py",
    "sharding/router.py",
    "pubsub/subjects.py",
    "pubsub/core.py",
    "kv/fsm.py",
    "streams/fsm.py",
    "jobs/core.py",
    "jobs/cron.py",
    "raft/messages.py",
    "raft/core.py",
    "raft/session.py",
    "testing/linearizability.py",
    "testing/sim.py",
]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    path = SRC / module
    assert path.exists(), f"{module} is listed as pure but does not exist"
    bad = {
        name
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not bad, f"pure module {module} imports {sorted(bad)}"
