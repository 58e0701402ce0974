"""Consume-then-publish chains (issue 4): the upstream ack waits for the downstream confirm."""

from __future__ import annotations

from collections.abc import Callable

import aio_pika
import pytest

from aio_workq import (
    ConfigurationError,
    DeadLetter,
    Job,
    Producer,
    RetryPolicy,
    TopologyError,
    UnroutableError,
    Worker,
)
from tests.helpers import Counter, queue_depth, read_line, wait_until, worker_process

pytestmark = pytest.mark.broker

FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.1, jitter=0)


async def test_upstream_is_acked_once_the_downstream_is_confirmed(
    amqp_url: str, producer: Producer, make_worker: Callable[..., Worker], queue_name: str,
    counter: Counter,
) -> None:  # fmt: skip
    down = f"{queue_name}-down"

    async def relay(job: Job) -> None:
        await job.forward({"from": job.message_id, "n": job.data}, queue=down)

    async def sink(job: Job) -> None:
        counter.add(job.data)

    relay_worker = make_worker(queue=queue_name, handler=relay, concurrency=4, prefetch=50)
    await relay_worker.start()
    await make_worker(queue=down, handler=sink, concurrency=10).start()
    ids = await producer.publish_many(range(200), queue=queue_name)
    received = await counter.wait_for(200)
    assert sorted(item["from"] for item in received) == sorted(ids)
    await wait_until(lambda: _is(relay_worker.state.processed == 200))
    assert await queue_depth(amqp_url, queue_name) == 0


async def _is(value: bool) -> bool:
    return value


async def _the_dead_letter(producer: Producer, queue_name: str) -> DeadLetter:
    """The one message of `queue_name`'s dead-letter queue, once it is there."""
    dead = producer.dead_letters(queue_name)

    async def dead_lettered() -> bool:
        return await dead.count() == 1

    await wait_until(dead_lettered)
    [letter] = await dead.read()
    return letter


async def test_unroutable_downstream_keeps_the_upstream_and_retries_it(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    async def relay(job: Job) -> None:
        counter.add(job.attempt)
        await job.forward(job.data, exchange="amq.direct", routing_key="nobody-bound")

    worker = make_worker(queue=queue_name, handler=relay, retry=FAST_RETRY)
    await worker.start()
    await producer.publish("x", queue=queue_name)
    letter = await _the_dead_letter(producer, queue_name)
    assert counter.items == [1, 2, 3]
    assert letter.exception_type == f"aio_workq.{UnroutableError.__name__}"
    assert worker.state.processed == 0


async def test_killed_between_downstream_confirm_and_upstream_ack_redelivers_upstream(
    amqp_url: str, producer: Producer, make_worker: Callable[..., Worker], queue_name: str,
    counter: Counter,
) -> None:  # fmt: skip
    down = f"{queue_name}-down"
    await producer.declare(queue_name)
    await producer.declare(down)
    async with worker_process(amqp_url, queue_name, "chain-hang") as proc:
        await producer.publish_many(range(20), queue=queue_name)
        forwarded = 0
        while forwarded < 5:  # concurrency 5: five confirmed downstream, none acked
            forwarded += (await read_line(proc)).startswith("FORWARDED")
    # leaving the block SIGKILLs it: after the downstream confirms, before the upstream acks

    async def relay(job: Job) -> None:
        await job.forward(job.data, queue=down)

    async def sink(job: Job) -> None:
        counter.add(job.data)

    await make_worker(queue=queue_name, handler=relay, concurrency=5).start()
    await make_worker(queue=down, handler=sink).start()
    received = await counter.wait_for(25)  # 20 upstream + the 5 forwarded before the kill
    assert set(received) == set(range(20))  # every upstream appears downstream at least once
    assert len(received) == 25
    assert await queue_depth(amqp_url, queue_name) == 0


async def _declare_classic(amqp_url: str, name: str) -> None:
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        channel = await conn.channel()
        await channel.declare_queue(name, durable=True)  # classic; the worker would want quorum


async def test_a_forward_whose_destination_fails_to_declare_keeps_the_upstream_even_if_caught(
    amqp_url: str, producer: Producer, make_worker: Callable[..., Worker], queue_name: str,
    counter: Counter,
) -> None:  # fmt: skip
    down = f"{queue_name}-down"
    await _declare_classic(amqp_url, down)

    async def relay(job: Job) -> None:
        try:
            await job.forward(job.data, queue=down)
        except TopologyError:
            counter.add(job.attempt)  # caught: the handler returns normally

    worker = make_worker(queue=queue_name, handler=relay, retry=FAST_RETRY)
    await worker.start()
    await producer.publish("x", queue=queue_name)
    letter = await _the_dead_letter(producer, queue_name)
    assert counter.items == [1, 2, 3]  # retried under the policy, never acked
    assert letter.exception_type == f"aio_workq.{TopologyError.__name__}"
    assert worker.state.processed == 0
    assert await queue_depth(amqp_url, down) == 0


async def test_a_forward_with_a_message_id_in_flight_keeps_the_upstream_even_if_caught(
    amqp_url: str, producer: Producer, make_worker: Callable[..., Worker], queue_name: str,
    counter: Counter,
) -> None:  # fmt: skip
    down = f"{queue_name}-down"
    await producer.declare(down)

    async def relay(job: Job) -> None:
        message_id = f"{job.message_id}-down"
        await job.send("first", queue=down, message_id=message_id)
        try:
            await job.forward("second", queue=down, message_id=message_id)
        except ConfigurationError:
            counter.add(job.attempt)  # caught: the handler returns normally

    worker = make_worker(queue=queue_name, handler=relay, retry=FAST_RETRY)
    await worker.start()
    await producer.publish("x", queue=queue_name)
    letter = await _the_dead_letter(producer, queue_name)
    assert counter.items == [1, 2, 3]  # "second" was never sent: the upstream is not acked
    assert letter.exception_type == f"aio_workq.{ConfigurationError.__name__}"
    assert worker.state.processed == 0
    assert await queue_depth(amqp_url, down) == 3  # "first", once per attempt
