"""Rooms are owned on the consistent-hash ring of the chat servers (pure: no processes).

The chat servers route with :func:`examples.chat.common.room_ring` / ``room_owner``;
these check that a change of servers moves only the changed server's share of rooms.
"""

from __future__ import annotations

import pytest
from examples.chat.common import room_owner, room_ring

ROOMS = [f"room-{i}" for i in range(6_000)]


def _owners(servers: list[str]) -> dict[str, str]:
    ring = room_ring(servers)
    return {room: room_owner(ring, room) for room in ROOMS}


@pytest.mark.parametrize("n", [2, 3, 5])
def test_adding_a_server_moves_only_its_share_of_rooms_to_it(n: int) -> None:
    servers = [f"s{i + 1}" for i in range(n)]
    before = _owners(servers)
    after = _owners([*servers, f"s{n + 1}"])
    moved = [room for room in ROOMS if before[room] != after[room]]
    # every moved room moved to the new server, none between the old ones
    assert {after[room] for room in moved} == {f"s{n + 1}"}
    share = len(moved) / len(ROOMS)
    assert abs(share - 1 / (n + 1)) < 0.25 / (n + 1), share  # about 1/(N+1) of them
    # and each old server gave up about its fair part, not all from one
    for s in servers:
        lost = sum(1 for room in moved if before[room] == s)
        assert lost > 0.5 * len(moved) / n, (s, lost)


@pytest.mark.parametrize("n", [3, 4])
def test_removing_a_server_moves_only_its_rooms(n: int) -> None:
    servers = [f"s{i + 1}" for i in range(n)]
    before = _owners(servers)
    gone = servers[1]
    after = _owners([s for s in servers if s != gone])
    moved = {room for room in ROOMS if before[room] != after[room]}
    assert moved == {room for room in ROOMS if before[room] == gone}
    assert gone not in after.values()


def test_the_ring_does_not_depend_on_the_order_servers_are_listed() -> None:
    a = _owners(["s1", "s2", "s3"])
    assert a == _owners(["s3", "s1", "s2", "s1"])
