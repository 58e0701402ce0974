"""aio_workq.jobs on a real broker with the SQLite store: a job's states from enqueue to result,
failures, retries, cancelling (queued and running, async and thread tasks), timeouts, the TTL,
and a store that is down while the queue goes on."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from aio_workq import PresenceWatcher, Producer, RetryPolicy, Worker, WorkerPresence
from aio_workq._consume import subscription as subscription_module
from aio_workq.jobs import (
    Cancelled,
    CancelRequests,
    JobCancelledError,
    JobFailedError,
    JobHandle,
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStatus,
    JobTimeoutError,
    SQLiteStore,
    Tasks,
    Write,
    current_job,
)
from aio_workq.jobs import _recorder as recorder_module
from aio_workq.jobs._handle import CONTROL_EXCHANGE

pytestmark = pytest.mark.broker


@dataclass
class Thumb:
    path: str
    width: int


@pytest.fixture
def make_tasks(tmp_path: Path, producer: Producer) -> Callable[..., Tasks]:
    def make(**store_options: Any) -> Tasks:
        return Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db", **store_options))

    return make


@asynccontextmanager
async def running(tasks: Tasks, url: str, **options: Any) -> AsyncIterator[list[Worker]]:
    workers = tasks.workers(url, **options)
    try:
        for worker in workers:
            await worker.start()
        yield workers
    finally:
        for worker in workers:
            await worker.stop(timeout=1)
        assert tasks.store is not None
        await tasks.store.close()


async def until(handle: JobHandle[Any], check: Callable[[JobStatus], bool]) -> JobStatus:
    """The job's status once `check` holds (polled: the store has no event to wait on; fails
    after 20 s with the last status seen)."""
    status: JobStatus | None = None
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    status = await handle.status()
                except JobNotFoundError:
                    status = None
                if status is not None and check(status):
                    return status
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"job {handle.job_id} never got there; last status: {status}")


async def test_a_job_goes_queued_running_succeeded_with_its_typed_result(
    amqp_url: str, make_tasks: Callable[..., Tasks], queue_name: str
) -> None:
    tasks = make_tasks()
    started, release = asyncio.Event(), asyncio.Event()

    @tasks.task(queue=queue_name)
    async def resize(path: str, width: int = 800) -> Thumb:
        job = current_job()
        assert job is not None and job.attempt == 1
        started.set()
        await release.wait()
        return Thumb(path, width)

    @tasks.task(queue=queue_name)  # a second task on the same queue
    def shout(word: str) -> str:
        return word.upper()

    job = await resize.enqueue("cat.png", width=400)
    status = await job.status()
    assert status.state is JobState.QUEUED and status.queue == queue_name
    assert status.task == resize.name and status.attempt == 1 and not status.done
    async with running(tasks, amqp_url, concurrency=2):
        loud = await shout.enqueue("hi")
        async with asyncio.timeout(20):
            await started.wait()
        status = await job.status()
        assert status.state is JobState.RUNNING and status.started_at is not None
        release.set()
        thumb = await job.result(timeout=20)
        assert thumb == Thumb("cat.png", 400)  # validated back into the return type
        assert await loud.result(timeout=20) == "HI"
        status = await job.status()
        assert status.state is JobState.SUCCEEDED and status.finished_at is not None
        # Any process that knows the id can follow the job.
        assert await tasks.job(job.job_id).result() == {"path": "cat.png", "width": 400}


async def test_a_job_is_created_before_it_starts_even_when_a_worker_is_quicker_than_the_confirm(
    amqp_url: str, make_tasks: Callable[..., Tasks], queue_name: str
) -> None:
    # An idle worker gets a job before its publisher has the confirm: the job's created time
    # is when it was enqueued, not when its `queued` record was written after the confirm.
    tasks = make_tasks()

    @tasks.task(queue=queue_name)
    def echo(n: int) -> int:
        return n

    statuses = []
    async with running(tasks, amqp_url, concurrency=20):
        for n in range(20):  # one at a time, to an idle worker
            job = await echo.enqueue(n)
            assert await job.result(timeout=30) == n
            statuses.append(await job.status())
    inverted = [
        (s.job_id, s.created_at, s.started_at)
        for s in statuses
        if s.created_at is None or s.started_at is None or s.started_at < s.created_at
    ]
    assert inverted == []


async def test_the_cancel_listener_is_named_by_its_exchange_and_not_listed_as_a_worker(
    amqp_url: str,
    make_tasks: Callable[..., Tasks],
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = make_tasks()

    @tasks.task(queue=queue_name)
    def noop() -> None:
        pass

    def ours(workers: Sequence[WorkerPresence]) -> list[WorkerPresence]:
        return [w for w in workers if w.beat.pid == os.getpid()]

    async with PresenceWatcher(amqp_url) as watcher:
        with caplog.at_level(logging.INFO, logger="aio_workq"):
            async with running(tasks, amqp_url, presence_interval=0.5) as workers:
                assert len(workers) == 2  # the task queue's worker and the cancel listener
                # Two beats of the task worker arrived: the listener, started with it, sent none.
                await watcher.wait_for(
                    lambda ws: any(w.beat.queues == (queue_name,)
                                   and w.beat.sent_at > w.beat.started_at + 0.5 for w in ws),
                    timeout=10,
                )  # fmt: skip
                assert [w.beat.queues for w in ours(watcher.workers())] == [(queue_name,)]
                listener = workers[1]
    assert listener.consuming.endswith("(bound to exchange 'workq.control')"), listener.consuming
    assert f"worker consuming {listener.consuming} (concurrency 1)" in caplog.text


async def test_a_failure_ends_failed_with_the_error(
    amqp_url: str, make_tasks: Callable[..., Tasks], queue_name: str
) -> None:
    tasks = make_tasks()

    @tasks.task(queue=queue_name)
    async def broken(n: int) -> int:
        raise ValueError(f"no good: {n}")

    job = await broken.enqueue(7)
    async with running(tasks, amqp_url, retry=None):
        with pytest.raises(JobFailedError) as failed:
            await job.result(timeout=20)
    assert failed.value.error_type == "builtins.ValueError"
    assert failed.value.error_message == "no good: 7" and failed.value.job_id == job.job_id
    status = await job.status()
    assert status.state is JobState.FAILED and status.error_message == "no good: 7"


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("a bug in __str__")


async def test_a_failure_whose_text_cant_be_stored_ends_failed_and_leaves_the_others_alone(
    amqp_url: str, make_tasks: Callable[..., Tasks], queue_name: str
) -> None:
    """An exception whose `str()` raises, or holds a lone surrogate (a file name decoded with
    `surrogateescape`): the worker settles such a failure like any other, and its job record
    must follow. Before, the first left the job `running` forever (the recorder's hook
    raised), the second failed the store's whole batch, the other jobs' writes with it."""
    tasks = make_tasks()

    @tasks.task(queue=queue_name)
    async def broken(kind: str) -> str:
        if kind == "unprintable":
            raise _Unprintable()
        if kind == "surrogate":
            raise FileNotFoundError("no file " + b"caf\xe9".decode("utf-8", "surrogateescape"))
        return kind

    jobs = [await broken.enqueue(kind) for kind in ("unprintable", "surrogate", "fine")]
    async with running(tasks, amqp_url, retry=None, concurrency=3):
        for job in jobs[:2]:
            with pytest.raises(JobFailedError):
                await job.result(timeout=20)
        assert await jobs[2].result(timeout=20) == "fine"
    unprintable, surrogate = [await job.status() for job in jobs[:2]]
    assert unprintable.state is JobState.FAILED
    assert unprintable.error_message == "<tests.test_jobs._Unprintable: str() failed>"
    assert surrogate.state is JobState.FAILED
    assert surrogate.error_message == "no file caf\\udce9"


async def test_a_failed_task_is_logged_under_its_own_name(
    amqp_url: str,
    make_tasks: Callable[..., Tasks],
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = make_tasks()

    @tasks.task(queue=queue_name)
    async def broken(n: int) -> int:
        raise ValueError(f"no good: {n}")

    job = await broken.enqueue(7)
    with caplog.at_level(logging.WARNING, logger="aio_workq"):
        async with running(tasks, amqp_url, retry=None):
            with pytest.raises(JobFailedError):
                await job.result(timeout=20)
    [failure] = [r.getMessage() for r in caplog.records if "failed on message" in r.getMessage()]
    assert failure.startswith(f"task {broken.name!r} failed on message {job.job_id}")
    assert "QueueRunner" not in failure


async def test_a_dead_lettered_job_replayed_runs_its_task_again(
    amqp_url: str, make_tasks: Callable[..., Tasks], producer: Producer, queue_name: str
) -> None:
    tasks = make_tasks()
    fixed = asyncio.Event()

    @tasks.task(queue=queue_name)
    async def fragile(n: int) -> int:
        if not fixed.is_set():
            raise ValueError("not yet")
        return n * 2

    job = await fragile.enqueue(21)
    async with running(tasks, amqp_url, retry=None):
        await until(job, lambda status: status.state is JobState.FAILED)
        fixed.set()  # the fix is deployed: replaying the dead letter runs the task again
        assert await producer.dead_letters(queue_name).replay() == 1
        assert await job.result(timeout=20) == 42


async def test_a_retry_shows_retrying_with_the_attempt_and_next_retry_time(
    amqp_url: str, make_tasks: Callable[..., Tasks], queue_name: str
) -> None:
    tasks = make_tasks()
    failed_at: list[float] = []

    @tasks.task(queue=queue_name)
    async def flaky() -> str:
        job = current_job()
        assert job is not None
        if job.attempt == 1:
            failed_at.append(time.time())
            raise ConnectionError("try again")
        return f"attempt {job.attempt}"

    job = await flaky.enqueue()
    policy = RetryPolicy(max_attempts=2, initial_delay=2.0, jitter=0)
    async with running(tasks, amqp_url, retry=policy):
        retrying = await until(job, lambda s: s.state is JobState.RETRYING)
        assert retrying.state is JobState.RETRYING and retrying.attempt == 1
        assert retrying.error_type == "builtins.ConnectionError"
        assert retrying.next_retry_at is not None
        # the policy's 2 s from the failure (no jitter), as the worker's dispatcher decided it
        assert failed_at[0] + 1.9 <= retrying.next_retry_at.timestamp() <= failed_at[0] + 2.5
        assert await job.result(timeout=20) == "attempt 2"
        assert (await job.status()).attempt == 2


async def test_a_queued_job_cancelled_is_skipped_when_it_arrives(
    amqp_url: str, make_tasks: Callable[..., Tasks], queue_name: str
) -> None:
    tasks = make_tasks()
    ran: list[str] = []

    @tasks.task(queue=queue_name)
    async def work(name: str) -> str:
        ran.append(name)
        return name

    doomed = await work.enqueue("doomed")
    status = await doomed.cancel()
    assert status.state is JobState.CANCELLED
    after = await work.enqueue("after")
    async with running(tasks, amqp_url):  # one at a time: "doomed" arrives first
        assert await after.result(timeout=20) == "after"
    assert ran == ["after"]
    with pytest.raises(JobCancelledError):
        await doomed.result(timeout=1)
    assert (await doomed.cancel()).state is JobState.CANCELLED  # a finished job stays


def _forever(tasks: Tasks, queue: str) -> tuple[Any, asyncio.Event, asyncio.Event]:
    """A task that runs until cancelled; the events say it started and it was cancelled."""
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @tasks.task(queue=queue)
    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    return forever, started, cancelled


async def test_a_running_async_task_is_cancelled_through_the_control_exchange(
    amqp_url: str, make_tasks: Callable[..., Tasks], queue_name: str
) -> None:
    tasks = make_tasks()
    forever, started, cancelled = _forever(tasks, queue_name)
    job = await forever.enqueue()
    async with running(tasks, amqp_url):
        async with asyncio.timeout(20):
            await started.wait()
        status = await job.cancel()
        assert status.state is JobState.RUNNING and status.cancel_requested
        async with asyncio.timeout(20):
            await cancelled.wait()
        status = await until(job, lambda s: s.done)
        assert status.state is JobState.CANCELLED
        with pytest.raises(JobCancelledError):
            await job.result()


class _OneByOne:
    """A store of one's own, without `CancelRequests`: a worker asks it with `get()`."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self.ttl = store.ttl

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        return await self._store.record(writes)

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._store.get(job_id)

    async def cancel(self, job_id: str, *, now: float) -> JobStatus | None:
        return await self._store.cancel(job_id, now=now)

    async def purge(self) -> int:
        return await self._store.purge()

    async def close(self) -> None:
        await self._store.close()


