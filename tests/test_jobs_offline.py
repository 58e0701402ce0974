"""aio_workq.jobs without a broker: the store rules (memory and SQLite alike), argument
checks at enqueue, the testing kit's `run_task`, and the layering."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import aio_workq.jobs
from aio_workq import (
    ConfigurationError,
    IntegrationError,
    PayloadError,
    Reject,
    RetryPolicy,
    Worker,
)
from aio_workq.cli._errors import TargetError
from aio_workq.cli._target import WorkerOptions, build_workers, split_queues
from aio_workq.jobs import (
    Cancelled,
    CancelRequests,
    JobState,
    JobStore,
    MemoryStore,
    SQLiteStore,
    StoreError,
    TaskArgumentError,
    Tasks,
    Write,
    current_job,
)
from aio_workq.testing import run_task
from tests.forking import fork_running
from tests.test_layers import PACKAGE, imports, modules


@dataclass
class Thumb:
    path: str
    width: int


# --- the store rules ------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    made: JobStore = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "j.db")
    yield made
    await made.close()


def w(state: JobState, job_id: str = "a", **fields: Any) -> Write:
    return Write(job_id=job_id, task="t", queue="q", state=state, at=time.time(), **fields)


async def test_a_late_write_never_overwrites_a_newer_state(store: JobStore) -> None:
    await check_late_writes(store)


async def test_cancel_ends_a_waiting_job_and_flags_a_running_one(store: JobStore) -> None:
    await check_cancel(store)


async def check_late_writes(store: JobStore) -> None:
    """The write rules, for every store (the PostgreSQL tests run it too)."""
    assert await store.record([w(JobState.QUEUED)]) == [True]
    assert await store.record([w(JobState.RUNNING, claim=True)]) == [True]
    # The enqueue's own record landing after the worker's claim changes nothing (#23 ledger).
    assert await store.record([w(JobState.QUEUED)]) == [False]
    requeue = w(JobState.QUEUED, requeue=True)
    assert await store.record([requeue]) == [True]  # requeued by a stopping worker
    assert await store.record([w(JobState.RUNNING, claim=True), w(JobState.RETRYING)]) == [
        True,
        True,
    ]
    assert await store.record([w(JobState.RUNNING)]) == [False]  # a late catch-up: older
    assert await store.record([w(JobState.QUEUED, attempt=1)]) == [False]
    assert await store.record([w(JobState.RUNNING, attempt=2)]) == [True]  # the next attempt
    done = w(JobState.SUCCEEDED, attempt=2, result=b'"x"', content_type="application/json")
    assert await store.record([done]) == [True]
    # Succeeded is final: no claim (a redelivery is skipped), no later write.
    assert await store.record([w(JobState.RUNNING, attempt=3, claim=True)]) == [False]
    assert await store.record([w(JobState.FAILED, attempt=9)]) == [False]
    record = await store.get("a")
    assert record is not None and record.result == b'"x"'
    assert record.status.state is JobState.SUCCEEDED and record.status.attempt == 2


async def check_cancel(store: JobStore) -> None:
    """Cancelling, for every store (the PostgreSQL tests run it too)."""
    await store.record([w(JobState.QUEUED, "queued"), w(JobState.RUNNING, "running")])
    status = await store.cancel("queued", now=time.time())
    assert status is not None and status.state is JobState.CANCELLED and status.done
    assert await store.record([w(JobState.RUNNING, "queued", claim=True)]) == [False]
    status = await store.cancel("running", now=time.time())
    assert status is not None and status.state is JobState.RUNNING and status.cancel_requested
    # Many flags in one read: a task worker's check of its long-running jobs.
    assert isinstance(store, CancelRequests)
    assert await store.cancel_requested(["queued", "running", "nobody"]) == {"running"}
    assert await store.cancel_requested([]) == set()
    # A redelivery of a job whose cancel was requested is not run again.
    assert await store.record([w(JobState.RUNNING, "running", claim=True)]) == [False]
    assert await store.record([w(JobState.CANCELLED, "running")]) == [True]
    assert await store.cancel("nobody", now=time.time()) is None


async def test_the_same_job_twice_in_one_batch_follows_the_rules_in_order(store: JobStore) -> None:
    await check_batches(store)


async def test_random_batches_end_as_the_reference_store_says(store: JobStore) -> None:
    await check_against_reference(store)


async def check_batches(store: JobStore) -> None:
    """A batch holding the same job more than once applies its writes in order, each under the
    rules, as if they came one batch each (for every store; the PostgreSQL tests run it too)."""
    # claimed, then succeeded: both apply; other jobs in between change nothing
    assert await store.record(
        [w(JobState.RUNNING, "x", claim=True), w(JobState.QUEUED, "o"),
         w(JobState.SUCCEEDED, "x", result=b"1")]
    ) == [True, True, True]  # fmt: skip
    # a redelivery of the succeeded job, in the batch that records it succeeded: refused
    assert await store.record(
        [w(JobState.SUCCEEDED, "y"), w(JobState.RUNNING, "y", claim=True)]
    ) == [True, False]  # fmt: skip
    # the enqueue's queued record landing after the claim, in the same batch: refused
    assert await store.record(
        [w(JobState.RUNNING, "z", claim=True), w(JobState.QUEUED, "z")]
    ) == [True, False]  # fmt: skip
    # queued, claimed, handed back (requeue), claimed again: all four apply, it ends running
    assert await store.record(
        [w(JobState.QUEUED, "r"), w(JobState.RUNNING, "r", claim=True),
         w(JobState.QUEUED, "r", requeue=True), w(JobState.RUNNING, "r", claim=True)]
    ) == [True, True, True, True]  # fmt: skip
    # three runs in one batch: retrying after the first, succeeded on the second
    assert await store.record(
        [w(JobState.RUNNING, "m", claim=True), w(JobState.RETRYING, "m", next_retry_at=1.0),
         w(JobState.RUNNING, "m", attempt=2, claim=True), w(JobState.RUNNING, "m"),
         w(JobState.SUCCEEDED, "m", attempt=2, result=b"2")]
    ) == [True, True, True, False, True]  # fmt: skip
    # a cancelled job: its claim is refused, so is every later write of the batch
    await store.record([w(JobState.QUEUED, "c")])
    await store.cancel("c", now=time.time())
    assert await store.record(
        [w(JobState.RUNNING, "c", claim=True), w(JobState.SUCCEEDED, "c")]
    ) == [False, False]  # fmt: skip
    expected = {
        "x": (JobState.SUCCEEDED, 1, b"1"), "o": (JobState.QUEUED, 1, None),
        "y": (JobState.SUCCEEDED, 1, None), "z": (JobState.RUNNING, 1, None),
        "r": (JobState.RUNNING, 1, None), "m": (JobState.SUCCEEDED, 2, b"2"),
        "c": (JobState.CANCELLED, 1, None),
    }  # fmt: skip
    for job_id, (state, attempt, result) in expected.items():
        record = await store.get(job_id)
        assert record is not None, job_id
        assert (record.status.state, record.status.attempt, record.result) == (
            state, attempt, result,
        ), job_id  # fmt: skip


def random_write(rng: random.Random, at: float) -> Write:
    """A write of one of a few jobs, of any kind a worker or producer sends."""
    state = rng.choice(list(JobState))
    return Write(
        job_id=rng.choice("abcd"), task="t", queue="q", state=state, at=at,
        attempt=rng.randint(1, 3), defers=rng.randint(0, 1),
        claim=state is JobState.RUNNING and rng.random() < 0.5,
        requeue=state is JobState.QUEUED and rng.random() < 0.5,
        next_retry_at=at + 1 if state is JobState.RETRYING else None,
        error_type="E" if state in (JobState.RETRYING, JobState.FAILED) else None,
        result=str(at).encode() if state is JobState.SUCCEEDED else None,
    )  # fmt: skip


async def check_against_reference(store: JobStore, rounds: int = 150) -> None:
    """Random batches (the same job often several times in one) and cancels: every write's
    answer and every final record as `MemoryStore`, the reference, has them."""
    rng = random.Random(23)
    reference = MemoryStore()
    at = time.time()
    for _ in range(rounds):
        at += 1.0
        if rng.random() < 0.1:
            job_id = rng.choice("abcd")
            expected = await reference.cancel(job_id, now=at)
            assert await store.cancel(job_id, now=at) == expected
            continue
        batch = [random_write(rng, at + i / 100) for i in range(rng.randint(1, 8))]
        expected_applied = await reference.record(batch)
        assert await store.record(batch) == expected_applied, batch
    for job_id in "abcd":
        assert await store.get(job_id) == await reference.get(job_id), job_id


async def test_records_expire_after_the_ttl(tmp_path: Path) -> None:
    for store in (MemoryStore(ttl=0.2), SQLiteStore(tmp_path / "ttl.db", ttl=0.2)):
        await store.record([w(JobState.SUCCEEDED, result=b"1")])
        assert await store.get("a") is not None
        async with asyncio.timeout(5):
            while await store.get("a") is not None:  # noqa: ASYNC110 - time is the event
                await asyncio.sleep(0.05)
        # an expired record counts as absent: a new write starts it afresh
        assert await store.record([w(JobState.QUEUED)]) == [True]
        assert await store.purge() == 0
        await store.close()


async def check_purge_keeps_old_jobs_written_lately(store: JobStore) -> None:
    """The purge deletes what is past its TTL, not what was created over a TTL ago and
    written since (the SQL stores find expired rows by `created_at`, which no status write
    changes)."""
    ttl, now = store.ttl, time.time()

    def at(ago: float, job_id: str, state: JobState) -> list[Write]:
        return [Write(job_id=job_id, task="t", queue="q", state=state, at=now - ago * ttl)]

    # (a store may purge at its first write: what must go is written after it)
    await store.record(at(1.5, "kept", JobState.QUEUED))
    await store.record(at(3, "gone", JobState.QUEUED))
    await store.record(at(0.5, "kept", JobState.RUNNING))
    assert await store.purge() == 1
    assert await store.get("gone") is None
    kept = await store.get("kept")
    assert kept is not None and kept.status.state is JobState.RUNNING


async def test_the_purge_keeps_old_jobs_written_lately(tmp_path: Path) -> None:
    for store in (MemoryStore(ttl=60), SQLiteStore(tmp_path / "purge.db", ttl=60)):
        await check_purge_keeps_old_jobs_written_lately(store)
        await store.close()


def remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def test_a_sqlite_file_deleted_while_open_is_reopened_not_written_into_the_void(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`rm jobs.db*` while a worker runs (a reset): the worker's store must not go on writing
    into the deleted file, where no other process (the web app's, a new one) reads it."""
    path = tmp_path / "jobs.db"
    worker_store = SQLiteStore(path)
    await worker_store.record([w(JobState.RUNNING, "old")])
    remove_db(path)
    app_store = SQLiteStore(path)  # the web app, started after the reset: a new file
    await app_store.record([w(JobState.QUEUED, "new")])
    with caplog.at_level("WARNING", logger="aio_workq.jobs"):
        await worker_store.record([w(JobState.SUCCEEDED, "new", result=b"1")])
    seen = await app_store.get("new")
    assert seen is not None and seen.status.state is JobState.SUCCEEDED
    assert await worker_store.get("old") is None  # the old records went with the file
    assert any(str(path) in r.getMessage() and "reopen" in r.getMessage() for r in caplog.records)
    # replaced by another file (moved over it): the same
    await worker_store.record([w(JobState.RUNNING, "x")])
    other = tmp_path / "other.db"
    other_store = SQLiteStore(other)
    await other_store.record([w(JobState.SUCCEEDED, "y", result=b"2")])
    await other_store.close()
    remove_db(path)
    other.replace(path)
    got = await worker_store.get("y")
    assert got is not None and got.status.state is JobState.SUCCEEDED
    for store in (worker_store, app_store):
        await store.close()


