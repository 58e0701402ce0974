"""The job layer's side roads under faults (review5): clocks that disagree, callers cancelled
mid-call, a store restarted under a waiting call."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from aio_workq import IntegrationError, Producer
from aio_workq.jobs import (
    GroupResult,
    JobRecord,
    JobState,
    RateLimit,
    SQLiteStore,
    Tasks,
    Write,
    group,
)
from aio_workq.jobs._groupstore import CallbackDue
from aio_workq.jobs.postgres import PostgresStore, migrate
from scripts.postgres import LocalPostgres
from tests.forking import fork_running
from tests.test_jobs import running


@pytest.fixture
async def pg_store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    """A `PostgresStore` on a fresh schema, dropped after."""
    schema = f"f_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
    store = PostgresStore(postgres_dsn, schema=schema)
    try:
        yield store
    finally:
        await store.close()
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.mark.postgres
@pytest.mark.parametrize("skew", [30.0, -30.0])
async def test_two_workers_whose_clocks_disagree_share_a_rate_limit_by_the_stores_clock(
    pg_store: PostgresStore, skew: float
) -> None:
    """Two worker hosts, one's clock `skew` seconds off the other's, run jobs of one task
    limited to 1/s. Each reserved its slot by its own clock: after the fast clock took a slot,
    the slow one found the next one 31 s away and deferred its jobs (again and again while
    the fast one ran: its defers run out, the job is dead-lettered); after the slow one, the
    fast one found the slot 29 s in the past and ran at once (the limit exceeded: 2 jobs in
    a second). Now PostgreSQL's clock decides the slots: the second worker waits one
    interval, whichever clock is ahead."""
    limit = RateLimit.of("1/s")
    key = limit.bucket("clock.task", {})

    async def take(now: float) -> float:
        return await pg_store.take_token(
            key, interval=limit.interval, tau=limit.tau, max_wait=limit.max_wait, now=now
        )

    first = await take(time.time() + skew)  # the first host, its clock off by `skew`
    second = await take(time.time())  # the second host, on time
    assert first <= 0.0  # an idle bucket: at once
    assert 0.8 <= second <= 1.0 + 0.2, second  # the next slot: one interval on, no more


class _StopsAfterARead(PostgresStore):
    """A `PostgresStore` whose server stops (for real) right after the first read answered:
    the outage comes between two reads of one call."""

    def __init__(self, node: LocalPostgres, schema: str) -> None:
        super().__init__(node.dsn, schema=schema, timeout=2.0)
        self.node = node
        self.reads = 0

    async def get(self, job_id: str) -> JobRecord | None:
        record = await super().get(job_id)
        self.reads += 1
        if self.reads == 1:
            await asyncio.to_thread(self.node.stop)
        return record


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_a_result_read_when_the_store_goes_down_after_the_job_was_found_done_is_returned(
    own_postgres: LocalPostgres,
) -> None:
    """`result(timeout=...)` read the job's record twice: once (and more) to wait until it
    was done, then again for its value. PostgreSQL going down between the two (a restart,
    a failover) made the second read raise `StoreError` at once, although the first had the
    value and the timeout had time left (a wait rides through an outage until its deadline);
    a store that hung there stretched the call past its timeout by the store's own (5 s).
    The value now comes from the read that found the job done."""
    schema = f"f_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(own_postgres.dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
    store = _StopsAfterARead(own_postgres, schema)
    try:
        write = Write(
            job_id="done", task="t", queue="q", state=JobState.SUCCEEDED, at=time.time(),
            result=b"42", content_type="application/json",
        )  # fmt: skip
        assert await store.record([write]) == [True]
        started = time.monotonic()
        assert await Tasks(store=store).job("done").result(timeout=10) == 42
        assert time.monotonic() - started < 10
        assert store.reads == 1
    finally:
        await store.close()


@pytest.mark.broker
async def test_an_enqueue_in_a_forked_child_through_the_parents_producer_says_fork(
    amqp_url: str, queue_name: str
) -> None:
    """A pre-forking server that started its `Producer` (and bound its `Tasks`) before
    `fork()`: an enqueue in a child was refused with "started on another event loop (running
    in another thread)" and advice about Django's views and threads, none of which the
    child has. It now says the producer was started before fork(), in another process, and
    to start one in each process after the fork; the parent's connection is untouched."""
    async with Producer(amqp_url) as producer:
        tasks = Tasks(producer=producer)

        @tasks.task(queue=queue_name, name="fork.echo")
        async def echo(i: int) -> int:
            return i

        await echo.enqueue(1)

        async def child() -> None:
            with pytest.raises(IntegrationError) as refused:
                await echo.enqueue(2)
            message = str(refused.value)
            assert "fork()" in message and "another thread" not in message, message

        forked = fork_running(child, timeout=20)
        await forked.wait()
        await echo.enqueue(3)  # the parent's producer goes on


