"""One chat deployment (real processes) shared by the tests of tests/chat."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from examples.chat.cluster import ChatCluster


@pytest.fixture(scope="package")
def cluster() -> Iterator[ChatCluster]:
    with ChatCluster(password_cost="fast", post_rate=20, post_burst=30) as c:
        yield c
