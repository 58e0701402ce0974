"""While the broker is unreachable, errors say so, and a `fail_fast` producer does not wait
(issue #21, item 3): a plain outage is told from a memory or disk alarm."""

from __future__ import annotations

import asyncio
import time

import pytest

from aio_workq import BrokerConnectionError, BrokerUnavailableError, Producer, PublishTimeoutError
from scripts.broker import LocalBroker
from tests.helpers import wait_until

pytestmark = pytest.mark.broker

MEMORY_ALARM = ("set_vm_memory_high_watermark", "0.0000001")
MEMORY_CLEAR = ("set_vm_memory_high_watermark", "0.4")


async def _true(value: bool) -> bool:
    return value


async def test_a_timeout_during_an_outage_says_the_connection_is_down_not_an_alarm(
    local_broker: LocalBroker, queue_name: str
) -> None:
    async with Producer(local_broker.url, timeout=30) as producer:
        await producer.declare(queue_name)
        await asyncio.to_thread(local_broker.stop)
        try:
            await wait_until(lambda: _true(not producer.connected), timeout=30)
            with pytest.raises(PublishTimeoutError) as info:
                async with asyncio.timeout(30):
                    await producer.publish("x", queue=queue_name, timeout=1)
        finally:
            await asyncio.to_thread(local_broker.start)
    text = str(info.value)
    assert "the connection to the broker is down since" in text, text
    assert " UTC (" in text, text  # the time's zone said (a process's local time had none)
    assert "reconnecting" in text and "alarm" not in text, text


async def test_a_fail_fast_producer_raises_broker_unavailable_at_once_during_an_outage(
    local_broker: LocalBroker, queue_name: str
) -> None:
    async with Producer(local_broker.url, fail_fast=True, timeout=30) as producer:
        await producer.publish("before", queue=queue_name)
        await asyncio.to_thread(local_broker.stop)
        try:
            await wait_until(lambda: _true(not producer.connected), timeout=30)
            started = time.monotonic()
            with pytest.raises(BrokerUnavailableError) as info:
                await producer.publish("during", queue=queue_name)
            assert time.monotonic() - started < 0.5
            assert isinstance(info.value, BrokerConnectionError)
            assert "the connection to the broker is down since" in str(info.value)
            assert "guest:guest" not in str(info.value)
        finally:
            await asyncio.to_thread(local_broker.start)
        async with asyncio.timeout(60):  # back: it publishes again
            while True:
                try:
                    await producer.publish("after", queue=queue_name, timeout=10)
                    break
                except BrokerUnavailableError:
                    await asyncio.sleep(0.2)  # polling the reconnect, as a web app's client would


async def test_a_timeout_during_a_memory_alarm_says_the_broker_blocked_publishers(
    local_broker: LocalBroker, queue_name: str
) -> None:
    async with Producer(local_broker.url, fail_fast=True, timeout=30) as producer:
        await producer.declare(queue_name)
        await asyncio.to_thread(local_broker.ctl, *MEMORY_ALARM)
        try:
            with pytest.raises(PublishTimeoutError) as info:
                async with asyncio.timeout(30):
                    await producer.publish("x", queue=queue_name, timeout=3)
        finally:
            await asyncio.to_thread(local_broker.ctl, *MEMORY_CLEAR)
        text = str(info.value)
        assert "the broker blocked publishers" in text and "memory" in text, text
        assert "connection to the broker is down" not in text, text
        await producer.publish("after the alarm", queue=queue_name, timeout=30)
