"""Public API: each package exports exactly its ``__all__`` (as httpx checks its own)."""

from __future__ import annotations
import __future__

import importlib
import pkgutil
import types

import pytest

import dsys

PACKAGES = sorted(
    ["dsys"] + [m.name for m in pkgutil.walk_packages(dsys.__path__, "dsys.") if m.ispkg]
)
EXTRA_PUBLIC = {"__version__"}  # dunder names a package deliberately exports


def _public_names(module: types.ModuleType) -> set[str]:
    """Names a user sees with ``dir()``: no private names, submodules or ``annotations``."""
    return {
        name
        for name, value in vars(module).items()
        if (not name.startswith("_") or name in EXTRA_PUBLIC)
        and not isinstance(value, (types.ModuleType, __future__._Feature))
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_equal_all(package: str) -> None:
    module = importlib.import_module(package)
    declared = getattr(module, "__all__", None)
    assert declared is not None, f"{package} has no __all__"
    assert len(declared) == len(set(declared)), f"{package}.__all__ has duplicates"
    for name in declared:  # lazy re-exports (PEP 562) become attributes on first access
        getattr(module, name)
    assert set(declared) == _public_names(module), package


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_exist_and_are_documented(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, (type, types.FunctionType)):
            assert obj.__doc__, f"{package}.{name} has no docstring"


def test_every_error_derives_from_the_base() -> None:
    from dsys import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.DsysError), name


def test_a_server_bug_is_not_bad_input() -> None:
    from dsys import errors

    assert not issubclass(errors.LocalProtocolError, errors.BadInputError)
    assert issubclass(errors.RemoteProtocolError, errors.BadInputError)
    assert issubclass(errors.LocalProtocolError, errors.ProtocolError)
    assert issubclass(errors.RemoteProtocolError, errors.ProtocolError)


def test_importing_a_light_block_does_not_load_the_servers() -> None:
    """``import dsys.sharding`` (and the CLI of one block) must not pull in every block."""
    import subprocess
    import sys

    heavy = "('aiohttp', 'dsys.kv', 'dsys.balance')"
    code = (
        f"import sys, dsys.sharding; print(sorted(m for m in sys.modules if m.startswith({heavy})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_lazy_reexports_resolve_to_the_block_objects() -> None:
    from dsys.kv.client import KVClient
    from dsys.sharding import HashRing

    assert dsys.KVClient is KVClient
    assert dsys.HashRing is HashRing
    assert "KVClient" in dir(dsys)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dsys.nope  # noqa: B018
