"""The worker's recorder without a broker: batches go out without waiting behind the one in
flight, a job's writes never overtake each other, and a failed batch is caught up in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from aio_workq.jobs import JobState, JobStore, MemoryStore, StoreError, Write
from aio_workq.jobs._batches import WriteBatches
from aio_workq.jobs._recorder import GroupCommit, Recorder, Running
from aio_workq.jobs._running import call_task
from aio_workq.jobs._status import JobRecord


class GatedStore(MemoryStore):
    """A memory store (or `inner`, another store) whose batches wait for `release(n)` (or
    fail with `fail(n)`): each batch is noted when it arrives, applied when released."""

    def __init__(self, inner: JobStore | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[list[tuple[str, JobState, bool]]] = []
        self._gates: list[asyncio.Future[bool]] = []
        self.arrived = asyncio.Condition()

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        gate = asyncio.get_running_loop().create_future()
        self.batches.append([(w.job_id, w.state, w.claim) for w in writes])
        self._gates.append(gate)
        async with self.arrived:
            self.arrived.notify_all()
        if not await gate:
            raise StoreError("the test failed this batch")
        if self.inner is not None:
            return await self.inner.record(writes)
        return await super().record(writes)

    async def get(self, job_id: str) -> JobRecord | None:
        if self.inner is not None:
            return await self.inner.get(job_id)
        return await super().get(job_id)

    async def batch(self, n: int) -> list[tuple[str, JobState, bool]]:
        """Batch `n` (0-based), once it has arrived."""
        async with asyncio.timeout(5), self.arrived:
            await self.arrived.wait_for(lambda: len(self.batches) > n)
        return self.batches[n]

    def release(self, n: int) -> None:
        self._gates[n].set_result(True)

    def fail(self, n: int) -> None:
        self._gates[n].set_result(False)


def running(job_id: str) -> Running:
    return Running(job_id, "t", "q", 1)


def write(job_id: str, state: JobState, **fields: object) -> Write:
    return Write(job_id=job_id, task="t", queue="q", state=state, at=time.time(), **fields)  # type: ignore[arg-type]


async def state_of(store: MemoryStore, job_id: str) -> JobState:
    record = await store.get(job_id)
    assert record is not None
    return record.status.state


async def test_a_claim_does_not_wait_behind_the_batch_in_flight() -> None:
    store = GatedStore()
    recorder = Recorder(store)
    first = asyncio.ensure_future(recorder.claim(running("x")))
    assert await store.batch(0) == [("x", JobState.RUNNING, True)]
    second = asyncio.ensure_future(recorder.claim(running("y")))
    # batch 0 is still in flight: y's claim goes out in a batch of its own all the same
    assert await store.batch(1) == [("y", JobState.RUNNING, True)]
    store.release(1)
    assert await second is True and not first.done()
    store.release(0)
    assert await first is True
    await recorder.close()


async def test_a_jobs_writes_never_overtake_each_other() -> None:
    store = GatedStore()
    recorder = Recorder(store)
    # x ran here and is handed back to the queue (a stopping worker's requeue) ...
    recorder.write(write("x", JobState.QUEUED, requeue=True))
    assert await store.batch(0) == [("x", JobState.QUEUED, False)]
    # ... and redelivered at once: its claim must not reach the store before the requeue
    claim_x = asyncio.ensure_future(recorder.claim(running("x")))
    claim_y = asyncio.ensure_future(recorder.claim(running("y")))
    assert await store.batch(1) == [("y", JobState.RUNNING, True)]  # y does not wait
    store.release(1)
    assert await claim_y is True
    await asyncio.sleep(0)
    assert len(store.batches) == 2 and not claim_x.done()  # x's claim waits for its requeue
    store.release(0)
    assert await store.batch(2) == [("x", JobState.RUNNING, True)]
    store.release(2)
    assert await claim_x is True
    assert await state_of(store, "x") is JobState.RUNNING
    await recorder.close()


async def test_a_failed_batch_is_caught_up_after_and_under_the_writes_held_behind_it() -> None:
    store = GatedStore()
    recorder = Recorder(store)
    claim_x = asyncio.ensure_future(recorder.claim(running("x")))
    assert await store.batch(0) == [("x", JobState.RUNNING, True)]
    recorder.write(write("y", JobState.QUEUED, requeue=True))  # y handed back to the queue
    # (with the next claim: a write no one waits for opens no batch beside one in flight)
    claim_z = asyncio.ensure_future(recorder.claim(running("z")))
    assert await store.batch(1) == [("y", JobState.QUEUED, False), ("z", JobState.RUNNING, True)]
    store.fail(0)  # x's claim fails: the store counts as down, the job runs all the same
    assert await claim_x is True
    # y is redelivered while its requeue is in flight: granted at once (the store is down)
    assert await recorder.claim(running("y")) is True
    store.fail(1)  # the requeue fails too: older than y's claim, it must not replace it
    assert await claim_z is True
    batch = await store.batch(2)  # the catch-up: the latest write of each job
    assert sorted(batch) == [
        ("x", JobState.RUNNING, False), ("y", JobState.RUNNING, False),
        ("z", JobState.RUNNING, False),
    ]  # fmt: skip
    store.release(2)
    recorder.write(write("x", JobState.SUCCEEDED, result=b"1"))
    assert await store.batch(3) == [("x", JobState.SUCCEEDED, False)]
    store.release(3)
    await recorder.close()
    assert await state_of(store, "x") is JobState.SUCCEEDED
    assert await state_of(store, "y") is JobState.RUNNING


async def test_outcomes_ride_with_the_next_claims_not_in_a_batch_of_their_own(
    every_store: JobStore,
) -> None:
    """A write no one waits for (an outcome) opens no batch beside one in flight: it goes with
    the next claim, or once that batch ended, and is recorded (every store: claims and
    outcomes in one statement on PostgreSQL). They went in a batch of their own about one time
    in three, each a statement and a commit (#23: 94-107 statements per 5,000 consumed jobs on
    PostgreSQL, 70-93 now)."""
    store = GatedStore(every_store)
    recorder = Recorder(store)
    claim_x = asyncio.ensure_future(recorder.claim(running("x")))
    assert await store.batch(0) == [("x", JobState.RUNNING, True)]
    recorder.write(write("a", JobState.SUCCEEDED, result=b"1"))
    recorder.write(write("b", JobState.SUCCEEDED, result=b"2"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(store.batches) == 1  # a and b wait: a lane is free, but no one waits for them
    claim_y = asyncio.ensure_future(recorder.claim(running("y")))
    assert await store.batch(1) == [
        ("a", JobState.SUCCEEDED, False), ("b", JobState.SUCCEEDED, False),
        ("y", JobState.RUNNING, True),
    ]  # fmt: skip
    store.release(1)
    assert await claim_y is True
    recorder.write(write("c", JobState.SUCCEEDED, result=b"3"))  # x's batch still in flight
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(store.batches) == 2
    store.release(0)  # its end sends what waited
    assert await claim_x is True
    assert await store.batch(2) == [("c", JobState.SUCCEEDED, False)]
    store.release(2)
    await recorder.close()
    for job_id in "abc":
        assert await state_of(store, job_id) is JobState.SUCCEEDED
    assert await state_of(store, "y") is JobState.RUNNING
    # with no batch in flight, an outcome goes at once
    recorder = Recorder(store)
    recorder.write(write("d", JobState.SUCCEEDED, result=b"4"))
    assert await store.batch(3) == [("d", JobState.SUCCEEDED, False)]
    store.release(3)
    await recorder.close()


async def test_concurrent_enqueues_go_out_without_waiting_for_the_batch_in_flight() -> None:
    store = GatedStore()
    commits = GroupCommit(store)
    first = asyncio.ensure_future(commits.record(write("a", JobState.QUEUED)))
    assert await store.batch(0) == [("a", JobState.QUEUED, False)]
    second = asyncio.ensure_future(commits.record(write("b", JobState.QUEUED)))
    third = asyncio.ensure_future(commits.record(write("c", JobState.QUEUED)))
    assert await store.batch(1) == [("b", JobState.QUEUED, False), ("c", JobState.QUEUED, False)]
    store.release(1)
    await second
    await third
    assert not first.done()
    store.release(0)
    await first


async def test_enqueues_while_the_store_is_down_do_not_wait_for_it_and_catch_up() -> None:
    """The first enqueue to find the store down has waited for its batch; the ones after it
    don't wait for the store at all (each waited the store's timeout before, 5 s by default,
    one after the other), and their `queued` records are written once it answers again."""
    store = GatedStore()
    commits = GroupCommit(store)
    first = asyncio.ensure_future(commits.record(write("a", JobState.QUEUED)))
    assert await store.batch(0) == [("a", JobState.QUEUED, False)]
    store.fail(0)  # the store is down: the enqueue goes on (its job was sent)
    async with asyncio.timeout(5):
        await first
        # No gate is opened: an enqueue that waited for the store would hang here.
        for job_id in "bcd":
            await commits.record(write(job_id, JobState.QUEUED))
    # None of them tried the store on its own: the failed batch, and at most the catch-up's
    # first try (with what was kept by then) went out.
    assert len(store.batches) <= 2

    async def open_every_gate() -> None:  # the store answers again
        n = 1
        while True:
            await store.batch(n)
            store.release(n)
            n += 1

    opener = asyncio.ensure_future(open_every_gate())
    await commits.close()  # returns once what was kept is recorded (at most 1.5 s)
    opener.cancel()
    assert all([await store.get(i) for i in "abcd"])


class Delivery:
    """What the recorder reads of a delivery (a `JobView`'s id, headers and attempt)."""

    def __init__(self, job_id: str) -> None:
        self.message_id = job_id
        self.headers = {"x-workq-task": "t"}
        self.attempt = 1
        self.redelivered = False


async def test_a_delivery_is_claimed_when_it_arrives_and_runs_only_once_granted() -> None:
    store = GatedStore()
    recorder = Recorder(store)
    delivery = Delivery("x")
    # the worker enters its hooks when the delivery arrives, before it waits for a handler
    recorder.arrived(delivery, "q")  # type: ignore[arg-type]
    assert await store.batch(0) == [("x", JobState.RUNNING, True)]
    tracked = recorder.running(delivery)  # type: ignore[arg-type]
    assert tracked is not None and (tracked.job_id, tracked.queue) == ("x", "q")
    granted = asyncio.ensure_future(recorder.claim(tracked))  # the handler's turn comes
    await asyncio.sleep(0)
    assert not granted.done()  # it runs only once the store granted the claim
    store.release(0)
    assert await granted is True
    assert len(store.batches) == 1  # claimed once
    await recorder.close()


class Task:
    """What `call_task` needs of a task."""

    name = "t"
    is_async = True

    def __init__(self) -> None:
        self.ran = False

    async def fn(self) -> int:
        self.ran = True
        return 1


async def test_a_job_cancelled_before_its_handler_starts_does_not_run() -> None:
    task = Task()
    tracked = running("x")
    tracked.request_cancel()  # e.g. while it waited for a free handler, or a rate limit
    assert await call_task(task, {}, tracked) is None  # type: ignore[arg-type]
    assert not task.ran and tracked.cancelled


@pytest.mark.timeout(30)
async def test_a_store_failing_at_once_is_retried_after_a_backoff_not_in_a_tight_loop() -> None:
    """A store that fails without waiting (a closed pool, a refused connection) is retried
    0.5 s later, then up to 2 s apart: the retry did not wait at all before (its own batch's
    end woke the wait for the backoff), so the flusher spun without ever yielding to the event
    loop, which then ran nothing else."""

    class Closed(MemoryStore):
        calls = 0

        async def record(self, writes: Sequence[Write]) -> list[bool]:
            self.calls += 1
            raise StoreError("the store is closed")

    store = Closed()
    batches = WriteBatches(store, buffer=10, timeout=5.0)
    batches.write(write("a", JobState.QUEUED))
    for _ in range(200):  # each lets the flusher take a step; a spinning one never returns
        await asyncio.sleep(0)
    assert store.calls <= 2, store.calls  # its batch, and the first retry
    await batches.close(0.1)


async def test_batches_with_nothing_left_to_write_leave_no_task_behind() -> None:
    """An enqueue's records (`GroupCommit`) have no close: a flusher waiting for more after
    its work was done outlived its registry, and was destroyed pending ("Task was destroyed
    but it is pending!"). It ends once idle; the next write starts one again."""

    def flushers() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if "_flush_loop" in repr(t.get_coro())]

    commits = GroupCommit(MemoryStore())
    for job_id in "ab":  # twice: a write after the flusher ended starts a new one
        await commits.record(write(job_id, JobState.QUEUED))
        for _ in range(20):  # a few steps: the lane's end wakes the flusher, which ends
            await asyncio.sleep(0)
        assert not flushers()


