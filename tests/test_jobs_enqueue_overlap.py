"""A tracked enqueue's `queued` record goes out with its publish (#23 item 8, round 4), for a
store that can take a record back (`Withdrawals`): the record while the publish waits for its
confirm, the withdrawal of a record whose publish failed (a typed error, a cancelled
enqueue), a confirm lost though the message arrived, a worker quicker than the record, and
what a concurrent reader sees, on a real broker. A store of the old protocol (`JobStore`
only) keeps the sequential enqueue (publish, confirm, then `queued`) and is never sent a
withdrawal: the same cases, on both paths."""

from __future__ import annotations

import asyncio
import copy
import pickle
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from aio_workq import ConnectionLostError, Producer, PublishNackedError, Queue
from aio_workq.jobs import (
    JobHandle,
    JobRecord,
    JobState,
    JobStatus,
    JobStore,
    MemoryStore,
    SQLiteStore,
    StoreError,
    Tasks,
    Withdrawals,
    Write,
)
from aio_workq.jobs._recorder import GroupCommit
from aio_workq.jobs._status import Withdrawal, withdrawal
from aio_workq.jobs.postgres import PostgresStore

pytestmark = pytest.mark.broker

WAIT = 20.0


@pytest.fixture
def store(every_store: JobStore) -> JobStore:
    return every_store  # conftest: a MemoryStore, a SQLiteStore and a PostgresStore in turn


def _w(job_id: str, state: JobState, **fields: Any) -> Write:
    return Write(job_id=job_id, task="t", queue="q", state=state, at=time.time(), **fields)


async def _state(store: JobStore, job_id: str) -> JobState | None:
    record = await store.get(job_id)
    return None if record is None else record.status.state


async def _until(store: JobStore, job_id: str, states: Sequence[JobState | None]) -> None:
    """Polled (a store has no event to wait on), within `WAIT`."""
    async with asyncio.timeout(WAIT):
        while True:
            if await _state(store, job_id) in states:
                return
            await asyncio.sleep(0.02)


async def test_a_withdrawal_deletes_only_the_enqueues_own_queued_record(store: JobStore) -> None:
    """On every built-in store (each declares `Withdrawals`): `withdraw()` deletes a record
    that is still the enqueue's `queued` (alone, or sent in one batch of the enqueues right
    after it); it leaves alone a job a worker claimed, finished or handed back to its queue
    (started before), a cancelled one, and an unknown id; the enqueue's `queued` never
    overwrites a worker's state that landed first (`RANK`)."""
    assert isinstance(store, Withdrawals)
    assert await store.record([_w("a", JobState.QUEUED)]) == [True]
    assert await store.withdraw(["a"]) == {"a"}
    assert await _state(store, "a") is None
    # In one batch of the enqueues with its record, beside another job's: record() is sent
    # the two records, withdraw() the one taken back.
    commits = GroupCommit(store, timeout=WAIT)
    assert commits.overlaps
    b, c = _w("b", JobState.QUEUED), _w("c", JobState.QUEUED)
    committed = [commits.commit(b), commits.commit(c)]
    commits.withdraw(b)
    assert await asyncio.wait_for(asyncio.gather(*committed), WAIT) == [True, True]
    await commits.close(timeout=WAIT)
    assert (await _state(store, "b"), await _state(store, "c")) == (None, JobState.QUEUED)
    # A worker's claim (or outcome) landed before the enqueue's record, or between it and
    # the withdrawal: the record stays the worker's.
    for job_id, state in (("d", JobState.RUNNING), ("e", JobState.SUCCEEDED)):
        claim = {"claim": True} if state is JobState.RUNNING else {}
        assert await store.record([_w(job_id, state, **claim)]) == [True]
        assert await store.record([_w(job_id, JobState.QUEUED)]) == [False]  # RANK
        assert await store.withdraw([job_id]) == set()
        assert await _state(store, job_id) is state
    # Handed back to its queue by a stopping worker: queued again, but it was started.
    f = _w("f", JobState.QUEUED)
    assert await store.record([f, _w("f", JobState.RUNNING, claim=True)]) == [True, True]
    assert await store.record([_w("f", JobState.QUEUED, requeue=True)]) == [True]
    assert await store.withdraw(["f"]) == set()
    assert await _state(store, "f") is JobState.QUEUED
    # Cancelled while queued: stays cancelled.
    assert await store.record([_w("g", JobState.QUEUED)]) == [True]
    assert await store.cancel("g", now=time.time()) is not None
    assert await store.withdraw(["g"]) == set()
    assert await _state(store, "g") is JobState.CANCELLED
    assert await store.withdraw(["h"]) == set()


