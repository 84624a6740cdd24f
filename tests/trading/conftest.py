"""One trading system (real processes) shared by every test of this directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from examples.trading.system import TradingSystem

N_INSTRUMENTS = 40


@pytest.fixture(scope="session")
def system() -> Iterator[TradingSystem]:
    with TradingSystem(instruments=N_INSTRUMENTS, feed_args=["--interval", "0.5"]) as ts:
        yield ts
