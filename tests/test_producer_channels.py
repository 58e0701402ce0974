"""`Producer(channels=N)`: publishing over several channels of one connection, in turn (#22).

The broker runs each channel as one process, which bounds one channel's rate on a quorum
queue; a producer over two channels reaches what two processes reach. Every message still
goes out once and is confirmed; a channel the broker closes is reopened like a single one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import aio_workq
from aio_workq import ConfigurationError, Job, Producer, TopologyError, Worker
from aio_workq.sync import SyncProducer
from scripts.broker import LocalBroker
from tests.helpers import wait_until

pytestmark = pytest.mark.broker


def _channels_of(broker: LocalBroker, name: str) -> int | None:
    """The channels the broker counts on the connection named `name` (None: no such one)."""
    for line in broker.ctl("list_connections", "client_properties", "channels").splitlines():
        if f'{{"connection_name","{name}"}}' in line:
            return int(line.rsplit(maxsplit=1)[-1])
    return None


async def _eventually(check: Callable[[], object], want: object) -> None:
    """Until `check()` (a rabbitmqctl call, in a thread) gives `want`, within 30 s."""

    async def holds() -> bool:
        return await asyncio.to_thread(check) == want

    await wait_until(holds, timeout=30)


async def _consume_all(url: str, queue: str, n: int) -> list[str]:
    ids: list[str] = []
    done = asyncio.Event()

    async def handle(job: Job) -> None:
        ids.append(job.message_id or "")
        if len(ids) >= n:
            done.set()

    async with Worker(url, queue=queue, handler=handle, concurrency=50):
        async with asyncio.timeout(60):
            await done.wait()
    return ids


async def test_a_producer_over_two_channels_delivers_every_message_once(
    amqp_url: str, queue_name: str, local_broker: LocalBroker
) -> None:
    one = f"one-channel-{uuid.uuid4().hex[:8]}"
    async with Producer(amqp_url, name=one) as producer:
        await producer.declare(queue_name)
        await _eventually(lambda: _channels_of(local_broker, one) is not None, True)
        usual = _channels_of(local_broker, one)  # its channel, and the one it declares on
        assert usual is not None
    name = f"two-channels-{uuid.uuid4().hex[:8]}"
    async with Producer(amqp_url, channels=2, name=name) as producer:
        await producer.declare(queue_name)
        await _eventually(lambda: _channels_of(local_broker, name), usual + 1)
        sent = await producer.publish_many([{"n": i} for i in range(2_000)], queue=queue_name)
        one_by_one = await asyncio.gather(
            *(producer.publish({"m": i}, queue_name) for i in range(100))
        )
        confirms = [await producer.send(b"sent", queue_name) for _ in range(20)]
        sent += one_by_one + [await confirm for confirm in confirms]
        assert producer.in_flight == 0
        assert producer.connected
    await _eventually(lambda: _channels_of(local_broker, name), None)
    received = await _consume_all(amqp_url, queue_name, len(sent))
    assert sorted(received) == sorted(sent)
    assert len(set(received)) == 2_120


async def test_closing_leaves_a_shared_connection_without_the_producers_channels(
    amqp_url: str, queue_name: str, local_broker: LocalBroker
) -> None:
    name = f"shared-{uuid.uuid4().hex[:8]}"
    async with await aio_workq.connect(amqp_url, name=name) as conn:
        async with Producer(connection=conn) as producer:
            await producer.publish(b"x", queue_name)
            await _eventually(lambda: _channels_of(local_broker, name), 2)
        # what is left: the idle channel the connection keeps for declarations
        await _eventually(lambda: _channels_of(local_broker, name), 1)
        async with Producer(connection=conn, channels=3) as producer:
            await producer.publish(b"x", queue_name)
            await _eventually(lambda: _channels_of(local_broker, name), 4)
        await _eventually(lambda: _channels_of(local_broker, name), 1)
        assert conn.is_connected  # a shared connection stays open


async def test_a_channel_closed_by_the_broker_leaves_the_others_publishing(
    amqp_url: str, queue_name: str
) -> None:
    async with Producer(amqp_url, channels=2) as producer:
        await producer.declare(queue_name)
        # Each publish to a missing exchange makes the broker close the channel it went on.
        outcomes = await asyncio.gather(
            *(
                producer.publish(i, exchange=f"{queue_name}-missing", routing_key="k")
                for i in range(6)
            ),
            *(producer.publish(i, queue_name) for i in range(200)),
            return_exceptions=True,
        )
        missing, delivered = outcomes[:6], outcomes[6:]
        assert all(isinstance(o, TopologyError) for o in missing), missing
        assert all(isinstance(o, str) for o in delivered), [
            o for o in delivered if not isinstance(o, str)
        ]
        # and both channels publish on afterwards
        assert len(await producer.publish_many(range(100), queue=queue_name)) == 100
    assert len(await _consume_all(amqp_url, queue_name, 300)) == 300


async def test_a_small_window_is_shared_out_and_still_moves(amqp_url: str, queue_name: str) -> None:
    async with Producer(amqp_url, channels=2, window=2, window_bytes=2) as producer:
        ids = await producer.publish_many([b"ab"] * 300, queue=queue_name)
        assert len(set(ids)) == 300
        assert producer.in_flight == 0


@pytest.mark.parametrize("channels", [0, 17, True, 1.5, "2", None])
def test_a_bad_channel_count_is_refused_naming_it(channels: Any) -> None:
    with pytest.raises(ConfigurationError, match="channels must be a whole number from 1 to 16"):
        Producer("amqp://localhost/", channels=channels)


def test_a_window_smaller_than_the_channels_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"window \(2\) .* at least channels \(4\)"):
        Producer("amqp://localhost/", channels=4, window=2)


def test_the_sync_producer_takes_channels(amqp_url: str, queue_name: str) -> None:
    with SyncProducer(amqp_url, channels=2) as producer:
        ids = producer.publish_many([{"n": i} for i in range(50)], queue=queue_name)
    assert len(set(ids)) == 50


def test_the_integrations_check_channels_when_made() -> None:
    with pytest.raises(ConfigurationError, match="channels must be a whole number"):
        SyncProducer("amqp://localhost/", channels=0)


async def test_every_call_of_a_producer_over_two_channels_gets_its_reply(
    amqp_url: str, queue_name: str
) -> None:
    # Direct reply-to answers on the channel that consumes the replies: a request sent on the
    # other channel made the broker close it (406 "fast reply consumer does not exist"), so
    # every other call failed, and so did the messages in flight on that channel.
    async def double(job: Job) -> int:
        return 2 * int(job.data)

    async with Worker(amqp_url, queue=queue_name, handler=double):
        async with Producer(amqp_url, channels=2, timeout=10) as producer:
            async with asyncio.timeout(60):
                replies = [await producer.call(n, queue_name, timeout=10) for n in range(6)]
                replies += await asyncio.gather(
                    *(producer.call(n, queue_name, timeout=10) for n in range(6, 12))
                )
                assert replies == [2 * n for n in range(12)]
                # the channels publish on as before
                assert len(await producer.publish_many(range(50), queue=queue_name)) == 50
