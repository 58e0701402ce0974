"""aio_workq.jobs where processes, shutdowns and waits meet, on a real broker: a cancel request
that outlives the run it was made for, the store's cancel checks, waits while the store is
away."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aio_workq import HandleInfo, Hook, JobView, Producer, Worker
from aio_workq.jobs import (
    GroupResult,
    JobCancelledError,
    JobState,
    JobStore,
    SQLiteStore,
    StoreError,
    Tasks,
    Write,
    group,
)
from aio_workq.jobs.postgres import PostgresStore, migrate
from scripts.postgres import LocalPostgres
from tests.test_jobs import until

pytestmark = pytest.mark.broker


class Settled(Hook):
    """Sets `came` once `n` deliveries were handled (`handling`), `settled` once `settles`
    (default `n`) were settled."""

    def __init__(self, n: int, settles: int | None = None) -> None:
        self.n, self.settles = n, n if settles is None else settles
        self.came, self.settled = asyncio.Event(), asyncio.Event()

    def handling(self, job: JobView, queue: str) -> None:
        self.n -= 1
        if self.n <= 0:
            self.came.set()

    def after_handle(self, info: HandleInfo) -> None:
        self.settles -= 1
        if self.settles <= 0:
            self.settled.set()


async def start(workers: list[Worker]) -> list[Worker]:
    for worker in workers:
        await worker.start()
    return workers


async def stop(workers: list[Worker], timeout: float = 1.0) -> None:
    for worker in workers:
        await worker.stop(timeout=timeout)


async def test_a_job_stopped_by_a_worker_stop_after_its_cancel_request_ends_cancelled(
    amqp_url: str, producer: Producer, tmp_path: Path, queue_name: str
) -> None:
    """A thread task does not check its cancel flag; the worker stops while it runs, so the
    job goes back to the queue (`queued`) with its cancel request kept. The next worker's claim
    is refused for the request and the message acked: the job must end `cancelled`, not stay
    `queued` for ever with no message left to run it."""
    store = SQLiteStore(tmp_path / "jobs.db")
    tasks = Tasks(producer=producer, store=store)
    loop = asyncio.get_running_loop()
    started, release = asyncio.Event(), threading.Event()
    runs = 0

    @tasks.task(queue=queue_name)
    def stubborn() -> str:
        nonlocal runs
        runs += 1
        loop.call_soon_threadsafe(started.set)
        release.wait(30)  # never looks at current_job().cancelled
        return "done"

    job = await stubborn.enqueue()
    try:
        workers = await start(tasks.workers(amqp_url))
        try:
            async with asyncio.timeout(20):
                await started.wait()
            status = await job.cancel()
            assert status.state is JobState.RUNNING and status.cancel_requested
        finally:
            await stop(workers, timeout=0.3)  # the thread runs on: the delivery is requeued
            release.set()
        status = await until(job, lambda s: s.state is not JobState.RUNNING)
        assert status.state is JobState.QUEUED and status.cancel_requested
        workers = await start(tasks.workers(amqp_url))
        try:
            status = await until(job, lambda s: s.done)
            assert status.state is JobState.CANCELLED
            with pytest.raises(JobCancelledError):
                await job.result(timeout=5)
        finally:
            await stop(workers)
        assert runs == 1
    finally:
        await store.close()


async def test_one_job_id_enqueued_by_two_processes_at_once_runs_once(
    amqp_url: str, tmp_path: Path, queue_name: str
) -> None:
    """`options(job_id=...)` makes an enqueue safe to repeat: two processes (two producers,
    two registries on one store file) enqueue the same id at once, so two messages are on the
    queue. The second delivery's claim, while the first runs, must be refused: one run, one
    result for both handles. (Before, both ran, at once, each with its own arguments.)"""
    runs: list[int] = []
    release = asyncio.Event()
    registries = []
    async with Producer(amqp_url) as first, Producer(amqp_url) as second:
        for producer in (first, second):
            tasks = Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db"))

            @tasks.task(queue=queue_name, name="roads.once")
            async def once(n: int) -> int:
                runs.append(n)
                await release.wait()
                return n

            registries.append((tasks, once))
        (tasks, task_a), (other, task_b) = registries
        try:
            handles = await asyncio.gather(
                task_a.options(job_id="roads-once").enqueue(1),
                task_b.options(job_id="roads-once").enqueue(2),
            )
            hook = Settled(2)
            workers = await start(tasks.workers(amqp_url, concurrency=4, hooks=[hook]))
            try:
                async with asyncio.timeout(20):
                    await hook.came.wait()
                release.set()
                async with asyncio.timeout(20):
                    await hook.settled.wait()
                results = [await handle.result(timeout=20) for handle in handles]
                assert results[0] == results[1] == runs[0]
            finally:
                await stop(workers)
            assert len(runs) == 1, runs
            status = await handles[1].status()
            assert status.state is JobState.SUCCEEDED and status.attempt == 1
        finally:
            for registry, _ in registries:
                assert registry.store is not None
                await registry.store.close()


@pytest.fixture
def store(every_store: JobStore) -> JobStore:
    return every_store  # conftest: a MemoryStore, a SQLiteStore and a PostgresStore in turn


def _w(job_id: str, state: JobState, attempt: int = 1, **fields: Any) -> Write:
    return Write(
        job_id=job_id, task="t", queue="q", state=state, at=time.time(), attempt=attempt, **fields
    )


async def _state(store: JobStore, job_id: str) -> JobState:
    record = await store.get(job_id)
    assert record is not None
    return record.status.state


async def test_a_claim_is_refused_to_a_second_message_of_a_run_not_to_a_redelivery(
    store: JobStore,
) -> None:
    """The claim rules on every store: a fresh delivery of a job running (or retrying) in the
    same run is a second message of one job id and is refused; a redelivered one (its worker
    gone) is granted; a later attempt and a replay of a failed job are granted; a refused
    claim's `CANCELLED` follow-up applies only to a job whose cancel was requested."""
    running, claim, reclaim = JobState.RUNNING, {"claim": True}, {"claim": True, "requeue": True}
    assert await store.record([_w("a", JobState.QUEUED), _w("a", running, **claim)]) == [True] * 2
    assert await store.record([_w("a", running, **claim)]) == [False]  # a second message
    assert await store.record([_w("a", JobState.CANCELLED, **claim)]) == [False]
    assert await _state(store, "a") is running  # the first run goes on
    assert await store.record([_w("a", running, **reclaim)]) == [True]  # its worker died
    # Two messages claimed in one batch: the first wins.
    assert await store.record([_w("b", running, **claim), _w("b", running, **claim)]) == [
        True, False,
    ]  # fmt: skip
    # Retrying: the second message of attempt 1 is refused, attempt 2 is granted.
    assert await store.record([_w("c", JobState.RETRYING)]) == [True]
    assert await store.record([_w("c", running, **claim)]) == [False]
    assert await store.record([_w("c", running, 2, **claim)]) == [True]
    # A failed job replayed from its dead-letter queue runs again.
    assert await store.record([_w("d", JobState.FAILED)]) == [True]
    assert await store.record([_w("d", running, **claim)]) == [True]
    # A cancel requested while it ran: the claim is refused, the follow-up cancels it.
    assert await store.record([_w("e", running, **claim)]) == [True]
    status = await store.cancel("e", now=time.time())
    assert status is not None and status.cancel_requested
    assert await store.record([_w("e", running, **reclaim)]) == [False]
    assert await store.record([_w("e", JobState.CANCELLED, **claim)]) == [True]
    assert await _state(store, "e") is JobState.CANCELLED


