"""A group's callback published during a memory alarm: RabbitMQ blocks the connection it goes
on and reads nothing more from it, acks included. It goes on a connection apart from the
workers' (one per `tasks.workers()` call), so the worker whose member completed the group
goes on acking its other deliveries, and gets new ones, for as long as the alarm lasts (before:
on the worker's own connection, its acks stopped until the alarm cleared)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from aio_workq import Connection, Producer, Queue
from aio_workq.jobs import GroupResult, JobState, SQLiteStore, Tasks, group
from aio_workq.testing import LocalBroker
from tests.helpers import connection_names, wait_until
from tests.test_jobs import running

pytestmark = pytest.mark.broker

PLAIN = 6


async def test_a_callback_published_during_a_memory_alarm_does_not_stop_the_workers_acks(
    local_broker: LocalBroker, tmp_path: Path, queue_name: str
) -> None:
    url = local_broker.url
    go = asyncio.Event()
    done: list[int] = []
    all_done = asyncio.Event()
    async with Producer(url) as producer:
        tasks = Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db"))
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


@pytest.mark.parametrize("given", ["url", "connection", "aio-pika"])
async def test_the_callbacks_connection_opens_with_the_first_callback_and_closes_with_the_workers(
    local_broker: LocalBroker, tmp_path: Path, queue_name: str, given: str
) -> None:
    """With a URL, and with an aio-workq `Connection` (whose sibling it is: the same brokers),
    the callbacks have a connection of their own, gone once the workers stopped; with an
    aio-pika connection, they go on it, as before."""
    url = local_broker.url

    def callback_links() -> list[str]:
        return [n for n in connection_names(local_broker) if n.endswith("group callbacks")]

    async with AsyncExitStack() as stack:
        options: dict[str, Any] = {}
        if given == "connection":
            options["connection"] = await stack.enter_async_context(Connection(url))
        elif given == "aio-pika":
            options["connection"] = await aio_pika.connect_robust(url)
            stack.push_async_callback(options["connection"].close)
        producer = await stack.enter_async_context(Producer(url))
        tasks = Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db"))

        @tasks.task(queue=f"{queue_name}-m", name="t.one")
        async def one(n: int) -> int:
            return n

        @tasks.task(queue=f"{queue_name}-r", name="t.report")
        async def report(results: list[GroupResult]) -> int:
            return sum(r.value for r in results)

        workers = tasks.workers(None if options else url, concurrency=2, **options)
        for worker in workers:
            await worker.start()
        try:
            assert await asyncio.to_thread(callback_links) == []  # none before a callback
            handle = await group([one.s(1), one.s(2)], then=report).enqueue()
            assert await handle.result(timeout=30) == 3
            links = await asyncio.to_thread(callback_links)
            assert len(links) == (0 if given == "aio-pika" else 1), links
        finally:
            for worker in workers:
                await worker.stop(timeout=1)
            await tasks.store.close()  # type: ignore[union-attr]

        async def closed() -> bool:
            return await asyncio.to_thread(callback_links) == []

        await wait_until(closed, timeout=15)