async def test_a_sqlite_path_in_a_missing_directory_says_to_create_it(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "data" / "jobs.db")
    with pytest.raises(StoreError, match=r"unable to open.*directory '.*data' does not exist"):
        await store.get("a")
    await store.close()


async def test_a_sqlite_store_locked_by_another_writer_is_unreachable_not_failed(
    tmp_path: Path,
) -> None:
    # Another process holding the write lock past `busy_timeout`: waiting cures it, as for a
    # PostgreSQL server that does not answer. It was a plain StoreError (`unreachable` False),
    # so a web app's handlers answered 500 where the server's outage answers 503 + Retry-After,
    # and `result(timeout=)` gave up at once instead of reading again until its deadline.
    store = SQLiteStore(tmp_path / "jobs.db", busy_timeout=0.05)
    await store.record([w(JobState.QUEUED, "locked-1")])
    other = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked") as raised:
            await store.cancel("locked-1", now=time.time())
        assert raised.value.unreachable and not raised.value.lasting
        other.execute("ROLLBACK")
        status = await store.cancel("locked-1", now=time.time())  # free again: it goes through
        assert status is not None and status.state == "cancelled"
    finally:
        other.close()
        await store.close()


async def test_a_sqlite_store_used_before_fork_works_in_the_child(tmp_path: Path) -> None:
    """A `SQLiteStore` used before `fork()` (a pre-forking server that loaded the app and
    touched the store): the child's calls answer, on a thread and a connection of its own,
    while the parent goes on using its own (before: the child's first call waited forever on
    the parent's store thread, which does not exist in the child)."""
    store = SQLiteStore(tmp_path / "fork.db")
    try:
        at = time.time()
        await store.record([Write(job_id="f-1", task="t", queue="q", state=JobState.QUEUED, at=at)])
        assert await store.get("f-1") is not None

        async def child() -> None:  # the child: its own event loop, the same store object
            at = time.time()
            await store.record(
                [Write(job_id="f-2", task="t", queue="q", state=JobState.QUEUED, at=at)]
            )
            for _ in range(50):
                record = await store.get("f-1")
                assert record is not None and record.status.job_id == "f-1"
            await store.close()

        forked = fork_running(child, timeout=10)
        async with asyncio.timeout(20):
            for _ in range(50):
                assert await store.get("f-1") is not None
        await forked.wait()
        child_write = await store.get("f-2")  # the child's write, read by the parent's thread
        assert child_write is not None and child_write.status.state is JobState.QUEUED
    finally:
        await store.close()


