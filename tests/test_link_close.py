"""close() and stop() meet their bounds when the broker stopped reading (issue #20, finding 10).

A SIGSTOPped node still accepts TCP bytes until its socket buffers fill, then reads nothing: the
polite AMQP close (Channel.Close, Connection.Close, each waiting for its -Ok) cannot finish. The
client must then abort its socket instead of waiting for aiormq's heartbeat grace
(3 × (heartbeat + 1) s: 18 s at heartbeat 5, 183 s by default).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import pytest

import aio_workq
from aio_workq import Job, Producer, Queue, Worker
from scripts.broker import LocalBroker
from tests.helpers import queue_consumers, queue_depth, wait_until

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
            assert all(isinstance(r, Exception) for r in results), (
                results
            )  # none confirmed, all typed
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


class _Records(logging.Handler):
    """Lets a test wait for a log record whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self._loop.call_soon_threadsafe(self.seen.set)


async def test_a_graceful_stop_writes_the_acks_of_finished_handlers_while_the_socket_is_backed_up(
    local_broker: LocalBroker, queue_name: str
) -> None:
    """#20 side road 1: handlers finish while the broker reads nothing (their acks wait behind a
    full socket), then a graceful stop: the acks reach the broker before the channel closes, so
    no handled message comes back."""
    n = 4
    runs: collections.Counter[str] = collections.Counter()
    all_started, release = asyncio.Event(), asyncio.Event()

    async def handle(job: Job) -> None:
        runs[str(job.message_id)] += 1
        if len(runs) == n:
            all_started.set()
        await release.wait()

    logger = logging.getLogger("aio_workq")
    waiting = _Records("waits for its buffered frames")
    logger.addHandler(waiting)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    conn = await aio_workq.connect(short_heartbeat(local_broker.url))
    # A single-active-consumer queue's stop sends no Basic.Cancel (which would time out against
    # the paused node, and aiormq closes a channel whose RPC times out): it goes straight on
    # to closing the channel, while the acks still wait behind the full socket.
    queue = Queue(queue_name, single_active_consumer=True)
    worker = Worker(connection=conn, queue=queue, handler=handle, concurrency=n)
    producer = Producer(connection=conn, timeout=60)
    try:
        await worker.start()
        await producer.start()
        await producer.declare(queue_name + "-fill")
        for i in range(n):
            await producer.publish(f"m{i}", queue=queue, timeout=30)
        async with asyncio.timeout(30):
            await all_started.wait()
        local_broker.pause()
        try:
            filling = await fill_the_socket(producer, queue_name + "-fill")
            release.set()
            async with asyncio.timeout(30):
                while worker.state.processed < n:  # noqa: ASYNC110 - a counter, no event
                    await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(worker.stop(timeout=30))
            seen = asyncio.ensure_future(waiting.seen.wait())
            # The stop reaches its channel close only while the broker is still paused.
            await asyncio.wait({stopping, seen}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            seen.cancel()
        finally:
            local_broker.resume()
        async with asyncio.timeout(60):
            await stopping
            await asyncio.gather(*filling, return_exceptions=True)
        await wait_until(lambda: _no_consumer(local_broker.url, queue_name), timeout=30)
        assert await queue_depth(local_broker.url, queue_name) == 0, "handled messages came back"
        # And a new consumer gets none of them: only the message published now.
        await producer.publish("last", queue=queue, message_id="last", timeout=30)
        last = asyncio.Event()

        async def again(job: Job) -> None:
            runs[str(job.message_id)] += 1
            if job.message_id == "last":
                last.set()

        async with Worker(connection=conn, queue=queue, handler=again):
            async with asyncio.timeout(30):
                await last.wait()
        assert {k: v for k, v in runs.items() if v != 1} == {}
    finally:
        logger.removeHandler(waiting)
        logger.setLevel(old_level)
        await worker.stop(timeout=0)
        await producer.close(timeout=0)
        await conn.close()


async def _no_consumer(url: str, queue: str) -> bool:
    return await queue_consumers(url, queue) == 0
