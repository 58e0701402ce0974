"""Declarations under faults (issue #20): a cancelled shared declaration, a deleted exchange."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import aio_pika
import pytest

import aio_workq
from aio_workq import (
    ConnectionLostError,
    Hook,
    Job,
    Producer,
    PublishTimeoutError,
    TopologyError,
    UnroutableError,
    Worker,
)
from aio_workq._consume import subscription as subscription_module
from tests.helpers import queue_depth, wait_until

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


async def _outcomes(
    producer: Producer, queue: str, exchange: str, key: str, n: int
) -> tuple[list[str | BaseException], list[str | BaseException]]:
    """`n` publishes to `queue` and `n // 10` to `exchange`, concurrently: their outcomes."""
    to_queue = [producer.publish(i, queue=queue) for i in range(n)]
    to_exchange = [producer.publish(i, exchange=exchange, routing_key=key) for i in range(n // 10)]
    results = await asyncio.gather(*to_queue, *to_exchange, return_exceptions=True)
    return results[:n], results[n:]


@pytest.mark.parametrize("on_reconnect", ["resend", "fail"])
async def test_a_deleted_exchange_fails_only_its_own_publishes(
    amqp_url: str, queue_name: str, on_reconnect: Literal["resend", "fail"]
) -> None:
    exchange, bound = f"{queue_name}-x", f"{queue_name}-bound"
    admin = await aio_pika.connect(amqp_url)
    lost: list[str] = []
    conn = await aio_workq.connect(amqp_url, hooks=[_LossCounter(lost)])
    async with conn, admin, Producer(connection=conn, on_reconnect=on_reconnect) as producer:
        channel = await admin.channel()
        declared = await channel.declare_exchange(exchange, "direct", durable=True)
        target = await channel.declare_queue(bound, durable=True)
        await target.bind(declared, routing_key="k")
        await producer.declare(queue_name)

        to_queue, to_exchange = await _outcomes(producer, queue_name, exchange, "k", 100)
        assert all(isinstance(r, str) for r in to_queue + to_exchange)

        # Deleted while a round is in flight. The first publish to it after that closes the
        # producer's channel (in that round or the next) and fails with TopologyError, like
        # every later one; the queue's publishes in flight on the channel are resent (or,
        # with "fail", fail typed, ConnectionLostError). The connection itself is never lost,
        # on either path: no publish reaches the broker after the channel's Channel.CloseOk
        # (on the plain path aiormq would write them; #20 side road 2).
        during = asyncio.ensure_future(_outcomes(producer, queue_name, exchange, "k", 100))
        await channel.exchange_delete(exchange)
        rounds = [await during]
        for _ in range(4):
            rounds.append(await _outcomes(producer, queue_name, exchange, "k", 100))
        for number, (to_queue, to_exchange) in enumerate(rounds):
            # In the round the deletion lands in, a publish routed while the exchange was being
            # deleted may find no binding left and come back returned as unroutable, which is
            # true (seen once in CI, round 0). Later rounds: only the missing exchange's error.
            expected = TopologyError if number else str | TopologyError | UnroutableError
            assert all(isinstance(r, expected) for r in to_exchange), (number, _kinds(to_exchange))
            if on_reconnect == "resend" or number >= 3:
                assert all(isinstance(r, str) for r in to_queue), (number, _kinds(to_queue))
            else:
                assert all(isinstance(r, str | ConnectionLostError) for r in to_queue)
        assert lost == [], f"the connection was lost: {lost}"
        assert conn.reconnects == 0
        assert exchange in str(rounds[-1][1][0])

        await channel.declare_exchange(exchange, "direct", durable=True)  # back again
        await target.bind(exchange, routing_key="k")
        to_queue, to_exchange = await _outcomes(producer, queue_name, exchange, "k", 100)
        assert all(isinstance(r, str) for r in to_queue + to_exchange), _kinds(to_exchange)
        await channel.exchange_delete(exchange)
        await channel.queue_delete(bound)


def _kinds(results: list[str | BaseException]) -> dict[str, object]:
    """How many of each outcome, and the first error of each kind (for a failing assert)."""
    kinds: dict[str, object] = {}
    for r in results:
        name = type(r).__name__
        count = kinds.get(name, 0)
        kinds[name] = count + 1 if isinstance(count, int) else count
        kinds.setdefault(f"{name} (first)", r) if isinstance(r, Exception) else None
    return kinds


class _LossCounter(Hook):
    """Records each loss of the connection."""

    def __init__(self, lost: list[str]) -> None:
        self.lost = lost

    def on_connection_lost(self, url: str) -> None:
        self.lost.append(url)


async def test_a_worker_bound_to_an_exchange_deleted_and_declared_again_is_bound_again(
    amqp_url: str,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Deleting an exchange deletes its bindings without a word to the consumers: a worker
    bound to it stayed deaf once it was declared again (a producer's publish declares it),
    until its next reconnect. It binds again within `REBIND_EVERY`, and says while it can't."""
    monkeypatch.setattr(subscription_module, "REBIND_EVERY", 0.2)
    exchange = f"{queue_name}-x"
    got: list[object] = []
    received = asyncio.Event()

    async def handle(job: Job) -> None:
        got.append(job.data)
        received.set()

    connection = await aio_pika.connect(amqp_url)
    async with connection, Producer(amqp_url) as producer:
        channel = await connection.channel()
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        worker = Worker(
            amqp_url, queue=queue_name, handler=handle, exchange=exchange, binding_keys=["k"]
        )
        async with worker:
            await producer.publish("before", exchange=exchange, routing_key="k")
            async with asyncio.timeout(10):
                await received.wait()
            with caplog.at_level(logging.WARNING, logger="aio_workq"):
                await channel.exchange_delete(exchange)

                async def warned() -> bool:
                    return "can't bind its queue again" in caplog.text

                await wait_until(warned)
                await channel.declare_exchange(exchange, aio_pika.ExchangeType.DIRECT, durable=True)

                async def routed() -> bool:
                    try:
                        await producer.publish("after", exchange=exchange, routing_key="k")
                    except UnroutableError:
                        return False  # not bound (yet)
                    return True

                await wait_until(routed)
                await wait_until(lambda: _holds("after" in got))
                assert "its queue is bound again" in caplog.text
        await channel.exchange_delete(exchange)


async def _holds(value: bool) -> bool:
    return value
