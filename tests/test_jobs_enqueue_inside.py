"""A task that enqueues another, inside a worker run from its registry: the workers bring a
producer when none is bound (and close it once they stopped), a producer the user bound is
used and left open, and a worker stopping while a child's enqueue is in flight loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aio_workq import Hook, Producer, PublishInfo, Worker
from aio_workq.jobs import GroupResult, JobState, SQLiteStore, Tasks, current_job, group
from aio_workq.jobs._handle import TASK_HEADER
from scripts.broker import LocalBroker
from tests.forking import fork_running
from tests.helpers import wait_until
from tests.test_cli import Cli, cli
from tests.test_link_outage import MEMORY_ALARM, MEMORY_CLEAR

pytestmark = pytest.mark.broker


def chain(
    tasks: Tasks,
    queue: str,
    *,
    on_enqueue: Callable[[], Any] | None = None,
    names: tuple[str, str] = ("inside.first", "inside.second"),
) -> Any:
    """Two tasks, on `queue` and `queue-next`: `first(n)` enqueues `second(n + 1)` under a job
    id of its own id plus `-next` (the same on a rerun) and returns that id (as
    `tests/chain_app.py` declares them)."""

    @tasks.task(queue=f"{queue}-next", name=names[1])
    async def second(n: int) -> int:
        return n * 10

    @tasks.task(queue=queue, name=names[0])
    async def first(n: int) -> str:
        job = current_job()
        assert job is not None
        if on_enqueue is not None:
            on_enqueue()
        child = await second.options(job_id=f"{job.job_id}-next").enqueue(n + 1)
        return child.job_id

    return first


async def start(workers: list[Worker]) -> None:
    for worker in workers:
        await worker.start()


async def stop(workers: list[Worker], timeout: float | None = None) -> None:
    await asyncio.gather(*(worker.stop(timeout) for worker in workers))


class _Counting(Hook):
    def __init__(self) -> None:
        self.tasks: list[object] = []

    def before_publish(self, message: PublishInfo) -> Any:
        self.tasks.append(message.headers.get(TASK_HEADER))


async def test_a_chain_runs_under_the_registrys_workers_with_no_producer_bound(
    tmp_path: Path, amqp_url: str, producer: Producer, queue_name: str
) -> None:
    """`await second.enqueue(...)` inside `first`, under `tasks.workers()` (and so `aio-workq
    worker myapp:tasks.workers`) from a process that bound no producer, failed every attempt
    with IntegrationError ("bind a producer"). The workers now bring one for the registry: the
    second task runs, its status and result followable; it is closed when they stop."""
    tasks = Tasks(store=SQLiteStore(tmp_path / "jobs.db"))
    first = chain(tasks, queue_name)
    assert tasks.publisher is None
    counting = _Counting()  # the workers' hooks see their producer's publishes (tracing)
    workers = tasks.workers(amqp_url, retry=None, hooks=[counting])
    await start(workers)
    try:
        lent = tasks.publisher
        assert isinstance(lent, Producer) and lent is not producer and lent.connected
        # the test's producer sends the first job (the registry's stays the workers')
        parent = await first._send(first.arguments.encode((4,), {}), producer, tasks)
        child_id = await parent.result(timeout=20)
        assert child_id == f"{parent.job_id}-next"
        assert await tasks.job(child_id).result(timeout=20) == 50
        status = await tasks.job(child_id).status()
        assert status.state is JobState.SUCCEEDED and status.task == "inside.second"
        assert counting.tasks == ["inside.second"]
    finally:
        await stop(workers)
        assert tasks.store is not None
        await tasks.store.close()
    assert tasks.publisher is None and not lent.connected  # closed with the workers


async def test_hooks_added_later_see_the_child_enqueues(
    tmp_path: Path, amqp_url: str, producer: Producer, queue_name: str
) -> None:
    """Hooks added with `Worker.add_hooks()` (the Prometheus hook of `aio-workq worker
    --metrics-port`) reached the workers but not the producer they bring: a child enqueue was
    neither counted nor traced. The producer now has the hooks its first worker had when it
    started."""
    tasks = Tasks(store=SQLiteStore(tmp_path / "jobs.db"))
    first = chain(tasks, queue_name)
    workers = tasks.workers(amqp_url, retry=None)
    counting = _Counting()
    for worker in workers:
        worker.add_hooks(counting)  # as `aio-workq worker --metrics-port` does
    await start(workers)
    try:
        parent = await first._send(first.arguments.encode((1,), {}), producer, tasks)
        child_id = await parent.result(timeout=20)
        assert await tasks.job(child_id).result(timeout=20) == 20
        assert counting.tasks == ["inside.second"]
    finally:
        await stop(workers)
        assert tasks.store is not None
        await tasks.store.close()


async def test_a_producer_the_user_bound_is_used_and_never_closed(
    tmp_path: Path, amqp_url: str, queue_name: str
) -> None:
    """A producer bound before the workers start is the one the jobs enqueue through, and the
    workers neither open another nor close it when they stop; one bound after they started
    takes over from theirs."""
    counting = _Counting()
    tasks = Tasks(store=SQLiteStore(tmp_path / "jobs.db"))
    first = chain(tasks, queue_name)
    async with Producer(amqp_url, hooks=[counting]) as bound:
        tasks.bind(bound)
        workers = tasks.workers(amqp_url, retry=None)
        await start(workers)
        try:
            assert tasks.publisher is bound
            parent = await first.enqueue(1)
            assert await tasks.job(await parent.result(timeout=20)).result(timeout=20) == 20
            assert counting.tasks == ["inside.first", "inside.second"]
        finally:
            await stop(workers)
        assert tasks.publisher is bound and bound.connected
        await bound.publish(b"still open", queue=f"{queue_name}-after")  # confirmed

        later = Tasks(store=tasks.store)
        first_later = chain(later, f"{queue_name}-later")
        workers = later.workers(amqp_url, retry=None)
        await start(workers)
        try:
            lent = later.publisher
            assert isinstance(lent, Producer) and lent is not bound
            later.bind(bound)  # bound while they run: it wins from now on
            assert later.publisher is bound
            parent = await first_later.enqueue(2)
            assert await later.job(await parent.result(timeout=20)).result(timeout=20) == 30
            assert counting.tasks[2:] == [None, "inside.first", "inside.second"]
        finally:
            await stop(workers)
            assert tasks.store is not None
            await tasks.store.close()
        assert not lent.connected and bound.connected


@pytest.mark.parametrize("stop_timeout", [30.0, 0.0], ids=["graceful", "at-once"])
async def test_a_worker_stopping_while_a_child_enqueue_is_in_flight_loses_nothing(
    tmp_path: Path, amqp_url: str, producer: Producer, queue_name: str, stop_timeout: float
) -> None:
    """The workers' producer closes only after their handlers finished: a graceful stop lets
    the child's enqueue be confirmed and the parent acked; a stop that cancels the handler
    leaves the parent unacked, back in its queue. Either way the child runs once workers
    run again."""
    enqueuing = asyncio.Event()
    tasks = Tasks(store=SQLiteStore(tmp_path / "jobs.db"))
    first = chain(tasks, queue_name, on_enqueue=enqueuing.set)
    workers = tasks.workers(amqp_url, retry=None)
    await start(workers)
    try:
        parent = await first._send(first.arguments.encode((7,), {}), producer, tasks)
        async with asyncio.timeout(20):
            await enqueuing.wait()
        # the handler is now in `second.enqueue()`: the store's record, the publish, its confirm
        await stop(workers, stop_timeout)
        state = (await parent.status()).state
        if stop_timeout:
            assert state is JobState.SUCCEEDED  # the child was confirmed before the ack
        else:
            assert state in (JobState.QUEUED, JobState.SUCCEEDED)
        workers = tasks.workers(amqp_url, retry=None)
        await start(workers)
        assert await tasks.job(f"{parent.job_id}-next").result(timeout=20) == 80
        assert await parent.result(timeout=20) == f"{parent.job_id}-next"
    finally:
        await stop(workers)
        assert tasks.store is not None
        await tasks.store.close()


async def test_a_forked_child_brings_a_producer_of_its_own(amqp_url: str, queue_name: str) -> None:
    """A process forked while the registry's workers run (a pre-forking server) does not
    enqueue through its parent's producer (whose socket it shares): its own workers bring
    their own, and closing it leaves the parent's open."""
    tasks = Tasks()
    chain(tasks, queue_name)
    workers = tasks.workers(amqp_url)
    await start(workers)
    try:
        parents = tasks.publisher
        assert isinstance(parents, Producer) and parents.connected

        async def child() -> None:
            assert tasks.publisher is None  # a new loop: the parent's is not the child's
            mine = tasks.workers(amqp_url)
            await start(mine)
            try:
                own = tasks.publisher
                assert isinstance(own, Producer) and own is not parents and own.connected
                await own.publish(b"from the child", queue=f"{queue_name}-child")
            finally:
                await stop(mine)
            assert tasks.publisher is None and not own.connected

        await fork_running(child, timeout=20).wait()
        assert tasks.publisher is parents and parents.connected
        await parents.publish(b"from the parent", queue=f"{queue_name}-parent")  # confirmed
    finally:
        await stop(workers)


