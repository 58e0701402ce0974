"""The PostgreSQL job store: its migration, the store rules, a job end to end, and a store
that can't be reached (the queue goes on)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from aio_workq import ConfigurationError, Producer
from aio_workq.jobs import JobState, StoreError, Tasks, Write
from aio_workq.jobs import postgres as postgres_store
from aio_workq.jobs.postgres import PostgresStore, migrate, schema_sql
from scripts.broker import free_port
from tests.forking import fork_running
from tests.test_jobs_offline import (
    check_against_reference,
    check_batches,
    check_cancel,
    check_late_writes,
    check_purge_keeps_old_jobs_written_lately,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
async def schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh schema with the job table (migrated twice: it is idempotent), dropped after."""
    name = f"j_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await migrate(conn, schema=name)
        await migrate(conn, schema=name)
        yield name
        await conn.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.fixture
async def store(postgres_dsn: str, schema: str) -> AsyncIterator[PostgresStore]:
    made = PostgresStore(postgres_dsn, schema=schema)
    yield made
    await made.close()


def test_the_migration_and_arguments() -> None:
    assert '"jobs_x".workq_jobs' in schema_sql("jobs_x")
    with pytest.raises(ConfigurationError):
        schema_sql("bad name")
    with pytest.raises(ConfigurationError, match="dsn= or pool="):
        PostgresStore()
    with pytest.raises(ConfigurationError, match="ttl"):
        PostgresStore("postgresql://x@localhost/db", ttl=0)
    assert "s3cret" not in repr(PostgresStore("postgresql://app:s3cret@db/app"))


async def test_a_store_without_its_tables_says_to_run_the_migration(postgres_dsn: str) -> None:
    store = PostgresStore(postgres_dsn, schema="never_migrated")
    try:
        with pytest.raises(StoreError, match=r"aio_workq\.jobs\.postgres\.migrate"):
            await store.get("some-job")
        with pytest.raises(StoreError, match="migrate"):
            await store.record([Write(job_id="j", task="t", queue="q", state=JobState.QUEUED,
                                      at=time.time())])  # fmt: skip
    finally:
        await store.close()


