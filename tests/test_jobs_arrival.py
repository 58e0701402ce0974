"""A tracked delivery's claim goes out as it arrives (the recorder's `Hook.arrived`, called by
the dispatcher outside the delivery's task), and its task starts only once the claim is
answered and a handler slot is free (#23): on a real broker with the SQLite store, what that
must keep: arrival order, a stop while deliveries wait (each back in the queue, none run
twice or lost), hooks without `arrived` entered in the task's own context, and a hook's own
`arrived` future waited for."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from aio_workq import Hook, JobView, Producer, Worker
from aio_workq.jobs import JobState, SQLiteStore, Tasks, Write, current_job

pytestmark = pytest.mark.broker


class GatedStore(SQLiteStore):
    """A SQLite store whose batches holding a claim wait for `gate` while `gated`."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gated = False
        self.gate = asyncio.Event()
        self.held = asyncio.Event()

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        if self.gated and any(write.claim for write in writes):
            self.held.set()
            await self.gate.wait()
        return await super().record(writes)


@asynccontextmanager
async def started(tasks: Tasks, url: str, **options: Any) -> AsyncIterator[list[Worker]]:
    workers = tasks.workers(url, **options)
    try:
        for worker in workers:
            await worker.start()
        yield workers
    finally:
        for worker in workers:
            await worker.stop(timeout=1)


async def _wait_for(check: Any) -> None:
    """Until `check()` holds (polled: what it reads has no event to wait on; 20 s at most)."""
    async with asyncio.timeout(20):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


async def test_handlers_start_in_arrival_order_with_claims_ahead(
    amqp_url: str, producer: Producer, queue_name: str, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "jobs.db")
    tasks = Tasks(producer=producer, store=store)
    order: list[int] = []
    done = asyncio.Event()

    @tasks.task(queue=queue_name)
    async def step(n: int) -> int:
        order.append(n)
        await asyncio.sleep(0.001 * (n % 3))  # handlers end out of order: slots freed so
        if len(order) == 30:
            done.set()
        return n

    handles = [await step.enqueue(n) for n in range(30)]
    async with started(tasks, amqp_url, concurrency=3):  # prefetch 12: claims go out ahead
        async with asyncio.timeout(20):
            await done.wait()
        assert [await handle.result(timeout=20) for handle in handles] == list(range(30))
    await store.close()
    assert order == list(range(30))


async def test_a_stop_while_deliveries_wait_for_their_claims_requeues_them_unrun(
    amqp_url: str, producer: Producer, queue_name: str, tmp_path: Path
) -> None:
    """Deliveries whose claims are not answered yet when the worker stops go back to the
    queue, their handlers not run, and run once each on the next worker."""
    store = GatedStore(tmp_path / "jobs.db")
    tasks = Tasks(producer=producer, store=store)
    ran: list[int] = []

    @tasks.task(queue=queue_name)
    async def work(n: int) -> int:
        ran.append(n)
        return n

    handles = [await work.enqueue(n) for n in range(4)]
    store.gated = True
    workers = tasks.workers(amqp_url, concurrency=2)
    for worker in workers:
        await worker.start()
    async with asyncio.timeout(20):
        await store.held.wait()  # the claims' batch is at the store, unanswered
    await _wait_for(lambda: workers[0].state.in_flight == 4)  # all four wait, none runs
    assert ran == []
    stopping = [asyncio.ensure_future(worker.stop(timeout=5)) for worker in workers]
    await asyncio.sleep(0)  # the stops began (the dispatchers are stopping) ...
    store.gate.set()  # ... and then the claims are granted: too late to run
    async with asyncio.timeout(20):
        await asyncio.gather(*stopping)
    assert ran == []
    for handle in handles:  # recorded back in the queue
        assert (await handle.status()).state is JobState.QUEUED
    store.gated = False
    async with started(tasks, amqp_url, concurrency=2):
        assert [await handle.result(timeout=20) for handle in handles] == list(range(4))
    await store.close()
    assert sorted(ran) == list(range(4))  # each once


