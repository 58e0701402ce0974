"""Issue 15's "Why", one test each: every bound holds, every bad input is a typed error.

Short tests of the default run. The fault proxy black-holes the connection where the issue used a
broker outage: the client sees the same silence, and the shared broker keeps running.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

from aio_workq import (
    BrokerConnectionError,
    ConfigurationError,
    Exchange,
    Producer,
    PublishTimeoutError,
    WorkqError,
    redact_url,
    resolve_url,
)
from tests.faultproxy import FaultProxy

pytestmark = [pytest.mark.broker]

SLACK = 5.0  # seconds allowed past a bound: scheduling on a loaded machine, never a hang


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[FaultProxy]:
    port = int(amqp_url.rsplit(":", 1)[1].split("/", 1)[0])
    async with FaultProxy(upstream_port=port) as proxy:
        yield proxy


async def test_publish_timeout_holds_in_a_black_hole_for_a_declared_queue(
    proxy: FaultProxy, amqp_url: str, queue_name: str
) -> None:
    async with Producer(proxy.url(amqp_url), timeout=30) as producer:
        await producer.declare(queue_name)
        async with proxy.black_holed_for(60):
            started = time.monotonic()
            with pytest.raises(PublishTimeoutError):
                async with asyncio.timeout(2 + SLACK + 5):
                    await producer.publish("x", queue=queue_name, timeout=2)
            assert time.monotonic() - started < 2 + SLACK
            proxy.cut()  # don't wait for the held bytes on the way out


async def test_publish_timeout_covers_the_declare_of_a_new_queue(
    proxy: FaultProxy, amqp_url: str, queue_name: str
) -> None:
    async with Producer(proxy.url(amqp_url), timeout=30) as producer:
        async with proxy.black_holed_for(60):
            try:
                with pytest.raises(PublishTimeoutError):
                    async with asyncio.timeout(2 + SLACK + 5):  # a hang fails, typed or not
                        await producer.publish("x", queue=queue_name, timeout=2)
            finally:
                proxy.cut()


async def test_a_failed_connect_leaves_nothing_running(amqp_url: str) -> None:
    # In a process of its own: the leak would otherwise hold up this loop's teardown.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.chaos.failed_connect", amqp_url, stdout=subprocess.PIPE
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    result = json.loads(out)
    assert result["error"] == "BrokerConnectionError"
    assert result["connected_after"] == 0, "a connection was opened after the failed connect"
    assert result["tasks_left"] == 0, "tasks were left running after the failed connect"


async def test_a_missing_vhost_is_a_typed_error_with_the_brokers_reason(amqp_url: str) -> None:
    url = amqp_url.rstrip("/") + "/no-such-vhost"
    with pytest.raises(BrokerConnectionError, match="no-such-vhost"):
        async with asyncio.timeout(20):
            await Producer(url, connect_timeout=5).start()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("q" * 256, id="over-255-bytes"),
        pytest.param("has space", id="outside-the-amqp-charset"),
    ],
)
async def test_a_bad_queue_name_is_a_typed_error(producer: Producer, name: str) -> None:
    with pytest.raises(WorkqError):
        await producer.publish("x", queue=name, timeout=5)
    await producer.publish("still usable", queue="test-bounds-usable", timeout=5)


async def test_an_overlong_routing_key_is_a_typed_error(amqp_url: str) -> None:
    exchange = Exchange("test-bounds-topic", type="topic")
    producer = Producer(amqp_url)
    await producer.start()
    try:
        with pytest.raises(WorkqError):
            await producer.publish("x", exchange=exchange, routing_key="k" * 300, timeout=5)
    finally:
        await producer.close(timeout=1)


@pytest.mark.parametrize("char", ["/", "#", "?"])
def test_an_unencoded_special_character_in_the_password_is_a_typed_error_never_shown(
    char: str,
) -> None:
    url = f"amqp://user:Sec{char}ret-4711@localhost:5672/"
    with pytest.raises(ConfigurationError) as info:
        resolve_url(url)
    assert "4711" not in str(info.value) and "Sec" not in str(info.value), str(info.value)
    assert "percent-encode" in str(info.value)  # it says how to fix it
    assert "4711" not in redact_url(url) and "Sec" not in redact_url(url)