async def test_an_enqueue_to_a_store_without_its_tables_logs_the_fix_not_an_outage(
    postgres_dsn: str, amqp_url: str, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The enqueue goes through (the queue never waits for the store), and the one log line
    says what is wrong and what to do: before, it called the store "unreachable" and promised
    the states would be recorded "when it answers again", which no wait brings."""
    tasks = Tasks(store=PostgresStore(postgres_dsn, schema="never_migrated"))

    @tasks.task(queue=queue_name)
    async def noop() -> None:
        pass

    caplog.set_level(logging.WARNING, logger="aio_workq.jobs")
    async with Producer(amqp_url) as producer:
        tasks.bind(producer)
        await noop.enqueue()
    assert tasks.store is not None
    await tasks.store.close()
    lines = [r for r in caplog.records if "never_migrated" in r.getMessage()]
    assert lines, caplog.text
    assert lines[0].levelno == logging.ERROR, caplog.text
    message = lines[0].getMessage()
    assert "unreachable" not in message and "migrate" in message, message
    assert "waiting does not cure" in message, message


async def test_the_store_rules(store: PostgresStore) -> None:
    await check_late_writes(store)
    await check_cancel(store)


async def test_the_same_job_twice_in_one_batch_follows_the_rules_in_order(
    store: PostgresStore,
) -> None:
    await check_batches(store)


async def test_random_batches_end_as_the_reference_store_says(store: PostgresStore) -> None:
    await check_against_reference(store, rounds=400)


async def test_records_expire_after_the_ttl(postgres_dsn: str, schema: str) -> None:
    store = PostgresStore(postgres_dsn, schema=schema, ttl=0.2)
    try:
        write = Write(job_id="e", task="t", queue="q", state=JobState.QUEUED, at=time.time())
        await store.record([write])
        assert await store.get("e") is not None
        async with asyncio.timeout(5):
            while await store.get("e") is not None:  # noqa: ASYNC110 - time is the event
                await asyncio.sleep(0.05)
        assert await store.purge() == 1
    finally:
        await store.close()


async def test_a_backlog_of_expired_records_is_purged_a_part_in_front_of_each_batch(
    postgres_dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge in front of a batch deletes at most `_PURGE_ROWS` rows a table: a backlog of
    expired records (the workers stopped for a day) could otherwise take one statement longer
    than the store's timeout, fail the batch (the purge rolled back) and every batch after it.
    The next batches delete the rest, then the purge waits its minute again."""
    monkeypatch.setattr(postgres_store, "_PURGE_ROWS", 100)
    old = time.time() - 3 * 86_400
    table = f'"{schema}".workq_jobs'

    async def expire(rows: int, first: int) -> None:
        await conn.execute(
            f"INSERT INTO {table} (job_id, task, queue, state, rank, attempt, created_at, "
            "updated_at, expires_at) SELECT 'old-' || i, 't', 'q', 'succeeded', 5, 1, %(old)s, "
            "%(old)s, %(old)s + 60 FROM generate_series(%(first)s::int, %(last)s::int) AS i",
            {"old": old, "first": first, "last": first + rows - 1},
        )

    async def expired() -> int:
        cursor = await conn.execute(f"SELECT count(*) FROM {table} WHERE job_id LIKE 'old-%%'")
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    store = PostgresStore(postgres_dsn, schema=schema, ttl=60)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        try:
            await expire(250, 0)
            left = []
            for k in range(4):
                write = Write(job_id=f"new-{k}", task="t", queue="q", state=JobState.QUEUED,
                              at=time.time())  # fmt: skip
                assert await store.record([write]) == [True]
                left.append(await expired())
            assert left == [150, 50, 0, 0]
            await expire(1, 1000)  # within the minute after the backlog's end: kept for now
            write = Write(job_id="new-5", task="t", queue="q", state=JobState.QUEUED,
                          at=time.time())  # fmt: skip
            assert await store.record([write]) == [True]
            assert await expired() == 1
            assert await store.purge() == 1  # the explicit purge deletes whatever has expired
        finally:
            await store.close()


async def test_a_purged_group_never_loses_its_members_first(
    postgres_dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While expired groups are left for the next batch's purge, their members are kept: a
    group is never found without the members it had (a late member's finish reads them)."""
    monkeypatch.setattr(postgres_store, "_PURGE_ROWS", 100)
    old = time.time() - 3 * 86_400
    groups, members = f'"{schema}".workq_groups', f'"{schema}".workq_group_members'
    store = PostgresStore(postgres_dsn, schema=schema, ttl=60)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:

        async def count(sql: str) -> int:
            row = await (await conn.execute(sql)).fetchone()
            assert row is not None
            return int(row[0])

        try:
            await conn.execute(
                f"INSERT INTO {groups} (group_id, size, remaining, created_at, expires_at) "
                "SELECT 'g' || i, 1, 1, %(old)s, %(old)s FROM generate_series(1, 250) AS i",
                {"old": old},
            )
            await conn.execute(  # the members in the other order: a purge's part of each
                f"INSERT INTO {members} (group_id, idx, job_id, expires_at) "  # table differs
                "SELECT 'g' || i, 0, 'j' || i, %(old)s FROM generate_series(250, 1, -1) AS i",
                {"old": old},
            )
            orphans = (
                f"SELECT count(*) FROM {groups} AS g WHERE NOT EXISTS "
                f"(SELECT 1 FROM {members} AS m WHERE m.group_id = g.group_id)"
            )
            for k in range(6):
                write = Write(job_id=f"new-{k}", task="t", queue="q", state=JobState.QUEUED,
                              at=time.time())  # fmt: skip
                assert await store.record([write]) == [True]
                assert await count(orphans) == 0
            assert await count(f"SELECT count(*) FROM {groups}") == 0
            assert await count(f"SELECT count(*) FROM {members}") == 0
        finally:
            await store.close()


async def test_the_purge_keeps_old_jobs_written_lately(postgres_dsn: str, schema: str) -> None:
    store = PostgresStore(postgres_dsn, schema=schema, ttl=60)
    try:
        await check_purge_keeps_old_jobs_written_lately(store)
    finally:
        await store.close()


async def test_status_writes_update_rows_in_place(postgres_dsn: str, schema: str) -> None:
    """A job's status writes change no indexed column, so PostgreSQL updates its row in place
    (heap-only tuples: no index entries per write) in the room the table's fillfactor leaves
    on each page: most of a worker's claims and outcomes are such updates."""
    store = PostgresStore(postgres_dsn, schema=schema)
    ids = [f"hot-{i}" for i in range(500)]
    now = time.time()

    def writes(chunk: list[str], state: JobState, at: float, **fields: Any) -> list[Write]:
        return [
            Write(job_id=job_id, task="t", queue="q", state=state, at=at, **fields)
            for job_id in chunk
        ]  # fmt: skip

    try:
        await store.record(writes(ids, JobState.QUEUED, now))
        for i in range(0, len(ids), 100):
            chunk = ids[i : i + 100]
            assert all(await store.record(writes(chunk, JobState.RUNNING, now + 1, claim=True)))
            done = writes(chunk, JobState.SUCCEEDED, now + 2, result=b"1")
            assert all(await store.record(done))
    finally:
        await store.close()  # its connections end, and with them their statistics are sent
    query = (
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
        "WHERE schemaname = %s AND relname = 'workq_jobs'"
    )
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        async with asyncio.timeout(10):
            while True:
                row = await (await conn.execute(query, (schema,))).fetchone()
                assert row is not None
                if row[0] >= 2 * len(ids):
                    break
                await asyncio.sleep(0.05)  # the statistics arrive by themselves
    updates, in_place = row
    assert in_place >= 0.9 * updates, (updates, in_place)


@pytest.mark.broker
async def test_a_job_end_to_end(
    amqp_url: str, producer: Producer, store: PostgresStore, queue_name: str
) -> None:
    tasks = Tasks(producer=producer, store=store)

    @tasks.task(queue=queue_name)
    async def add(a: int, b: int = 1) -> int:
        return a + b

    job = await add.enqueue(40, b=2)
    assert (await job.status()).state is JobState.QUEUED
    workers = tasks.workers(amqp_url)
    try:
        for worker in workers:
            await worker.start()
        assert await job.result(timeout=20) == 42
    finally:
        for worker in workers:
            await worker.stop(timeout=1)
    status = await job.status()
    assert status.state is JobState.SUCCEEDED and status.attempt == 1


@pytest.mark.broker
async def test_an_unreachable_store_does_not_stop_the_queue(
    amqp_url: str, producer: Producer, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", timeout=0.5)
    tasks = Tasks(producer=producer, store=down)
    ran = asyncio.Event()

    @tasks.task(queue=queue_name)
    async def important() -> None:
        ran.set()

    job = await important.enqueue()  # recorded nowhere, sent all the same
    assert "unreachable" in caplog.text  # its record is kept for when the store answers
    workers = tasks.workers(amqp_url)
    try:
        for worker in workers:
            await worker.start()
        async with asyncio.timeout(20):
            await ran.wait()
    finally:
        for worker in workers:
            await worker.stop(timeout=1)
    assert "unreachable" in caplog.text
    with pytest.raises(
        StoreError, match=r"PostgreSQL store.*logged by psycopg.s logger .psycopg\.pool."
    ):
        await job.status()
    await down.close()


@pytest.mark.parametrize(
    "dsn", ["postgres:/app:s3cret@127.0.0.1:5432/postgres", "postgresql://app:s3cret@db:x/app"]
)
def test_a_malformed_dsn_is_refused_at_once_without_its_password(dsn: str) -> None:
    with pytest.raises(ConfigurationError, match="not a PostgreSQL connection") as caught:
        PostgresStore(dsn)
    assert "s3cret" not in str(caught.value)


async def test_a_failed_write_fails_its_whole_batch_and_the_store_goes_on(
    store: PostgresStore,
) -> None:
    def write(job_id: str, attempt: int = 1) -> Write:
        return Write(
            job_id=job_id, task="t", queue="q", state=JobState.QUEUED, at=time.time(),
            attempt=attempt,
        )  # fmt: skip

    # The second write fails in the server (attempt out of the column's range): the batch is
    # one transaction, so the first is not recorded either.
    with pytest.raises(StoreError, match="recording job states"):
        await store.record([write("first"), write("second", attempt=2**40), write("third")])
    assert await store.get("first") is None
    # The connection went back to the pool usable: the next batch is recorded.
    assert await store.record([write("first"), write("third")]) == [True, True]
    record = await store.get("first")
    assert record is not None and record.status.state is JobState.QUEUED


async def _rows(dsn: str, schema: str) -> dict[str, tuple[object, ...]]:
    columns = (
        "task, queue, state, rank, attempt, defers, next_retry_at, error_type, error_message, "
        "result, content_type, updated_at"
    )
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(f'SELECT job_id, {columns} FROM "{schema}".workq_jobs')
        return {row[0]: tuple(row[1:]) for row in await cursor.fetchall()}


async def test_every_field_of_a_batch_reaches_postgresql_as_written(
    postgres_dsn: str, schema: str
) -> None:
    """The batch's columns, built as binary arrays by the store itself (#23): text in the
    connection's encoding, NULL apart from empty, every float's bits, the int limits."""
    from psycopg_pool import AsyncConnectionPool

    at = time.time()
    writes = [
        Write(
            job_id="é-1", task="tâche.ü", queue="q ☃", state=JobState.RETRYING, at=at,
            attempt=2**31 - 1, defers=7, next_retry_at=at + 0.123456789, error_type="E",
            error_message="line\n" * 300,
        ),
        Write(
            job_id="j-2", task="t", queue="q", state=JobState.SUCCEEDED, at=at + 1e-6,
            result=b"\x00\xff" * 5, content_type="application/octet-stream",
        ),
        Write(
            job_id="j-3", task="t", queue="q", state=JobState.FAILED, at=at, result=b"",
            content_type="", error_type="", error_message="",
        ),
        Write(job_id="j-4", task="t", queue="q", state=JobState.RUNNING, at=at, claim=True),
    ] + [
        Write(job_id=f"many-{i}", task=f"task-{i % 7}", queue="q", state=JobState.QUEUED, at=at)
        for i in range(500)
    ]  # fmt: skip
    store = PostgresStore(postgres_dsn, schema=schema)
    try:
        assert await store.record(writes) == [True] * len(writes)
    finally:
        await store.close()
    rows = await _rows(postgres_dsn, schema)
    assert len(rows) == len(writes)
    for write in writes:
        assert rows[write.job_id] == (
            write.task, write.queue, write.state.value, write.rank, write.attempt, write.defers,
            write.next_retry_at, write.error_type, write.error_message, write.result,
            write.content_type, write.at,
        ), write.job_id  # fmt: skip
    # A client encoding other than UTF-8: the strings are sent in it.
    pool: AsyncConnectionPool = AsyncConnectionPool(
        postgres_dsn, kwargs={"client_encoding": "LATIN1"}, open=False, min_size=1
    )
    await pool.open()
    latin = PostgresStore(pool=pool, schema=schema)
    try:
        done = Write(job_id="é-1", task="tâche.ü", queue="q ☃", state=JobState.SUCCEEDED, at=at)
        with pytest.raises(StoreError):  # "☃" has no LATIN1 form: the batch fails, typed
            await latin.record([done])
        done = Write(job_id="é-5", task="tâche.ü", queue="qé", state=JobState.SUCCEEDED, at=at)
        assert await latin.record([done]) == [True]
    finally:
        await latin.close()
        await pool.close()
    assert (await _rows(postgres_dsn, schema))["é-5"][:3] == ("tâche.ü", "qé", "succeeded")


async def test_a_pool_of_yours_with_dict_rows_records_and_reads(
    postgres_dsn: str, schema: str
) -> None:
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    pool: AsyncConnectionPool = AsyncConnectionPool(
        postgres_dsn, kwargs={"row_factory": dict_row}, open=False, min_size=1
    )
    await pool.open()
    store = PostgresStore(pool=pool, schema=schema)
    try:
        at = time.time()
        claim = Write(job_id="d1", task="t", queue="q", state=JobState.RUNNING, at=at, claim=True)
        assert await store.record([claim]) == [True]
        record = await store.get("d1")
        assert record is not None and record.status.state is JobState.RUNNING
    finally:
        await store.close()
        await pool.close()


_UNANSWERED = r"did not answer within 1 s|couldn't get a connection after 1 sec"


async def test_a_store_that_stops_answering_fails_within_its_timeout(
    postgres_dsn: str, schema: str
) -> None:
    """A server that stops answering mid-session (a partition: the connection stays open, no
    byte comes back): every call raises `StoreError` within the store's `timeout`, and a
    handle's `result(timeout=)` keeps its own bound (before: they waited forever)."""
    from tests.faultproxy import FaultProxy

    port = int(postgres_dsn.rsplit(":", 1)[1].split("/")[0])
    async with FaultProxy(upstream_port=port) as proxy:
        dsn = postgres_dsn.replace(f":{port}/", f":{proxy.port}/")
        store = PostgresStore(dsn, schema=schema, timeout=1)
        patient = PostgresStore(dsn, schema=schema, timeout=10)  # longer than a wait below
        tasks = Tasks(store=store)
        try:
            at = time.time()
            queued = Write(job_id="bh-1", task="t", queue="q", state=JobState.QUEUED, at=at)
            assert await store.record([queued]) == [True]
            assert await store.get("bh-1") is not None  # a connection in the pool, open
            proxy.black_hole()
            with pytest.raises(StoreError, match="did not answer within 1 s"):
                async with asyncio.timeout(30):
                    await store.get("bh-1")
            for call in (
                lambda: store.get("bh-1"),
                lambda: store.record([queued]),
                lambda: store.cancel("bh-1", now=time.time()),
                lambda: store.recent(state="failed"),
                lambda: tasks.job("bh-1").status(),
            ):
                started = time.monotonic()
                # the first call's connection does not answer; later ones may find none
                # (the pool's new connections do not get through either)
                with pytest.raises(StoreError, match=_UNANSWERED):
                    async with asyncio.timeout(30):
                        await call()
                assert time.monotonic() - started < 1 + 2
            # A store with a longer timeout than the wait: the wait's deadline holds.
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="did not answer"):  # JobTimeoutError
                async with asyncio.timeout(30):
                    await Tasks(store=patient).job("bh-1").result(timeout=0.3)
            assert time.monotonic() - started < 0.3 + 2  # not the store's 10 s
            proxy.heal()
            async with asyncio.timeout(30):  # the store comes back by itself
                while True:
                    try:
                        record = await store.get("bh-1")
                        break
                    except StoreError:
                        await asyncio.sleep(0.1)
            assert record is not None and record.status.state is JobState.QUEUED
        finally:
            proxy.heal()
            await store.close()
            await patient.close()


async def test_a_forked_child_opens_connections_of_its_own(postgres_dsn: str, schema: str) -> None:
    """A store used before `fork()` (e.g. a pre-forking server that loaded the app): the
    child and the parent both use it at once, each on connections of its own (before: they
    shared the parent's, read each other's answers, and one hung)."""
    store = PostgresStore(postgres_dsn, schema=schema, timeout=5)
    try:
        at = time.time()
        await store.record([Write(job_id="f-1", task="t", queue="q", state=JobState.QUEUED, at=at)])
        assert await store.get("f-1") is not None

        async def child() -> None:  # the child: its own event loop, the same store object
            for _ in range(200):
                record = await store.get("f-1")
                assert record is not None and record.status.job_id == "f-1"

        forked = fork_running(child, timeout=20)
        async with asyncio.timeout(30):
            for _ in range(200):
                record = await store.get("f-1")
                assert record is not None and record.status.job_id == "f-1"
        await forked.wait()
        assert await store.get("f-1") is not None  # the parent's connections are intact
    finally:
        await store.close()


_ENDS_WITH_THE_STORE_OPEN = """
import asyncio, sys
from aio_workq.jobs import StoreError, Tasks
from aio_workq.jobs.postgres import PostgresStore

async def main() -> None:
    tasks = Tasks(store=PostgresStore(sys.argv[1], timeout=1))
    try:
        await tasks.job("j").status()
    except StoreError:
        print("StoreError", flush=True)

asyncio.run(main())
print("exited", flush=True)
"""


async def test_a_script_that_ends_with_the_store_open_exits_while_the_pool_connects(
    own_postgres: Any,
) -> None:
    """`asyncio.run()` ends while the store's pool is still connecting (a paused server, whose
    port accepts and never answers): psycopg_pool swallows its worker's cancellation, and
    asyncio.run() waited for that worker forever; the store closes its pool when cancelled."""
    import os
    import signal
    import subprocess
    import sys

    pid = own_postgres.postmaster_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _ENDS_WITH_THE_STORE_OPEN, own_postgres.dsn,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(20):
                await proc.wait()  # its few lines fit the pipe
        except TimeoutError:
            proc.kill()
            await proc.wait()
            printed = await proc.stdout.read()
            raise AssertionError(f"the script never exited; it printed {printed!r}") from None
        out = await proc.stdout.read()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (proc.returncode, out.decode().split()) == (0, ["StoreError", "exited"])
