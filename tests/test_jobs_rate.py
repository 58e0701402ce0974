"""Rate limits across worker processes: 3 processes (`aio-workq worker --processes 3`) share
one limit through the store; a job whose slot is far away is deferred on the broker, not held;
per-key buckets; the options are checked."""

from __future__ import annotations

import asyncio
import os
import random
import string
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aio_workq import ConfigurationError, Producer, RetryPolicy, Worker
from aio_workq.jobs import JobFailedError, JobState, MemoryStore, RateLimit, SQLiteStore, Tasks
from aio_workq.jobs.postgres import PostgresStore, migrate
from tests.test_cli import cli
from tests.test_jobs import until

RATE = 20.0


def steady_rate(times: list[float], trim: float = 0.15) -> float:
    """Jobs a second over the steady part: the first and last `trim` of the starts dropped
    (the ramp-up of the processes, the tail)."""
    times = sorted(times)
    cut = int(len(times) * trim)
    middle = times[cut : len(times) - cut]
    return (len(middle) - 1) / (middle[-1] - middle[0])


async def measure(
    amqp_url: str, tmp_path: Path, *, processes: int, jobs: int, rate: str
) -> tuple[float, set[str]]:
    queue = f"rate-{uuid.uuid4().hex[:8]}"
    db = tmp_path / "rate.db"
    env = {
        **os.environ, "AMQP_URL": amqp_url, "PYTHONUNBUFFERED": "1",
        "WORKQ_RATE_DB": str(db), "WORKQ_RATE": rate, "WORKQ_RATE_QUEUE": queue,
    }  # fmt: skip
    args = ["worker", "tests.jobs_rate_app:workers", "--processes", str(processes)]
    async with cli(*args, env=env) as sup:
        await sup.wait_for(
            lambda: len(sup.lines(r"worker consuming", "err")) >= 2 * processes,
            timeout=60, what="the workers consuming",
        )  # fmt: skip
        store = SQLiteStore(db)
        try:
            async with Producer(amqp_url) as producer:
                tasks = Tasks(producer=producer, store=store)

                @tasks.task(queue=queue, name="rate.tick")
                async def tick(i: int) -> float:
                    return 0.0  # runs in the worker processes (tests/jobs_rate_app.py)

                await asyncio.gather(*(tick.enqueue(i) for i in range(jobs)))
        finally:
            await store.close()
        await sup.wait_for(
            lambda: len(sup.lines(r"^RAN ")) >= jobs, timeout=jobs / RATE * 3 + 60,
            what=f"{jobs} jobs run",
        )  # fmt: skip
        ran = sup.lines(r"^RAN (\d+) ([\d.]+)")
        sup.proc.terminate()
        await sup.exit_code()
    return steady_rate([float(m[2]) for m in ran]), {m[1] for m in ran}


@pytest.mark.broker
async def test_three_processes_together_hold_the_rate(amqp_url: str, tmp_path: Path) -> None:
    """200 jobs at once on 3 processes of 8 handlers each, limited to 20/s: about 10 s."""
    measured, pids = await measure(amqp_url, tmp_path, processes=3, jobs=200, rate="20/s")
    print(f"\nmeasured {measured:.2f} jobs/s (limit 20/s) on {len(pids)} processes")  # noqa: T201
    assert len(pids) == 3  # every process ran some
    assert RATE * 0.9 <= measured <= RATE * 1.1, measured


@pytest.mark.broker
@pytest.mark.slow
async def test_four_processes_for_a_minute(amqp_url: str, tmp_path: Path) -> None:
    """The figure in the guide: 4 processes, 50/s, 3000 jobs (a minute)."""
    measured, pids = await measure(amqp_url, tmp_path, processes=4, jobs=3000, rate="50/s")
    print(f"\nmeasured {measured:.2f} jobs/s, steady part (limit 50/s), {len(pids)} pids")  # noqa: T201
    assert len(pids) == 4
    assert 45 <= measured <= 55, measured


