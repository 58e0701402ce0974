"""Typed tasks from synchronous code: `SyncProducer.enqueue(task, ...)` and its blocking
`SyncJobHandle`, against a real broker and the SQLite store (PostgreSQL once).

The worker runs on the test's event loop, as another process would; the sync calls run in
threads (`asyncio.to_thread`), as a WSGI server's request threads do. The worker's registry
is a second `Tasks` with a store of its own on the same file, as in a worker process.

mypy checks this file: each wrong call carries the `# type: ignore[...]` of the error mypy
reports for it (an unused ignore fails the lint).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from aio_workq import (
    BrokerConnectionError,
    ConfigurationError,
    IntegrationError,
    PublishTimeoutError,
    Worker,
)
from aio_workq.jobs import (
    JobCancelledError,
    JobNotFoundError,
    JobState,
    JobStore,
    JobTimeoutError,
    SQLiteStore,
    StoreError,
    TaskArgumentError,
    Tasks,
)
from aio_workq.sync import SyncJobHandle, SyncProducer
from scripts.broker import free_port
from tests.faultproxy import FaultProxy
from tests.helpers import queue_depth, run_script, wait_until
from tests.test_jobs import running


@dataclass
class Thumb:
    path: str
    width: int


class App:
    """The tasks of an app, declared on a registry with `store` (the web process's, or the
    worker's: the same names and queue)."""

    def __init__(self, store: JobStore | None, queue: str) -> None:
        self.tasks = Tasks(store=store)

        @self.tasks.task(queue=queue, name="synctasks.thumb")
        def thumb(path: str, width: int = 100) -> Thumb:
            return Thumb(path, width)

        self.thumb = thumb


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


@pytest.fixture
def web(db: Path, queue_name: str) -> App:
    return App(SQLiteStore(db), queue_name)


@pytest.fixture
def producer(amqp_url: str) -> Iterator[SyncProducer]:
    """A started SyncProducer (this module's `producer`: conftest's is an async one)."""
    with SyncProducer(amqp_url, timeout=5) as made:
        yield made


@dataclass
class DownStore:
    """An app whose SQLite store is "down": another connection holds the file's exclusive
    lock, so every write fails (busy after 50 ms) until `answer()`."""

    web: App
    db: Path
    lock: sqlite3.Connection

    def answer(self) -> None:
        self.lock.execute("ROLLBACK")

    async def wait_queued(self, *job_ids: str) -> None:
        """Until each job's record reads `queued` (in this order), read by a store of its own."""
        reader = SQLiteStore(self.db)

        async def queued(job_id: str) -> bool:
            record = await reader.get(job_id)
            return record is not None and record.status.state is JobState.QUEUED

        try:
            for job_id in job_ids:
                await wait_until(functools.partial(queued, job_id), timeout=15)
        finally:
            await reader.close()


@asynccontextmanager
async def down(db: Path, queue: str, busy_timeout: float) -> AsyncIterator[DownStore]:
    """An app on a SQLite store at `db` that is down for the block (or until `answer()`);
    each write waits `busy_timeout` for the lock, then fails."""
    web = App(SQLiteStore(db, busy_timeout=busy_timeout), queue)
    assert web.tasks.store is not None
    await web.tasks.store.purge()  # the file and its table exist
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # every write of the store now fails: it is "down"
    try:
        yield DownStore(web, db, lock)
    finally:
        lock.close()


@pytest.fixture
async def store_down(db: Path, queue_name: str) -> AsyncIterator[DownStore]:
    """The store down, its writes failing at once (50 ms)."""
    async with down(db, queue_name, busy_timeout=0.05) as made:
        yield made


def worker(app: App, url: str) -> AbstractAsyncContextManager[list[Worker]]:
    """The app's workers started (on the test's loop), stopped and their store closed after."""
    return running(app.tasks, url)


# --- the road -------------------------------------------------------------------------------


@pytest.mark.broker
async def test_enqueue_follow_and_find_a_job_by_id_from_sync_code(
    amqp_url: str, producer: SyncProducer, web: App, db: Path, queue_name: str
) -> None:
    job = await asyncio.to_thread(producer.enqueue, web.thumb, "cat.png", width=64)
    assert isinstance(job, SyncJobHandle) and repr(job) == f"<SyncJobHandle {job.job_id}>"
    status = await asyncio.to_thread(job.status)
    assert status.state is JobState.QUEUED and status.task == "synctasks.thumb"
    # options() as with `await task.enqueue(...)`: the job id, a delay
    fixed = await asyncio.to_thread(
        producer.enqueue, web.thumb.options(job_id="order-7", delay=0.5), "dog.png"
    )
    assert fixed.job_id == "order-7"
    async with worker(App(SQLiteStore(db), queue_name), amqp_url):
        thumb = await asyncio.to_thread(job.result, 20)
        assert thumb == Thumb("cat.png", 64)  # typed as the task's return type
        assert await asyncio.to_thread(fixed.result, 20) == Thumb("dog.png", 100)
    # a status view: a handle from the id alone, typed from the task or untyped from the registry
    again = producer.job(web.thumb, job.job_id)
    assert (await asyncio.to_thread(again.status)).state is JobState.SUCCEEDED
    assert await asyncio.to_thread(producer.job(web.tasks, job.job_id).result, 5) == {
        "path": "cat.png",
        "width": 64,
    }
    with pytest.raises(JobNotFoundError):
        await asyncio.to_thread(producer.job(web.tasks, "no-such-job").status)


@pytest.mark.broker
async def test_many_threads_enqueue_at_once(
    amqp_url: str, producer: SyncProducer, web: App, db: Path, queue_name: str
) -> None:
    threads, each = 8, 10

    def enqueue_some(thread: int) -> list[str]:
        ids = []
        for n in range(each):
            job = producer.enqueue(web.thumb, f"{thread}-{n}.png", width=n)
            assert job.status().state is JobState.QUEUED  # recorded before enqueue returned
            ids.append(job.job_id)
        return ids

    with ThreadPoolExecutor(threads) as pool:
        batches = await asyncio.gather(
            *(asyncio.wrap_future(pool.submit(enqueue_some, t)) for t in range(threads))
        )
    ids = [job_id for batch in batches for job_id in batch]
    assert len(set(ids)) == threads * each
    assert await queue_depth(amqp_url, queue_name) == threads * each
    async with worker(App(SQLiteStore(db), queue_name), amqp_url):
        with ThreadPoolExecutor(threads) as pool:  # not the loop's executor: the worker's
            results = await asyncio.gather(  # sync task runs there
                *(
                    asyncio.wrap_future(pool.submit(producer.job(web.thumb, i).result, 30))
                    for i in ids
                )
            )
    assert sorted(r.path for r in results) == sorted(
        f"{t}-{n}.png" for t in range(threads) for n in range(each)
    )


@pytest.mark.broker
async def test_cancel_a_queued_job_from_sync_code(producer: SyncProducer, web: App) -> None:
    job = await asyncio.to_thread(producer.enqueue, web.thumb, "cat.png")
    assert (await asyncio.to_thread(job.cancel)).state is JobState.CANCELLED
    with pytest.raises(JobCancelledError):
        await asyncio.to_thread(job.result, 10)
    assert (await asyncio.to_thread(job.status)).state is JobState.CANCELLED


# --- side roads ------------------------------------------------------------------------------


@pytest.mark.broker
async def test_result_timeout_is_a_job_timeout_error_in_time(
    producer: SyncProducer, web: App
) -> None:
    job = await asyncio.to_thread(producer.enqueue, web.thumb, "cat.png")  # no worker runs it
    started = time.monotonic()
    with pytest.raises(JobTimeoutError, match="queued") as caught:
        await asyncio.to_thread(job.result, 0.5)
    assert 0.5 <= time.monotonic() - started < 2.0
    assert caught.value.job_id == job.job_id
    with pytest.raises(JobTimeoutError):
        await asyncio.to_thread(job.wait, 0.2)


@pytest.mark.broker
async def test_the_store_down_at_enqueue_sends_the_job_anyway_and_it_catches_up(
    amqp_url: str, producer: SyncProducer, store_down: DownStore, db: Path, queue_name: str
) -> None:
    # As `await task.enqueue()`: the job is sent, its `queued` record kept while the store
    # can't be written, and the states catch up once it answers again.
    started = time.monotonic()
    job = await asyncio.to_thread(producer.enqueue, store_down.web.thumb, "cat.png", width=8)
    assert time.monotonic() - started < 5.0 + 5.0  # the publish, then at most the store's
    assert await queue_depth(amqp_url, queue_name) == 1  # sent anyway
    store_down.answer()
    async with worker(App(SQLiteStore(db), queue_name), amqp_url):
        assert await asyncio.to_thread(job.result, 20) == Thumb("cat.png", 8)


@pytest.mark.broker
async def test_broker_down_is_a_publish_timeout_within_the_timeout(amqp_url: str, web: App) -> None:
    port = urlsplit(amqp_url).port
    assert port is not None
    async with FaultProxy(upstream_port=port) as proxy:
        producer = SyncProducer(proxy.url(amqp_url), timeout=1.5, connect_timeout=5)
        try:
            await asyncio.to_thread(producer.enqueue, web.thumb, "before.png")
            proxy.black_hole()  # the broker stops answering
            started = time.monotonic()
            with pytest.raises(PublishTimeoutError):
                await asyncio.to_thread(producer.enqueue, web.thumb, "during.png")
            assert time.monotonic() - started < 1.5 + 1.0
        finally:
            proxy.heal()
            await asyncio.to_thread(producer.close, 2)


def test_an_unreachable_broker_is_a_typed_error_and_bad_arguments_never_connect(
    tmp_path: Path,
) -> None:
    app = App(SQLiteStore(tmp_path / "jobs.db"), "q")
    producer = SyncProducer(f"amqp://guest:s3cret@127.0.0.1:{free_port()}/", connect_timeout=1)
    try:
        with pytest.raises(TaskArgumentError, match="hieght"):
            producer.enqueue(app.thumb, "cat.png", hieght=4)  # type: ignore[call-arg]
        assert "not started" in repr(producer)  # refused at call time, before connecting
        started = time.monotonic()
        with pytest.raises(BrokerConnectionError) as caught:
            producer.enqueue(app.thumb, "cat.png")
        assert time.monotonic() - started < 1 + 2.5 and "s3cret" not in str(caught.value)
    finally:
        producer.close()


@pytest.mark.broker
def test_cancel_with_the_store_down_is_a_store_error_within_its_timeout(amqp_url: str) -> None:
    """`cancel()` is bounded by the producer's `timeout` as `status()` is, as the web-apps
    guide says: the store's part waited twice that (1.0 s for a 0.5 s timeout, the error
    saying "within 1 s"), and `cancel(timeout=1)` took 2 s."""
    from aio_workq.jobs.postgres import PostgresStore

    app = App(PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"), "q")
    with SyncProducer(amqp_url, timeout=0.5) as producer:
        handle = producer.job(app.tasks, "some-job")
        for call, bound in ((handle.status, 0.5), (handle.cancel, 0.5)):
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"within 0\.5 s") as caught:
                call()
            took = time.monotonic() - started
            assert bound <= took < bound + 0.4, (call, took)
            assert caught.value.unreachable
        started = time.monotonic()
        with pytest.raises(StoreError, match="within 0.8 s"):
            handle.cancel(timeout=0.8)
        assert time.monotonic() - started < 0.8 + 0.4


def test_wrong_calls_are_type_errors_and_refused_at_call_time() -> None:
    app = App(None, "typing-images")
    producer = SyncProducer("amqp://127.0.0.1:1/")  # never connects: refused before that
    try:
        with pytest.raises(TaskArgumentError, match="width"):
            producer.enqueue(app.thumb, "cat.png", width="wide")  # type: ignore[arg-type]
        with pytest.raises(TaskArgumentError, match="path"):
            producer.enqueue(app.thumb)  # type: ignore[call-arg]
        with pytest.raises(TaskArgumentError, match="hieght"):
            producer.enqueue(app.thumb.options(delay=1), "a.png", hieght=2)  # type: ignore[call-arg]
        with pytest.raises(ConfigurationError, match="@tasks.task"):
            producer.enqueue(print, "cat.png")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="Tasks"):
            producer.job("synctasks.thumb", "id")  # type: ignore[call-overload]

        def typed(handle: SyncJobHandle[Thumb]) -> SyncJobHandle[Thumb]:
            return handle

        typed(producer.job(app.thumb, "some-id"))
        wrong: SyncJobHandle[int] = producer.job(app.thumb, "some-id")  # type: ignore[arg-type]
        assert wrong.job_id == "some-id"
        assert "not started" in repr(producer)
    finally:
        producer.close()


