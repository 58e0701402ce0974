"""Connection errors show the broker's own reason, never an internal repr or a password."""

from __future__ import annotations

import aiormq
import pytest

import aio_workq
from aio_workq import AccessRefusedError
from aio_workq._link.errors import connect_error

pytestmark = pytest.mark.broker


async def test_a_missing_vhost_shows_the_brokers_reply_text(amqp_url: str) -> None:
    url = amqp_url.rstrip("/") + "/nope"
    with pytest.raises(AccessRefusedError) as info:
        await aio_workq.connect(url, timeout=5)
    text = str(info.value)
    assert "vhost nope not found" in text, text  # RabbitMQ's NOT_ALLOWED reply text
    assert "object at 0x" not in text, text
    assert "guest:guest" not in text and "guest:***@" in text, text


def test_without_the_frame_the_refusal_names_the_vhost_of_the_url() -> None:
    error = connect_error(
        aiormq.exceptions.InvalidFrameError(
            "Expected one of ['Connection.OpenOk'], got <Connection.Close object at 0x7f0>"
        ),
        "amqp://app:s3cret@localhost:5672/orders%2Feu",
    )
    assert isinstance(error, AccessRefusedError)
    assert "vhost 'orders/eu' does not exist, or the user may not use it" in str(error)
    assert "object at 0x" not in str(error) and "s3cret" not in str(error)
