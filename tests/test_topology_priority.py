"""Message priorities (issue #21, item 6): only a classic queue with `max_priority` honours
`priority=`; a publish with it to any other queue is a `ConfigurationError`, not ignored."""

from __future__ import annotations

from typing import Any

import aio_pika
import pytest

from aio_workq import ConfigurationError, Job, Producer, Queue, Worker
from tests.helpers import Counter

# --- offline ---


def test_max_priority_declares_x_max_priority_on_the_work_queue_only() -> None:
    spec = Queue("jobs", type="classic", max_priority=10)
    assert spec.arguments_for_work_queue()["x-max-priority"] == 10
    assert "x-max-priority" not in spec.arguments_for_delay_queue(1000)
    assert "x-max-priority" not in spec.arguments_for_dead_letter_queue()
    assert "x-max-priority" not in Queue("jobs", type="classic").arguments_for_work_queue()


def test_max_priority_on_a_quorum_queue_says_to_use_a_classic_one() -> None:
    with pytest.raises(ConfigurationError, match=r"type=.classic., max_priority=10"):
        Queue("jobs", max_priority=10)


@pytest.mark.parametrize("bad", [0, 256, -1, True, 2.5, "10"])
def test_a_bad_max_priority_is_a_configuration_error(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_priority"):
        Queue("jobs", type="classic", max_priority=bad)


# --- on the broker ---


async def _declared(amqp_url: str, name: str) -> bool:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
    return True


@pytest.mark.broker
@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_priority_to_a_queue_without_priorities_is_a_configuration_error(
    amqp_url: str, queue_name: str, queue_type: str
) -> None:
    async with Producer(amqp_url, queue_type=queue_type) as producer:  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError) as info:
            await producer.publish("urgent", queue=queue_name, priority=5)
        text = str(info.value)
        assert queue_name in text and f"Queue({queue_name!r}, type='classic', max_priority=" in text
        assert not await _declared(amqp_url, queue_name)  # checked before anything happened
        await producer.publish("plain", queue=queue_name)  # without priority= it is fine
        with pytest.raises(ConfigurationError, match="max_priority"):  # and once declared, too
            await producer.send("urgent", queue=queue_name, priority=0)
        with pytest.raises(ConfigurationError, match="max_priority"):
            await producer.publish_many(["a", "b"], queue=queue_name, priority=1)


@pytest.mark.broker
async def test_a_classic_queue_with_max_priority_delivers_the_highest_first(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    spec = Queue(queue_name, type="classic", max_priority=10)
    await producer.publish_many([f"low-{i}" for i in range(5)], queue=spec, priority=1)
    await producer.publish_many([f"high-{i}" for i in range(5)], queue=spec, priority=9)
    await producer.publish("default", queue=queue_name)  # the name now maps to the spec
    await producer.publish("by-name", queue=queue_name, priority=5)
    seen = Counter()

    async def handler(job: Job) -> None:
        seen.add(job.data)

    async with Worker(amqp_url, queue=spec, handler=handler, prefetch=1, concurrency=1):
        order = await seen.wait_for(12)
    assert order[:5] == [f"high-{i}" for i in range(5)]
    assert order[5] == "by-name"
    assert order[6:11] == [f"low-{i}" for i in range(5)]
    assert order[11] == "default"


@pytest.mark.broker
async def test_priorities_set_through_arguments_or_on_a_passive_queue_are_not_second_guessed(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    by_argument = Queue(queue_name, type="classic", arguments={"x-max-priority": 3})
    await producer.publish("x", queue=by_argument, priority=2)
    passive = Queue(queue_name, type="classic", passive=True)  # its arguments are unknown
    await producer.publish("y", queue=passive, priority=2)
