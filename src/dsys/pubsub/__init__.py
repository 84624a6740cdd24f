"""dsys.pubsub: a pub/sub broker with wildcard subjects, queue groups and clustering.

* :class:`Client` (``dsys.pubsub.client``): the asyncio client: publish, subscribe,
  request/reply, queue groups, reconnect.
* :class:`Broker` (``dsys.pubsub.broker``): the aiohttp server behind
  ``dsys pubsub serve``.
* :class:`BrokerState` (``dsys.pubsub.core``) and :class:`SubjectIndex`
  (``dsys.pubsub.subjects``): the pure cores.
"""

from __future__ import annotations

from dsys.pubsub.broker import Broker, BrokerConfig
from dsys.pubsub.client import Client, Msg, Subscription
from dsys.pubsub.core import (
    BrokerLimits,
    BrokerState,
    Permissions,
    QueueChoice,
    SlowConsumerPolicy,
)
from dsys.pubsub.subjects import SubjectIndex, matches, validate_pattern, validate_subject

__all__ = [
    "Broker",
    "BrokerConfig",
    "BrokerLimits",
    "BrokerState",
    "Client",
    "Msg",
    "Permissions",
    "QueueChoice",
    "SlowConsumerPolicy",
    "SubjectIndex",
    "Subscription",
    "matches",
    "validate_pattern",
    "validate_subject",
]
