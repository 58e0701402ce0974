"""aio_workq.jobs on its side roads, against a real PostgreSQL and RabbitMQ: the bounds a
caller gives a wait (NaN, infinite, not a number), bad ids, a return value that can't be
stored."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aio_workq import ConfigurationError, Producer, RetryPolicy, SerializationError
from aio_workq.jobs import (
    JobFailedError,
    JobState,
    JobTimeoutError,
    SQLiteStore,
    TaskArgumentError,
    Tasks,
    Write,
)
from aio_workq.jobs.postgres import PostgresStore, migrate
from tests.helpers import queue_depth

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


@pytest.mark.parametrize("cap", [0, -1, 0.01, math.nan, math.inf, "1", True])
def test_a_poll_cap_that_would_poll_in_a_tight_loop_or_never_is_refused(
    tasks: Tasks, cap: object
) -> None:
    handle = tasks.job("running")
    # 0 (or a tiny cap) polled the store in a tight loop; NaN never backed off at all.
    with pytest.raises(ConfigurationError, match="poll_cap must be"):
        handle.poll_cap = cap  # type: ignore[assignment]
    assert handle.poll_cap == 1.0
    handle.poll_cap = 0.05
    assert handle.poll_cap == 0.05


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


@pytest.mark.broker
async def test_a_str_result_that_cant_be_encoded_fails_the_job_at_once_as_any_unstorable_one(
    amqp_url: str, producer: Producer, tmp_path: Path, queue_name: str
) -> None:
    # A lone surrogate (a file name decoded with surrogateescape) in a returned str raised
    # UnicodeEncodeError, not SerializationError: the job was retried, its task run again,
    # where a value JSON can't take fails it at once (nothing stored could ever be read).
    tasks = Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db"))
    runs: list[str] = []

    @tasks.task(queue=queue_name)
    async def name_of(kind: str) -> str:
        runs.append(kind)
        if kind == "surrogate":
            return "caf" + b"\xe9".decode("utf-8", "surrogateescape")
        return object()  # type: ignore[return-value]

    # Nor does one go out as a message, or a job's argument (pydantic's JSON refused it on
    # the worker, after the enqueue): refused before anything is sent.
    bad = "caf" + b"\xe9".decode("utf-8", "surrogateescape")
    for body in (bad, {"name": bad}, [bad]):
        with pytest.raises(SerializationError, match="not valid text|as UTF-8"):
            await producer.publish(body, queue_name)
    with pytest.raises(TaskArgumentError, match="not valid text"):
        await name_of.enqueue(bad)
    jobs = [await name_of.enqueue(kind) for kind in ("surrogate", "object")]
    retry = RetryPolicy(max_attempts=3, initial_delay=0.05)
    workers = tasks.workers(amqp_url, retry=retry)
    try:
        for worker in workers:
            await worker.start()
        for job in jobs:
            with pytest.raises(JobFailedError, match="can't be stored"):
                await job.result(timeout=20)
    finally:
        for worker in workers:
            await worker.stop(timeout=1)
        assert tasks.store is not None
        await tasks.store.close()
    assert sorted(runs) == ["object", "surrogate"]  # each ran once


@pytest.mark.parametrize("job_id", [123, None, b"abc"])
async def test_a_handle_on_an_id_that_is_not_a_str_is_refused(tasks: Tasks, job_id: object) -> None:
    # Its status() raised a bare TypeError from the store ("argument of type 'int' ...").
    with pytest.raises(ConfigurationError, match="job id as a string"):
        tasks.job(job_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("busy_timeout", [float("inf"), float("nan"), -1, "1", None])
def test_a_sqlite_store_with_a_bad_busy_timeout_is_refused(
    tmp_path: Path, busy_timeout: object
) -> None:
    # inf raised OverflowError, a str TypeError: not the ConfigurationError the docs promise.
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        SQLiteStore(tmp_path / "jobs.db", busy_timeout=busy_timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_size", [0, -1, 1.5, "4", True])
async def test_a_postgres_store_with_a_bad_max_size_is_refused(
    postgres_dsn: str, max_size: object
) -> None:
    # Accepted, then every call failed with psycopg_pool's ValueError (or TypeError), which
    # a worker's recorder took for the store being down, for good.
    with pytest.raises(ConfigurationError, match="max_size"):
        PostgresStore(postgres_dsn, max_size=max_size)  # type: ignore[arg-type]


@pytest.mark.broker
async def test_a_lone_surrogate_in_an_amqp_string_is_a_serialization_error_and_sends_nothing(
    amqp_url: str, producer: Producer, tmp_path: Path, queue_name: str
) -> None:
    # A message id, correlation id, content type, header name or routing key with a lone
    # surrogate raised a bare UnicodeEncodeError from publish() (and from a job's enqueue
    # with such a job_id), not the SerializationError its docs promise.
    bad = "caf" + b"\xe9".decode("utf-8", "surrogateescape")
    calls: list[dict[str, Any]] = [
        {"message_id": bad},
        {"correlation_id": bad},
        {"content_type": bad},
        {"headers": {bad: 1}},
    ]
    for options in calls:
        with pytest.raises(SerializationError, match="not valid text"):
            await producer.publish("x", queue_name, **options)
    with pytest.raises(SerializationError, match="routing key"):
        await producer.publish("x", exchange="amq.direct", routing_key=bad)
    tasks = Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db"))

    @tasks.task(queue=queue_name)
    async def noop() -> None: ...

    with pytest.raises(SerializationError, match="message_id"):
        await noop.options(job_id=bad).enqueue()
    await producer.publish("fine", queue_name)
    assert await queue_depth(amqp_url, queue_name) == 1  # only that one went out
    assert tasks.store is not None
    await tasks.store.close()


async def test_a_sqlite_store_on_a_path_with_a_nul_is_refused_when_made(tmp_path: Path) -> None:
    # Accepted, then every call raised sqlite3's bare ValueError ("embedded null byte"): a
    # worker's recorder took it for the store being down, for good.
    for path in (f"{tmp_path}/jobs\x00.db", tmp_path / "jobs\x00.db"):
        with pytest.raises(ConfigurationError, match="NUL"):
            SQLiteStore(path)