async def test_a_group_enqueued_again_while_a_member_runs_counts_the_member_by_its_run(
    amqp_url: str, producer: Producer, tmp_path: Path, queue_name: str
) -> None:
    """`group(..., group_id=...).enqueue()` again (after an error, as its docstring invites)
    while a member runs: the member's second message is skipped, and must not count the
    member as cancelled in the group; the run that goes on finishes it."""
    store = SQLiteStore(tmp_path / "jobs.db")
    tasks = Tasks(producer=producer, store=store)
    started, release = asyncio.Event(), asyncio.Event()
    runs: list[int] = []

    @tasks.task(queue=queue_name, name="roads.member")
    async def member(n: int) -> int:
        runs.append(n)
        started.set()
        await release.wait()
        return n * 10

    @tasks.task(queue=queue_name, name="roads.report")
    async def report(results: list[GroupResult]) -> list[str]:
        return [f"{r.state}:{r.value}" for r in results]

    made = group([member.s(1)], then=report, group_id="roads-group")
    hook = Settled(2, settles=1)  # the member's two deliveries; the second one skipped
    try:
        handle = await made.enqueue()
        workers = await start(tasks.workers(amqp_url, concurrency=4, hooks=[hook]))
        try:
            async with asyncio.timeout(20):
                await started.wait()
            await made.enqueue()  # the member's second message
            async with asyncio.timeout(20):
                await hook.settled.wait()
            release.set()
            assert await handle.result(timeout=20) == ["succeeded:10"]
        finally:
            await stop(workers)
        assert runs == [1]
    finally:
        await store.close()


