"""A group's callback published during a memory alarm: RabbitMQ blocks the connection it goes
on and reads nothing more from it, acks included. It goes through the registry's producer (the
one bound, else the one the workers bring), apart from the workers' connection, so the worker
whose member completed the group goes on acking its other deliveries, and gets new ones, for as
long as the alarm lasts (before: on the worker's own connection, its acks stopped until the
alarm cleared)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from aio_workq import Connection, Hook, Producer, PublishInfo, Queue
from aio_workq.jobs import GroupResult, JobState, SQLiteStore, Tasks, group
from aio_workq.jobs._handle import TASK_HEADER
from aio_workq.jobs._lent import PRODUCER_NAME
from aio_workq.testing import LocalBroker
from tests.helpers import connection_names, wait_until
from tests.test_jobs import running

pytestmark = pytest.mark.broker

PLAIN = 6


@pytest.mark.parametrize("bound", [True, False], ids=["bound", "brought"])
async def test_a_callback_published_during_a_memory_alarm_does_not_stop_the_workers_acks(
    local_broker: LocalBroker, tmp_path: Path, queue_name: str, bound: bool
) -> None:
    """Through a producer bound (on a connection of its own), or the one the workers bring."""
    url = local_broker.url
    go = asyncio.Event()
    done: list[int] = []
    all_done = asyncio.Event()
    async with Producer(url) as producer:
        tasks = Tasks(producer=producer if bound else None, store=SQLiteStore(tmp_path / "jobs.db"))
        members = Queue(f"{queue_name}-m", type="classic")

        @tasks.task(queue=members, name="t.one")
        async def one(n: int) -> int:
            await go.wait()
            return n

        @tasks.task(queue=members, name="t.plain")
        async def plain(n: int) -> int:
            await go.wait()
            done.append(n)
            if len(done) == PLAIN:
                all_done.set()
            return n

        @tasks.task(queue=f"{queue_name}-r", name="t.report")
        async def report(results: list[GroupResult]) -> int:
            return len(results)

        # Two deliveries at a time: the member and a plain job; the other plain jobs come
        # only as the broker reads the acks of those before them.
        async with running(tasks, url, concurrency=2, prefetch=2):
            handle = await group([one.s(1)], then=report).enqueue()
            for n in range(PLAIN):
                await plain.enqueue(n)
            await asyncio.to_thread(local_broker.ctl, "set_vm_memory_high_watermark", "0.0000001")
            try:
                go.set()  # the member completes the group: its callback is published now
                async with asyncio.timeout(20):
                    await all_done.wait()  # the acks are read: the work goes on
                assert handle.callback is not None
                status = await handle.callback.status()
                assert status.state is JobState.QUEUED  # its publish waits for the alarm
            finally:
                await asyncio.to_thread(local_broker.ctl, "set_vm_memory_high_watermark", "0.4")
            assert await handle.result(timeout=60) == 1


class _Sent(Hook):
    """The task of each message published through the producer it is a hook of."""

    def __init__(self) -> None:
        self.tasks: list[object] = []

    def before_publish(self, message: PublishInfo) -> Any:
        self.tasks.append(message.headers.get(TASK_HEADER))


@pytest.mark.parametrize("given", ["url", "connection", "aio-pika", "bound"])
async def test_the_callbacks_go_through_the_producer_the_jobs_enqueue_through(
    local_broker: LocalBroker, tmp_path: Path, queue_name: str, given: str
) -> None:
    """No connection of their own: a group's callback is published through the registry's
    producer, as the jobs' enqueues are: the one the workers bring (with a URL or an aio-workq
    `Connection`: one connection of its own, open while the workers run; with an aio-pika
    connection: on it, no other), or the one bound (no connection opened for the callbacks)."""
    url = local_broker.url
    sent = _Sent()

    def names() -> list[str]:
        return connection_names(local_broker)

    async with AsyncExitStack() as stack:
        options: dict[str, Any] = {}
        if given == "connection":
            options["connection"] = await stack.enter_async_context(Connection(url))
        elif given == "aio-pika":
            options["connection"] = await aio_pika.connect_robust(url)
            stack.push_async_callback(options["connection"].close)
        tasks = Tasks(store=SQLiteStore(tmp_path / "jobs.db"))
        if given == "bound":
            tasks.bind(await stack.enter_async_context(Producer(url, hooks=[sent])))
        else:
            options["hooks"] = [sent]  # the workers' hooks see their producer's publishes

        @tasks.task(queue=f"{queue_name}-m", name="t.one")
        async def one(n: int) -> int:
            return n

        @tasks.task(queue=f"{queue_name}-r", name="t.report")
        async def report(results: list[GroupResult]) -> int:
            return sum(r.value for r in results)

        workers = tasks.workers(None if options.get("connection") else url, **options)
        for worker in workers:
            await worker.start()
        try:
            before = await asyncio.to_thread(names)
            brought = 1 if given in ("url", "connection") else 0
            assert before.count(PRODUCER_NAME) == brought, before
            handle = await group([one.s(1), one.s(2)], then=report).enqueue()
            assert await handle.result(timeout=30) == 3
            assert sent.tasks.count("t.report") == 1  # through the registry's producer
            assert sorted(await asyncio.to_thread(names)) == sorted(before)  # none opened
        finally:
            for worker in workers:
                await worker.stop(timeout=1)
            await tasks.store.close()  # type: ignore[union-attr]

        async def closed() -> bool:
            return PRODUCER_NAME not in await asyncio.to_thread(names)

        await wait_until(closed, timeout=15)
