"""Declarations under faults (issue #20): a cancelled shared declaration, a deleted exchange."""

from __future__ import annotations

import asyncio

import pytest

from aio_workq import Producer, PublishTimeoutError
from tests.helpers import queue_depth

pytestmark = pytest.mark.broker


async def test_a_publish_sharing_a_cancelled_declaration_declares_the_queue_itself(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    # Two first publishes to a new queue share one declaration; the first one's timeout cancels
    # it mid-way. The second, with its whole timeout left, must not inherit that cancellation.
    hasty = producer.publish("hasty", queue=queue_name, timeout=0.001)
    patient = producer.publish("patient", queue=queue_name, timeout=30)
    first, second = await asyncio.gather(hasty, patient, return_exceptions=True)
    assert isinstance(first, PublishTimeoutError), first  # the scenario: it was cut short
    assert isinstance(second, str), second  # the message id: declared and confirmed
    assert await queue_depth(amqp_url, queue_name) == 1
    await producer.publish("after", queue=queue_name)  # and the queue is known from now on
    assert await queue_depth(amqp_url, queue_name) == 2