def test_a_running_job_takes_what_differs_by_job_in_order_and_starts_in_its_first_state() -> None:
    """`Running` is made once a tracked job (#23, round 3): a slotted class whose `__init__`
    takes the fields that differ from job to job, positionally, the delivery's properties
    last; it was a dataclass whose `__init__` took all fifteen (the properties by keyword:
    1.3k instructions a job more, callgrind). Its state starts where a job's starts, and its
    repr leaves out the delivery's properties (headers a user put there)."""
    properties = object()
    job = Running("j1", "t", "q", 2, 1, 123.5, True, properties)
    assert (job.job_id, job.task, job.queue, job.attempt, job.defers) == ("j1", "t", "q", 2, 1)
    assert (job.since, job.redelivered, job._properties) == (123.5, True, properties)
    assert (job.handler, job.claimed, job.result) == (None, None, None)
    assert not (job.skipped or job.interrupted or job.stopped or job.cancelled)
    assert not hasattr(job, "__dict__")  # slotted: no dict a job
    assert repr(job).startswith("Running(job_id='j1', task='t', queue='q', attempt=2")
    assert "object at" not in repr(job)  # not the properties
    assert job != Running("j1", "t", "q", 2, 1, 123.5, True, properties)  # one per delivery
    assert Running("j2", "t", "q", 1).since == 0.0
