"""Many channels closed by the broker at once leave the connection up (#20, side roads).

Each 404 (a passive check of a missing exchange, a publish to a deleted one) makes the broker
close that channel and wait for the client's `Channel.CloseOk`; until it has it, the channel's
number is taken. aiormq frees the number when the broker's `Channel.Close` arrives, and drops
its `Channel.CloseOk` when its write queue is full (`seams` reliance 11): a later channel on
that number then closes the whole connection (504 "second 'channel.open' seen"), every producer
and worker on it.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
import pytest

import aio_workq
from aio_workq import Exchange, Hook, Producer, TopologyError
from aio_workq._link import declare as declare_module
from aio_workq._link import router as router_module

pytestmark = pytest.mark.broker

_AT_ONCE = 20


class _Losses(Hook):
    def __init__(self) -> None:
        self.lost: list[str] = []

    def on_connection_lost(self, url: str) -> None:
        self.lost.append(url)


async def _check_missing(channel: aiormq.abc.AbstractChannel, exchange: str) -> BaseException:
    try:
        await channel.exchange_declare(exchange=exchange, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        return exc
    raise AssertionError(f"exchange {exchange!r} exists")


async def test_many_channels_closed_by_the_broker_at_once_keep_the_connection(
    amqp_url: str, queue_name: str
) -> None:
    losses = _Losses()
    async with await aio_workq.connect(amqp_url, hooks=[losses]) as conn:
        for _ in range(5):
            channels = [await conn.channel(timeout=10) for _ in range(_AT_ONCE)]
            async with asyncio.timeout(30):
                closes = await asyncio.gather(
                    *(_check_missing(ch, f"{queue_name}-missing") for ch in channels)
                )
            assert len(closes) == _AT_ONCE
            async with asyncio.timeout(30):
                for _ in range(_AT_ONCE):  # each number again: none may still be the broker's
                    channel = await conn.channel(timeout=10)
                    await channel.close()
        assert losses.lost == [], f"the connection was lost: {losses.lost}"
        assert conn.reconnects == 0


async def test_publishes_to_a_missing_exchange_at_once_keep_the_connection(
    amqp_url: str, queue_name: str
) -> None:
    losses = _Losses()
    conn = await aio_workq.connect(amqp_url, hooks=[losses])
    async with conn, Producer(connection=conn) as producer:
        await producer.declare(queue_name)
        for _ in range(5):
            async with asyncio.timeout(60):
                missing = await asyncio.gather(
                    *(
                        producer.publish(i, exchange=f"{queue_name}-missing", routing_key="k")
                        for i in range(_AT_ONCE)
                    ),
                    return_exceptions=True,
                )
                assert all(isinstance(r, TopologyError) for r in missing), missing
                assert isinstance(await producer.publish("after", queue=queue_name), str)
        assert losses.lost == [], f"the connection was lost: {losses.lost}"
        assert conn.reconnects == 0


async def test_concurrent_first_publishes_to_an_exchange_check_it_once(
    amqp_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 20 first publishes to one exchange share one check (one channel), whether it exists or
    # not: not 20 channels, each closed by the broker with a 404 when it is missing.
    checks: list[str] = []
    real = declare_module.declare_exchange

    async def counted(channel: aiormq.abc.AbstractChannel, exchange: Exchange) -> None:
        checks.append(exchange.name)
        await real(channel, exchange)

    monkeypatch.setattr(router_module, "declare_exchange", counted)
    admin = await aio_pika.connect(amqp_url)
    async with admin, Producer(amqp_url) as producer:
        missing = f"{queue_name}-missing"
        async with asyncio.timeout(60):
            outcomes = await asyncio.gather(
                *(producer.publish(i, exchange=missing, routing_key="k") for i in range(20)),
                return_exceptions=True,
            )
        assert all(isinstance(r, TopologyError) for r in outcomes), outcomes
        assert checks == [missing]

        channel = await admin.channel()
        present = await channel.declare_exchange(f"{queue_name}-x", "direct", auto_delete=True)
        bound = await channel.declare_queue(f"{queue_name}-bound", auto_delete=True)
        await bound.bind(present, routing_key="k")
        async with asyncio.timeout(60):
            outcomes = await asyncio.gather(
                *(producer.publish(i, exchange=present.name, routing_key="k") for i in range(20)),
                return_exceptions=True,
            )
        assert all(isinstance(r, str) for r in outcomes), outcomes
        assert checks == [missing, present.name]
        await bound.delete(if_unused=False, if_empty=False)
        await present.delete()
