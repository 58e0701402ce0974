"""Every reported publish outcome is the broker's, on the fast and the plain path (issue 11)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

import aio_workq
from aio_workq import (
    ConfigurationError,
    Producer,
    PublishNackedError,
    Queue,
    SerializationError,
    Worker,
)
from tests.helpers import Counter, queue_depth, wait_until

pytestmark = pytest.mark.broker


@pytest.fixture(params=["fast", "plain"])
async def any_producer(request: pytest.FixtureRequest, amqp_url: str) -> AsyncIterator[Producer]:
    """A producer on aio-workq's own connection, and one on a robust aio-pika connection (which
    takes aiormq's public API for every frame)."""
    if request.param == "fast":
        async with Producer(amqp_url) as producer:
            yield producer
        return
    robust = await aio_pika.connect_robust(amqp_url)
    try:
        async with Producer(connection=robust) as producer:
            yield producer
    finally:
        await robust.close()


BAD_INPUTS: list[dict[str, Any]] = [
    {"headers": {"x": object()}},
    {"expiration": "60"},
    {"priority": "high"},
    {"message_id": "m" * 300},
    {"correlation_id": "c" * 300},
]


async def outcome(confirm: asyncio.Future[str]) -> str:
    try:
        await confirm
    except PublishNackedError:
        return "nacked"
    return "confirmed"


async def test_a_bad_publish_changes_no_other_outcome(
    any_producer: Producer, queue_name: str, amqp_url: str
) -> None:
    # A classic queue that holds 3 messages and nacks the rest (reject-publish), with 1 in it.
    queue = Queue(
        queue_name,
        type="classic",
        arguments={"x-max-length": 3, "x-overflow": "reject-publish"},
    )
    await any_producer.publish("m-first", queue=queue)
    for bad in BAD_INPUTS:
        with pytest.raises(SerializationError):
            await any_producer.send("bad", queue=queue, **bad)
    confirms = []
    for n in range(5):
        confirms.append(await any_producer.send(f"m{n}", queue=queue))
        if n == 1:  # between good sends too
            with pytest.raises(SerializationError, match="header 'x'"):
                await any_producer.send("bad", queue=queue, headers={"x": object()})
    outcomes = [await outcome(confirm) for confirm in confirms]
    # The broker took m0 and m1 (3 in the queue), and nacked m2..m4.
    assert outcomes == ["confirmed", "confirmed", "nacked", "nacked", "nacked"]
    assert await queue_depth(amqp_url, queue_name) == 3
    # ...and the producer still works: a confirmed publish after draining the queue.
    async with await aio_workq.connect(amqp_url) as conn:
        channel = await conn.channel()
        await channel.queue_purge(queue_name)
        await channel.close()
    assert await any_producer.publish("after", queue=queue)


async def test_a_message_id_already_in_flight_is_refused(
    any_producer: Producer, queue_name: str
) -> None:
    await any_producer.declare(queue_name)
    first = await any_producer.send("a", queue=queue_name, message_id="same")
    with pytest.raises(ConfigurationError, match="already in flight"):
        await any_producer.send("b", queue=queue_name, message_id="same")
    assert await first == "same"
    assert await any_producer.publish("c", queue=queue_name, message_id="same") == "same"


async def test_unknown_and_mistyped_options_are_named(
    any_producer: Producer, queue_name: str
) -> None:
    with pytest.raises(ConfigurationError, match="delay_seconds"):
        await any_producer.publish("x", queue=queue_name, delay_seconds=5)  # type: ignore[call-arg]
    with pytest.raises(SerializationError, match="expiration"):
        await any_producer.publish("x", queue=queue_name, expiration="soon")  # type: ignore[arg-type]
    assert await any_producer.publish("x", queue=queue_name, expiration=60)


async def test_a_bad_forward_fails_only_its_own_job(
    amqp_url: str, producer: Producer, make_worker: Any, queue_name: str, counter: Counter
) -> None:
    down = f"{queue_name}-down"
    await producer.declare(down)

    async def handler(job: aio_workq.Job) -> None:
        if job.data == "bad":
            with pytest.raises(SerializationError):
                await job.forward("x", queue=down, headers={"x": object()})
            return
        await job.forward(job.data, queue=down)
        counter.add(job.data)

    worker: Worker = make_worker(queue=queue_name, handler=handler, concurrency=4)
    await worker.start()
    await producer.publish_many(["bad", "a", "b", "c"], queue=queue_name)
    await counter.wait_for(3)
    await wait_until(lambda: _depth_is(amqp_url, down, 3))
    await wait_until(lambda: _depth_is(amqp_url, queue_name, 0))

    # The caught error still fails its own job (the message it meant to forward was never sent):
    # retried, not acked; the other three go on as if it never happened.
    async def retried() -> bool:
        return worker.state.retried == 1

    await wait_until(retried)
    assert worker.state.processed == 3 and worker.state.failed == 1


async def _depth_is(amqp_url: str, name: str, depth: int) -> bool:
    return await queue_depth(amqp_url, name) == depth