@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_a_read_waiting_for_a_connection_when_the_fresh_pool_takes_over_is_answered(
    own_postgres: LocalPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """After an outage, the store's fresh pool replaces the reconnecting one (closed in the
    background). A read waiting on the old pool's connection then got psycopg's "the pool is
    closed" as a `StoreError`, with the server up again: a `job.result(timeout=...)` across a
    restart ended in an error instead of its answer. It now waits on the fresh pool."""
    caplog.set_level(logging.CRITICAL, logger="psycopg.pool")  # its "error connecting" lines
    caplog.set_level(logging.INFO, logger="aio_workq.jobs")
    schema = f"j_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(own_postgres.dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
    store = PostgresStore(own_postgres.dsn, schema=schema)  # timeout 5 s
    try:
        assert await store.record([_w("a", JobState.QUEUED)]) == [True]
        await asyncio.to_thread(own_postgres.stop)
        down_at = time.monotonic()
        while True:  # the broken connections, then no connection: the store probes
            with pytest.raises(StoreError) as failed:
                await store.get("a")
            if "couldn't get a connection" in str(failed.value):
                break
        # The old pool's next attempt is its backoff away (7 s, then 15 s into the outage).
        await asyncio.sleep(max(0.0, 8.0 - (time.monotonic() - down_at)))
        waiting = asyncio.ensure_future(store.get("a"))  # waits on the old pool
        await asyncio.to_thread(own_postgres.start)
        record = await waiting  # the fresh pool took over meanwhile (the store probes each 1 s)
        assert record is not None and record.status.state is JobState.QUEUED
        assert any("fresh pool" in r.getMessage() for r in caplog.records)
    finally:
        await store.close()


async def test_a_job_whose_second_message_was_skipped_can_still_be_cancelled(
    amqp_url: str, tmp_path: Path, queue_name: str
) -> None:
    """Both messages of one job id reach the same worker process: the second one's claim is
    refused and it is settled at once, while the first runs. Settling it must not make the
    worker forget the run: `cancel()` stops it (before, the control message found no job of
    that id here, nor did the store checks, and the job ran to its end)."""
    started, cancelled = asyncio.Event(), asyncio.Event()
    registries = []
    async with Producer(amqp_url) as first, Producer(amqp_url) as second:
        for producer in (first, second):
            tasks = Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db"))

            @tasks.task(queue=queue_name, name="roads.forever")
            async def forever() -> None:
                started.set()
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise

            registries.append((tasks, forever))
        (tasks, task_a), (_, task_b) = registries
        try:
            handles = await asyncio.gather(
                task_a.options(job_id="roads-forever").enqueue(),
                task_b.options(job_id="roads-forever").enqueue(),
            )
            hook = Settled(2, settles=1)  # two deliveries; the second skipped
            workers = await start(tasks.workers(amqp_url, concurrency=4, hooks=[hook]))
            try:
                async with asyncio.timeout(20):
                    await started.wait()
                    await hook.settled.wait()
                status = await handles[0].cancel()
                assert status.state is JobState.RUNNING and status.cancel_requested
                async with asyncio.timeout(15):
                    await cancelled.wait()
                status = await until(handles[1], lambda s: s.done)
                assert status.state is JobState.CANCELLED
            finally:
                await stop(workers)
        finally:
            for registry, _ in registries:
                assert registry.store is not None
                await registry.store.close()
