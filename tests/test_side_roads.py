"""Side roads of the core's public API found by the review of 7 Dec (review4): each bad input
is a typed `WorkqError` that leaves the object as it was, and a later good call still works.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from aio_workq import (
    ConfigurationError,
    Connection,
    Exchange,
    IntegrationError,
    Job,
    Producer,
    Queue,
    RPCError,
    Worker,
)
from tests.helpers import queue_consumers, queue_depth, wait_until

pytestmark = pytest.mark.broker

BAD_WAITS: list[Any] = ["5", float("nan"), None, True, [1]]


async def _nothing(job: Job) -> None:
    pass


@pytest.mark.parametrize("timeout", ["5", float("nan"), True, [1]])
async def test_a_bad_stop_timeout_is_a_configuration_error_and_the_worker_still_stops(
    amqp_url: str, queue_name: str, timeout: Any
) -> None:
    # stop("5") raised TypeError after marking the worker stopping: every later stop() then
    # waited forever for a teardown that never ran (and stop(nan) passed as stop(0)).
    worker = Worker(amqp_url, queue=queue_name, handler=_nothing)
    await worker.start()
    with pytest.raises(ConfigurationError, match="timeout"):
        await worker.stop(timeout)
    assert worker.state.consuming  # untouched by the refused call
    await asyncio.wait_for(worker.stop(1), 10)
    assert not worker.state.connected

    async def no_consumer() -> bool:
        return await queue_consumers(amqp_url, queue_name) == 0

    await wait_until(no_consumer)


@pytest.mark.parametrize("timeout", BAD_WAITS)
async def test_a_bad_close_timeout_is_a_configuration_error_and_the_producer_still_closes(
    amqp_url: str, queue_name: str, timeout: Any
) -> None:
    producer = Producer(amqp_url)
    await producer.start()
    with pytest.raises(ConfigurationError, match="timeout"):
        await producer.close(timeout)
    assert await producer.publish(b"still open", queue=queue_name)
    await asyncio.wait_for(producer.close(1), 10)


@pytest.mark.parametrize("timeout", BAD_WAITS)
async def test_a_bad_close_timeout_is_a_configuration_error_and_the_connection_still_closes(
    amqp_url: str, timeout: Any
) -> None:
    # Connection.close("5") raised TypeError after stopping its reconnects: its socket stayed
    # open, and a later close() had nothing left to close.
    connection = Connection(amqp_url)
    await connection.open()
    with pytest.raises(ConfigurationError, match="timeout"):
        await connection.close(timeout)
    assert connection.is_connected  # still up
    await asyncio.wait_for(connection.close(1), 10)
    assert connection.is_closed


@pytest.mark.parametrize("make", [Queue, Exchange])
def test_a_name_with_a_lone_surrogate_is_a_configuration_error(make: Any) -> None:
    # It raised UnicodeEncodeError (from the length check's encode) rather than the
    # ConfigurationError every other invalid name gets.
    with pytest.raises(ConfigurationError, match="invalid"):
        make("caf\udce9")


async def test_publishing_to_a_queue_name_with_a_lone_surrogate_is_a_configuration_error(
    producer: Producer, queue_name: str
) -> None:
    with pytest.raises(ConfigurationError, match="invalid"):
        await producer.publish(b"x", queue="caf\udce9")
    with pytest.raises(ConfigurationError, match="invalid"):
        await producer.publish(b"x", exchange="caf\udce9", routing_key="k")
    assert await producer.publish(b"the next one goes", queue=queue_name)


async def test_a_stop_whose_caller_is_cancelled_still_cancels_the_running_handlers(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    # The caller's stop() cancelled while it let handlers finish: the worker closed, but its
    # handlers ran on (their acks lost, the messages handled twice), and a later stop()
    # returned at once with them still running.
    started, cancelled, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(job: Job) -> None:
        started.set()
        try:
            await release.wait()  # never set: only the stop ends it
        except asyncio.CancelledError:
            cancelled.set()
            raise

    queue = Queue(queue_name, type="classic")  # (a quorum queue counts a cancelled consumer
    worker = Worker(amqp_url, queue=queue, handler=handler)  # until its deliveries settle)
    await worker.start()
    try:
        await producer.publish(b"long", queue=queue)
        await asyncio.wait_for(started.wait(), 10)
        stopping = asyncio.ensure_future(worker.stop(30))

        async def draining() -> bool:  # the consumer is cancelled: the stop waits for it
            return await queue_consumers(amqp_url, queue_name) == 0

        await wait_until(draining)
        assert not stopping.done()
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        await asyncio.wait_for(cancelled.wait(), 10)
        assert worker.state.in_flight == 0

        async def back_in_the_queue() -> bool:
            return await queue_depth(amqp_url, queue_name) == 1

        await wait_until(back_in_the_queue)
    finally:
        release.set()
        await asyncio.wait_for(worker.stop(1), 10)


@pytest.fixture
def other_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own (another thread's loop)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


async def test_close_and_stop_on_another_loop_raise_a_typed_error_and_change_nothing(
    amqp_url: str, queue_name: str, other_loop: asyncio.AbstractEventLoop
) -> None:
    # Producer.close() on another loop raised RuntimeError ("attached to a different loop")
    # after marking the producer closed: its connection stayed open. Worker.stop() there
    # tore down another thread's connection from this one.
    async def start() -> tuple[Producer, Worker]:
        producer = Producer(amqp_url)
        await producer.start()
        worker = Worker(amqp_url, queue=queue_name, handler=_nothing)
        await worker.start()
        return producer, worker

    def on_theirs(coro: Any) -> Any:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, other_loop))

    producer, worker = await asyncio.wait_for(on_theirs(start()), 20)
    try:
        with pytest.raises(IntegrationError, match="another event loop"):
            await producer.close()
        with pytest.raises(IntegrationError, match="another event loop"):
            await worker.stop()

        async def still_working() -> bool:
            return bool(await producer.publish(b"after", queue=queue_name)) and (
                worker.state.consuming
            )

        assert await asyncio.wait_for(on_theirs(still_working()), 20)
    finally:
        await asyncio.wait_for(on_theirs(worker.stop(1)), 20)
        await asyncio.wait_for(on_theirs(producer.close(1)), 20)


BAD_DSNS = [
    "postgresql://app:s3cret%ZZ@127.0.0.1:1/app",  # psycopg quotes the bad token: the password
    "host=127.0.0.1 port=1 user=app password='s3cret",  # an unterminated quote
]


@pytest.mark.parametrize("dsn", BAD_DSNS)
def test_a_dsn_that_does_not_parse_is_refused_without_its_password(dsn: str) -> None:
    from aio_workq.outbox import OutboxConfigurationError, OutboxRelay

    with pytest.raises(OutboxConfigurationError) as refused:
        OutboxRelay(dsn, url="amqp://guest:guest@127.0.0.1:1/")
    assert "is not a PostgreSQL connection string" in str(refused.value)
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("dsn", BAD_DSNS)
def test_outbox_migrate_with_a_dsn_that_does_not_parse_is_one_line_without_its_password(
    dsn: str,
) -> None:
    # `aio-workq outbox migrate` printed psycopg's traceback, whose last line quoted the
    # password ("invalid percent-encoded token: "s3cret%ZZ"").
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "aio_workq", "outbox", "migrate", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "s3cret" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("aio-workq: error: dsn ")
    assert "Traceback" not in proc.stderr


async def test_an_rpc_result_too_large_to_send_is_an_error_reply_not_a_timeout(
    amqp_url: str, producer: Producer, queue_name: str, make_worker: Any
) -> None:
    # The result encoded, but the reply was refused before it was sent (over RabbitMQ's
    # 128 MiB): the worker only logged it, and the caller waited out its whole timeout for an
    # RPCTimeoutError asking whether a worker consumed the queue.
    async def handler(job: Job) -> object:
        return b"x" * (129 * 2**20) if job.data == "big" else job.data

    worker = make_worker(queue=queue_name, handler=handler, retry=None)
    await worker.start()
    with pytest.raises(RPCError, match="MessageTooLargeError.*128 MiB") as refused:
        await producer.call("big", queue=queue_name, timeout=20)
    assert refused.type is RPCError  # not its RPCTimeoutError subclass
    assert refused.value.remote_type == "aio_workq.MessageTooLargeError"
    assert await producer.call("small", queue=queue_name, timeout=20) == "small"


@pytest.mark.parametrize("name", ["caf\udce9", "x" * 5000, "é" * 501])
def test_a_connection_name_the_broker_cannot_take_is_a_configuration_error(
    amqp_url: str, name: str
) -> None:
    # Accepted here, it failed every connect as a BrokerConnectionError ("cannot connect to
    # ...: UnicodeEncodeError", or "Connection reset by peer": the handshake's frame is at most
    # 4 KiB before tuning), retried for the whole of wait_for_broker.
    for make in (Connection, Producer):
        with pytest.raises(ConfigurationError, match="name"):
            make(amqp_url, name=name)
    with pytest.raises(ConfigurationError, match="name"):
        Worker(amqp_url, queue="q", handler=_nothing, name=name)


async def test_a_connection_name_of_1000_bytes_connects(amqp_url: str, queue_name: str) -> None:
    async with Producer(amqp_url, name="é" * 500) as producer:
        assert await producer.publish(b"x", queue=queue_name)


async def test_a_naive_timestamp_out_of_the_epoch_s_range_is_a_serialization_error(
    producer: Producer, queue_name: str
) -> None:
    # datetime(1, 1, 1) raised ValueError ("year 0 is out of range") from the local-time
    # conversion, not the SerializationError an aware one before 1970 gets.
    from datetime import datetime

    from aio_workq import SerializationError

    with pytest.raises(SerializationError, match="timestamp"):
        await producer.publish(b"x", queue=queue_name, timestamp=datetime(1, 1, 1))
    assert await producer.publish(b"x", queue=queue_name, timestamp=datetime(2026, 1, 1))


@pytest.mark.parametrize("timeout", ["5", float("nan"), -1, True])
async def test_wait_connected_checks_its_timeout_even_while_connected(
    producer: Producer, timeout: Any
) -> None:
    # Checked only when the connection was down (asyncio.timeout("5"): TypeError then; NaN
    # passed as 0): the same call passed or failed depending on the broker.
    with pytest.raises(ConfigurationError, match="timeout"):
        await producer.wait_connected(timeout)
    await producer.wait_connected(0)
