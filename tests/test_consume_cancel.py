"""A consumer the broker cancels (its queue deleted) while handlers run: the worker closes and
reopens only its own channel; the connection it shares with others stays up (#20 finding 2)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from yarl import URL

from aio_workq import Connection, Hook, Job, Producer, Worker, connect
from tests.faultproxy import FaultProxy
from tests.helpers import Counter, wait_until

pytestmark = pytest.mark.broker

IN_FLIGHT = 20


class Losses(Hook):
    """Counts the losses of the connection it watches."""

    def __init__(self) -> None:
        self.lost: list[str] = []

    def on_connection_lost(self, url: str) -> None:
        self.lost.append(url)


@pytest.fixture
async def slow_link(amqp_url: str) -> AsyncIterator[FaultProxy]:
    """A proxy adding 30 ms each way: the time between our Channel.Close and its Close-Ok in
    which a late ack used to be written."""
    port = URL(amqp_url).port
    assert port is not None
    async with FaultProxy(upstream_port=port) as proxy:
        proxy.latency = 0.03
        yield proxy


async def _delete_queue(amqp_url: str, name: str) -> None:
    """Delete `name` from a connection of its own, consumers and unacked messages regardless."""
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        channel = await conn.channel()
        await channel.queue_delete(name)


@pytest.mark.parametrize("round_", range(3))
async def test_a_queue_deleted_under_running_handlers_leaves_the_shared_connection_up(
    amqp_url: str, slow_link: FaultProxy, queue_name: str, round_: int
) -> None:
    losses = Losses()
    started, finished = Counter(), Counter()
    release = asyncio.Event()

    async def handler(job: Job) -> None:
        started.add(job.data)
        if job.data == "after":
            return
        await release.wait()
        # The acks go out one by one over 200 ms, across the consumer's cancel and the
        # channel's close.
        await asyncio.sleep(0.01 * job.data)
        finished.add(job.data)

    conn: Connection = await connect(slow_link.url(amqp_url), hooks=[losses])
    async with conn:
        producer = Producer(connection=conn)
        worker = Worker(
            connection=conn, queue=queue_name, handler=handler,
            concurrency=IN_FLIGHT, retry=None,
        )  # fmt: skip
        async with producer, worker:
            await producer.publish_many(range(IN_FLIGHT), queue=queue_name)
            await started.wait_for(IN_FLIGHT)
            await _delete_queue(amqp_url, queue_name)
            release.set()
            await finished.wait_for(IN_FLIGHT)

            # Per the workers guide the worker declares its queue again and consumes.
            async def consuming_again() -> bool:
                return worker.state.consuming

            await wait_until(consuming_again, timeout=20)
            # The producer on the same connection still publishes and gets its confirm.
            await producer.publish("after", queue=queue_name, timeout=10)
            await started.wait_for(IN_FLIGHT + 1)
            assert started.items[-1] == "after"
            assert conn.is_connected
            assert losses.lost == [] and conn.reconnects == 0, "the shared connection was lost"
