"""After a long PostgreSQL outage, the statuses kept meanwhile catch up within seconds of the
server answering again, not after psycopg_pool's reconnect backoff (which doubles up to its
`reconnect_timeout`: about 16 s between attempts 15 s into an outage, 32 s after 31 s)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from aio_workq.jobs import JobState, StoreError, Write
from aio_workq.jobs._batches import WriteBatches
from aio_workq.jobs.postgres import PostgresStore, migrate
from scripts.postgres import LocalPostgres
from tests.helpers import wait_until

pytestmark = pytest.mark.postgres

OUTAGE = 18.0  # the pool's attempts: ~0, 1, 3, 7, 15, then ~31 s (±10 %) in
CATCH_UP = 5.0  # the bound the docs give


def write(job_id: str, state: JobState) -> Write:
    return Write(job_id=job_id, task="t", queue="q", state=state, at=time.time())


async def wait_for_state(
    dsn: str, schema: str, job_id: str, state: JobState, timeout: float
) -> float:
    """Seconds until `job_id` is `state` in the table, read on a connection of the test's own
    (not the store's pool, whose reconnecting is what is measured), every 0.1 s."""
    t0 = time.monotonic()
    query = f'SELECT state FROM "{schema}".workq_jobs WHERE job_id = %s'
    async with asyncio.timeout(timeout):
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while True:
                row = await (await conn.execute(query, (job_id,))).fetchone()
                if row is not None and row[0] == state.value:
                    return time.monotonic() - t0
                await asyncio.sleep(0.1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "given", ["dsn", "pool"], ids=["own-pool", "given-pool-reconnect_timeout-5"]
)
async def test_a_status_kept_during_a_long_outage_catches_up_within_seconds_of_the_restart(
    own_postgres: LocalPostgres, caplog: pytest.LogCaptureFixture, given: str
) -> None:
    """`dsn=`: the store's own pool is replaced once the server answers. `pool=`: the pool the
    docs suggest, `reconnect_timeout=5` (psycopg_pool then gives an attempt up after 5 s, and
    the store's next call starts a new one from its first, 1 s, delay)."""
    caplog.set_level(logging.CRITICAL, logger="psycopg.pool")  # its "error connecting" lines
    schema = f"j_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(own_postgres.dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
    pool: AsyncConnectionPool[Any] | None = None
    if given == "pool":
        pool = AsyncConnectionPool(
            own_postgres.dsn, open=False, reconnect_timeout=5, kwargs={"autocommit": True}
        )
        await pool.open()
        store = PostgresStore(pool=pool, schema=schema)
    else:
        store = PostgresStore(own_postgres.dsn, schema=schema)  # timeout 5 s
    batches = WriteBatches(store, buffer=100, timeout=5.0)
    try:
        batches.write(write("before", JobState.QUEUED))
        await wait_for_state(own_postgres.dsn, schema, "before", JobState.QUEUED, 10)

        await asyncio.to_thread(own_postgres.stop)
        down_at = time.monotonic()
        batches.write(write("during", JobState.RUNNING))
        await wait_until(lambda: asyncio.sleep(0, batches.down))
        await asyncio.sleep(OUTAGE - (time.monotonic() - down_at))  # the outage itself

        await asyncio.to_thread(own_postgres.start)  # returns once it accepts connections
        # (a bound well over the old behaviour's wait, to measure it; the assert is CATCH_UP)
        took = await wait_for_state(own_postgres.dsn, schema, "during", JobState.RUNNING, 30)
        print(f"\noutage {OUTAGE:g} s: caught up {took:.1f} s after the restart")  # noqa: T201
        assert took < CATCH_UP, f"caught up {took:.1f} s after the restart"
        assert not batches.down
    finally:
        await batches.close(timeout=1)
        await store.close()
        if pool is not None:
            await pool.close()


@pytest.mark.timeout(90)
async def test_a_fail_fast_store_answers_at_once_while_the_server_refuses_and_again_after(
    own_postgres: LocalPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """`PostgresStore(dsn, fail_fast=True)`: once a call found no connection, and while the
    store's probe finds the server refusing, each call raises `StoreError(unreachable)` at
    once (a status route's 503), not after the store's `timeout`; within seconds of the
    restart, calls reach the server again. Without it, every call waits the `timeout`."""
    caplog.set_level(logging.CRITICAL, logger="psycopg.pool")  # its "error connecting" lines
    schema = f"j_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(own_postgres.dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
    fast = PostgresStore(own_postgres.dsn, schema=schema, timeout=3, fail_fast=True)
    slow = PostgresStore(own_postgres.dsn, schema=schema, timeout=3)
    try:
        assert await fast.record([write("a", JobState.QUEUED)]) == [True]
        assert await slow.get("a") is not None
        await asyncio.to_thread(own_postgres.stop)
        for store in (fast, slow):  # the connections the stop broke, then none to be had
            while True:  # (fast: its probe, at the first call without one, finds it refusing)
                with pytest.raises(StoreError) as failed:
                    await store.get("a")
                assert failed.value.unreachable
                text = str(failed.value)
                if "couldn't get a connection" in text or "fail_fast" in text:
                    break
        took = []
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(StoreError) as failed:
                await fast.get("a")
            took.append(time.monotonic() - started)
            assert failed.value.unreachable
            assert "fail_fast" in str(failed.value), failed.value
        assert max(took) < 0.1, took
        started = time.monotonic()
        with pytest.raises(StoreError):
            await slow.get("a")
        assert time.monotonic() - started > 2.5  # the timeout, as before
        with pytest.raises(StoreError):  # writes too: a worker's batch is kept, not waited on
            await fast.record([write("b", JobState.QUEUED)])

        await asyncio.to_thread(own_postgres.start)
        restarted = time.monotonic()

        async def answers() -> bool:
            try:
                return await fast.get("a") is not None
            except StoreError:
                return False

        await wait_until(answers, timeout=CATCH_UP)
        print(f"\nfail_fast: answered {time.monotonic() - restarted:.1f} s after the restart")  # noqa: T201
    finally:
        await fast.close()
        await slow.close()


@pytest.mark.parametrize("given", [False, True], ids=["dsn", "pool"])
async def test_fail_fast_finds_a_refusing_server_on_the_first_call_given_pool_or_not(
    given: bool,
) -> None:
    """`fail_fast=True` and a server that refuses connections (nothing listens on the port):
    the first call waited the full `timeout` (nothing was known yet), and a pool given to the
    store was never probed (every call waited). The first call finds the refusal by a probe of
    its own, at once, and so does a given pool's store; the next calls fail at once too."""
    dsn = "postgresql://postgres@127.0.0.1:47451/postgres?connect_timeout=2"  # nothing there
    pool: AsyncConnectionPool[Any] | None = None
    if given:
        pool = AsyncConnectionPool(dsn, min_size=1, open=False, timeout=3)
        await pool.open(wait=False)
        store = PostgresStore(pool=pool, timeout=3, fail_fast=True)
    else:
        store = PostgresStore(dsn, timeout=3, fail_fast=True)
    try:
        for call in range(3):
            started = time.monotonic()
            with pytest.raises(StoreError) as failed:
                await store.get("a")
            took = time.monotonic() - started
            assert failed.value.unreachable
            assert took < 1.0, (call, took)  # not the timeout's 3 s
        assert "fail_fast" in str(failed.value)
    finally:
        await store.close()
        if pool is not None:
            await pool.close()