@pytest.mark.broker
def test_a_closed_producer_refuses_tasks(amqp_url: str, web: App) -> None:
    producer = SyncProducer(amqp_url)
    job = producer.enqueue(web.thumb, "cat.png")
    producer.close()
    with pytest.raises(IntegrationError, match="closed"):
        producer.enqueue(web.thumb, "cat.png")
    with pytest.raises(IntegrationError, match="closed"):
        job.status()


@pytest.mark.broker
async def test_closing_ends_a_wait_for_a_result_without_a_timeout(amqp_url: str, web: App) -> None:
    producer = SyncProducer(amqp_url)
    job = await asyncio.to_thread(producer.enqueue, web.thumb, "cat.png")  # no worker runs it
    runner = producer._runner
    assert runner is not None

    async def is_waiting() -> bool:
        return bool(runner._waits)

    waiting = asyncio.ensure_future(asyncio.to_thread(job.result))  # no timeout: until done
    await wait_until(is_waiting)
    async with asyncio.timeout(10):  # it hung until the process exited
        await asyncio.to_thread(producer.close)
        with pytest.raises(IntegrationError, match="closed meanwhile"):
            await waiting
    with pytest.raises(IntegrationError, match="closed"):
        job.wait(1)


@pytest.mark.broker
def test_not_from_its_own_loop_thread(producer: SyncProducer, web: App) -> None:
    job = producer.enqueue(web.thumb, "cat.png")
    runner = producer._runner
    assert runner is not None

    async def on_the_loop_thread() -> None:
        with pytest.raises(IntegrationError, match="own event-loop thread"):
            producer.enqueue(web.thumb, "cat.png")
        with pytest.raises(IntegrationError, match="own event-loop thread"):
            job.status()

    runner.submit(on_the_loop_thread(), 5, "test")
    assert job.status().state is JobState.QUEUED  # still usable from other threads