@pytest.mark.broker
async def test_a_slot_far_away_defers_the_job_on_the_broker(
    tmp_path: Path, producer: Producer, amqp_url: str
) -> None:
    """12/m: one job every 5 s; a worker holds a delivery at most 0.5 s (rate_max_wait), so
    the second job is deferred (recorded `retrying`), not held, and runs about 5 s later."""
    tasks = Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db"))
    ran: list[float] = []

    queue = f"rate-defer-{uuid.uuid4().hex[:8]}"

    @tasks.task(queue=queue, name="rate.slow", rate_limit="12/m", rate_max_wait=0.5)
    async def slow(i: int) -> int:
        ran.append(time.time())
        return i

    workers: list[Worker] = tasks.workers(amqp_url, concurrency=4)
    try:
        for worker in workers:
            await worker.start()
        first = await slow.enqueue(1)
        assert await first.result(timeout=30) == 1
        second = await slow.enqueue(2)
        status = await until(second, lambda s: s.state is JobState.RETRYING)
        assert status.error_type == "aio_workq.Defer"
        assert status.next_retry_at is not None
        assert 3.0 <= status.next_retry_at.timestamp() - time.time() <= 5.5
        # `retrying` is recorded once the worker moved the message to a delay queue and
        # acked it: it waits on the broker, not unacked in this process.
        assert await second.result(timeout=30) == 2
        assert ran[1] - ran[0] >= 5.0 - 0.05  # not before its slot
    finally:
        for worker in workers:
            await worker.stop(timeout=1)
        assert tasks.store is not None
        await tasks.store.close()


@pytest.mark.broker
async def test_waiting_for_a_slot_does_not_count_against_the_handler_timeout(
    tmp_path: Path, producer: Producer, amqp_url: str
) -> None:
    """4/s with `handler_timeout=0.5`: six jobs enqueued at once wait up to 1.25 s for their
    slots, longer than the timeout. Every one runs and succeeds; the timeout bounds the task
    itself, not its wait (before: the jobs that waited longer than 0.5 s failed with
    `TimeoutError` without running, and were dead-lettered once their attempts ran out).
    A task that runs longer than the timeout still fails with it."""
    tasks = Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db"))
    ran: list[int] = []
    queue = f"rate-timeout-{uuid.uuid4().hex[:8]}"

    @tasks.task(queue=queue, name="rate.quick", rate_limit="4/s", rate_max_wait=5)
    async def quick(i: int) -> int:
        ran.append(i)
        return i

    @tasks.task(queue=queue, name="rate.stuck")
    async def stuck() -> None:
        await asyncio.sleep(30)

    workers: list[Worker] = tasks.workers(
        amqp_url, concurrency=8, handler_timeout=0.5, retry=RetryPolicy(max_attempts=1)
    )
    try:
        for worker in workers:
            await worker.start()
        jobs = await asyncio.gather(*(quick.enqueue(i) for i in range(6)))
        results = await asyncio.gather(*(job.result(timeout=30) for job in jobs))
        assert results == list(range(6))
        assert sorted(ran) == list(range(6))
        late = await stuck.enqueue()
        with pytest.raises(JobFailedError, match="TimeoutError") as failed:
            await late.result(timeout=30)
        # as a plain worker's handler says it (the job's status shows the message)
        assert failed.value.error_message == "the handler ran over its handler_timeout of 0.5 s"
    finally:
        for worker in workers:
            await worker.stop(timeout=1)
        assert tasks.store is not None
        await tasks.store.close()


async def test_per_key_buckets_are_separate() -> None:
    limit = RateLimit.of("1/s", key=lambda customer, **_: customer)
    store = MemoryStore()
    now = time.time()
    waits = [
        await store.take_token(
            limit.bucket("t", {"customer": c, "n": 1}),
            interval=limit.interval,
            tau=limit.tau,
            max_wait=limit.max_wait,
            now=now,
        )  # fmt: skip
        for c in ("a", "b", "a")
    ]
    assert waits == [0.0, 0.0, 1.0]
    assert limit.bucket("t", {"customer": "a"}) == "t:a"