@contextlib.asynccontextmanager
async def chain_cli(
    amqp_url: str, db: Path, queue_name: str, *more: str, consuming: int
) -> AsyncIterator[Cli]:
    """`aio-workq worker tests.chain_app:tasks.workers --processes 2 *more`, once `consuming`
    workers log that they consume."""
    env = {
        **os.environ, "AMQP_URL": amqp_url, "PYTHONUNBUFFERED": "1",
        "WORKQ_CHAIN_DB": str(db), "WORKQ_CHAIN_QUEUE": queue_name,
    }  # fmt: skip
    args = ("tests.chain_app:tasks.workers", "--processes", "2", *more)
    async with cli("worker", *args, env=env) as sup:
        await sup.wait_for(
            lambda: len(sup.lines(r"worker consuming", "err")) >= consuming, timeout=60,
            what="the workers consuming",
        )  # fmt: skip
        yield sup


async def test_a_chain_runs_under_the_command_line_in_each_process(
    amqp_url: str, tmp_path: Path, producer: Producer, queue_name: str
) -> None:
    """The new user's case: `aio-workq worker tests.chain_app:tasks.workers --processes 2`,
    nothing bound. Every chain's second task runs, whichever process took the first; a
    SIGTERM stops the workers, then their producers, and the command exits 0."""
    db = tmp_path / "jobs.db"
    async with chain_cli(amqp_url, db, queue_name, consuming=6) as sup:
        tasks = Tasks(producer=producer, store=SQLiteStore(db))
        first = chain(tasks, queue_name, names=("chain.first", "chain.second"))
        try:
            parents = [await first.enqueue(n) for n in range(6)]
            for n, parent in enumerate(parents):
                child_id = await parent.result(timeout=30)
                assert await tasks.job(child_id).result(timeout=30) == (n + 1) * 10
        finally:
            assert tasks.store is not None
            await tasks.store.close()
        sup.proc.terminate()
        assert await sup.exit_code() == 0, sup.err
    assert not sup.lines(r"IntegrationError|Traceback", "err"), sup.err


