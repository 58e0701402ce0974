"""Producers are publishing again within seconds of the broker's return, however long it was down
(issue #21, item 3): the reconnect backoff is capped low enough, with its jitter kept."""

from __future__ import annotations

import logging
import re
import statistics

import pytest

import aio_workq
from aio_workq import redact_url
from scripts.broker import LocalBroker
from scripts.recovery import recover_once
from tests.faultproxy import FaultProxy
from tests.helpers import wait_until

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


async def test_a_failed_reconnect_round_says_when_it_tries_again(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The broker gone for good (the proxy closed: every connect refused). Each failed round's
    # WARNING says when the next one starts and how long the connection has been down, as the
    # first connect's does, and names the URL once (it said "...; after a pause").
    caplog.set_level(logging.WARNING, logger="aio_workq")
    proxy = FaultProxy.to(amqp_url)
    await proxy.start()
    url = proxy.url(amqp_url)
    backoff = aio_workq.Backoff(initial=0.2, cap=0.4, settle=0.05)
    async with await aio_workq.connect(url, backoff=backoff) as connection:
        await proxy.close()

        async def failed_twice() -> bool:
            return len(failures()) >= 2

        def failures() -> list[str]:
            return [m for r in caplog.records if (m := r.getMessage()).startswith("connecting to")]

        await wait_until(failed_twice, timeout=10)
        assert not connection.is_connected
    first = failures()[0]
    assert re.search(r"; trying again in 0\.\d\d s \(down for \d\.\d\d s\)$", first), first
    assert first.count(redact_url(url)) == 1, first