@pytest.mark.broker
@pytest.mark.parametrize("callback_queue", ["classic, declared", "quorum, not declared yet"])
async def test_a_groups_callback_is_sent_by_a_member_worker_that_does_not_run_its_task(
    amqp_url: str, tmp_path: Path, producer: Producer, callback_queue: str
) -> None:
    """The members run on workers of a registry without the callback's task (another
    service). The worker that completes the group knew the callback's queue by name only and
    declared it with the default spec: a callback queue of another type or other arguments
    (here classic) refused that (PRECONDITION_FAILED), the member was deferred again and
    again, and the callback never ran. Now a queue that exists is published to as it is; one
    that does not is declared as before."""
    suffix = uuid.uuid4().hex[:8]
    store = tmp_path / "jobs.db"
    app = Tasks(producer=producer, store=SQLiteStore(store))  # enqueues, runs the callback
    members = Tasks(store=SQLiteStore(store))  # the members' service: no callback task

    async def square(n: int) -> int:
        return n * n

    async def total(results: list[GroupResult]) -> int:
        return sum(r.value for r in results)

    square_task = app.task(queue=f"m-{suffix}", name="faults.square")(square)
    members.task(queue=f"m-{suffix}", name="faults.square")(square)
    classic = callback_queue.startswith("classic")
    total_task = app.task(
        queue=f"r-{suffix}", name="faults.total", queue_type="classic" if classic else None
    )(total)
    if classic:
        await producer.declare(total_task.queue)
    async with running(members, amqp_url):
        handle = await group([square_task.s(n) for n in range(3)], then=total_task).enqueue()
        for member in handle.members:  # the group completes with no callback worker up
            assert await member.result(timeout=20) in (0, 1, 4)
        async with running(app, amqp_url, queues=[f"r-{suffix}"]):
            assert await handle.result(timeout=20) == 5


class _HangsAfterTheLastFinish(SQLiteStore):
    """A `SQLiteStore` whose `finish_member` that claims the callback commits, then hangs
    (until cancelled): the worker is stopped right after the member's terminal write."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.claimed = asyncio.Event()

    async def finish_member(self, write: Write, *, group_id: str, index: int) -> CallbackDue | None:
        due = await super().finish_member(write, group_id=group_id, index=index)
        if due is not None and not self.claimed.is_set():
            self.claimed.set()
            await asyncio.Event().wait()  # the stop's cancellation ends this
        return due


@pytest.mark.broker
async def test_a_worker_stopped_after_the_last_members_terminal_write_sends_the_callback_once(
    amqp_url: str, tmp_path: Path, producer: Producer
) -> None:
    """SIGTERM (a graceful stop whose timeout runs out) while the member that completes the
    group is between its terminal write (committed, the callback claimed) and the callback's
    publish: the member is not acked, comes back to the next worker, finds the callback
    claimed and not published, and publishes it; the callback runs once."""
    suffix = uuid.uuid4().hex[:8]
    store = _HangsAfterTheLastFinish(tmp_path / "jobs.db")
    tasks = Tasks(producer=producer, store=store)
    ran: list[int] = []

    @tasks.task(queue=f"m-{suffix}", name="faults.one")
    async def one(n: int) -> int:
        return n

    @tasks.task(queue=f"r-{suffix}", name="faults.sum")
    async def total(results: list[GroupResult]) -> int:
        ran.append(1)
        return sum(r.value for r in results)

    first = tasks.workers(amqp_url)
    for worker in first:
        await worker.start()
    handle = await group([one.s(n) for n in range(3)], then=total).enqueue()
    try:
        async with asyncio.timeout(20):
            await store.claimed.wait()
    finally:
        for worker in first:
            await worker.stop(timeout=0.2)
    async with running(tasks, amqp_url):
        assert await handle.result(timeout=20) == 3
    assert ran == [1]
