"""close() and stop() meet their bounds when the broker stopped reading (issue #20, finding 10).

A SIGSTOPped node still accepts TCP bytes until its socket buffers fill, then reads nothing: the
polite AMQP close (Channel.Close, Connection.Close, each waiting for its -Ok) cannot finish. The
client must then abort its socket instead of waiting for aiormq's heartbeat grace
(3 × (heartbeat + 1) s: 18 s at heartbeat 5, 183 s by default).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from aio_workq import Job, Producer, Worker
from scripts.broker import LocalBroker

pytestmark = pytest.mark.broker

SLACK = 3.0  # seconds allowed past a bound on a loaded machine; the hang was 16-183 s
HEARTBEAT = 5  # short, so that the run before the fix fails in ~20 s instead of ~3 minutes


def short_heartbeat(url: str) -> str:
    return f"{url}?heartbeat={HEARTBEAT}"


async def fill_the_socket(producer: Producer, queue: str) -> list[asyncio.Future[str]]:
    """Hand the paused broker far more bytes than the loopback socket buffers hold."""
    body = b"x" * 2**20
    return [await producer.send(body, queue=queue, timeout=60) for _ in range(40)]


async def test_producer_close_returns_within_its_timeout_when_the_broker_stopped_reading(
    local_broker: LocalBroker, queue_name: str
) -> None:
    producer = Producer(short_heartbeat(local_broker.url), timeout=60)
    await producer.start()
    closed = False
    try:
        await producer.declare(queue_name)
        local_broker.pause()
        try:
            confirms = await fill_the_socket(producer, queue_name)
            started = time.monotonic()
            async with asyncio.timeout(60):  # a hang guard far past the bound
                await producer.close(timeout=1)
            closed = True
            took = time.monotonic() - started
            assert took < 1 + 1 + SLACK, f"close(timeout=1) took {took:.1f} s"
            results = await asyncio.gather(*confirms, return_exceptions=True)
            assert all(isinstance(r, Exception) for r in results)  # none confirmed, all typed
        finally:
            local_broker.resume()
    finally:
        if not closed:
            await producer.close(timeout=0)


async def test_worker_stop_returns_within_its_bound_when_the_broker_stopped_reading(
    local_broker: LocalBroker, queue_name: str
) -> None:
    started_handling = asyncio.Event()

    async def handle(job: Job) -> None:
        started_handling.set()
        await asyncio.sleep(3600)  # cancelled by stop(): its message goes back to the queue

    url = short_heartbeat(local_broker.url)
    worker = Worker(url, queue=queue_name, handler=handle)
    await worker.start()
    stopped = False
    try:
        async with Producer(url) as producer:
            await producer.publish("x", queue=queue_name, timeout=30)
            async with asyncio.timeout(30):
                await started_handling.wait()
            local_broker.pause()
            try:
                await fill_the_socket(producer, queue_name)
                started = time.monotonic()
                async with asyncio.timeout(60):
                    await worker.stop(timeout=1)
                stopped = True
                took = time.monotonic() - started
                assert took < 1 + 5 + SLACK, f"stop(timeout=1) took {took:.1f} s"
                started = time.monotonic()
                async with asyncio.timeout(60):
                    await producer.close(timeout=0)
                took = time.monotonic() - started
                assert took < 1 + SLACK, f"close(timeout=0) took {took:.1f} s"
            finally:
                local_broker.resume()
    finally:
        if not stopped:
            await worker.stop(timeout=0)
