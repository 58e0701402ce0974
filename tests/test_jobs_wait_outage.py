"""`job.result(timeout=)` / `job.wait(timeout)` across a job store outage: a wait with a
deadline reads the store again until then (the job goes on running meanwhile), as it does when
the store hangs, instead of ending at once with the outage's `StoreError`."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import psycopg
import pytest

from aio_workq.jobs import JobState, JobTimeoutError, StoreError, Tasks, Write
from aio_workq.jobs.postgres import PostgresStore, migrate
from scripts.postgres import LocalPostgres

pytestmark = pytest.mark.postgres


def _w(job_id: str, state: JobState) -> Write:
    return Write(
        job_id=job_id,
        task="t",
        queue="q",
        state=state,
        at=time.time(),
        result=b"7",
        content_type="application/json",
    )


@pytest.mark.timeout(120)
async def test_a_wait_with_a_deadline_rides_through_a_store_restart(
    own_postgres: LocalPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="psycopg.pool")  # its "error connecting" lines
    schema = f"j_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(own_postgres.dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
    store = PostgresStore(own_postgres.dsn, schema=schema, timeout=2)
    tasks = Tasks(store=store)
    try:
        assert await store.record([_w("a", JobState.RUNNING), _w("b", JobState.RUNNING)])
        waiting = asyncio.ensure_future(tasks.job("a").result(timeout=60))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(own_postgres.stop)
        # The store refuses now: a wait that has time left goes on; one whose deadline
        # passes says the store did not answer, with the outage as its cause.
        with pytest.raises(JobTimeoutError, match="did not answer") as late:
            await tasks.job("b").wait(timeout=3)
        assert isinstance(late.value.__cause__, StoreError)
        assert not waiting.done()
        await asyncio.to_thread(own_postgres.start)
        while True:  # the job ran on meanwhile; its worker records it once the store is back
            try:
                await store.record([_w("a", JobState.SUCCEEDED)])
                break
            except StoreError:
                await asyncio.sleep(0.2)
        assert await asyncio.wait_for(waiting, 30) == 7
        # A store that answers with an error that waiting does not cure says so at once.
        broken = Tasks(store=PostgresStore(own_postgres.dsn, schema="never_migrated"))
        started = time.monotonic()
        with pytest.raises(StoreError, match="migrate"):
            await broken.job("a").wait(timeout=30)
        assert time.monotonic() - started < 10
        assert broken.store is not None
        await broken.store.close()
    finally:
        await store.close()


@pytest.mark.timeout(120)
async def test_the_first_read_after_a_quiet_restart_of_the_server_is_answered(
    own_postgres: LocalPostgres,
) -> None:
    """A web app's store, idle while PostgreSQL restarted (an upgrade, a failover): its pooled
    connection is dead, and the next status read failed with `StoreError` ("terminating
    connection due to administrator command"), a 503, with the server up for minutes. A
    connection idle for a while is checked before use, and replaced when dead."""
    schema = f"j_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(own_postgres.dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
    store = PostgresStore(own_postgres.dsn, schema=schema)
    try:
        assert await store.record([_w("a", JobState.SUCCEEDED)]) == [True]
        await asyncio.to_thread(own_postgres.stop)
        await asyncio.to_thread(own_postgres.start)
        await asyncio.sleep(2.5)  # the app was idle meanwhile
        record = await store.get("a")
        assert record is not None and record.status.state is JobState.SUCCEEDED
    finally:
        await store.close()