if TYPE_CHECKING:
    _Store = MemoryStore  # what the mixin's `super()` is: a store with `withdraw()`
else:
    _Store = object


class _Watching(_Store):
    """Keeps every write `record()` is sent (`received`), and each withdrawal's answer
    (`withdrawals`), setting `withdrawn` once one was answered; mixed into a store."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.received: list[Write] = []
        self.withdrawals: dict[str, bool] = {}
        self.withdrawn = asyncio.Event()

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        self.received.extend(writes)
        return await super().record(writes)

    async def withdraw(self, job_ids: Sequence[str]) -> set[str]:
        gone = await super().withdraw(job_ids)
        for job_id in job_ids:
            self.withdrawals[job_id] = job_id in gone
        self.withdrawn.set()
        return gone


class Watched(_Watching, MemoryStore):
    """A watched `MemoryStore` (`_Watching`)."""


class WatchedSQLite(_Watching, SQLiteStore):
    """A watched `SQLiteStore` (`_Watching`), on the file it is given."""


class OldStore:
    """A third-party store: only the `JobStore` protocol as it was before `Withdrawals`
    (`ttl`, `record`, `get`, `cancel`, `purge`, `close`), over another store's rows; keeps
    every write `record()` is sent (`received`). It would insert a `Withdrawal` as a
    `queued` row, as such a store would."""

    def __init__(self, rows: JobStore) -> None:
        self.rows = rows
        self.ttl = rows.ttl
        self.received: list[Write] = []

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        self.received.extend(writes)
        return await self.rows.record(writes)

    async def get(self, job_id: str) -> JobRecord | None:
        return await self.rows.get(job_id)

    async def cancel(self, job_id: str, *, now: float) -> JobStatus | None:
        return await self.rows.cancel(job_id, now=now)

    async def purge(self) -> int:
        return await self.rows.purge()

    async def close(self) -> None:
        await self.rows.close()


Tracked = Watched | WatchedSQLite | OldStore
PATHS = pytest.mark.parametrize("path", ["overlap", "sequential"])


def _made(path: str, sqlite: Path | None = None) -> Tracked:
    """The store of `path`: one that declares `Withdrawals` (the overlapped enqueue), or one
    of the old protocol (the sequential enqueue); in memory, or in the SQLite file `sqlite`."""
    if path == "sequential":
        return OldStore(MemoryStore() if sqlite is None else SQLiteStore(sqlite))
    return Watched() if sqlite is None else WatchedSQLite(sqlite)


async def _sent_so_far(tasks: Tasks, store: Tracked) -> list[Write]:
    """The enqueues' writes `store.record()` was sent up to now: a probe committed through
    the enqueues' batches after them (their record() calls were entered before its own)."""
    await asyncio.wait_for(tasks.commits(store).record(_w("probe", JobState.QUEUED)), WAIT)
    return [w for w in store.received if w.job_id != "probe"]


def _queued_of(store: Tracked, job_id: str) -> list[Write]:
    """The enqueue's `queued` writes of `job_id` that `record()` was sent (never one of
    withdrawal: checked for every write it was sent)."""
    assert not any(isinstance(w, Withdrawal) for w in store.received), store.received
    return [
        w for w in store.received if w.job_id == job_id and w.state is JobState.QUEUED
        and not w.requeue
    ]  # fmt: skip