def test_bad_store_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="ttl"):
        MemoryStore(ttl=0)
    with pytest.raises(ConfigurationError, match="ttl"):
        SQLiteStore(tmp_path / "x.db", ttl=-1)
    with pytest.raises(ConfigurationError, match="path"):
        SQLiteStore("")


# --- declaring and enqueueing --------------------------------------------------------------


def make_tasks(store: JobStore | None = None) -> Tasks:
    tasks = Tasks(store=store)

    @tasks.task(queue="images", name="images.resize")
    async def resize(path: str, width: int = 800) -> Thumb:
        return Thumb(path, width)

    return tasks


async def test_enqueue_checks_the_arguments_and_names_task_and_argument() -> None:
    tasks = make_tasks()
    resize: Any = tasks.tasks["images.resize"]
    with pytest.raises(TaskArgumentError, match=r"'images.resize'.*'hieght'"):
        await resize.enqueue("cat.png", hieght=3)
    with pytest.raises(TaskArgumentError, match=r"'images.resize'.*'path'"):
        await resize.enqueue(width=3)
    with pytest.raises(TaskArgumentError, match=r"(?s)'images.resize'.*width"):
        await resize.enqueue("cat.png", width="wide")
    with pytest.raises(TaskArgumentError, match=r"argument 'path' can't be sent as JSON"):
        await resize.enqueue(object())
    assert isinstance(TaskArgumentError("x"), TypeError | ConfigurationError)
    # Good arguments, but no producer yet.
    with pytest.raises(IntegrationError, match=r"tasks.bind\(producer\)"):
        await resize.enqueue("cat.png", width=3)