@pytest.mark.parametrize("reads", ["all at once", "one by one"])
async def test_a_cancel_request_no_worker_heard_still_stops_the_running_job(
    amqp_url: str,
    producer: Producer,
    tmp_path: Path,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
    reads: str,
) -> None:
    """The request to stop a running job travels on `workq.control`, and a broadcast is heard
    only by the workers bound at that moment: here the exchange was deleted (its bindings with
    it) and declared again by the request's own publish, so no worker heard it. Before, the job
    ran on with `cancel_requested` set; a worker now checks its long-running jobs' flags in the
    store every `CANCEL_CHECK_EVERY` seconds."""
    monkeypatch.setattr(subscription_module, "REBIND_EVERY", 3600.0)  # no rebinding to help
    monkeypatch.setattr(recorder_module, "CANCEL_CHECK_EVERY", 0.2)
    sqlite = SQLiteStore(tmp_path / "jobs.db")
    store = sqlite if reads == "all at once" else _OneByOne(sqlite)
    assert isinstance(store, CancelRequests) is (reads == "all at once")
    tasks = Tasks(producer=producer, store=store)
    forever, started, cancelled = _forever(tasks, queue_name)
    job = await forever.enqueue()
    connection = await aio_pika.connect(amqp_url)
    async with connection, running(tasks, amqp_url):
        async with asyncio.timeout(20):
            await started.wait()
        channel = await connection.channel()
        await channel.exchange_delete(CONTROL_EXCHANGE.name)
        status = await job.cancel()
        assert status.state is JobState.RUNNING and status.cancel_requested
        async with asyncio.timeout(10):
            await cancelled.wait()
        status = await until(job, lambda s: s.done)
        assert status.state is JobState.CANCELLED


