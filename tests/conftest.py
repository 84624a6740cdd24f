"""Shared pytest configuration for dsys tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_TESTDATA = REPO.parent / "shared" / "testdata"


@pytest.fixture
def shared_testdata() -> Path:
    """Path of ../shared/testdata (real data nobody here wrote); skips when absent."""
    if not SHARED_TESTDATA.is_dir():
        pytest.skip(f"{SHARED_TESTDATA} is not present (CI always has it)")
    return SHARED_TESTDATA
