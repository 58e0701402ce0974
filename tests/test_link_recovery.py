"""Producers are publishing again within seconds of the broker's return, however long it was down
(issue #21, item 3): the reconnect backoff is capped low enough, with its jitter kept."""

from __future__ import annotations

import statistics

import pytest

from scripts.broker import LocalBroker
from scripts.recovery import recover_once

pytestmark = pytest.mark.broker

CLIENTS = 6  # each on a connection of its own: their backoff phases differ


async def test_producers_recover_within_5_s_of_the_brokers_return_after_a_short_outage(
    local_broker: LocalBroker, queue_name: str
) -> None:
    result = await recover_once(local_broker, outage=3, clients=CLIENTS, queue=queue_name)
    assert statistics.median(result.recoveries) < 5, result
    assert max(result.recoveries) < 10, result


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_producers_recover_within_5_s_of_the_brokers_return_after_a_long_outage(
    local_broker: LocalBroker, queue_name: str
) -> None:
    # Down for over 25 s (20 s, then the node's boot): past where a 30 s backoff cap hurt.
    result = await recover_once(local_broker, outage=20, clients=CLIENTS, queue=queue_name)
    assert statistics.median(result.recoveries) < 5, result
    assert max(result.recoveries) < 10, result