async def test_a_task_that_enqueues_without_a_producer_is_told_how_to_give_its_worker_one() -> None:
    """A task that enqueues the next step (a Celery chain) outside the registry's workers
    (which bring a producer) failed each attempt with "call tasks.bind(producer) (e.g. in your
    app's lifespan)": a worker has no lifespan. Inside a job the error names the worker's fix
    and the guide's section."""
    tasks = Tasks()

    @tasks.task(queue="b", name="chain.second")
    async def second(n: int) -> int:
        return n

    @tasks.task(queue="a", name="chain.first")
    async def first(n: int) -> int:
        await second.enqueue(n + 1)
        return n

    run = await run_task(first.s(1), retry=None)
    assert run.status.state is JobState.FAILED
    message = run.status.error_message or ""
    assert "task 'chain.second': the tasks are not bound to a producer" in message
    assert "the job of task 'chain.first' enqueues outside the registry's workers" in message
    assert "tasks.bind(producer)" in message and "tasks.workers()" in message
    assert "jobs.md#tasks-that-enqueue-tasks" in message
    with pytest.raises(IntegrationError, match=r"lifespan\) before enqueueing$"):
        await second.enqueue(1)  # outside a job: the web app's fix, as before


def test_an_empty_or_non_string_job_id_is_refused() -> None:
    """`options(job_id="")` (an empty form field, say) took a fresh random id instead: the
    enqueue was no longer safe to repeat, and nothing said so."""
    resize: Any = make_tasks().tasks["images.resize"]
    for bad in ("", "   ", 42):
        with pytest.raises(ConfigurationError, match=r"'images.resize'.*job_id"):
            resize.options(job_id=bad)
    assert resize.options(job_id="order-7") is not resize