@pytest.mark.broker
async def test_a_producer_used_before_fork_enqueues_in_the_child(
    amqp_url: str, db: Path, queue_name: str
) -> None:
    script = textwrap.dedent(
        f"""
        import os
        from aio_workq.jobs import SQLiteStore, Tasks
        from aio_workq.sync import SyncProducer

        tasks = Tasks(store=SQLiteStore({str(db)!r}))

        @tasks.task(queue={queue_name!r}, name="synctasks.thumb")
        def thumb(path: str, width: int = 100) -> dict:
            return {{"path": path}}

        producer = SyncProducer({amqp_url!r})
        print("job", producer.enqueue(thumb, "parent-before.png").job_id, flush=True)
        pid = os.fork()
        if pid == 0:  # the child: the parent's loop thread (and store thread) did not survive
            job = producer.enqueue(thumb, "child.png")
            assert producer.job(thumb, job.job_id).status().state.value == "queued"
            print("job", job.job_id, flush=True)
            producer.close()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("job", producer.enqueue(thumb, "parent-after.png").job_id, flush=True)
        print("child exit status", os.waitstatus_to_exitcode(status))
        """
    )
    code, text = await run_script(script)
    assert code == 0 and "child exit status 0" in text, text
    ids = [line.split()[1] for line in text.splitlines() if line.startswith("job ")]
    assert len(set(ids)) == 3, text
    reader = App(SQLiteStore(db), queue_name)
    async with worker(reader, amqp_url):
        with SyncProducer(amqp_url) as producer:
            for job_id in ids:
                done = await asyncio.to_thread(producer.job(reader.tasks, job_id).wait, 20)
                assert done.state is JobState.SUCCEEDED