async def test_a_running_thread_task_is_flagged_and_stops_itself(
    amqp_url: str, make_tasks: Callable[..., Tasks], queue_name: str
) -> None:
    tasks = make_tasks()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    @tasks.task(queue=queue_name)
    def crunch() -> None:
        job = current_job()
        assert job is not None
        loop.call_soon_threadsafe(started.set)
        while not job.cancelled:
            time.sleep(0.01)
        job.check()  # raises Cancelled

    job = await crunch.enqueue()
    async with running(tasks, amqp_url):
        async with asyncio.timeout(20):
            await started.wait()
        await job.cancel()
        status = await until(job, lambda s: s.done)
        assert status.state is JobState.CANCELLED


@pytest.mark.parametrize("value", [None, 7])
async def test_a_thread_task_that_returns_as_its_cancel_arrives_is_recorded_succeeded(
    amqp_url: str, make_tasks: Callable[..., Tasks], queue_name: str, value: int | None
) -> None:
    """A plain `def` task stops for a cancel request by raising `Cancelled`; one that returns
    instead ran to its end: recorded `succeeded` with its value, whatever it is. Before, a
    `None` returned after the request had reached it was recorded `cancelled` (and
    `result()` raised JobCancelledError) where 7 was `succeeded`: the work was done all the
    same."""
    tasks = make_tasks()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    finished = threading.Event()

    @tasks.task(queue=queue_name)
    def finish(value: int | None) -> int | None:
        job = current_job()
        assert job is not None
        loop.call_soon_threadsafe(started.set)
        deadline = time.monotonic() + 20
        while not job.cancelled and time.monotonic() < deadline:  # the request reached it
            time.sleep(0.01)
        assert job.cancelled
        finished.set()  # its work is done: it returns without looking at the flag again
        return value

    job = await finish.enqueue(value)
    async with running(tasks, amqp_url):
        async with asyncio.timeout(20):
            await started.wait()
        await job.cancel()
        status = await until(job, lambda s: s.done)
    assert finished.is_set()
    assert status.state is JobState.SUCCEEDED, status
    assert await job.result(timeout=5) == value