async def test_datetimes_uuids_and_decimals_travel_as_their_annotations_say() -> None:
    """A task annotated `at: datetime` (or UUID, Decimal, date, timedelta, a set) could not
    be enqueued with one ("can't be sent as JSON"), nor return one; the annotation brings them
    back at the other end, so they are sent in their JSON form (ISO 8601, str, seconds)."""
    tasks = Tasks()
    seen: dict[str, Any] = {}

    @tasks.task(queue="typed", name="typed.when")
    async def when(
        at: datetime, day: date, key: uuid.UUID, amount: Decimal, every: timedelta, tags: set[str]
    ) -> tuple[datetime, uuid.UUID, Decimal]:
        seen.update(at=at, day=day, key=key, amount=amount, every=every, tags=tags)
        return at, key, amount

    at = datetime(2026, 12, 7, 1, 2, 3, 456789, tzinfo=UTC)
    key = uuid.uuid4()
    args = [at, date(2026, 12, 7), key, Decimal("12.50"), timedelta(minutes=5), {"a", "b"}]
    run = await run_task(when, args)
    assert run.status.state is JobState.SUCCEEDED, run.outcome
    assert seen == {
        "at": at, "day": date(2026, 12, 7), "key": key, "amount": Decimal("12.50"),
        "every": timedelta(minutes=5), "tags": {"a", "b"},
    }  # fmt: skip
    assert run.result == (at, key, Decimal("12.50"))
    # what JSON can't say at all is still refused, naming the argument
    with pytest.raises(TaskArgumentError, match="argument 'at'"):
        await when.enqueue(object(), *args[1:])  # type: ignore[arg-type]


def test_declarations_are_checked() -> None:
    tasks = make_tasks()
    with pytest.raises(ConfigurationError, match="declared already"):

        @tasks.task(queue="images", name="images.resize")
        def again(path: str) -> None: ...

    with pytest.raises(ConfigurationError, match=r"parameter 'rest' is variadic positional"):

        @tasks.task(queue="images")
        def spread(*rest: int) -> None: ...

    with pytest.raises(ConfigurationError, match="task name"):
        tasks.task(queue="images", name="no spaces")
    with pytest.raises(ConfigurationError, match="named queue"):
        tasks.task(queue="")
    with pytest.raises(ConfigurationError, match="no tasks on queues"):
        tasks.workers(queues=["other"])


async def test_the_cli_runs_a_registry_through_its_workers_factory() -> None:
    tasks = make_tasks(MemoryStore())  # the worker processes need no producer
    workers = await build_workers(tasks.workers, WorkerOptions(target="app:tasks.workers"))
    assert [type(worker) for worker in workers] == [aio_workq.jobs.TaskWorker] * 2
    assert all(isinstance(worker, Worker) for worker in workers)
    assert workers[0].queue_name == "images"  # and a server-named one for cancel requests


async def test_the_cli_passes_concurrency_to_the_tasks_workers_factory() -> None:
    """`aio-workq worker app:tasks.workers --concurrency 4`, as `celery worker --concurrency`:
    it was refused, naming `Worker(concurrency=...)`, which a registry's workers don't take."""
    tasks = make_tasks(MemoryStore())
    options = WorkerOptions(target="app:tasks.workers", concurrency=3)
    workers = await build_workers(tasks.workers, options)
    assert workers[0].queue_name == "images" and "concurrency=3" in repr(workers[0])


def test_a_tracked_task_worker_prefetches_four_times_its_concurrency_unless_told() -> None:
    """With a store the claims go out as deliveries arrive and are answered in batches: at
    twice the concurrency a tracked consume was bound by the prefetch over the store's round
    trips (about 8,000-13,000 jobs/s on the bench's machine, 17,500-19,400 at 4x and 8x)."""
    tasks = make_tasks(MemoryStore())
    [tracked, _control] = tasks.workers("amqp://guest:guest@127.0.0.1:1/", concurrency=5)
    assert tracked._plan.prefetch == 20
    [given, _control] = tasks.workers("amqp://guest:guest@127.0.0.1:1/", concurrency=5, prefetch=7)
    assert given._plan.prefetch == 7
    [untracked] = make_tasks().workers("amqp://guest:guest@127.0.0.1:1/", concurrency=5)
    assert untracked._plan.prefetch == 5


async def test_the_cli_given_the_registry_or_a_task_names_the_workers_factory() -> None:
    """`aio-workq worker app:tasks` or `app:resize` (a Task, which is callable): the error
    says what to name instead; a Task was taken for a handler ("pass --queue QUEUE"), and
    with --queue it ran as one, untracked, called with the Job as its first argument."""
    tasks = make_tasks(MemoryStore())
    resize = tasks.tasks["images.resize"]
    with pytest.raises(TargetError, match=r"'app:tasks' is a Tasks registry.*app:tasks\.workers"):
        await build_workers(tasks, WorkerOptions(target="app:tasks"))
    for queues in ((), ("images",)):
        with pytest.raises(
            TargetError, match=r"'app:resize' is the task 'images\.resize'.*workers"
        ):
            await build_workers(resize, WorkerOptions(target="app:resize", queues=queues))


