"""A tracked enqueue's `queued` record goes out with its publish (#23 item 8, round 4): the
record while the publish waits for its confirm, the withdrawal of a record whose publish
failed (a typed error, a cancelled enqueue), a confirm lost though the message arrived, a
worker quicker than the record, and what a concurrent reader sees, on a real broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aio_workq import ConnectionLostError, Producer, PublishNackedError, Queue
from aio_workq.jobs import (
    JobState,
    JobStore,
    MemoryStore,
    SQLiteStore,
    StoreError,
    Tasks,
    Write,
)
from aio_workq.jobs._recorder import GroupCommit
from aio_workq.jobs._status import withdrawal
from aio_workq.jobs.postgres import PostgresStore, migrate

pytestmark = pytest.mark.broker

WAIT = 20.0


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite":
        made = SQLiteStore(tmp_path / "jobs.db")
        yield made
        await made.close()
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        schema = f"j_{uuid.uuid4().hex[:12]}"
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await migrate(conn, schema=schema)
            pg = PostgresStore(dsn, schema=schema)
            yield pg
            await pg.close()
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _w(job_id: str, state: JobState, **fields: Any) -> Write:
    return Write(job_id=job_id, task="t", queue="q", state=state, at=time.time(), **fields)


async def _state(store: JobStore, job_id: str) -> JobState | None:
    record = await store.get(job_id)
    return None if record is None else record.status.state


async def test_a_withdrawal_deletes_only_the_enqueues_own_queued_record(store: JobStore) -> None:
    """On every store: a withdrawal deletes a record that is still the enqueue's `queued`
    (alone, or after it in one batch); it leaves alone a job a worker claimed, finished or
    handed back to its queue (started before), a cancelled one, and an unknown id; the
    enqueue's `queued` never overwrites a worker's state that landed first (`RANK`)."""
    queued = _w("a", JobState.QUEUED)
    assert await store.record([queued]) == [True]
    assert await store.record([withdrawal(queued, time.time())]) == [True]
    assert await _state(store, "a") is None
    # In one batch with its record, and beside other jobs' writes.
    b, c = _w("b", JobState.QUEUED), _w("c", JobState.QUEUED)
    assert await store.record([b, c, withdrawal(b, time.time())]) == [True] * 3
    assert (await _state(store, "b"), await _state(store, "c")) == (None, JobState.QUEUED)
    # A worker's claim (or outcome) landed before the enqueue's record, or between it and
    # the withdrawal: the record stays the worker's.
    for job_id, state in (("d", JobState.RUNNING), ("e", JobState.SUCCEEDED)):
        claim = {"claim": True} if state is JobState.RUNNING else {}
        assert await store.record([_w(job_id, state, **claim)]) == [True]
        late = _w(job_id, JobState.QUEUED)
        assert await store.record([late]) == [False]  # RANK: never over running/succeeded
        assert await store.record([withdrawal(late, time.time())]) == [False]
        assert await _state(store, job_id) is state
    # Handed back to its queue by a stopping worker: queued again, but it was started.
    f = _w("f", JobState.QUEUED)
    assert await store.record([f, _w("f", JobState.RUNNING, claim=True)]) == [True, True]
    assert await store.record([_w("f", JobState.QUEUED, requeue=True)]) == [True]
    assert await store.record([withdrawal(f, time.time())]) == [False]
    assert await _state(store, "f") is JobState.QUEUED
    # Cancelled while queued: stays cancelled.
    g = _w("g", JobState.QUEUED)
    assert await store.record([g]) == [True]
    assert await store.cancel("g", now=time.time()) is not None
    assert await store.record([withdrawal(g, time.time())]) == [False]
    assert await _state(store, "g") is JobState.CANCELLED
    assert await store.record([withdrawal(_w("h", JobState.QUEUED), time.time())]) == [False]


class Gate:
    """A `Publisher` in front of a real producer: `publish` waits for `open` first (and
    says it arrived), then publishes, then, if `after` is set, waits for `lose` and raises
    `after`: a confirm lost though the message was sent."""

    def __init__(self, producer: Producer, *, after: BaseException | None = None) -> None:
        self.producer, self.after = producer, after
        self.arrived, self.open, self.lose = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def publish(self, body: Any, queue: Any = None, **options: Any) -> str:
        self.arrived.set()
        await self.open.wait()
        confirm = await self.producer.publish(body, queue, **options)
        if self.after is not None:
            await self.lose.wait()
            raise self.after
        return confirm


class Watched(MemoryStore):
    """A `MemoryStore` that keeps each withdrawal's answer (`withdrawals`) and sets
    `withdrawn` once one was applied or refused."""

    def __init__(self) -> None:
        super().__init__()
        self.withdrawals: dict[str, bool] = {}
        self.withdrawn = asyncio.Event()

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        return _watch(self, writes, await super().record(writes))


class WatchedSQLite(SQLiteStore):
    """`Watched`, on a SQLite file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.withdrawals: dict[str, bool] = {}
        self.withdrawn = asyncio.Event()

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        return _watch(self, writes, await super().record(writes))


