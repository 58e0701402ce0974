"""Large bodies: what a publish holds besides the body itself (#22).

A 16 MiB body on the fast path was handed to the transport whole: asyncio's selector transport
(3.11) copies into its own buffer whatever the socket does not take at once, so most of the body
was held twice until the socket had sent it. The writer now hands a large body to the transport
one frame at a time while the transport's buffer is under its high-water mark, and the rest once
it drains: the copy is at most a frame or two.
"""

from __future__ import annotations

import asyncio
import tracemalloc

import aiormq
import pytest

from aio_workq import Connection, Producer, Queue
from aio_workq.testing import LocalBroker

pytestmark = pytest.mark.broker

MiB = 2**20
SIZE = 16 * MiB
SLACK = MiB // 2  # the frames' headers, asyncio's and the library's own objects


async def bodies_in(url: str, queue: str) -> list[bytes]:
    """The bodies in `queue`, taken off it in order."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        bodies: list[bytes] = []
        while True:
            message = await channel.basic_get(queue, no_ack=True)
            if message.delivery_tag is None:  # Basic.GetEmpty
                return bodies
            bodies.append(message.body)
    finally:
        await connection.close()


@pytest.mark.timeout(120)
async def test_publishing_a_16_mib_body_holds_little_more_than_the_body(
    local_broker: LocalBroker, queue_name: str
) -> None:
    template = bytearray(range(256)) * (SIZE // 256)
    queue = Queue(queue_name, type="classic")
    async with Connection(local_broker.url, fast_path=True) as connection:
        async with Producer(connection=connection, timeout=60) as producer:
            await producer.declare(queue)
            await producer.publish(b"warm-up", queue)  # the channel and its caches exist
            tracemalloc.start()
            try:
                body = bytes(template)  # the application's body, counted in the peak
                async with asyncio.timeout(60):
                    await producer.publish(body, queue)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    assert peak <= 1.2 * SIZE + SLACK, f"publishing held {peak / SIZE:.2f} bodies"
    bodies = await bodies_in(local_broker.url, queue_name)
    assert bodies[0] == b"warm-up"
    assert bodies[1] == template  # framed from views of the body: the same bytes arrive


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "plain"])
async def test_a_bytearray_changed_after_send_arrives_as_it_was_sent(
    local_broker: LocalBroker, queue_name: str, fast_path: bool
) -> None:
    body = bytearray(b"a" * (4 * MiB))
    queue = Queue(queue_name, type="classic")
    async with Connection(local_broker.url, fast_path=fast_path) as connection:
        async with Producer(connection=connection, timeout=60) as producer:
            await producer.declare(queue)
            confirm = await producer.send(body, queue)
            body[:] = b"b" * len(body)  # before its frames have left (the confirm is pending)
            async with asyncio.timeout(60):
                await confirm
    assert await bodies_in(local_broker.url, queue_name) == [b"a" * (4 * MiB)]