async def test_the_cli_runs_the_registrys_workers_of_the_queues_given() -> None:
    """`aio-workq worker app:tasks.workers -q images` (Celery's `-Q images`) was refused
    ("--queue runs 'app:tasks.workers' as a handler ... name a factory of yours"); now
    `--queue` picks the registry's workers of those queues, the registry itself named or its
    factory, repeated or as a comma list, and a queue none of its tasks is on is refused with
    the registry's queues."""
    tasks = make_tasks(MemoryStore())

    @tasks.task(queue="mail", name="mail.send")
    async def send(to: str) -> None: ...

    @tasks.task(queue="reports", name="reports.daily")
    async def daily() -> None: ...

    def consuming(workers: list[Worker]) -> list[str]:  # the cancel listener's is server-named
        return [w.queue_name for w in workers if w.queue_name]

    for target, obj in (("app:tasks.workers", tasks.workers), ("app:tasks", tasks)):
        options = WorkerOptions(target=target, queues=("images", "reports"), concurrency=2)
        workers = await build_workers(obj, options)
        assert consuming(workers) == ["images", "reports"]
        assert "concurrency=2" in repr(workers[0])
    assert consuming(await build_workers(tasks.workers, WorkerOptions("a:t", ("mail",)))) == [
        "mail"
    ]
    with pytest.raises(
        TargetError,
        match=r"--queue 'imgs': no task of the registry of 'app:tasks\.workers' is on it; "
        r"its queues: images, mail, reports",
    ):
        options = WorkerOptions(target="app:tasks.workers", queues=("images", "imgs"))
        await build_workers(tasks.workers, options)


def test_queue_options_split_as_celerys_q() -> None:
    assert split_queues(["images", "mail,reports", " images ,", "mail"]) == (
        "images",
        "mail",
        "reports",
    )


# --- the testing kit -------------------------------------------------------------------------


async def test_run_task_shows_the_recorded_status_and_typed_result() -> None:
    tasks = make_tasks()
    resize: Any = tasks.tasks["images.resize"]
    run = await run_task(resize, ["cat.png"], {"width": 400})
    assert run.outcome.acked and run.result == Thumb("cat.png", 400)
    assert run.status.state is JobState.SUCCEEDED and run.status.attempt == 1


async def test_run_task_takes_a_signature_and_refuses_a_partial_or_extra_arguments() -> None:
    tasks = make_tasks()
    resize: Any = tasks.tasks["images.resize"]
    run = await run_task(resize.s("cat.png", width=400), retry=None)
    assert run.outcome.acked and run.result == Thumb("cat.png", 400)
    with pytest.raises(TaskArgumentError, match=r"images\.resize.*partial"):
        await run_task(resize.partial(width=400))
    with pytest.raises(TaskArgumentError, match=r"images\.resize.*no args or kwargs"):
        await run_task(resize.s("cat.png"), ["dog.png"])


async def test_run_task_records_retrying_failed_and_cancelled() -> None:
    tasks = Tasks()

    @tasks.task(queue="work")
    def flaky(n: int) -> int:
        raise ValueError(f"boom {n}")

    @tasks.task(queue="work")
    def stopping() -> None:
        job = current_job()
        assert job is not None and job.attempt == 1
        raise Cancelled("enough")

    policy = RetryPolicy(max_attempts=2, initial_delay=2, jitter=0)
    before = time.time()
    run = await run_task(flaky, [1], retry=policy)
    assert run.outcome.retried and run.status.state is JobState.RETRYING
    assert run.status.error_type == "builtins.ValueError" and run.status.error_message == "boom 1"
    assert run.status.next_retry_at is not None
    assert before + 1.9 <= run.status.next_retry_at.timestamp() <= time.time() + 2.1
    last = await run_task(flaky, [2], retry=policy, attempt=2)
    assert last.outcome.dead_lettered and last.status.state is JobState.FAILED
    assert last.status.attempt == 2 and last.status.error_message == "boom 2"
    stopped = await run_task(stopping)
    assert stopped.outcome.acked and stopped.status.state is JobState.CANCELLED


