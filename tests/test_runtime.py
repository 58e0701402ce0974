"""Worker runtime (issue 5): handlers in threads and processes, shutdown, reconnects."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable

import pytest

from aio_workq import ConfigurationError, Job, Producer, Worker, run_workers
from aio_workq.jobs import MemoryStore, Tasks
from scripts.broker import LocalBroker
from tests.handlers import square_in_process
from tests.helpers import (
    Counter,
    heartbeat_connection,
    queue_consumers,
    queue_depth,
    read_line,
    wait_until,
    worker_process,
)
from tests.test_producer import connection_names

pytestmark = pytest.mark.broker


class LoopLag:
    """Measures how late the event loop wakes a 10 ms sleeper."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, loop.time() - before - 0.01)

    def stop(self) -> float:
        self._task.cancel()
        return self.worst


async def _holds(value: bool) -> bool:
    return value


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_concurrency_five_runs_twenty_half_second_jobs_in_about_two_seconds(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter,
    kind: str,
) -> None:  # fmt: skip
    running = 0
    peak = 0

    def enter() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)

    def leave(job: Job) -> None:
        nonlocal running
        running -= 1
        counter.add(job.data)

    async def async_handler(job: Job) -> None:
        enter()
        await asyncio.sleep(0.5)
        leave(job)

    def def_handler(job: Job) -> None:
        enter()
        time.sleep(0.5)
        leave(job)

    handler = async_handler if kind == "async" else def_handler
    await producer.declare(queue_name)
    await producer.publish_many(range(20), queue=queue_name)
    lag = LoopLag()
    started = time.monotonic()
    await make_worker(queue=queue_name, handler=handler, concurrency=5).start()
    await counter.wait_for(20)
    elapsed = time.monotonic() - started
    assert peak == 5
    assert elapsed > 1.9  # 20 half-second handlers, 5 at a time (load only makes it longer)
    # A handler that blocked the loop would stall it for its whole 0.5 s sleep; the margin
    # below that absorbs a loaded machine's scheduling delays.
    assert lag.stop() < 0.4


async def test_process_pool_runs_cpu_bound_handlers_in_other_processes(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str
) -> None:
    worker = make_worker(
        queue=queue_name, handler=square_in_process, executor="process", concurrency=2
    )
    await worker.start()
    replies = await asyncio.gather(*(producer.call(n, queue=queue_name) for n in (3, 4, 5)))
    assert [r["square"] for r in replies] == [9, 16, 25]
    assert os.getpid() not in {r["pid"] for r in replies}


def test_process_pool_needs_a_picklable_plain_function() -> None:
    async def coroutine_handler(job: Job) -> None: ...

    with pytest.raises(ConfigurationError, match="async handler"):
        Worker("amqp://h/", queue="q", handler=coroutine_handler, executor="process")
    with pytest.raises(ConfigurationError, match="picklable"):
        Worker("amqp://h/", queue="q", handler=lambda job: None, executor="process")


async def test_heartbeat_two_seconds_and_a_ten_second_blocking_def_handler(
    amqp_url: str, producer: Producer, queue_name: str, counter: Counter
) -> None:
    conn = await heartbeat_connection(amqp_url, 2)

    def blocking(job: Job) -> None:
        time.sleep(10)
        counter.add(job.redelivered)

    async with Worker(connection=conn, queue=queue_name, handler=blocking) as worker:
        await producer.publish("slow", queue=queue_name)
        await counter.wait_for(1, timeout=20)
        await wait_until(lambda: _holds(worker.state.processed == 1))
    assert counter.items == [False] and conn.reconnects == 0
    await conn.close()


async def test_graceful_stop_lets_running_handlers_finish_and_acks_them(
    amqp_url: str, producer: Producer, queue_name: str, counter: Counter
) -> None:
    started = Counter()

    async def handler(job: Job) -> None:
        started.add(job.data)
        await asyncio.sleep(1)
        counter.add(job.data)

    await producer.publish_many(range(5), queue=queue_name)
    worker = Worker(amqp_url, queue=queue_name, handler=handler, concurrency=5)
    await worker.start()
    await started.wait_for(5)
    await worker.stop()
    assert sorted(counter.items) == [0, 1, 2, 3, 4]
    assert await queue_depth(amqp_url, queue_name) == 0  # all acked, none comes back