def _watch(
    store: Watched | WatchedSQLite, writes: Sequence[Write], applied: list[bool]
) -> list[bool]:
    for write, answer in zip(writes, applied, strict=True):
        if write.withdraws:
            store.withdrawals[write.job_id] = answer
            store.withdrawn.set()
    return applied


async def _until(store: JobStore, job_id: str, states: Sequence[JobState | None]) -> None:
    """Polled (a store has no event to wait on), within `WAIT`."""
    async with asyncio.timeout(WAIT):
        while True:
            if await _state(store, job_id) in states:
                return
            await asyncio.sleep(0.02)


async def test_the_queued_record_is_written_while_the_publish_waits_for_its_confirm(
    producer: Producer, queue_name: str
) -> None:
    """The overlap itself: the record is committed before the publish returns (before, the
    record was sent only once the confirm was back: two round trips one after the other)."""
    store = MemoryStore()
    tasks = Tasks(producer=producer, store=store)

    @tasks.task(queue=queue_name)
    def echo(n: int) -> int:
        return n

    gate = Gate(producer)
    task = echo.options(job_id="overlap")
    enqueue = asyncio.ensure_future(task.send(task.arguments.encode((1,), {}), gate, tasks))
    async with asyncio.timeout(WAIT):
        await gate.arrived.wait()
    await _until(store, "overlap", [JobState.QUEUED])  # the publish still waits
    assert not enqueue.done()
    gate.open.set()
    handle = await asyncio.wait_for(enqueue, WAIT)
    assert (await handle.status()).state is JobState.QUEUED


async def test_a_nacked_enqueue_raises_typed_and_leaves_no_queued_record(
    producer: Producer, queue_name: str, tmp_path: Path
) -> None:
    """A publish the broker refuses (a full queue that rejects): the caller gets the typed
    error and the `queued` record sent with the publish is taken back: the id reads unknown,
    as it did when the record was written only after the confirm; the same id enqueued
    again once there is room is recorded and found."""
    store = WatchedSQLite(tmp_path / "jobs.db")
    tasks = Tasks(producer=producer, store=store)
    full = Queue(queue_name, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})

    @tasks.task(queue=full)
    def echo(n: int) -> int:
        return n

    try:
        refused = None
        for n in range(4):  # a quorum queue takes one past its length
            try:
                await echo.options(job_id=f"n{n}").enqueue(n)
            except PublishNackedError:
                refused = f"n{n}"
                break
        assert refused is not None and refused != "n0"
        async with asyncio.timeout(WAIT):
            await store.withdrawn.wait()
        assert store.withdrawals == {refused: True}  # its record was written, then taken back
        assert await _state(store, refused) is None
        assert await _state(store, "n0") is JobState.QUEUED
    finally:
        await store.close()


async def test_a_cancelled_enqueue_takes_its_queued_record_back(
    producer: Producer, queue_name: str
) -> None:
    """The enqueuing task cancelled while its publish waits: the record is taken back (the
    job may or may not have gone out; if it did, its worker's claim records it)."""
    store = MemoryStore()
    tasks = Tasks(producer=producer, store=store)

    @tasks.task(queue=queue_name)
    def echo(n: int) -> int:
        return n

    gate = Gate(producer)
    task = echo.options(job_id="cancelled-enqueue")
    enqueue = asyncio.ensure_future(task.send(task.arguments.encode((1,), {}), gate, tasks))
    async with asyncio.timeout(WAIT):
        await gate.arrived.wait()
    await _until(store, "cancelled-enqueue", [JobState.QUEUED])
    enqueue.cancel()
    with pytest.raises(asyncio.CancelledError):
        await enqueue
    await _until(store, "cancelled-enqueue", [None])


