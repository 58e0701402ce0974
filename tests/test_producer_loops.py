"""A `Producer` used on an event loop other than the one it was started on (a Django async view
under a WSGI server gets an event loop of its own per request) says so at once, naming the fix,
instead of waiting out the publish timeout for a connection that died with its loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from aio_workq import IntegrationError, Producer


@pytest.mark.broker
def test_a_producer_used_on_another_event_loop_says_so_at_once(
    amqp_url: str, queue_name: str
) -> None:
    producer = Producer(amqp_url, timeout=20)
    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(producer.start())
        assert first.run_until_complete(producer.publish("on its loop", queue=queue_name))
        started = time.monotonic()
        with pytest.raises(IntegrationError) as caught:
            asyncio.run(producer.publish("on another loop", queue=queue_name))
        assert time.monotonic() - started < 2
        message = str(caught.value)
        assert "started on another event loop" in message
        assert "SyncProducer" in message and "Django" in message
        with pytest.raises(IntegrationError, match="another event loop"):
            asyncio.run(producer.publish_many(["a"], queue=queue_name))
        # still fine on its own loop
        assert first.run_until_complete(producer.publish("again", queue=queue_name))
    finally:
        first.run_until_complete(producer.close())
        first.close()
