"""Pure cores import no I/O, clocks, asyncio, logging or metrics (see STYLE.md).

Checked on the source, transitively: a pure module may import other dsys modules only
if those are clean too (the graph is followed through absolute and relative imports,
including ``from package import submodule``), and it may not touch files (``open()``,
``Path.read_text()`` and friends). Imports under ``if TYPE_CHECKING:`` never run and
are skipped.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "dsys"

FORBIDDEN = {
    "asyncio",
    "aiohttp",
    "time",
    "structlog",
    "prometheus_client",
    "socket",
    "threading",
    "selectors",
    "subprocess",
    "os",
    "io",
    "shutil",
    "tempfile",
    "pathlib",
    "dsys.observability",
}

# Calls that do file I/O: builtins, and methods (Path's, mostly) whatever the receiver.
FILE_CALLS = {"open"}
FILE_METHODS = {
    "read_text",
    "read_bytes",
    "write_text",
    "write_bytes",
    "open",
    "mkdir",
    "unlink",
    "touch",
    "rmdir",
}

# Pure modules, relative to src/dsys. Each block adds its cores here.
PURE = [
    "errors.py",
    "codec.py",
    "http11.py",
    "resilience/breaker_core.py",
    "resilience/backoff.py",
    "ratelimit/core.py",
    "sharding/ring.py",
    "balance/strategies.py",
    "balance/health.py",
    "balance/forwarded.py",
    "sharding/jump.py",
    "sharding/rendezvous.py",
    "sharding/bounded.py",
    "sharding/router.py",
    "pubsub/subjects.py",
    "pubsub/core.py",
    "kv/api.py",
    "kv/fsm.py",
    "kv/ranges.py",
    "kv/rangefsm.py",
    "kv/multiwatch.py",
    "kv/rangeload.py",
    "kv/placement.py",
    "kv/tombstones.py",
    "streams/fsm.py",
    "jobs/core.py",
    "jobs/cron.py",
    "raft/messages.py",
    "raft/core.py",
    "raft/session.py",
    "testing/linearizability.py",
    "testing/sim.py",
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _file_of(module: str) -> Path | None:
    """The source file of a dsys module or package, if it is one."""
    if module != "dsys" and not module.startswith("dsys."):
        return None
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Scan(ast.NodeVisitor):
    """Collects a module's imports (absolute names) and its file-I/O calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        name = _module_name(path)
        self.package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.imports: set[str] = set()
        self.file_io: list[str] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.imports.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        self.imports.add(module)
        for alias in node.names:  # `from pkg import submodule`
            if _file_of(f"{module}.{alias.name}") is not None:
                self.imports.add(f"{module}.{alias.name}")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in FILE_CALLS:
            self.file_io.append(f"{func.id}() at line {node.lineno}")
        elif isinstance(func, ast.Attribute) and func.attr in FILE_METHODS:
            self.file_io.append(f".{func.attr}() at line {node.lineno}")
        elif isinstance(func, ast.Name) and func.id == "__import__":
            self.file_io.append(f"__import__() at line {node.lineno}")
        self.generic_visit(node)


def _scan_source(path: Path, source: str) -> _Scan:
    scan = _Scan(path)
    scan.visit(ast.parse(source, filename=str(path)))
    return scan


@cache
def _scan(path: Path) -> _Scan:
    return _scan_source(path, path.read_text())


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _violations(path: Path, source: str | None = None) -> list[str]:
    """Forbidden imports and file I/O of ``path`` and of every dsys module it imports.

    ``source``: the text of ``path`` (checked instead of the file, which need not exist).
    """
    found: list[str] = []
    seen: set[Path] = set()
    stack: list[tuple[Path, str]] = [(path, _module_name(path))]
    while stack:
        current, via = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        scan = _scan_source(current, source) if current == path and source else _scan(current)
        found += [f"{via} imports {n}" for n in sorted(scan.imports) if _forbidden(n)]
        found += [f"{via} does file I/O: {c}" for c in scan.file_io]
        for name in sorted(scan.imports):
            target = _file_of(name)
            if target is not None and not _forbidden(name):
                stack.append((target, f"{via} -> {name}"))
    return found


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    path = PKG / module
    assert path.exists(), f"{module} is listed as pure but does not exist"
    bad = _violations(path)
    assert not bad, f"pure module {module}: " + "; ".join(bad)


# The checker itself, on small made-up modules: each rule must be able to fail.
@pytest.mark.parametrize(
    ("source", "expect"),
    [
        ("import asyncio\n", "imports asyncio"),
        ("from time import monotonic\n", "imports time"),
        ("from dsys import observability\n", "imports dsys.observability"),
        ("from ..observability import metrics\n", "imports dsys.observability"),
        ("from . import server\n", "-> dsys.kv.server imports"),  # transitive, relative
        ("from dsys.kv.server import KVServer\n", "-> dsys.kv.server imports"),
        ("def f():\n    import socket\n", "imports socket"),
        ("data = open('x').read()\n", "open() at line 1"),
        ("def f(p):\n    return p.read_text()\n", ".read_text() at line 2"),
        ("def f(p):\n    p.write_bytes(b'')\n", ".write_bytes() at line 2"),
        ("m = __import__('asyncio')\n", "__import__() at line 1"),
    ],
)
def test_the_checker_catches(source: str, expect: str) -> None:
    bad = _violations(PKG / "kv" / "_probe.py", source)
    assert any(expect in b for b in bad), bad


def test_type_checking_imports_are_not_followed() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio\n"
    assert _violations(PKG / "kv" / "_probe.py", source) == []