@pytest.mark.postgres
@pytest.mark.broker
async def test_a_child_forked_after_the_postgres_store_was_used_exits_quietly(
    amqp_url: str, postgres_dsn: str, queue_name: str
) -> None:
    """A pre-forking server (gunicorn `--preload`) whose app enqueued before the fork: each
    worker process enqueues, then exits through the interpreter's normal exit (a recycled
    worker, `--max-requests`). The parent's store pool and its guard task, inherited but
    never run in the child, were collected there: every exit printed "Task was destroyed but
    it is pending!" and a `RuntimeError: no running event loop` ("Exception ignored")."""
    import psycopg

    from aio_workq.jobs.postgres import migrate

    schema = f"s_{queue_name.replace('-', '')[:12]}"
    script = textwrap.dedent(
        f"""
        import gc, os, sys
        from aio_workq.jobs import Tasks
        from aio_workq.jobs.postgres import PostgresStore
        from aio_workq.sync import SyncProducer

        tasks = Tasks(store=PostgresStore({postgres_dsn!r}, schema={schema!r}))

        @tasks.task(queue={queue_name!r}, name="synctasks.thumb")
        def thumb(path: str, width: int = 100) -> dict:
            return {{"path": path}}

        producer = SyncProducer({amqp_url!r}, timeout=5)
        print("job", producer.enqueue(thumb, "parent.png").job_id, flush=True)
        pid = os.fork()
        if pid == 0:  # a worker process: serves, then exits as the interpreter does
            job = producer.enqueue(thumb, "child.png")
            assert producer.job(thumb, job.job_id).status().state.value == "queued"
            print("job", job.job_id, flush=True)
            gc.collect()
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        print("child exit status", os.waitstatus_to_exitcode(status), flush=True)
        """
    )
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
        try:
            code, text = await run_script(script)
        finally:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    assert code == 0 and "child exit status 0" in text, text
    assert len({line for line in text.splitlines() if line.startswith("job ")}) == 2, text
    assert "destroyed" not in text and "Exception ignored" not in text, text