async def test_stop_after_shutdown_timeout_returns_unfinished_messages(
    amqp_url: str, producer: Producer, make_worker: Callable[..., Worker], queue_name: str,
) -> None:  # fmt: skip
    started = Counter()
    finished = Counter()

    async def handler(job: Job) -> None:
        started.add(job.data)
        await asyncio.sleep(0.2 if job.data < 2 else 30)
        finished.add(job.data)

    await producer.publish_many(range(5), queue=queue_name)
    worker = Worker(amqp_url, queue=queue_name, handler=handler, concurrency=5)
    await worker.start()
    await started.wait_for(5)
    await worker.stop(timeout=1)
    assert sorted(finished.items) == [0, 1]

    later = Counter()

    async def again(job: Job) -> None:
        later.add((job.data, job.redelivered))

    await make_worker(queue=queue_name, handler=again).start()
    assert sorted(await later.wait_for(3)) == [(2, True), (3, True), (4, True)]


async def test_sigterm_to_a_worker_process_mid_batch_loses_nothing(
    amqp_url: str, producer: Producer, make_worker: Callable[..., Worker], queue_name: str,
    counter: Counter,
) -> None:  # fmt: skip
    lines: list[str] = []
    async with worker_process(amqp_url, queue_name, "slow") as proc:
        await producer.publish_many(range(20), queue=queue_name)
        while sum(line.startswith("STARTED") for line in lines) < 5:
            lines.append(await read_line(proc))
        proc.send_signal(signal.SIGTERM)
        while line := await read_line(proc):
            lines.append(line)
    started = {line.split()[1] for line in lines if line.startswith("STARTED")}
    done = {line.split()[1] for line in lines if line.startswith("DONE")}
    assert started == done and len(done) == 5  # the running five finished
    assert lines[-1] == "STOPPED"

    async def handler(job: Job) -> None:
        counter.add(str(job.data))

    await make_worker(queue=queue_name, handler=handler, concurrency=5).start()
    rest = await counter.wait_for(15)
    assert set(rest) | done == {str(i) for i in range(20)}
    assert not set(rest) & done  # finished ones were acked and do not come back


async def test_broker_restart_mid_stream_processes_everything_with_one_consumer(
    amqp_url: str, local_broker: LocalBroker, queue_name: str, counter: Counter
) -> None:
    async def handler(job: Job) -> None:
        await asyncio.sleep(0.002)
        counter.add(job.data)

    async with Producer(amqp_url) as producer:
        await producer.publish_many(range(2000), queue=queue_name)
    async with Worker(amqp_url, queue=queue_name, handler=handler, concurrency=20) as worker:
        await counter.wait_for(300, timeout=30)
        await asyncio.to_thread(local_broker.stop)
        await asyncio.to_thread(local_broker.start)

        async def all_seen() -> bool:
            return len(set(counter.items)) == 2000

        await wait_until(all_seen, timeout=60)
        duplicates = len(counter.items) - 2000
        assert duplicates < 200  # at most the unacked window at the restart

        async def one_consumer() -> bool:
            return await queue_consumers(amqp_url, queue_name) == 1

        await wait_until(one_consumer)
        assert worker.state.consuming


async def test_worker_recovers_when_the_broker_closes_its_connection(
    amqp_url: str, local_broker: LocalBroker, producer: Producer, queue_name: str,
    counter: Counter,
) -> None:  # fmt: skip
    name = f"worker-{queue_name}"
    first = asyncio.Event()

    async def handler(job: Job) -> None:
        counter.add((job.data, job.redelivered))
        if job.data == "during" and not job.redelivered:
            first.set()
            await asyncio.sleep(1)  # still running when the connection goes

    async with Worker(amqp_url, queue=queue_name, handler=handler, name=name):
        await producer.publish("during", queue=queue_name)
        await asyncio.wait_for(first.wait(), 10)
        [conn] = connection_names(local_broker, name)
        local_broker.ctl("close_connection", conn, "test: cut")
        await producer.publish("after", queue=queue_name)
        items = await counter.wait_for(3, timeout=20)
    assert set(items) == {("during", False), ("during", True), ("after", False)}