def test_a_store_of_the_old_protocol_keeps_the_sequential_enqueue() -> None:
    """A store implementing only `JobStore` is a job store but not `Withdrawals`: its
    enqueues do not overlap, and the enqueues' `withdraw()` sends it nothing; the built-in
    stores declare it."""
    old = OldStore(MemoryStore())
    assert isinstance(old, JobStore) and not isinstance(old, Withdrawals)
    assert not GroupCommit(old).overlaps
    assert GroupCommit(MemoryStore()).overlaps
    for store in (MemoryStore, SQLiteStore, PostgresStore):
        assert callable(getattr(store, "withdraw", None)), store


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


async def _held(
    path: str, producer: Producer, queue_name: str, job_id: str
) -> tuple[Tracked, Tasks, Gate, asyncio.Future[JobHandle[int]]]:
    """A job `job_id` of an `echo` task enqueued through a `Gate` on a store of `path`, its
    publish held at the gate (the gate's `open` lets it go)."""
    store = _made(path)
    tasks = Tasks(producer=producer, store=store)

    @tasks.task(queue=queue_name)
    def echo(n: int) -> int:
        return n

    gate = Gate(producer)
    task = echo.options(job_id=job_id)
    enqueue = asyncio.ensure_future(task._send(task.arguments.encode((1,), {}), gate, tasks))
    async with asyncio.timeout(WAIT):
        await gate.arrived.wait()
    return store, tasks, gate, enqueue


@PATHS
async def test_the_queued_record_is_written_while_the_publish_waits_for_its_confirm(
    producer: Producer, queue_name: str, tmp_path: Path, path: str
) -> None:
    """The overlap itself: the record is committed before the publish returns (before, the
    record was sent only once the confirm was back: two round trips one after the other);
    a store of the old protocol is sent it only once the publish returned."""
    store, tasks, gate, enqueue = await _held(path, producer, queue_name, "overlap")
    if path == "overlap":
        await _until(store, "overlap", [JobState.QUEUED])  # the publish still waits
    else:
        await _sent_so_far(tasks, store)
        assert _queued_of(store, "overlap") == []
        assert await _state(store, "overlap") is None
    assert not enqueue.done()
    gate.open.set()
    handle = await asyncio.wait_for(enqueue, WAIT)
    assert (await handle.status()).state is JobState.QUEUED
    assert len(_queued_of(store, "overlap")) == 1


@PATHS
async def test_a_nacked_enqueue_raises_typed_and_leaves_no_queued_record(
    producer: Producer, queue_name: str, tmp_path: Path, path: str
) -> None:
    """A publish the broker refuses (a full queue that rejects): the caller gets the typed
    error and no `queued` record is left: taken back (overlap), or never sent (a store of the
    old protocol); the id reads unknown; the first job reads `queued`."""
    store = _made(path, tmp_path / "jobs.db")
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
        if isinstance(store, OldStore):
            await _sent_so_far(tasks, store)
            assert _queued_of(store, refused) == []
        else:
            async with asyncio.timeout(WAIT):
                await store.withdrawn.wait()
            assert store.withdrawals == {refused: True}  # written, then taken back
            assert len(_queued_of(store, refused)) == 1
        assert await _state(store, refused) is None
        assert await _state(store, "n0") is JobState.QUEUED
    finally:
        await store.close()


@PATHS
async def test_a_cancelled_enqueue_takes_its_queued_record_back(
    producer: Producer, queue_name: str, tmp_path: Path, path: str
) -> None:
    """The enqueuing task cancelled while its publish waits: the record is taken back (the
    job may or may not have gone out; if it did, its worker's claim records it); a store of
    the old protocol was never sent it."""
    store, tasks, gate, enqueue = await _held(path, producer, queue_name, "cancelled-enqueue")
    if path == "overlap":
        await _until(store, "cancelled-enqueue", [JobState.QUEUED])
    enqueue.cancel()
    with pytest.raises(asyncio.CancelledError):
        await enqueue
    await _until(store, "cancelled-enqueue", [None])
    await _sent_so_far(tasks, store)
    assert len(_queued_of(store, "cancelled-enqueue")) == (1 if path == "overlap" else 0)
    assert await _state(store, "cancelled-enqueue") is None