@pytest.mark.postgres
@pytest.mark.broker
async def test_with_the_postgres_store(
    amqp_url: str, producer: SyncProducer, postgres_dsn: str, queue_name: str
) -> None:
    import psycopg

    from aio_workq.jobs.postgres import PostgresStore, migrate

    schema = f"s_{queue_name.replace('-', '')[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
        try:
            # the web side's store is used only on the producer's loop thread
            web = App(PostgresStore(postgres_dsn, schema=schema), queue_name)
            job = await asyncio.to_thread(producer.enqueue, web.thumb, "pg.png", width=3)
            assert (await asyncio.to_thread(job.status)).state is JobState.QUEUED
            async with worker(
                App(PostgresStore(postgres_dsn, schema=schema), queue_name), amqp_url
            ):
                assert await asyncio.to_thread(job.result, 20) == Thumb("pg.png", 3)
        finally:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.mark.postgres
@pytest.mark.broker
async def test_a_store_shared_with_async_code_survives_the_sync_producer(
    amqp_url: str, postgres_dsn: str, queue_name: str
) -> None:
    import psycopg

    from aio_workq import Producer
    from aio_workq.jobs.postgres import PostgresStore, migrate

    schema = f"s_{queue_name.replace('-', '')[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
        store = PostgresStore(postgres_dsn, schema=schema)
        try:
            app = App(store, queue_name)
            async with Producer(amqp_url) as async_producer:
                app.tasks.bind(async_producer)
                # the async views: enqueue and read on this loop (the pool opens here)
                handle = await app.thumb.enqueue("async.png")
                assert (await handle.status()).state is JobState.QUEUED
                # the sync views: the same registry, through a SyncProducer
                sync_producer = SyncProducer(amqp_url, timeout=5)
                try:
                    job = await asyncio.to_thread(sync_producer.enqueue, app.thumb, "sync.png")
                    assert (await asyncio.to_thread(job.status)).state is JobState.QUEUED
                finally:
                    await asyncio.to_thread(sync_producer.close)
                # the async side goes on with its store
                async with asyncio.timeout(10):
                    assert (await handle.status()).state is JobState.QUEUED
                    again = await app.thumb.enqueue("after.png")
                    assert (await again.status()).state is JobState.QUEUED
        finally:
            await store.close()
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.mark.postgres
@pytest.mark.broker
async def test_a_given_pool_used_from_the_sync_producers_loop_is_refused(
    amqp_url: str, postgres_dsn: str, queue_name: str
) -> None:
    """A psycopg pool belongs to the loop it was opened on: a store made on the app's pool
    refuses the SyncProducer's loop with an error that says what to do, instead of using the
    pool from two loops."""
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    from aio_workq.jobs.postgres import PostgresStore, migrate

    schema = f"s_{queue_name.replace('-', '')[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
        try:
            async with AsyncConnectionPool(
                postgres_dsn, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
            ) as pool:
                app = App(PostgresStore(pool=pool, schema=schema), queue_name)
                missing = "no-such-job"
                with pytest.raises(JobNotFoundError):
                    await app.tasks.job(missing).status()  # this loop: the pool's own
                with SyncProducer(amqp_url, timeout=5) as producer:
                    handle = producer.job(app.tasks, missing)
                    with pytest.raises(ConfigurationError, match=r"give the store a dsn"):
                        await asyncio.to_thread(handle.status)
                with pytest.raises(JobNotFoundError):
                    await app.tasks.job(missing).status()  # still serves its loop
        finally:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.mark.broker
