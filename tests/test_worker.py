"""Worker against a real broker: dispatch, failures, heartbeats, crashes, restarts, shutdown."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
import pytest

from aio_workq import (
    IntegrationError,
    Job,
    Producer,
    Queue,
    RetryPolicy,
    TopologyError,
    Worker,
    connect,
)
from scripts.broker import LocalBroker
from tests.helpers import (
    Counter,
    heartbeat_connection,
    queue_depth,
    read_line,
    wait_until,
    worker_process,
)

pytestmark = pytest.mark.broker

FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0)


async def test_fair_dispatch_splits_equal_work_evenly(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    def handler_for(name: str) -> Callable[[Job], object]:
        async def handler(job: Job) -> None:
            await asyncio.sleep(0.05)
            counter.add(name)

        return handler

    await producer.declare(queue_name)
    for name in ("a", "b"):
        await make_worker(queue=queue_name, handler=handler_for(name), concurrency=1).start()
    await producer.publish_many(range(10), queue=queue_name)
    taken = await counter.wait_for(10)
    assert 4 <= taken.count("a") <= 6


async def test_fair_dispatch_gives_more_to_the_worker_with_lighter_tasks(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    async def slow(job: Job) -> None:
        await asyncio.sleep(0.5)
        counter.add("slow")

    async def fast(job: Job) -> None:
        await asyncio.sleep(0.01)
        counter.add("fast")

    await producer.declare(queue_name)
    await make_worker(queue=queue_name, handler=slow, concurrency=1).start()
    await make_worker(queue=queue_name, handler=fast, concurrency=1).start()
    await producer.publish_many(range(10), queue=queue_name)
    taken = await counter.wait_for(10)
    assert taken.count("fast") >= 8  # round-robin would give 5 each


async def test_handler_exception_does_not_lose_the_message(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    async def flaky(job: Job) -> None:
        counter.add(job.attempt)
        if job.attempt == 1:
            raise RuntimeError("first try fails")

    worker = make_worker(queue=queue_name, handler=flaky, retry=FAST_RETRY)
    await worker.start()
    await producer.publish("task", queue=queue_name)
    assert await counter.wait_for(2) == [1, 2]
    await wait_until(lambda: _true(worker.state.processed == 1))
    assert worker.state.failed == 1 and worker.state.retried == 1


async def _true(value: bool) -> bool:
    return value


async def test_blocking_sync_handler_keeps_the_connection_alive(
    amqp_url: str, producer: Producer, queue_name: str, counter: Counter
) -> None:
    conn = await heartbeat_connection(amqp_url, 1)

    def blocking(job: Job) -> None:
        time.sleep(3.5)  # 3.5x the heartbeat interval, in the worker's thread pool
        counter.add(job.redelivered)

    async with Worker(connection=conn, queue=queue_name, handler=blocking) as worker:
        await producer.publish("slow", queue=queue_name)
        assert await counter.wait_for(1) == [False]
        await wait_until(lambda: _true(worker.state.processed == 1))
    assert conn.reconnects == 0
    assert conn.is_connected
    assert await queue_depth(amqp_url, queue_name) == 0
    assert counter.items == [False]  # exactly one delivery
    await conn.close()


async def test_workers_share_one_connection_under_gather(
    connection: object, producer: Producer, queue_name: str, counter: Counter
) -> None:
    async def handler(job: Job) -> None:
        counter.add(job.data)

    workers = [
        Worker(connection=connection, queue=f"{queue_name}-{i}", handler=handler)  # type: ignore[arg-type]
        for i in range(2)
    ]
    runs = asyncio.gather(*(w.run() for w in workers))
    for i in range(2):
        await producer.publish(f"for {i}", queue=f"{queue_name}-{i}")
    assert sorted(await counter.wait_for(2)) == ["for 0", "for 1"]
    for worker in workers:
        await worker.stop()
    await asyncio.wait_for(runs, 10)


async def test_a_bad_queue_declaration_does_not_stop_other_workers_on_the_connection(
    amqp_url: str, connection: object, producer: Producer, queue_name: str, counter: Counter
) -> None:
    async with Producer(amqp_url, queue_type="classic") as classic:
        await classic.declare(f"{queue_name}-bad")  # a quorum worker on it must fail

    async def handler(job: Job) -> None:
        counter.add(job.data)

    good = [
        Worker(connection=connection, queue=f"{queue_name}-{i}", handler=handler)  # type: ignore[arg-type]
        for i in range(2)
    ]
    bad = Worker(connection=connection, queue=f"{queue_name}-bad", handler=handler)  # type: ignore[arg-type]
    results = asyncio.gather(*(w.run() for w in [*good, bad]), return_exceptions=True)
    for i in range(2):
        await producer.publish(i, queue=f"{queue_name}-{i}")
    assert sorted(await counter.wait_for(2)) == [0, 1]
    for worker in good:
        await worker.stop()
    outcomes = await asyncio.wait_for(results, 10)
    assert isinstance(outcomes[2], TopologyError)
    assert f"{queue_name}-bad" in str(outcomes[2])


async def test_messages_survive_a_broker_restart(
    amqp_url: str, local_broker: LocalBroker, queue_name: str, counter: Counter
) -> None:
    async with Producer(amqp_url) as producer:
        await producer.publish_many(["a", "b", "c"], queue=queue_name)
    local_broker.stop()
    local_broker.start()

    async def handler(job: Job) -> None:
        counter.add(job.data)

    async with Worker(amqp_url, queue=queue_name, handler=handler):
        assert sorted(await counter.wait_for(3)) == ["a", "b", "c"]


async def test_a_killed_worker_s_message_is_redelivered_to_another(
    amqp_url: str, producer: Producer, queue_name: str, counter: Counter
) -> None:
    await producer.declare(queue_name)
    async with worker_process(amqp_url, queue_name, "hang") as proc:
        await producer.publish("important", queue=queue_name)
        assert await read_line(proc) == "STARTED important"
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

    async def handler(job: Job) -> None:
        counter.add((job.data, job.redelivered))

    async with Worker(amqp_url, queue=queue_name, handler=handler):
        assert await counter.wait_for(1) == [("important", True)]


async def test_concurrency_limits_handlers_running_at_once(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    running = 0
    peak = 0

    async def handler(job: Job) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.5)
        running -= 1
        counter.add(job.data)

    await producer.declare(queue_name)
    await producer.publish_many(range(20), queue=queue_name)
    started = time.monotonic()
    await make_worker(queue=queue_name, handler=handler, concurrency=5, prefetch=10).start()
    await counter.wait_for(20)
    elapsed = time.monotonic() - started
    assert peak == 5
    assert elapsed > 1.9  # 20 half-second handlers, 5 at a time (load only makes it longer)


@pytest.mark.parametrize("factory", [False, True], ids=["no-task-factory", "task-factory"])
async def test_each_handler_runs_in_a_task_of_its_own(
    factory: bool,
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
    counter: Counter,
) -> None:
    """`asyncio.current_task()` in a handler is its delivery's own task, named after the queue,
    in which `asyncio.timeout()` works; an application's task factory makes those tasks (the
    dispatcher makes them itself only when none is set)."""
    loop = asyncio.get_running_loop()
    made: list[asyncio.Task[Any]] = []

    def task_factory(
        loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        made.append(task)
        return task

    seen: list[asyncio.Task[Any]] = []

    async def handler(job: Job) -> None:
        task = asyncio.current_task()
        assert task is not None
        seen.append(task)
        async with asyncio.timeout(5):  # asks the task for its cancellations
            await asyncio.sleep(0)
        assert asyncio.current_task() is task
        counter.add(job.data)

    await producer.declare(queue_name)
    await make_worker(queue=queue_name, handler=handler, concurrency=3).start()
    if factory:
        loop.set_task_factory(task_factory)
    try:
        await producer.publish_many(["a", "b", "c"], queue=queue_name)
        assert sorted(await counter.wait_for(3)) == ["a", "b", "c"]
    finally:
        loop.set_task_factory(None)
    assert len({id(task) for task in seen}) == 3
    assert all(task.get_name() == f"aio-workq worker {queue_name!r}" for task in seen)
    assert all(task in made for task in seen) is factory


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks came with Python 3.12")
@pytest.mark.parametrize("prefetch", [None, 8], ids=["prefetch-default", "prefetch-beyond"])
async def test_handlers_run_under_an_eager_task_factory(
    prefetch: int | None,
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
    counter: Counter,
) -> None:
    """An application's eager task factory (Python 3.12's `asyncio.eager_task_factory`) runs a
    delivery's first step inside `create_task`: every delivery is still handled and settled
    (the handler that never suspends ends within `create_task` itself)."""
    loop = asyncio.get_running_loop()

    async def handler(job: Job) -> None:
        if job.data % 2:
            await asyncio.sleep(0)
        counter.add(job.data)

    options: dict[str, Any] = {} if prefetch is None else {"prefetch": prefetch}
    await producer.declare(queue_name)
    worker = make_worker(queue=queue_name, handler=handler, concurrency=2, **options)
    await worker.start()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
    try:
        await producer.publish_many(range(40), queue=queue_name)
        assert sorted(await counter.wait_for(40)) == list(range(40))
    finally:
        loop.set_task_factory(None)


async def test_passive_queue_that_does_not_exist_is_a_topology_error(
    make_worker: Callable[..., Worker], queue_name: str
) -> None:
    worker = make_worker(queue=Queue(queue_name, passive=True), handler=lambda job: None)
    with pytest.raises(TopologyError, match="does not exist"):
        await worker.start()


async def test_worker_resumes_after_its_queue_is_deleted_and_recreated(
    amqp_url: str, producer: Producer, make_worker: Callable[..., Worker], queue_name: str,
    counter: Counter,
) -> None:  # fmt: skip
    async def handler(job: Job) -> None:
        counter.add(job.data)

    worker = make_worker(queue=queue_name, handler=handler)
    await worker.start()
    await producer.publish("one", queue=queue_name)
    await counter.wait_for(1)
    conn = await connect(amqp_url)
    async with conn:
        channel = await conn.channel()
        await channel.queue_delete(queue_name)

    async def consuming_again() -> bool:
        try:
            return worker.state.consuming and await queue_depth(amqp_url, queue_name) == 0
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False  # not re-declared yet

    await wait_until(consuming_again)
    async with Producer(amqp_url) as fresh:  # the first producer's declaration cache is stale
        await fresh.publish("two", queue=queue_name)
    assert await counter.wait_for(2) == ["one", "two"]


def _job_view(job: Job) -> dict[str, object]:
    message = job.message
    return {
        "body": job.body,
        "data": job.data,
        "headers": dict(job.headers),
        "message_id": job.message_id,
        "content_type": job.content_type,
        "correlation_id": job.correlation_id,
        "reply_to": job.reply_to,
        "redelivered": job.redelivered,
        "routing_key": job.routing_key,
        "exchange": job.exchange,
        "attempt": job.attempt,
        "aio_pika": (message.body, message.message_id, message.headers, message.priority),
    }


@pytest.mark.parametrize("own_connection", [True, False], ids=["aio-workq", "plain-aio-pika"])
async def test_a_job_reads_the_same_on_the_lean_path_and_through_aio_pika(
    amqp_url: str, producer: Producer, queue_name: str, counter: Counter, own_connection: bool
) -> None:
    # aio-workq's connections hand deliveries to the worker straight off the socket; a plain
    # aio-pika connection goes through aiormq's consumer callback. Jobs must not differ.
    conn = await (connect(amqp_url) if own_connection else aio_pika.connect_robust(amqp_url))

    async def handler(job: Job) -> None:
        counter.add(_job_view(job))

    spec = Queue(queue_name, type="classic", max_priority=5)  # for priority= (#21)
    async with conn, Worker(connection=conn, queue=spec, handler=handler):
        await producer.publish(
            {"n": 1}, queue=spec, headers={"x-workq-attempt": 2, "k": "v"},
            message_id="id-1", correlation_id="c-1", priority=3,
        )  # fmt: skip
        [view] = await counter.wait_for(1)
    assert view == {
        "body": b'{"n":1}',
        "data": {"n": 1},
        "headers": {"x-workq-attempt": 2, "k": "v"},
        "message_id": "id-1",
        "content_type": "application/json",
        "correlation_id": "c-1",
        "reply_to": None,
        "redelivered": False,
        "routing_key": queue_name,
        "exchange": "",
        "attempt": 2,
        "aio_pika": (b'{"n":1}', "id-1", {"x-workq-attempt": 2, "k": "v"}, 3),
    }


async def test_a_steady_stream_of_deliveries_keeps_the_connection_alive(
    amqp_url: str, producer: Producer, queue_name: str, counter: Counter
) -> None:
    # The broker sends no heartbeat while it sends deliveries, and the worker takes those
    # before aiormq sees them: aiormq must still see a sign of life, or it drops the
    # connection after three heartbeat intervals (here (1 + 1) * 3 = 6 s) without frames.
    conn = await heartbeat_connection(amqp_url, 1)

    async def handler(job: Job) -> None:
        counter.add(job.data)

    async with conn, Worker(connection=conn, queue=queue_name, handler=handler):
        loop = asyncio.get_running_loop()
        end, sent = loop.time() + 8, 0
        while loop.time() < end:
            await producer.publish(sent, queue=queue_name)
            sent += 1
            await asyncio.sleep(0.02)  # pacing the stream, not waiting for a result
        await counter.wait_for(sent)
        assert conn.reconnects == 0 and conn.is_connected
    assert counter.items == list(range(sent))


async def test_a_stopped_worker_refuses_to_start_again_and_names_the_fix(
    amqp_url: str, queue_name: str
) -> None:
    """start() or run() after stop() used to return at once, consuming nothing (run() too)."""
    worker = Worker(amqp_url, queue=queue_name, handler=lambda job: None)
    await worker.start()
    await worker.start()  # a second start while running is harmless
    await worker.stop()
    with pytest.raises(IntegrationError, match=r"the worker is stopped .* make a new Worker"):
        await worker.start()
    with pytest.raises(IntegrationError, match="make a new Worker"):
        async with asyncio.timeout(5):
            await worker.run()
    await worker.stop()  # stopping again is harmless
    # stopped before it ever started (a signal handler's stop that came first): the stop
    # wins, start() and run() return at once and nothing consumes
    never_started = Worker(amqp_url, queue=queue_name, handler=lambda job: None)
    await never_started.stop()
    await never_started.start()
    async with asyncio.timeout(5):
        await never_started.run()
    assert not never_started.state.consuming and not never_started.state.connected
