"""The local-broker helper (scripts/broker.py) the test suite runs on."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest

from scripts.broker import LocalBroker, amqp_answers

pytestmark = pytest.mark.broker


def test_node_answers_and_lists_queues(local_broker: LocalBroker) -> None:
    assert amqp_answers(local_broker.amqp_port)
    assert isinstance(local_broker.queues(), list)


async def test_restart_keeps_durable_messages(local_broker: LocalBroker) -> None:
    name = f"test-broker-restart-{uuid.uuid4().hex[:8]}"
    async with asyncio.timeout(90):
        async with await aio_pika.connect(local_broker.url) as conn:
            channel = await conn.channel()
            await channel.declare_queue(name, durable=True)
            message = aio_pika.Message(b"kept", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=name)

        await asyncio.to_thread(local_broker.stop)
        assert not amqp_answers(local_broker.amqp_port)
        await asyncio.to_thread(local_broker.start)

        queues = {q["name"]: q for q in await asyncio.to_thread(local_broker.queues)}
        assert queues[name]["messages"] == 1
        async with await aio_pika.connect(local_broker.url) as conn:
            channel = await conn.channel()
            queue = await channel.declare_queue(name, durable=True)
            got = await queue.get(no_ack=True)
            assert got.body == b"kept"
            await queue.delete()