@PATHS
async def test_a_lost_confirm_of_a_delivered_job_never_hides_its_run(
    amqp_url: str, producer: Producer, queue_name: str, tmp_path: Path, path: str
) -> None:
    """The publish went out but its confirm was lost (a typed error to the caller): if the
    worker's claim landed first, the withdrawal leaves it and the job reads as it runs; if the
    withdrawal landed first (or, with a store of the old protocol, no record was sent), the
    id reads unknown until the worker claims it, then as it ran. Never `queued` forever,
    never a run hidden."""
    store = _made(path)
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
        enqueue = asyncio.ensure_future(task._send(task.arguments.encode((1,), {}), gate, tasks))
        await _until(store, "claimed-first", [JobState.RUNNING])
        gate.lose.set()
        with pytest.raises(ConnectionLostError):
            await asyncio.wait_for(enqueue, WAIT)
        if isinstance(store, OldStore):
            await _sent_so_far(tasks, store)
            assert _queued_of(store, "claimed-first") == []
        else:
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
    gate = Gate(producer, after=lost)
    gate.open.set()
    gate.lose.set()
    task = echo.options(job_id="withdrawn-first")
    if not isinstance(store, OldStore):
        store.withdrawn.clear()
    with pytest.raises(ConnectionLostError):
        await task._send(task.arguments.encode((2,), {}), gate, tasks)
    if isinstance(store, OldStore):
        await _sent_so_far(tasks, store)
        assert _queued_of(store, "withdrawn-first") == []
    else:
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
    _queued_of(store, "withdrawn-first")  # no withdrawal was ever recorded


def _holds_queued(writes: Sequence[Write]) -> bool:
    return any(
        w.state is JobState.QUEUED and not w.requeue and not isinstance(w, Withdrawal)
        for w in writes
    )


class HeldQueued(MemoryStore):
    """A `MemoryStore` whose batches holding an enqueue's `queued` record wait for `release`:
    a worker quicker than the record."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        if _holds_queued(writes):
            await self.release.wait()
        return await super().record(writes)


class HeldOld(OldStore):
    """`HeldQueued`, of the old protocol."""

    def __init__(self) -> None:
        super().__init__(MemoryStore())
        self.release = asyncio.Event()

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        if _holds_queued(writes):
            await self.release.wait()
        return await super().record(writes)


@PATHS
async def test_a_worker_quicker_than_the_queued_record_keeps_its_states_in_order(
    amqp_url: str, producer: Producer, queue_name: str, path: str
) -> None:
    """The job runs and succeeds before its `queued` record commits: the record lands after
    and changes nothing (`RANK`); a reader polling meanwhile sees the states only in order
    (unknown, then running/succeeded; never `queued` after them)."""
    store: HeldQueued | HeldOld = HeldQueued() if path == "overlap" else HeldOld()
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


@PATHS
async def test_an_enqueue_that_fails_while_the_store_is_down_leaves_no_record_once_it_is_back(
    producer: Producer, queue_name: str, path: str
) -> None:
    """The store down, one enqueue's confirm lost and one confirmed: the caller of the first
    gets the typed error, the second returns (its record kept); once the store answers, the
    first reads unknown and the second `queued`, on both paths; a store of the old protocol
    was never sent the first's record."""
    failing = Failing()
    store: Failing | OldStore = failing if path == "overlap" else OldStore(failing)
    tasks = Tasks(producer=producer, store=store)

    @tasks.task(queue=queue_name)
    def echo(n: int) -> int:
        return n

    gate = Gate(producer, after=ConnectionLostError("the confirm was lost (test)"))
    gate.open.set()
    gate.lose.set()
    task = echo.options(job_id="lost")
    with pytest.raises(ConnectionLostError):
        await asyncio.wait_for(task._send(task.arguments.encode((1,), {}), gate, tasks), WAIT)
    handle = await asyncio.wait_for(echo.options(job_id="sent").enqueue(2), WAIT)
    assert handle.job_id == "sent"
    failing.down = False
    await tasks.commits(store).close(timeout=WAIT)
    assert await _state(store, "lost") is None
    assert await _state(store, "sent") is JobState.QUEUED
    if isinstance(store, OldStore):
        assert _queued_of(store, "lost") == []