async def test_the_command_line_runs_only_the_queues_given(
    amqp_url: str, tmp_path: Path, producer: Producer, queue_name: str
) -> None:
    """`aio-workq worker tests.chain_app:tasks.workers -q QUEUE` (Celery's `-Q`), in each of
    two processes: only that queue's tasks are consumed (and the cancel requests), the
    registry's other queue is left alone."""
    db = tmp_path / "jobs.db"
    only = ("-q", f"{queue_name}-next")
    async with chain_cli(amqp_url, db, queue_name, *only, consuming=4) as sup:
        tasks = Tasks(producer=producer, store=SQLiteStore(db))
        first = chain(tasks, queue_name, names=("chain.first", "chain.second"))
        second = tasks.tasks["chain.second"]
        try:
            assert await (await second.enqueue(4)).result(timeout=30) == 40
            parent = await first.enqueue(1)  # its queue has no worker: it waits there
            assert (await parent.status()).state is JobState.QUEUED
        finally:
            assert tasks.store is not None
            await tasks.store.close()
        sup.proc.terminate()
        assert await sup.exit_code() == 0, sup.err
    assert len(sup.lines(rf"consuming '{queue_name}-next'", "err")) == 2, sup.err
    assert not sup.lines(rf"consuming '{queue_name}'", "err"), sup.err