async def test_a_result_that_does_not_validate_as_the_return_type_names_job_and_task() -> None:
    """A task annotated `-> int` that returned a str: the job succeeded, but its typed
    `result()` can't give an int. The error must say which job and task, and what to do (a
    bare "does not validate as int" in a web app's 500 leaves a user guessing)."""
    store = MemoryStore()
    tasks = Tasks(store=store)

    @tasks.task(queue="work", name="work.count")
    async def count() -> int:
        return "many"  # type: ignore[return-value]

    run_error = None
    try:
        await run_task(count)
    except PayloadError as exc:
        run_error = str(exc)
    assert run_error is not None and "work.count" in run_error, run_error
    write = Write(
        job_id="j1", task="work.count", queue="work", state=JobState.SUCCEEDED,
        at=time.time(), result=b'"many"', content_type="application/json",
    )  # fmt: skip
    await store.record([write])
    with pytest.raises(PayloadError) as caught:
        await count.job("j1").result(timeout=1)
    message = str(caught.value)
    assert "j1" in message and "work.count" in message and "return type" in message, message
    assert "tasks.job(" in message, message  # the untyped way to read it
    assert await tasks.job("j1").result(timeout=1) == "many"
    await store.close()


async def test_a_message_for_an_unknown_task_is_dead_lettered() -> None:
    from aio_workq.jobs._running import QueueRunner
    from aio_workq.testing import run_handler

    runner = QueueRunner("work", {}, None)
    outcome = await run_handler(runner, {}, headers={"x-workq-task": "nope"})
    assert outcome.dead_lettered and isinstance(outcome.error, Reject)
    assert "no task 'nope' runs on queue 'work'" in str(outcome.error)
    # the other cause: two Tasks registries whose workers share the queue (the taskiq user's
    # "task not found" with a module per registry): the reason names that fix too
    assert "one Tasks registry" in str(outcome.error), outcome.error
    # a plain producer.publish() to a task queue: no header at all ("no task None" before)
    plain = await run_handler(runner, {"path": "cat.png"})
    assert plain.dead_lettered and isinstance(plain.error, Reject)
    message = str(plain.error)
    assert "None" not in message and "x-workq-task" in message and "enqueue" in message, message


# --- layering and exports ---------------------------------------------------------------------


def test_nothing_below_jobs_imports_it() -> None:
    # the dashboard shows the jobs; the integrations are the top layer (docs/architecture.md):
    # sync.py enqueues tasks (SyncProducer.enqueue, in _synctasks.py), and _web.py answers
    # the job store's errors for fastapi.py and aiohttp.py; the CLI serves the dashboard and
    # reads one job's status from a store (`aio-workq job`)
    above = (
        "jobs", "testing", "dashboard", "sync.py", "_synctasks.py", "_web.py", "fastapi.py",
        "aiohttp.py", "cli",
    )  # fmt: skip
    found = modules()
    bad = sorted(
        f"{path.relative_to(PACKAGE)} imports {name}"
        for module, path in found.items()
        if path.relative_to(PACKAGE).parts[0] not in above
        for name, _ in imports(module, path, set(found))
        if name.startswith("aio_workq.jobs")
    )
    assert not bad


def test_the_jobs_exports_are_sorted_and_complete() -> None:
    names = aio_workq.jobs.__all__
    assert names == sorted(names, key=str.casefold)
    public = {
        name
        for name, value in vars(aio_workq.jobs).items()
        if not name.startswith(("_", "@"))
        and name != "annotations"
        and not isinstance(value, type(aio_workq))
    }
    assert public == set(names)


async def test_a_job_whose_arguments_do_not_validate_is_recorded_failed() -> None:
    from aio_workq.jobs._recorder import Recorder
    from aio_workq.jobs._running import QueueRunner
    from aio_workq.testing import run_handler

    tasks = make_tasks()
    resize: Any = tasks.tasks["images.resize"]
    store = MemoryStore()
    recorder = Recorder(store)
    runner = QueueRunner("images", {resize.name: resize}, recorder)
    outcome = await run_handler(
        runner, {"path": 3}, queue="images", hooks=[recorder], message_id="bad-1",
        headers={"x-workq-task": resize.name},
    )  # fmt: skip
    await recorder.close()
    assert outcome.dead_lettered
    record = await store.get("bad-1")
    assert record is not None and record.status.state is JobState.FAILED
    assert record.status.error_type == "aio_workq.PayloadError"


