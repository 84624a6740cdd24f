"""Quiet ticks (hibernating idle groups) in the deterministic simulation."""

from __future__ import annotations

import pytest

from dsys.errors import ConfigError
from dsys.raft import RaftConfig
from dsys.raft.messages import Role
from dsys.testing.sim import SimNetwork


def _quiet_net(seed: int, n: int = 3) -> tuple[SimNetwork, str]:
    net = SimNetwork(node_ids=[f"n{i}" for i in range(1, n + 1)], seed=seed, quiet_ticks=5)
    lead = net.tick_until(net.leader, max_ticks=100)
    net.tick_until(lambda: all(net.node(x).quiet for x in net.nodes), max_ticks=50)
    return net, lead


def test_an_idle_group_goes_quiet_and_a_proposal_wakes_it() -> None:
    net, lead = _quiet_net(7)
    before = net.messages_delivered
    net.run(200)  # twenty election timeouts: no heartbeat, no election, nothing sent
    assert net.messages_delivered == before
    assert net.leader() == lead and len({net.node(x).term for x in net.nodes}) == 1
    idx = net.propose_via_leader(b"x=1")
    assert not net.node(lead).quiet
    net.tick_until(lambda: all(net.node(x).commit_index >= idx for x in net.nodes), max_ticks=20)
    net.tick_until(lambda: all(net.node(x).quiet for x in net.nodes), max_ticks=50)
    net.assert_logs_match()


def test_a_quiet_follower_does_not_campaign_while_the_connection_lives() -> None:
    net, lead = _quiet_net(3)
    follower = next(x for x in net.nodes if x != lead)
    net.drop(lead, follower, 1.0)  # messages lost, the connection not reported lost
    term = net.node(lead).term
    net.run(200)
    assert net.node(follower).term == term and net.node(follower).quiet


@pytest.mark.parametrize("fault", ["crash", "isolate"])
def test_a_lost_quiet_leader_is_replaced(fault: str) -> None:
    net, lead = _quiet_net(11, n=5)
    if fault == "crash":
        net.crash(lead)
    else:
        net.isolate(lead)
    net.tick_until(lambda: net.leader() not in (None, lead), max_ticks=300)
    new = net.leader()
    assert new is not None
    idx = net.propose_via_leader(b"after")
    net.tick_until(lambda: net.node(new).commit_index >= idx, max_ticks=50)
    if fault == "crash":
        net.restart(lead)
    else:
        net.heal()  # the old leader, still quiet, wakes on the new leader's messages
    net.tick_until(
        lambda: net.node(lead).role is Role.FOLLOWER and net.node(lead).commit_index >= idx,
        max_ticks=300,
    )
    net.assert_logs_match()


def test_a_restarted_follower_wakes_the_quiet_leader() -> None:
    net, lead = _quiet_net(5)
    follower = next(x for x in net.nodes if x != lead)
    net.crash(follower)
    net.restart(follower)  # not quiet: it campaigns, and its vote request wakes the leader
    net.tick_until(lambda: net.node(follower).leader_id == lead, max_ticks=200)
    assert net.leader() == lead
    net.tick_until(lambda: all(net.node(x).quiet for x in net.nodes), max_ticks=100)


def test_quiet_ticks_must_not_be_negative() -> None:
    with pytest.raises(ConfigError):
        RaftConfig(id="a", quiet_ticks=-1)