async def test_queued_records_kept_on_a_sync_producers_loop_survive_its_close(
    amqp_url: str, store_down: DownStore, caplog: pytest.LogCaptureFixture
) -> None:
    """One registry used from a SyncProducer's thread and from the app's loop (a Flask app
    and async code in one process) while the store is down: each loop keeps the `queued`
    records of its enqueues. Closing the SyncProducer closes its loop; what it kept is handed
    to the app's loop and caught up once the store answers (before: lost, the job unknown)."""
    from aio_workq import Producer

    web = store_down.web
    async with Producer(amqp_url) as async_producer:
        web.tasks.bind(async_producer)
        sync_producer = SyncProducer(amqp_url, timeout=5)
        try:
            synced = await asyncio.to_thread(sync_producer.enqueue, web.thumb, "sync.png")
            handle = await web.thumb.enqueue("async.png")  # the app's loop: kept here
        finally:
            await asyncio.to_thread(sync_producer.close)
        store_down.answer()
        await store_down.wait_queued(handle.job_id, synced.job_id)
    assert web.tasks.store is not None
    await web.tasks.store.close()
    assert "handed to another one" in caplog.text, caplog.text
    assert synced.job_id in caplog.text


@pytest.mark.broker
async def test_queued_records_kept_on_a_loop_that_ended_are_taken_over_by_the_next(
    amqp_url: str, store_down: DownStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Sync code enqueuing through `asyncio.run()` in a thread (a loop a call) while the store
    is down: the loop ends with the `queued` record kept. The registry's next enqueue, on
    another loop, takes it over, and it is written once the store answers (before: lost)."""
    from aio_workq import Producer

    web = store_down.web

    async def in_a_loop_of_its_own() -> str:
        async with Producer(amqp_url) as producer:
            web.tasks.bind(producer)
            return (await web.thumb.enqueue("ended.png")).job_id

    ended = await asyncio.to_thread(asyncio.run, in_a_loop_of_its_own())
    async with Producer(amqp_url) as producer:
        web.tasks.bind(producer)
        handle = await web.thumb.enqueue("next.png")  # this loop's batches take it over
        store_down.answer()
        await store_down.wait_queued(handle.job_id, ended)
    assert web.tasks.store is not None
    await web.tasks.store.close()
    assert f"taken over by this one: {ended}" in caplog.text, caplog.text


@pytest.mark.broker
async def test_the_first_enqueue_to_find_the_store_down_keeps_the_callers_bound(
    amqp_url: str, db: Path, queue_name: str
) -> None:
    """A store that takes its full 5 s to fail (SQLite's busy_timeout, PostgreSQL's timeout):
    the first tracked enqueue waited for it whatever the caller's bound (a web request's 1 s,
    `options(timeout=1)`, a SyncProducer's `timeout=1`): 6 s in all. It returns by the bound
    now, the job sent and its `queued` record kept, written once the store answers."""
    from aio_workq import Producer
    from aio_workq.fastapi import ProducerView

    async with down(db, queue_name, busy_timeout=5) as store, Producer(amqp_url) as producer:
        thumb = store.web.thumb
        ids = []
        for publisher, task in (
            (ProducerView(producer, timeout=1), thumb),  # a web app's request timeout
            (producer, thumb.options(timeout=1)),
        ):
            store.web.tasks.bind(publisher)
            started = time.monotonic()
            ids.append((await task.enqueue("cat.png")).job_id)
            assert time.monotonic() - started < 1.5, time.monotonic() - started
        sync_producer = SyncProducer(amqp_url, timeout=1)
        try:
            started = time.monotonic()
            job = await asyncio.to_thread(sync_producer.enqueue, thumb, "sync.png")
            assert time.monotonic() - started < 2.5, time.monotonic() - started  # + connecting
            ids.append(job.job_id)
        finally:
            await asyncio.to_thread(sync_producer.close)
        assert await queue_depth(amqp_url, queue_name) == 3  # all sent
        store.answer()
        await store.wait_queued(*ids)  # kept, and written (the sync one: handed over)
        assert store.web.tasks.store is not None
        await store.web.tasks.store.close()