async def test_the_rate_key_sees_the_arguments_defaults(tmp_path: Path) -> None:
    """A job that leaves out a defaulted argument: the key function is called with the
    function's default for it, as the function itself is (before: without it, so
    `lambda customer, **_: customer` raised TypeError and the job failed without running)."""
    tasks = Tasks(store=SQLiteStore(tmp_path / "jobs.db"))

    @tasks.task(queue="api", name="api.sync", rate_limit="1/s",
                rate_key=lambda customer, **_: customer)  # fmt: skip
    async def sync(since: int, customer: str = "acme") -> None: ...

    limit = sync.rate_limit
    assert limit is not None
    jobs = [sync.arguments.encode((1,), {}), sync.arguments.encode((2,), {"customer": "acme"})]
    jobs.append(sync.arguments.encode((3,), {"customer": "zeta"}))
    decoded = [sync.arguments.decode(body, "application/json") for body in jobs]
    keys = [limit.bucket(sync.name, kwargs) for kwargs in decoded]
    assert keys == ["api.sync:acme", "api.sync:acme", "api.sync:zeta"]
    store = tasks.store
    assert isinstance(store, SQLiteStore)
    try:
        now = time.time()
        waits = [
            await store.take_token(
                key, interval=limit.interval, tau=limit.tau, max_wait=limit.max_wait, now=now
            )
            for key in keys
        ]
        assert waits == [0.0, pytest.approx(1.0), 0.0]  # the defaulted job shares acme's bucket
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rate_limit": "fast"}, "'50/s'"),
        ({"rate_limit": 0}, "> 0"),
        ({"rate_limit": "5/s", "rate_burst": 0}, "rate_burst"),
        ({"rate_limit": "5/s", "rate_max_wait": 600}, "rate_max_wait"),
        ({"rate_key": str}, "rate_key= needs a rate_limit="),
        ({"rate_limit": "5/s", "rate_key": 3}, "rate_key"),
        # A bad type or an infinite rate: TypeError/OverflowError, or no limit at all.
        ({"rate_limit": "5/s", "rate_max_wait": "5"}, "rate_max_wait"),
        ({"rate_limit": "5/s", "rate_max_wait": None}, "rate_max_wait"),
        ({"rate_limit": "5/s", "rate_max_wait": True}, "rate_max_wait"),
        ({"rate_limit": 10**400}, "rate_limit must be a finite"),
        ({"rate_limit": float("inf")}, "rate_limit must be a finite"),
        ({"rate_limit": "1" * 400 + "/s"}, "rate_limit must be a finite"),
    ],
)
def test_bad_rate_options_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Tasks().task(queue="q", **options)


def test_a_rate_without_a_unit_is_jobs_a_second_as_in_celery() -> None:
    """`rate_limit="10"` (Celery's form for 10 a second, the same as the number 10) was refused
    with "must look like '50/s', '600/m' or '1000/h'", which did not say a number works."""
    assert RateLimit.of("10").per_second == 10.0
    assert RateLimit.of(" 2.5 ").per_second == 2.5
    assert RateLimit.of("10/minute").per_second == pytest.approx(10 / 60)
    with pytest.raises(ConfigurationError, match=r"'10' \(jobs a second\) or 10, got '1/d'"):
        RateLimit.of("1/d")


def test_parsing_and_a_store_is_needed() -> None:
    assert RateLimit.of("600/m").per_second == 10.0
    assert RateLimit.of("3600/h").interval == 1.0
    assert RateLimit.of(2.5, burst=3).tau == pytest.approx(0.8)
    tasks = Tasks()

    @tasks.task(queue="q", name="t.limited", rate_limit="5/s")
    async def limited() -> None: ...

    with pytest.raises(ConfigurationError, match="rate_limit"):
        tasks.workers("amqp://localhost/")


