from __future__ import annotations

import dsys


def test_all_names_exist_and_are_documented() -> None:
    for name in dsys.__all__:
        obj = getattr(dsys, name)
        if name != "__version__":
            assert obj.__doc__, f"dsys.{name} has no docstring"


def test_every_error_derives_from_the_base() -> None:
    from dsys import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.DsysError), name