async def test_a_thread_task_that_raises_cancelled_as_its_cancel_arrives_is_cancelled(
    amqp_url: str, make_tasks: Callable[..., Tasks], queue_name: str
) -> None:
    """The other side of the test above: `Cancelled` raised (here without its flag looked
    at) ends the job `cancelled`, never `succeeded`."""
    tasks = make_tasks()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    @tasks.task(queue=queue_name)
    def stop() -> None:
        job = current_job()
        assert job is not None
        loop.call_soon_threadsafe(started.set)
        deadline = time.monotonic() + 20
        while not job.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        raise Cancelled("stopping")

    job = await stop.enqueue()
    async with running(tasks, amqp_url):
        async with asyncio.timeout(20):
            await started.wait()
        await job.cancel()
        status = await until(job, lambda s: s.done)
    assert status.state is JobState.CANCELLED, status
    with pytest.raises(JobCancelledError):
        await job.result(timeout=5)


async def test_result_with_a_timeout_raises_a_typed_timeout(
    make_tasks: Callable[..., Tasks], queue_name: str
) -> None:
    tasks = make_tasks()

    @tasks.task(queue=queue_name)
    async def never_run() -> None: ...

    job = await never_run.enqueue()  # no worker runs
    started = time.monotonic()
    with pytest.raises(JobTimeoutError, match="not done within 0.3 s") as timed_out:
        await job.result(timeout=0.3)
    assert isinstance(timed_out.value, TimeoutError)
    assert time.monotonic() - started < 5
    assert tasks.store is not None
    await tasks.store.close()