@pytest.mark.broker
@pytest.mark.postgres
async def test_a_rate_key_postgres_cant_index_is_limited_not_deferred_as_a_store_outage(
    postgres_dsn: str, producer: Producer, amqp_url: str
) -> None:
    """`rate_key` returning a long key (a 4 KB document, past PostgreSQL's btree row limit) or
    one with a NUL (which `text` can't hold): the bucket's INSERT failed, the job was deferred
    5 s as if the store were down ("the store can't be reached"), again and again until its
    defers ran out, logging the whole key each time. Now such a key is stored by its digest:
    the job runs, within its limit, and jobs of equal keys share a bucket."""
    schema = f"r_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
    store = PostgresStore(postgres_dsn, schema=schema)
    tasks = Tasks(producer=producer, store=store)
    queue = f"rate-key-{uuid.uuid4().hex[:8]}"

    @tasks.task(queue=queue, name="rate.doc", rate_limit="2/s", rate_key=lambda doc, **_: doc)
    async def index(doc: str, i: int) -> int:
        return i

    long_key = "".join(random.choices(string.ascii_letters, k=4000))  # incompressible
    workers: list[Worker] = tasks.workers(amqp_url, concurrency=4)
    try:
        for worker in workers:
            await worker.start()
        started = time.monotonic()
        jobs = [
            await index.enqueue(long_key, 1),
            await index.enqueue(long_key, 2),
            await index.enqueue("a\x00b", 3),
        ]
        assert [await job.result(timeout=4) for job in jobs] == [1, 2, 3]
        assert time.monotonic() - started >= 0.5 - 0.05  # the two long ones share a bucket
        statuses = [await job.status() for job in jobs]
        assert [s.error_type for s in statuses] == [None, None, None]  # never deferred
        limit = index.rate_limit
        assert limit is not None
        assert len(limit.bucket("rate.doc", {"doc": long_key, "i": 0})) < 120
        assert limit.bucket("rate.doc", {"doc": "acme", "i": 0}) == "rate.doc:acme"
    finally:
        for worker in workers:
            await worker.stop(timeout=1)
        await store.close()
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.mark.broker
async def test_a_rate_key_that_raises_dead_letters_the_job_at_once_naming_rate_key(
    tmp_path: Path, producer: Producer, amqp_url: str
) -> None:
    """`rate_key=lambda customer, **_: customer["id"]` and a job whose customer has no id:
    the job failed with a bare `KeyError: 'id'`, as if the task had raised it (it never
    ran), and was retried with the same arguments until its attempts ran out. Now it is
    rejected at once, the reason naming the task's rate_key and what it raised."""
    tasks = Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db"))
    queue = f"rate-keyerror-{uuid.uuid4().hex[:8]}"
    ran: list[str] = []

    @tasks.task(queue=queue, name="rate.bykey", rate_limit="10/s",
                rate_key=lambda customer, **_: customer["id"])  # fmt: skip
    async def sync(customer: dict[str, str]) -> str:
        ran.append(customer["id"])
        return customer["id"]

    workers: list[Worker] = tasks.workers(amqp_url, concurrency=4)
    try:
        for worker in workers:
            await worker.start()
        bad = await sync.enqueue({"name": "no id"})
        good = await sync.enqueue({"id": "acme"})
        with pytest.raises(JobFailedError) as failed:
            await bad.result(timeout=10)
        assert await good.result(timeout=10) == "acme"
        assert ran == ["acme"]
        message = failed.value.error_message or ""
        assert "rate_key of task 'rate.bykey' raised KeyError('id')" in message, message
        status = await bad.status()
        assert status.attempt == 1  # not retried: the same arguments give the same error
    finally:
        for worker in workers:
            await worker.stop(timeout=1)
        assert tasks.store is not None
        await tasks.store.close()
