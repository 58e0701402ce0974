"""Exactly-once effects under crashes, counted with a ledger: rows committed vs effects applied.

Each scenario commits business rows with their outbox messages, crashes something on the way
(SIGKILL of the app, the relay, the worker; kill -9 of the broker), lets the rest run to the end,
and then counts in PostgreSQL and RabbitMQ: every committed message delivered (0 lost), no
rolled-back one delivered, and with the idempotent consumer every effect applied exactly once.
The figures are printed (`LEDGER ...`) for the notes; `make outbox-test` runs all scenarios.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from aio_workq import Job, Producer, Queue, Worker
from aio_workq.outbox import Outbox, OutboxRelay, idempotent, migrate
from scripts.broker import LocalBroker
from tests.helpers import queue_depth, read_line, wait_until

pytestmark = pytest.mark.postgres


@dataclass
class Ledger:
    """What was committed, what was delivered, and what took effect, for one scenario."""

    scenario: str
    committed: set[str] = field(default_factory=set)  # order rows in the database
    rolled_back: set[str] = field(default_factory=set)  # the app said it rolled these back
    delivered: list[str] = field(default_factory=list)  # message ids consumed, with duplicates
    effects: list[str] = field(default_factory=list)  # effect rows, one per handler run
    skipped: int = 0  # deliveries the idempotent consumer acked without running

    def line(self) -> str:
        got = set(self.delivered)
        return (
            f"LEDGER {self.scenario}: committed={len(self.committed)} "
            f"rolled_back={len(self.rolled_back)} delivered={len(self.delivered)} "
            f"duplicates={len(self.delivered) - len(got)} lost={len(self.committed - got)} "
            f"phantom={len(got - self.committed)} effects={len(self.effects)} "
            f"distinct_effects={len(set(self.effects))} skipped={self.skipped}"
        )

    def check(self, capsys: pytest.CaptureFixture[str]) -> None:
        with capsys.disabled():
            print(f"\n{self.line()}")  # noqa: T201 - the figures the scenario is about
        assert self.committed, "the scenario committed nothing"
        assert set(self.delivered) == self.committed  # 0 lost, nothing uncommitted
        assert not self.rolled_back & set(self.delivered)
        assert sorted(self.effects) == sorted(self.committed)  # each effect exactly once
        assert self.skipped == len(self.delivered) - len(self.committed)


@pytest.fixture
async def db(postgres_dsn: str) -> AsyncIterator[tuple[str, psycopg.AsyncConnection[Any]]]:
    """A fresh schema with the outbox tables plus `orders` and `effects` (no unique keys)."""
    schema = f"l_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
        await conn.execute(f"CREATE TABLE {schema}.orders (message_id text NOT NULL)")
        await conn.execute(f"CREATE TABLE {schema}.effects (message_id text NOT NULL)")
        yield schema, conn
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


async def column(conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> list[str]:
    cursor = await conn.execute(f"SELECT message_id FROM {schema}.{table}")
    return [row[0] for row in await cursor.fetchall()]


@asynccontextmanager
async def actor(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`tests.outbox_proc` in a process of its own; SIGKILLed on exit if still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.outbox_proc", *args, stdout=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def commit_orders(dsn: str, schema: str, queue: str, ids: list[str], per_tx: int) -> None:
    """Commit an order row and its outbox message for each id, `per_tx` ids a transaction."""
    outbox = Outbox(schema=schema)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for start in range(0, len(ids), per_tx):
            async with conn.transaction():
                for message_id in ids[start : start + per_tx]:
                    await conn.execute(
                        f"INSERT INTO {schema}.orders (message_id) VALUES (%s)", (message_id,)
                    )
                    await outbox.publish(
                        conn, {"id": message_id}, queue=queue, message_id=message_id
                    )


async def relay_all(dsn: str, amqp_url: str, schema: str) -> int:
    async with OutboxRelay(dsn, url=amqp_url, schema=schema, batch_size=100) as relay:
        return await relay.drain()


async def consume_all(
    dsn: str,
    amqp_url: str,
    schema: str,
    queue: str | Queue,
    ledger: Ledger,
    timeout: float = 60,
) -> None:
    """Consume every message in the queue with the idempotent consumer; fill in the ledger."""
    expected = await queue_depth(amqp_url, queue if isinstance(queue, str) else queue.name)
    done = asyncio.Event()
    handled = 0  # this consume's deliveries (the ledger may hold some from before)
    async with AsyncConnectionPool(dsn, min_size=1, max_size=8, open=False) as pool:
        consumer = idempotent(pool, name="effects", schema=schema)

        @consumer
        async def apply(job: Job, conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                f"INSERT INTO {schema}.effects (message_id) VALUES (%s)", (job.message_id,)
            )

        async def handler(job: Job) -> None:
            nonlocal handled
            await apply(job)
            ledger.delivered.append(job.message_id or "")
            handled += 1
            if handled >= expected:
                done.set()

        async with Worker(amqp_url, queue=queue, handler=handler, concurrency=8):
            async with asyncio.timeout(timeout):
                await done.wait()
        ledger.skipped += consumer.skipped
        async with pool.connection() as conn:
            ledger.effects = await column(conn, schema, "effects")


# --- in the default run ---


async def test_app_killed_after_commits_relay_started_later_loses_nothing(
    postgres_dsn: str,
    amqp_url: str,
    db: tuple[str, psycopg.AsyncConnection[Any]],
    queue_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    schema, conn = db
    ledger = Ledger("app SIGKILL between commit and relay")
    said_committed: set[str] = set()
    async with actor("app", postgres_dsn, schema, queue_name, "1000") as app:
        while len(said_committed) + len(ledger.rolled_back) < 200:  # then SIGKILL, mid-stream
            verb, message_id = (await read_line(app)).split()
            (said_committed if verb == "COMMITTED" else ledger.rolled_back).add(message_id)
        app.kill()
    ledger.committed = set(await column(conn, schema, "orders"))
    # A commit can land just before the kill, before its line is printed: never the reverse.
    assert said_committed <= ledger.committed
    assert len(ledger.committed - said_committed) <= 1
    assert sorted(await column(conn, schema, "workq_outbox")) == sorted(ledger.committed)

    assert await relay_all(postgres_dsn, amqp_url, schema) == len(ledger.committed)
    await consume_all(postgres_dsn, amqp_url, schema, queue_name, ledger)
    ledger.check(capsys)
    assert ledger.rolled_back and not ledger.skipped


async def test_worker_killed_after_commit_before_ack_redelivery_is_skipped(
    postgres_dsn: str,
    amqp_url: str,
    db: tuple[str, psycopg.AsyncConnection[Any]],
    queue_name: str,
    producer: Producer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    schema, conn = db
    ledger = Ledger("worker SIGKILL after the handler's commit, before the ack")
    ledger.committed = {f"w{i}" for i in range(20)}
    for message_id in sorted(ledger.committed):
        await producer.publish({"id": message_id}, queue=queue_name, message_id=message_id)
    async with actor("worker", postgres_dsn, schema, amqp_url, queue_name) as worker:
        assert await read_line(worker) == "READY"
        verb, first = (await read_line(worker)).split()
        assert verb == "COMMITTED"
        worker.kill()
    ledger.delivered.append(first)
    assert await column(conn, schema, "effects") == [first]  # committed, never acked

    async def requeued() -> bool:
        return await queue_depth(amqp_url, queue_name) == len(ledger.committed)

    await wait_until(requeued)  # the broker saw the connection die: all 20 are ready again
    await consume_all(postgres_dsn, amqp_url, schema, queue_name, ledger)
    ledger.check(capsys)
    assert ledger.skipped == 1  # the redelivery of the one committed before the kill


async def test_relay_killed_mid_batch_then_restarted(
    postgres_dsn: str,
    amqp_url: str,
    db: tuple[str, psycopg.AsyncConnection[Any]],
    queue_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    schema, conn = db
    ledger = Ledger("relay SIGKILL mid-batch (40 of a 100-row batch confirmed)")
    ids = [f"r{i}" for i in range(300)]
    await commit_orders(postgres_dsn, schema, queue_name, ids, per_tx=25)
    ledger.committed = set(ids)
    async with actor("relay", postgres_dsn, schema, amqp_url, "40") as relay:
        assert await read_line(relay) == "READY"
        assert await read_line(relay) == "STALLED"
        assert await queue_depth(amqp_url, queue_name) == 40  # confirmed, rows not deleted
        relay.kill()
    assert len(await column(conn, schema, "workq_outbox")) == 300  # the batch rolled back

    assert await relay_all(postgres_dsn, amqp_url, schema) == 300
    await consume_all(postgres_dsn, amqp_url, schema, queue_name, ledger)
    ledger.check(capsys)
    assert ledger.skipped == 40  # the 40 published twice took effect once


# --- longer: make outbox-test ---


@pytest.mark.slow
async def test_two_relays_at_once_while_the_app_commits(
    postgres_dsn: str,
    amqp_url: str,
    db: tuple[str, psycopg.AsyncConnection[Any]],
    queue_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    schema, conn = db
    ledger = Ledger("two relays at once, app committing meanwhile")
    ids = [f"t{i}" for i in range(3000)]
    relays = [
        OutboxRelay(postgres_dsn, url=amqp_url, schema=schema, batch_size=50, poll_interval=0.2)
        for _ in range(2)
    ]
    for relay in relays:
        await relay.start()
    try:
        await asyncio.gather(
            commit_orders(postgres_dsn, schema, queue_name, ids[0::2], per_tx=10),
            commit_orders(postgres_dsn, schema, queue_name, ids[1::2], per_tx=10),
        )
        ledger.committed = set(ids)

        async def emptied() -> bool:
            return not await column(conn, schema, "workq_outbox")

        await wait_until(emptied, timeout=120)
    finally:
        for relay in relays:
            await relay.stop()
    shares = [relay.published for relay in relays]
    with capsys.disabled():
        print(f"\nrelay shares: {shares}")  # noqa: T201
    assert sum(shares) == len(ids)  # SKIP LOCKED: no row published by both
    await consume_all(postgres_dsn, amqp_url, schema, queue_name, ledger)
    ledger.check(capsys)
    assert ledger.skipped == 0


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_broker_killed_during_the_relay(
    postgres_dsn: str,
    amqp_url: str,
    local_broker: LocalBroker,
    db: tuple[str, psycopg.AsyncConnection[Any]],
    queue_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    schema, conn = db
    ledger = Ledger("broker kill -9 during the relay")
    # A classic queue: on this RabbitMQ (3.10.8, one node) a quorum queue that existed before a
    # kill -9 never elects a leader again ("leader not known"), so nothing could be published.
    queue = Queue(queue_name, type="classic")
    ids = [f"b{i}" for i in range(5000)]
    await commit_orders(postgres_dsn, schema, queue_name, ids, per_tx=100)
    ledger.committed = set(ids)
    async with OutboxRelay(
        postgres_dsn,
        url=amqp_url,
        schema=schema,
        batch_size=200,
        poll_interval=0.5,
        publish_timeout=5,
        queues=[queue],
    ) as relay:

        async def started() -> bool:
            return relay.published > 0

        await wait_until(started, timeout=30)
        await asyncio.to_thread(local_broker.kill)
        killed_at = relay.published
        await asyncio.to_thread(local_broker.start)

        async def emptied() -> bool:
            return not await column(conn, schema, "workq_outbox")

        await wait_until(emptied, timeout=120)
    with capsys.disabled():
        print(f"\nrelayed before the kill: {killed_at}, failed publishes: {relay.failed}")  # noqa: T201
    assert killed_at < len(ids)  # the kill landed mid-relay
    await consume_all(postgres_dsn, amqp_url, schema, queue, ledger, timeout=120)
    ledger.check(capsys)


@pytest.mark.slow
async def test_broker_paused_during_the_relay(
    postgres_dsn: str,
    amqp_url: str,
    local_broker: LocalBroker,
    db: tuple[str, psycopg.AsyncConnection[Any]],
    queue_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    schema, conn = db
    ledger = Ledger("broker SIGSTOP for 8 s during the relay (publish_timeout=1)")
    ids = [f"p{i}" for i in range(2000)]
    await commit_orders(postgres_dsn, schema, queue_name, ids, per_tx=100)
    ledger.committed = set(ids)
    async with OutboxRelay(
        postgres_dsn, url=amqp_url, schema=schema, batch_size=100, publish_timeout=1
    ) as relay:

        async def started() -> bool:
            return relay.published > 0

        await wait_until(started, timeout=30)
        local_broker.pause()
        try:

            async def timed_out() -> bool:
                return relay.failed > 0

            await wait_until(timed_out, timeout=30)  # publishes time out: rows stay
            await asyncio.sleep(8)  # the broker stays silent; the relay keeps trying
        finally:
            local_broker.resume()

        async def emptied() -> bool:
            return not await column(conn, schema, "workq_outbox")

        await wait_until(emptied, timeout=120)
    with capsys.disabled():
        print(f"\nfailed publishes while paused: {relay.failed}")  # noqa: T201
    await consume_all(postgres_dsn, amqp_url, schema, queue_name, ledger, timeout=120)
    ledger.check(capsys)
