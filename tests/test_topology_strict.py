"""`Producer(declare="never")` (issue #21, item 6): a misspelt queue name is an error, not a new
queue that nobody consumes."""

from __future__ import annotations

import aio_pika
import pytest

from aio_workq import ConfigurationError, Exchange, Producer, Queue, TopologyError
from tests.helpers import queue_depth

pytestmark = pytest.mark.broker


async def _exists(amqp_url: str, name: str) -> bool:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
    return True


async def test_a_strict_producer_refuses_a_queue_that_does_not_exist(
    amqp_url: str, queue_name: str
) -> None:
    async with Producer(amqp_url, declare="never") as producer:
        with pytest.raises(TopologyError) as info:
            await producer.publish("lost?", queue=queue_name)
        text = str(info.value)
        assert repr(queue_name) in text and "declare='never'" in text and "typo" in text
        assert f"call producer.declare({queue_name!r})" in text, text
        with pytest.raises(TopologyError, match=queue_name):
            await producer.publish_many(["a", "b"], queue=Queue(queue_name, type="classic"))
        with pytest.raises(TopologyError, match=queue_name):
            await producer.publish("later", queue=queue_name, delay=1)
        assert not await _exists(amqp_url, queue_name)
        assert not await _exists(amqp_url, f"{queue_name}.dlq")


async def test_a_strict_producer_publishes_to_an_existing_queue_as_it_is(
    amqp_url: str, queue_name: str
) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection, Producer(amqp_url, declare="never") as producer:
        channel = await connection.channel()
        await channel.declare_queue(queue_name, durable=True)  # classic, no arguments of ours
        await producer.publish("one", queue=queue_name)
        await producer.publish_many(["two", "three"], queue=queue_name)
        await producer.publish("urgent", queue=queue_name, priority=3)  # its arguments: unknown
        assert await queue_depth(amqp_url, queue_name) == 4
        assert not await _exists(amqp_url, f"{queue_name}.dlq")  # nothing declared beside it
        await channel.queue_delete(queue_name)


async def test_a_strict_producer_checks_declared_exchanges_too(
    amqp_url: str, queue_name: str
) -> None:
    connection = await aio_pika.connect(amqp_url)
    exchange = Exchange(f"{queue_name}-x", "fanout")
    async with connection, Producer(amqp_url, declare="never") as producer:
        with pytest.raises(TopologyError, match=rf"exchange '{exchange.name}'.*declare='never'"):
            await producer.publish("x", exchange=exchange, mandatory=False)
        channel = await connection.channel()
        await channel.declare_exchange(exchange.name, "fanout", durable=True)
        await producer.publish("y", exchange=exchange, mandatory=False)
        await channel.exchange_delete(exchange.name)


async def test_explicit_declare_still_declares_and_always_is_the_default(
    amqp_url: str, queue_name: str
) -> None:
    async with Producer(amqp_url, declare="never") as strict:
        await strict.declare(queue_name)  # asked for by name: declared
        await strict.publish("x", queue=queue_name)
    async with Producer(amqp_url, declare="always") as producer:
        await producer.publish("y", queue=f"{queue_name}-new")
    assert await _exists(amqp_url, f"{queue_name}-new")
    assert await queue_depth(amqp_url, queue_name) == 1


@pytest.mark.parametrize("bad", ["sometimes", "Never", None, True])
async def test_a_bad_declare_setting_is_a_configuration_error(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="declare must be 'always' or 'never'"):
        Producer("amqp://guest:guest@localhost/", declare=bad)  # type: ignore[arg-type]