async def test_a_lost_confirm_of_a_delivered_job_never_hides_its_run(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    """The publish went out but its confirm was lost (a typed error to the caller): if the
    worker's claim landed first, the withdrawal leaves it and the job reads as it runs; if the
    withdrawal landed first, the id reads unknown until the worker claims it, then as it
    ran. Never `queued` forever, never a run hidden."""
    store = Watched()
    tasks = Tasks(producer=producer, store=store)
    release = asyncio.Event()

    @tasks.task(queue=queue_name)
    async def echo(n: int) -> int:
        await release.wait()
        return n

    lost = ConnectionLostError("the confirm was lost (test)")
    workers = tasks.workers(amqp_url, concurrency=2)
    for worker in workers:
        await worker.start()
    try:
        # 1. The worker runs it before the enqueue learns its publish failed.
        gate = Gate(producer, after=lost)
        gate.open.set()
        task = echo.options(job_id="claimed-first")
        enqueue = asyncio.ensure_future(task.send(task.arguments.encode((1,), {}), gate, tasks))
        await _until(store, "claimed-first", [JobState.RUNNING])
        gate.lose.set()
        with pytest.raises(ConnectionLostError):
            await asyncio.wait_for(enqueue, WAIT)
        async with asyncio.timeout(WAIT):
            await store.withdrawn.wait()
        assert store.withdrawals == {"claimed-first": False}
        assert await _state(store, "claimed-first") is JobState.RUNNING
        release.set()
        await _until(store, "claimed-first", [JobState.SUCCEEDED])
    finally:
        for worker in workers:
            await worker.stop(timeout=1)
    # 2. No worker yet: the withdrawal lands first; the job waits in its queue.
    release.clear()
    store.withdrawn.clear()
    gate = Gate(producer, after=lost)
    gate.open.set()
    gate.lose.set()
    task = echo.options(job_id="withdrawn-first")
    with pytest.raises(ConnectionLostError):
        await task.send(task.arguments.encode((2,), {}), gate, tasks)
    async with asyncio.timeout(WAIT):
        await store.withdrawn.wait()
    assert store.withdrawals["withdrawn-first"] is True
    assert await _state(store, "withdrawn-first") is None
    release.set()
    seen: list[JobState | None] = []
    workers = tasks.workers(amqp_url, concurrency=2)
    for worker in workers:
        await worker.start()
    try:
        async with asyncio.timeout(WAIT):
            while True:
                state = await _state(store, "withdrawn-first")
                if state is JobState.SUCCEEDED:
                    break
                seen.append(state)
                await asyncio.sleep(0.01)
    finally:
        for worker in workers:
            await worker.stop(timeout=1)
    assert JobState.QUEUED not in seen, seen


class HeldQueued(MemoryStore):
    """A `MemoryStore` whose batches holding an enqueue's `queued` record wait for `release`:
    a worker quicker than the record."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        if any(w.state is JobState.QUEUED and not w.requeue and w.attempt for w in writes):
            await self.release.wait()
        return await super().record(writes)


async def test_a_worker_quicker_than_the_queued_record_keeps_its_states_in_order(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    """The job runs and succeeds before its `queued` record commits: the record lands after
    and changes nothing (`RANK`); a reader polling meanwhile sees the states only in order
    (unknown, then running/succeeded; never `queued` after them)."""
    store = HeldQueued()
    tasks = Tasks(producer=producer, store=store)

    @tasks.task(queue=queue_name)
    def echo(n: int) -> int:
        return n

    seen: list[JobState | None] = []
    stop = asyncio.Event()

    async def read() -> None:
        while not stop.is_set():
            state = await _state(store, "quick")
            if not seen or seen[-1] is not state:
                seen.append(state)
            await asyncio.sleep(0.005)

    reader = asyncio.ensure_future(read())
    workers = tasks.workers(amqp_url, concurrency=2)
    for worker in workers:
        await worker.start()
    try:
        enqueue = asyncio.ensure_future(echo.options(job_id="quick").enqueue(7))
        await _until(store, "quick", [JobState.SUCCEEDED])
        assert not enqueue.done()  # it waits for its record
        store.release.set()
        handle = await asyncio.wait_for(enqueue, WAIT)
        assert await handle.result(timeout=WAIT) == 7
        assert (await handle.status()).state is JobState.SUCCEEDED
    finally:
        stop.set()
        await reader
        for worker in workers:
            await worker.stop(timeout=1)
    order = [None, JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen), seen


class Failing(MemoryStore):
    """A `MemoryStore` that fails every batch while `down` (the store unreachable)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.tried = asyncio.Event()

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        self.tried.set()
        if self.down:
            raise StoreError("down (test)")
        return await super().record(writes)


@pytest.mark.parametrize("together", [True, False])
async def test_a_withdrawal_while_the_store_is_down_leaves_no_record_once_it_is_back(
    together: bool,
) -> None:
    """The store down: the enqueue's record is kept for the catch-up, and its withdrawal
    replaces it there, whether they failed in one batch (`together`) or the withdrawal came
    once the store counted as down: once the store answers, nothing reads `queued`."""
    store = Failing()
    commits = GroupCommit(store, timeout=1.0)
    queued = _w("x", JobState.QUEUED)
    committed = commits.commit(queued)
    if not together:
        assert await asyncio.wait_for(committed, WAIT)  # failed: at once, kept
    commits.withdraw(queued)
    if together:
        assert await asyncio.wait_for(committed, WAIT)
    store.down = False
    await commits.close(timeout=WAIT)
    assert await _state(store, "x") is None
    assert store.tried.is_set()
