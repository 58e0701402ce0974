"""aio_workq.jobs on its side roads, against a real PostgreSQL: the bounds a caller gives a
wait (NaN, infinite, not a number), and bad ids."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest

from aio_workq import ConfigurationError
from aio_workq.jobs import JobState, JobTimeoutError, Tasks, Write
from aio_workq.jobs.postgres import PostgresStore, migrate

pytestmark = pytest.mark.postgres


@pytest.fixture
async def tasks(postgres_dsn: str) -> AsyncIterator[Tasks]:
    schema = f"j_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
    store = PostgresStore(postgres_dsn, schema=schema, timeout=5)
    await store.record(
        [Write(job_id="running", task="t", queue="q", state=JobState.RUNNING, at=time.time())]
    )
    try:
        yield Tasks(store=store)
    finally:
        await store.close()


@pytest.mark.parametrize("timeout", [float("nan"), "1", b"1", True, [1]])
async def test_a_wait_given_a_timeout_that_is_not_a_number_of_seconds_is_refused(
    tasks: Tasks, timeout: object
) -> None:
    handle = tasks.job("running")
    # NaN never ran out: the wait had no bound at all (a caller's "bounded" wait hung).
    async with asyncio.timeout(5):
        with pytest.raises(ConfigurationError, match="timeout"):
            await handle.wait(timeout)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="timeout"):
            await handle.result(timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, -0.5])
async def test_a_wait_with_no_time_left_reads_the_status_once(tasks: Tasks, timeout: float) -> None:
    async with asyncio.timeout(5):
        with pytest.raises(JobTimeoutError, match="it is running"):
            await tasks.job("running").result(timeout)


async def test_a_wait_given_an_infinite_timeout_waits_as_without_one(tasks: Tasks) -> None:
    waiting = asyncio.ensure_future(tasks.job("running").result(float("inf")))
    done, _ = await asyncio.wait((waiting,), timeout=0.3)
    assert not done  # still waiting, no error
    store = tasks.store
    assert store is not None
    await store.record(
        [
            Write(
                job_id="running", task="t", queue="q", state=JobState.SUCCEEDED, at=time.time(),
                result=b"7", content_type="application/json",
            )
        ]
    )  # fmt: skip
    async with asyncio.timeout(10):
        assert await waiting == 7