async def test_a_finished_job_expires_after_the_ttl(
    amqp_url: str, make_tasks: Callable[..., Tasks], queue_name: str
) -> None:
    tasks = make_tasks(ttl=1.0)

    @tasks.task(queue=queue_name)
    async def quick() -> int:
        return 42

    job = await quick.enqueue()
    async with running(tasks, amqp_url):
        assert await job.result(timeout=20) == 42
        async with asyncio.timeout(10):
            while True:
                try:
                    await job.status()
                except JobNotFoundError:
                    break
                await asyncio.sleep(0.1)
        with pytest.raises(JobNotFoundError):
            await job.result()
        # cancel() says why there is no record, as status() does (it said only "no record")
        with pytest.raises(JobNotFoundError, match="past the store's TTL"):
            await job.cancel()


async def test_the_store_down_does_not_stop_the_queue_and_the_status_catches_up(
    amqp_url: str,
    make_tasks: Callable[..., Tasks],
    queue_name: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = make_tasks(busy_timeout=0.05)
    ran = asyncio.Event()

    @tasks.task(queue=queue_name)
    async def important(n: int) -> int:
        ran.set()
        return n * 2

    assert tasks.store is not None
    await tasks.store.purge()  # the file and its table exist
    lock = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # every write of the store now fails: it is "down"
    try:
        job = await important.enqueue(21)  # the queued state can't be recorded: sent anyway
        async with running(tasks, amqp_url):
            async with asyncio.timeout(20):
                await ran.wait()  # the job ran while the store was down
            # the enqueue's record and the worker's states are kept (each said so) ...
            assert caplog.text.count("unreachable") >= 2, caplog.text
            lock.execute("ROLLBACK")
            status = await until(job, lambda s: s.done)  # ... and caught up
            assert status.state is JobState.SUCCEEDED
            assert await job.result() == 42
    finally:
        lock.close()


class CountingStore(SQLiteStore):
    """A SQLite store that notes the size of each batch it records."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        self.batches.append(len(writes))
        return await super().record(writes)


async def test_concurrent_enqueues_share_store_transactions_and_each_is_found_on_return(
    producer: Producer, tmp_path: Path, queue_name: str
) -> None:
    store = CountingStore(tmp_path / "jobs.db")
    tasks = Tasks(producer=producer, store=store)

    @tasks.task(queue=queue_name)
    async def noop(i: int) -> int:
        return i

    async def enqueue_and_read(i: int) -> None:
        job = await noop.enqueue(i)
        status = await job.status()  # recorded by the time enqueue returns
        assert status.state is JobState.QUEUED

    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(enqueue_and_read(i) for i in range(50)))
    finally:
        await store.close()
    assert sum(store.batches) == 50
    assert len(store.batches) < 50, store.batches  # not one transaction per enqueue
