"""Options for the Raft simulation tests.

* ``--sim-seeds N``: how many seeds the long campaign runs (``pytest -m sim --sim-seeds 20000``).
* ``--sim-seed S``: replay one seed of the campaign verbosely (``pytest -m sim --sim-seed 42``).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dsys-sim", "Raft deterministic simulation")
    group.addoption(
        "--sim-seeds",
        type=int,
        default=None,
        help="number of seeds for the long Raft simulation campaign (-m sim)",
    )
    group.addoption(
        "--sim-seed",
        type=int,
        default=None,
        help="replay a single Raft simulation seed (-m sim)",
    )


@pytest.fixture
def sim_seeds(request: pytest.FixtureRequest) -> int:
    """Seeds for the long campaign (default 2000)."""
    value = request.config.getoption("--sim-seeds")
    return 2000 if value is None else int(value)


@pytest.fixture
def sim_seed(request: pytest.FixtureRequest) -> int | None:
    """A single seed to replay, if given."""
    value = request.config.getoption("--sim-seed")
    return None if value is None else int(value)
