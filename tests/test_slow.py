"""Fault tests that take minutes: `make test-slow` (not in the default run)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from aio_workq import Job, Producer, Worker
from scripts.broker import LocalBroker
from tests.helpers import Counter, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def strict_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A node whose consumer timeout is the smallest RabbitMQ 3.10 supports: 60 s."""
    node = LocalBroker(Path(tmp_path_factory.mktemp("strict")), name="workqstrict",
                       consumer_timeout_ms=60_000)  # fmt: skip
    node.start()
    yield node
    node.close()


@pytest.mark.timeout(300)
async def test_consumer_timeout_reopens_the_channel_and_redelivers(
    strict_broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aio_workq")
    url = strict_broker.url
    redelivered = asyncio.Event()
    seen = Counter()

    async def handler(job: Job) -> None:
        seen.add(job.redelivered)
        if job.redelivered:
            redelivered.set()
        else:
            await redelivered.wait()  # far past the consumer timeout; then acks a dead channel

    async with Producer(url) as producer, Worker(url, queue="long-task", handler=handler) as w:
        await producer.publish("long", queue="long-task")
        async with asyncio.timeout(200):  # checked once a minute: up to two minutes
            await redelivered.wait()
        await seen.wait_for(2)

        async def processed() -> bool:
            return w.state.processed >= 1

        await wait_until(processed)
    assert seen.items == [False, True]
    assert any("lost its channel" in r.getMessage() for r in caplog.records)