def test_a_withdrawal_is_a_kind_of_write_of_its_own() -> None:
    """A withdrawal in the enqueues' batches is a `Withdrawal`, told apart from the record it
    takes back by its kind (it was a `Write` of attempt 0, a value no run has), and stays one
    when copied or pickled; it never reaches `record()` (above)."""
    queued = _w("m", JobState.QUEUED)
    mark = withdrawal(queued, time.time())
    assert isinstance(mark, Withdrawal) and not isinstance(queued, Withdrawal)
    assert (mark.job_id, mark.state, mark.attempt) == ("m", JobState.QUEUED, queued.attempt)
    assert type(copy.copy(mark)) is Withdrawal
    assert type(pickle.loads(pickle.dumps(mark))) is Withdrawal


class WithdrawFailsOnce(Watched):
    """A `Watched` store whose first `withdraw()` fails (the store unreachable in between)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def withdraw(self, job_ids: Sequence[str]) -> set[str]:
        if not self.failed:
            self.failed = True
            raise StoreError("down between record() and withdraw() (test)")
        return await super().withdraw(job_ids)


async def test_a_withdraw_that_fails_after_its_batchs_record_is_caught_up() -> None:
    """A batch of a record and another job's withdrawal: `record()` applied, `withdraw()`
    failed: the batch counts as failed and is caught up whole once the store answers; the
    withdrawn job reads unknown, the other `queued`, and `record()` was never sent the
    withdrawal."""
    store = WithdrawFailsOnce()
    gone = _w("gone", JobState.QUEUED)
    assert await store.record([gone]) == [True]
    commits = GroupCommit(store, timeout=WAIT)
    kept = commits.commit(_w("kept", JobState.QUEUED))
    commits.withdraw(gone)
    assert await asyncio.wait_for(kept, WAIT)
    await commits.close(timeout=WAIT)
    assert store.failed and store.withdrawals == {"gone": True}
    assert (await _state(store, "gone"), await _state(store, "kept")) == (None, JobState.QUEUED)
    _queued_of(store, "gone")  # no withdrawal was sent to record()


async def test_withdrawals_handed_to_another_loops_batches_still_go_to_withdraw() -> None:
    """Batches that kept a withdrawal while the store was down hand it over (their event
    loop closing) to batches that never withdrew anything themselves: those send it to
    `withdraw()`, not to `record()`."""
    store = Watched()
    assert await store.record([_w("y", JobState.QUEUED)]) == [True]
    down = Failing()
    closing = GroupCommit(down, timeout=WAIT)
    queued = _w("y", JobState.QUEUED)
    assert await asyncio.wait_for(closing.commit(queued), WAIT)  # failed: kept
    closing.withdraw(queued)
    batches = closing._batches[asyncio.get_running_loop()]
    left = batches.left()
    assert [type(w) for w in left] == [Withdrawal]  # it replaced the record kept
    await closing.close(timeout=WAIT)
    taker = GroupCommit(store, timeout=WAIT)
    assert await asyncio.wait_for(taker.commit(_w("z", JobState.QUEUED)), WAIT)
    taker._batches[asyncio.get_running_loop()].adopt(left)
    await taker.close(timeout=WAIT)
    assert store.withdrawals == {"y": True}
    assert await _state(store, "y") is None
    _queued_of(store, "y")


async def test_batches_to_a_store_of_the_old_protocol_never_send_it_a_withdrawal() -> None:
    """Should a withdrawal reach the batches of a store without `withdraw()` (the enqueue
    never makes one for it), it is dropped, never sent to `record()` as a `queued` row."""
    store = OldStore(MemoryStore())
    commits = GroupCommit(store, timeout=WAIT)
    queued = _w("w", JobState.QUEUED)
    assert await asyncio.wait_for(commits.commit(queued), WAIT)
    commits.withdraw(queued)  # nothing for this store
    batches = commits._batches[asyncio.get_running_loop()]
    batches.withdraw(withdrawal(queued, time.time()))  # reached it anyway: dropped
    await commits.close(timeout=WAIT)
    assert _queued_of(store, "w") == [queued]
    assert await _state(store, "w") is JobState.QUEUED