async def test_a_coroutine_handler_blocking_the_loop_is_named_in_a_warning(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    async def hogs_the_loop(job: Job) -> None:
        time.sleep(0.8)  # noqa: ASYNC251 - the mistake this warning is for
        counter.add(job.data)

    await make_worker(queue=queue_name, handler=hogs_the_loop).start()
    await producer.publish("x", queue=queue_name)
    await counter.wait_for(1)

    def warned() -> bool:
        return any("hogs_the_loop" in r.getMessage() and "blocked the event loop" in
                   r.getMessage() for r in caplog.records)  # fmt: skip

    await wait_until(lambda: _holds(warned()))


async def test_stop_while_starting_leaves_nothing_running(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    await producer.publish_many(["a", "b", "c"], queue=queue_name)
    seen: list[object] = []

    async def handler(job: Job) -> None:
        seen.append(job.data)

    for pause in (0, 0.02, 0.05, 0.1):  # stop at different points of the start-up
        worker = Worker(amqp_url, queue=queue_name, handler=handler)
        run = asyncio.ensure_future(worker.run())
        await asyncio.sleep(pause)  # deliberately racing the start-up, not waiting for it
        await asyncio.wait_for(worker.stop(), 10)
        await asyncio.wait_for(run, 10)  # returns, does not raise
        assert not worker.state.connected

    async def no_consumer_and_all_messages_ready() -> bool:
        return (
            await queue_consumers(amqp_url, queue_name) == 0
            and await queue_depth(amqp_url, queue_name) + len(seen) == 3
        )

    await wait_until(no_consumer_and_all_messages_ready)


async def test_a_second_sigterm_stops_fast_and_the_message_returns(
    amqp_url: str, producer: Producer, make_worker: Callable[..., Worker], queue_name: str,
    counter: Counter,
) -> None:  # fmt: skip
    async with worker_process(amqp_url, queue_name, "hang", stderr=True) as proc:
        assert proc.stderr is not None
        await producer.publish("stuck", queue=queue_name)
        assert await read_line(proc) == "STARTED stuck"
        proc.send_signal(signal.SIGTERM)  # graceful: would wait 10 s for the handler
        async with asyncio.timeout(20):
            while b"gracefully" not in await proc.stderr.readline():
                pass  # run_workers logs that it is stopping gracefully
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # fast: cancel the handler now
        assert await read_line(proc) == "STOPPED"
        # A graceful stop would wait out the handler's 10 s shutdown timeout.
        assert time.monotonic() - started < 9

    async def handler(job: Job) -> None:
        counter.add((job.data, job.redelivered))

    await make_worker(queue=queue_name, handler=handler).start()
    assert await counter.wait_for(1) == [("stuck", True)]


async def test_the_stop_line_names_the_cancel_listener_apart_from_the_workers(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The start lines name the jobs' cancel listener by its exchange; a SIGTERM's line said
    # "stopping 2 worker(s)" for one task queue and that listener.
    tasks = Tasks(store=MemoryStore())

    @tasks.task(queue=f"stop-line-{uuid.uuid4().hex[:8]}")
    async def noop() -> None:
        pass

    # Twice, as for two sets of settings: a listener each, on the one exchange (the line
    # named the exchange twice).
    workers = (*tasks.workers(amqp_url), *tasks.workers(amqp_url))
    caplog.set_level(logging.INFO, logger="aio_workq")
    run = asyncio.create_task(run_workers(*workers))
    await wait_until(lambda: _holds(all(w.state.consuming for w in workers)), timeout=30)
    os.kill(os.getpid(), signal.SIGTERM)  # run_workers' handler takes it (the loop's)
    async with asyncio.timeout(30):
        await run
    said = [r.getMessage() for r in caplog.records if "SIGTERM received" in r.getMessage()]
    assert said == [
        "SIGTERM received: stopping 2 worker(s) and 2 listeners on exchange 'workq.control' "
        "gracefully"
    ], said
    assert [w.listens_to for w in workers] == [None, "workq.control"] * 2