async def test_group_commit_shares_a_batch_a_caller_may_leave_it_a_failure_is_caught_up() -> None:
    from aio_workq.jobs import StoreError
    from aio_workq.jobs._recorder import GroupCommit

    class Gated(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.entered = asyncio.Event(), asyncio.Event()
            self.batches: list[list[str]] = []
            self.fail = self.open = False

        async def record(self, writes: Any) -> list[bool]:
            self.batches.append([write.job_id for write in writes])
            self.entered.set()
            if not self.open:
                await self.gate.wait()  # one batch through per gate.set()
                self.gate.clear()
            if self.fail:
                raise StoreError("store down")
            return await super().record(writes)

    store = Gated()
    commits = GroupCommit(store)
    async with asyncio.timeout(5):
        first = asyncio.create_task(commits.record(w(JobState.QUEUED, "a")))
        await store.entered.wait()  # the first batch is in flight: the next ones gather
        store.entered.clear()
        rest = [asyncio.create_task(commits.record(w(JobState.QUEUED, i))) for i in "bcd"]
        store.gate.set()
        await first
        await store.entered.wait()  # the second batch is in flight ...
        rest[0].cancel()  # ... a caller gives up: the others still get theirs
        store.gate.set()
        await asyncio.gather(*rest[1:])
        assert store.batches == [["a"], ["b", "c", "d"]]
        assert all([await store.get(i) for i in "abcd"])
        store.fail = True
        store.gate.set()
        failing = [asyncio.create_task(commits.record(w(JobState.QUEUED, i))) for i in "ef"]
        results = await asyncio.gather(*failing, return_exceptions=True)
        # The store is down: the callers don't wait for it; their writes are kept ...
        assert results == [None, None]
        store.fail, store.open = False, True
        store.gate.set()
        await commits.close()  # ... and recorded once it answers again
        assert all([await store.get(i) for i in "ef"])


class _Sent:
    """A publisher that keeps the options of each publish (an offline enqueue's)."""

    def __init__(self) -> None:
        self.options: list[dict[str, Any]] = []

    async def publish(self, body: Any, queue: Any = None, **options: Any) -> str:
        self.options.append(options)
        return str(options.get("message_id"))


async def test_eta_enqueues_with_the_delay_until_it_and_a_naive_one_names_the_fix() -> None:
    """Celery's `apply_async(eta=...)` had no counterpart: a Celery user had to compute the
    delay. `options(eta=)` takes an aware datetime, its delay reckoned at each enqueue (0 once
    it has passed); a naive one, which names no moment, is refused with the fix."""
    sent = _Sent()
    tasks = make_tasks()
    tasks.bind(sent)
    resize: Any = tasks.tasks["images.resize"]
    await resize.options(eta=datetime.now(UTC) + timedelta(seconds=60)).enqueue("a.png")
    await resize.options(eta=datetime.now(UTC) - timedelta(hours=1)).enqueue("b.png")
    paris = datetime.now(UTC).astimezone(timezone(timedelta(hours=1))) + timedelta(minutes=2)
    await resize.options(eta=paris, priority=3).enqueue("c.png")
    first, past, local = (options["delay"] for options in sent.options)
    assert 55 < first <= 60 and past == 0 and 115 < local <= 120
    assert sent.options[2]["priority"] == 3
    # the latest of delay= and eta= wins; both at once is refused
    assert resize.options(delay=5).options(eta=paris).publish_options["delay"] > 100
    assert resize.options(eta=paris).options(delay=5).publish_options["delay"] == 5
    with pytest.raises(ConfigurationError, match=r"eta= or delay=, not both"):
        resize.options(eta=paris, delay=5)
    with pytest.raises(ConfigurationError, match=r"has no time zone.*datetime.now\(UTC\)"):
        resize.options(eta=datetime.now() + timedelta(minutes=5))  # naive: no zone
    with pytest.raises(ConfigurationError, match=r"takes a datetime with a time zone.*delay="):
        resize.options(eta=60)
    assert isinstance(ConfigurationError("x"), ValueError)


def test_workers_build_the_validators_before_the_first_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tasks.workers()` builds every task's validators (pydantic's import, the types'
    schemas) at once: the first job decodes its arguments and the first child enqueue makes
    its handle without building one on the event loop, where the loop watchdog blamed the
    first handler for it ("blocked the event loop for 1.53 s")."""
    from aio_workq.jobs import _tasks

    tasks = Tasks(store=MemoryStore())

    @tasks.task(queue="p9-first")
    async def first(n: int) -> int:
        return n

    @tasks.task(queue="p9-second")
    async def second(size: float, label: str = "x") -> str:
        return label

    tasks.workers("amqp://127.0.0.1:1/", queues=["p9-first"])

    def on_the_loop(tp: Any, **_: Any) -> Any:
        raise AssertionError(f"a validator built at the first job: {tp!r}")

    monkeypatch.setattr(_tasks, "build_validator", on_the_loop)
    assert first.arguments.decode(b'{"n": 3}', "application/json") == {"n": 3}
    assert second.arguments.encode((2.5,), {}) == b'{"size":2.5}'  # a child enqueue's body
    assert second.job("j1").job_id == "j1"  # its handle's result validator, built already