async def test_a_child_enqueue_blocked_by_a_memory_alarm_leaves_the_workers_connections_free(
    local_broker: LocalBroker, tmp_path: Path, queue_name: str
) -> None:
    """The workers' producer has a connection of its own: RabbitMQ blocks a connection that
    publishes during a memory alarm and reads nothing more from it, acks included. A child's
    enqueue blocked by the alarm blocks that connection only; the workers' own stay free (their
    acks read) and their other jobs go on; the child is sent once the alarm clears."""
    enqueuing = asyncio.Event()
    tasks = Tasks(store=SQLiteStore(tmp_path / "jobs.db"))
    first = chain(tasks, queue_name, on_enqueue=enqueuing.set)

    @tasks.task(queue=f"{queue_name}-plain", name="inside.plain")
    async def plain(n: int) -> int:
        return n

    async with Producer(local_broker.url) as producer:  # sent before the alarm
        parent = await first._send(first.arguments.encode((3,), {}), producer, tasks)
        plains = [
            await plain._send(plain.arguments.encode((n,), {}), producer, tasks) for n in range(3)
        ]
    await asyncio.to_thread(local_broker.ctl, *MEMORY_ALARM)
    workers = tasks.workers(local_broker.url, retry=None)
    try:
        await start(workers)
        lent = tasks.publisher
        assert isinstance(lent, Producer) and lent._connection is not None
        async with asyncio.timeout(20):
            await enqueuing.wait()

        async def blocked() -> bool:
            assert lent._connection is not None
            return lent._connection.trouble() is not None

        await wait_until(blocked, timeout=20)
        for n, job in enumerate(plains):  # handled meanwhile
            assert await job.result(timeout=20) == n
        for worker in workers:
            assert worker._connection is not None and worker._connection.trouble() is None
        assert (await parent.status()).state is JobState.RUNNING  # its child still unsent
    finally:
        await asyncio.to_thread(local_broker.ctl, *MEMORY_CLEAR)
    try:
        assert await tasks.job(await parent.result(timeout=30)).result(timeout=30) == 40
    finally:
        await stop(workers)
        assert tasks.store is not None
        await tasks.store.close()


async def test_a_task_that_enqueues_a_group_runs_it_with_no_producer_bound(
    tmp_path: Path, amqp_url: str, producer: Producer, queue_name: str
) -> None:
    """A group enqueued inside a task (the next fan-out of a pipeline) goes through the
    producer the workers brought, as a single task's enqueue does: its members and callback
    run."""
    tasks = Tasks(store=SQLiteStore(tmp_path / "jobs.db"))

    @tasks.task(queue=f"{queue_name}-members", name="inside.square")
    async def square(n: int) -> int:
        return n * n

    @tasks.task(queue=f"{queue_name}-members", name="inside.total")
    async def total(results: list[GroupResult]) -> int:
        return sum(r.value for r in results if r.ok)

    @tasks.task(queue=queue_name, name="inside.fan_out")
    async def fan_out(n: int) -> str:
        made = await group([square.s(i) for i in range(n)], then=total).enqueue()
        return made.group_id

    workers = tasks.workers(amqp_url, retry=None)
    await start(workers)
    try:
        parent = await fan_out._send(fan_out.arguments.encode((4,), {}), producer, tasks)
        group_id = await parent.result(timeout=20)
        assert await tasks.job(f"{group_id}.callback").result(timeout=20) == 0 + 1 + 4 + 9
    finally:
        await stop(workers)
        assert tasks.store is not None
        await tasks.store.close()


async def test_a_stop_while_the_producer_opens_leaves_nothing_open(
    amqp_url: str, queue_name: str
) -> None:
    """A stop (a signal) that ends while the first worker is still opening the workers'
    producer: the producer is closed once open, not left for the process's life."""
    tasks = Tasks()
    chain(tasks, queue_name)
    [worker, *others] = tasks.workers(amqp_url)
    starting = asyncio.ensure_future(worker.start())
    await asyncio.sleep(0)  # the producer's connect is under way
    await worker.stop()
    await starting
    assert tasks.publisher is None
    for other in others:
        await other.stop()
