"""The local-broker helper (scripts/broker.py) the test suite runs on, and its command line's
output: the management API's URL, and no password but on request (`--url-only`, for scripts)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aio_pika
import pytest

from scripts import broker as script
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


def test_start_names_the_management_api_and_hides_the_password(tmp_path: Path) -> None:
    node = LocalBroker(tmp_path, amqp_port=34013, management=True, management_port=49383)
    text = "\n".join(script.report(node, running=True, started=True))
    assert "management API: http://127.0.0.1:49383/" in text
    assert "amqp://guest:***@127.0.0.1:34013/" in text
    assert "guest:guest" not in text
    assert "--url-only" in text  # where the full URL is, for AMQP_URL
    plain = LocalBroker(tmp_path, amqp_port=34013)
    assert "management" not in "\n".join(script.report(plain, running=True, started=True))


def test_status_hides_the_password_unless_asked_for_the_url(
    local_broker: LocalBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    assert script.main(["status", "--dir", str(local_broker.base_dir)]) == 0
    out = capsys.readouterr().out
    assert "running" in out and "guest:***@" in out and "guest:guest" not in out
    assert script.main(["status", "--dir", str(local_broker.base_dir), "--url-only"]) == 0
    assert capsys.readouterr().out == f"{local_broker.url}\n"