async def test_a_stop_while_deliveries_wait_for_a_handler_slot_requeues_them_unrun(
    amqp_url: str, producer: Producer, queue_name: str, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "jobs.db")
    tasks = Tasks(producer=producer, store=store)
    ran: list[int] = []
    first, release = asyncio.Event(), asyncio.Event()

    @tasks.task(queue=queue_name)
    async def work(n: int) -> int:
        ran.append(n)
        if n == 0:
            first.set()
            await release.wait()
        return n

    handles = [await work.enqueue(n) for n in range(2)]
    workers = tasks.workers(amqp_url, concurrency=1)  # prefetch 4: job 1 waits for the slot
    for worker in workers:
        await worker.start()
    async with asyncio.timeout(20):
        await first.wait()
    await _wait_for(lambda: workers[0].state.in_flight == 2)
    stopping = [asyncio.ensure_future(worker.stop(timeout=5)) for worker in workers]
    await asyncio.sleep(0)
    release.set()  # job 0 ends within the stop's timeout: its slot frees as the worker stops
    async with asyncio.timeout(20):
        await asyncio.gather(*stopping)
    assert ran == [0]
    assert await handles[0].result(timeout=5) == 0
    assert (await handles[1].status()).state is JobState.QUEUED
    async with started(tasks, amqp_url, concurrency=1):
        assert await handles[1].result(timeout=20) == 1
    await store.close()
    assert ran == [0, 1]


_seen: contextvars.ContextVar[str | None] = contextvars.ContextVar("seen", default=None)


class Tagging(Hook):
    """A hook without `arrived`: its `handling` sets a context variable the handler reads."""

    @contextmanager
    def _tag(self, job: JobView) -> Iterator[None]:
        token = _seen.set(job.message_id)
        try:
            yield
        finally:
            _seen.reset(token)

    def handling(self, job: JobView, queue: str) -> Any:
        return self._tag(job)


async def test_a_hook_without_arrived_is_entered_in_the_deliverys_own_task(
    amqp_url: str, producer: Producer, queue_name: str, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "jobs.db")
    tasks = Tasks(producer=producer, store=store)
    mismatched: list[tuple[str | None, str]] = []

    @tasks.task(queue=queue_name)
    async def look() -> None:
        job = current_job()
        assert job is not None
        if _seen.get() != job.job_id:
            mismatched.append((_seen.get(), job.job_id))
        await asyncio.sleep(0.001)

    handles = [await look.enqueue() for _ in range(12)]
    async with started(tasks, amqp_url, concurrency=2, hooks=[Tagging()]):
        for handle in handles:
            await handle.result(timeout=20)
    await store.close()
    assert mismatched == []


class Admitting(Hook):
    """A hook whose `arrived` returns a future the test resolves (or raises, for `broken`)."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.futures: list[asyncio.Future[None]] = []

    def arrived(self, job: JobView, queue: str) -> asyncio.Future[None] | None:
        if self.broken:
            raise RuntimeError("arrived broke")
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future


async def test_a_hooks_arrived_future_is_waited_for_and_a_failing_one_is_ignored(
    amqp_url: str, producer: Producer, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    admitting, broken = Admitting(), Admitting(broken=True)
    handled: list[bytes] = []
    done = asyncio.Event()

    async def handler(job: Any) -> None:
        handled.append(job.body)
        if len(handled) == 2:
            done.set()

    worker = Worker(
        amqp_url, queue=queue_name, handler=handler, hooks=[admitting, broken], concurrency=2
    )
    await worker.start()
    try:
        await producer.publish(b"a", queue_name)
        await producer.publish(b"b", queue_name)
        await _wait_for(lambda: len(admitting.futures) == 2)
        assert handled == []  # each waits for its future
        admitting.futures[1].set_result(None)
        await asyncio.sleep(0.05)
        assert handled == []  # "b" waits behind "a": starts stay in arrival order
        admitting.futures[0].set_exception(RuntimeError("no"))  # a failed one: it runs
        async with asyncio.timeout(20):
            await done.wait()
        assert handled == [b"a", b"b"]
    finally:
        await worker.stop(timeout=1)
    assert "arrived broke" in caplog.text


async def test_the_only_hooks_arrived_failing_is_logged_and_the_delivery_runs(
    amqp_url: str, producer: Producer, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The dispatcher calls a worker's one `arrived` itself (no `Hooks` call between): what
    it raises is guarded there as in `Hooks.arrive`."""
    handled = asyncio.Event()

    async def handler(job: Any) -> None:
        handled.set()

    worker = Worker(amqp_url, queue=queue_name, handler=handler, hooks=[Admitting(broken=True)])
    await worker.start()
    try:
        await producer.publish(b"a", queue_name)
        async with asyncio.timeout(20):
            await handled.wait()
    finally:
        await worker.stop(timeout=1)
    assert "failed in arrived: RuntimeError('arrived broke')" in caplog.text
