"""aio_workq.outbox on a real PostgreSQL and RabbitMQ: insert side, relay, idempotent consumer."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import aio_workq
from aio_workq import ConfigurationError, Job, Producer, Retry, SerializationError, Worker
from aio_workq.outbox import (
    Outbox,
    OutboxConfigurationError,
    OutboxError,
    OutboxRelay,
    OutboxSchemaError,
    UnsupportedConnectionError,
    idempotent,
    migrate,
    schema_sql,
)
from aio_workq.outbox._schema import redact_dsn
from tests.helpers import Counter, queue_depth, wait_until

pytestmark = pytest.mark.postgres


@pytest.fixture
async def schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh schema with the outbox tables, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await migrate(conn, schema=name)
        yield name
        await conn.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.fixture
async def conn(postgres_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as c:
        yield c


@pytest.fixture
async def pool(postgres_dsn: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    async with AsyncConnectionPool(postgres_dsn, min_size=1, max_size=4, open=False) as p:
        yield p


async def outbox_rows(conn: psycopg.AsyncConnection[Any], schema: str) -> list[tuple[Any, ...]]:
    cursor = await conn.execute(
        f"SELECT message_id, queue, body, content_type, headers, attempts, last_error "
        f"FROM {schema}.workq_outbox ORDER BY id"
    )
    rows = await cursor.fetchall()
    await conn.commit()
    return rows


# --- the migration ---


async def test_migration_is_idempotent_and_creates_both_tables(
    conn: psycopg.AsyncConnection[Any], schema: str
) -> None:
    await migrate(conn, schema=schema)  # a second time: no error, nothing changes
    cursor = await conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
        "ORDER BY table_name",
        (schema,),
    )
    assert [r[0] for r in await cursor.fetchall()] == ["workq_outbox", "workq_processed"]
    assert '"public".workq_outbox' in schema_sql()


@pytest.mark.parametrize("bad", ["", "a-b", 'x"; DROP TABLE t; --', "1abc", "a" * 64])
def test_bad_schema_names_are_refused(bad: str) -> None:
    with pytest.raises(OutboxConfigurationError, match="plain SQL identifier"):
        schema_sql(bad)
    with pytest.raises(ConfigurationError):  # also a ValueError, a WorkqError
        Outbox(schema=bad)


def test_redact_dsn_hides_passwords() -> None:
    assert "s3cret" not in redact_dsn("postgresql://app:s3cret@db:5432/app")
    assert "s3cret" not in redact_dsn("host=db user=app password=s3cret dbname=app")
    assert "s3cret" not in redact_dsn("host=db password='s3cret x' dbname=app")
    assert redact_dsn("postgresql://app@db:5432/app") == "postgresql://app@db:5432/app"


@pytest.mark.parametrize(
    "dsn",
    [
        "postgres:/app:s3cret@127.0.0.1:5432/postgres",  # a slash missing
        "postgresql//app:s3cret@db/app",
        "postgresql:/app:s3:cr/et@db/app",
        "app:s3cret@db",
        "mysql://app:s3cret@db/app",
    ],
)
def test_a_malformed_dsn_is_refused_without_its_password(dsn: str) -> None:
    """The password of a DSN psycopg can't parse is hidden too (found by a new user: a slash
    missing printed it in the store's repr, its errors and psycopg's pool warnings)."""
    assert "s3cret" not in redact_dsn(dsn) and "s3:cr/et" not in redact_dsn(dsn)
    with pytest.raises(OutboxConfigurationError, match="not a PostgreSQL connection") as caught:
        OutboxRelay(dsn, url="amqp://guest:guest@127.0.0.1:1/")
    assert "s3cret" not in str(caught.value) and "s3:cr" not in str(caught.value)
    assert "postgresql://user:password@host:5432/dbname" in str(caught.value)


# --- the insert side ---


async def test_publish_commits_and_rolls_back_with_the_transaction(
    conn: psycopg.AsyncConnection[Any], schema: str
) -> None:
    outbox = Outbox(schema=schema)
    async with conn.transaction():
        kept = await outbox.publish(conn, {"n": 1}, queue="q", headers={"k": "v"})
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await outbox.publish(conn, "gone", queue="q")
            raise RuntimeError("rollback")
    rows = await outbox_rows(conn, schema)
    assert rows == [(kept, "q", b'{"n":1}', "application/json", {"k": "v"}, 0, None)]


async def test_publish_through_psycopg_cursor_sqlalchemy_and_asyncpg(
    postgres_dsn: str, conn: psycopg.AsyncConnection[Any], schema: str
) -> None:
    outbox = Outbox(schema=schema)
    async with conn.cursor() as cursor:
        await outbox.publish(cursor, b"cursor", queue="q", message_id="m-cursor")
    await conn.commit()

    engine = create_async_engine(postgres_dsn.replace("postgresql://", "postgresql+psycopg://"))
    try:
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(text("SELECT 1"))
            await outbox.publish(session, "session", queue="q", message_id="m-session")
        async with engine.begin() as sa_conn:
            await outbox.publish(sa_conn, [1, 2], routing_key="q", message_id="m-saconn")
    finally:
        await engine.dispose()
    engine = create_async_engine(postgres_dsn.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with AsyncSession(engine) as session, session.begin():
            await outbox.publish(
                session, "sa-asyncpg", queue="q", message_id="m-sa-asyncpg", headers={"a": [1]}
            )
    finally:
        await engine.dispose()

    pg = await asyncpg.connect(postgres_dsn)
    try:
        async with pg.transaction():
            await outbox.publish(pg, {"x": None}, queue="q", message_id="m-asyncpg", delay=1.5)
    finally:
        await pg.close()

    rows = {r[0]: r for r in await outbox_rows(conn, schema)}
    assert sorted(rows) == ["m-asyncpg", "m-cursor", "m-sa-asyncpg", "m-saconn", "m-session"]
    assert rows["m-sa-asyncpg"][4] == {"a": [1]}
    assert rows["m-cursor"][2:4] == (b"cursor", None)
    assert rows["m-session"][2:4] == (b"session", "text/plain; charset=utf-8")
    assert rows["m-saconn"][1:3] == (None, b"[1,2]")
    assert rows["m-asyncpg"][2] == b'{"x":null}'


def test_publish_sync_through_psycopg_and_sqlalchemy(postgres_dsn: str, schema: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    outbox = Outbox(schema=schema)
    with psycopg.connect(postgres_dsn) as sync_conn:
        with sync_conn.transaction():
            outbox.publish_sync(sync_conn, "kept", queue="q", message_id="m-sync")
        with pytest.raises(RuntimeError), sync_conn.transaction():
            outbox.publish_sync(sync_conn, "gone", queue="q", message_id="m-gone")
            raise RuntimeError("rollback")
    engine = create_engine(postgres_dsn.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with Session(engine) as session, session.begin():
            outbox.publish_sync(session, "orm", queue="q", message_id="m-orm")
    finally:
        engine.dispose()
    import psycopg2  # any DB-API connection with cursor(), as Django's `connection` is

    dbapi = psycopg2.connect(postgres_dsn)
    try:
        with dbapi:  # commits on success
            outbox.publish_sync(dbapi, {"x": 1}, queue="q", message_id="m-dbapi", headers={"h": 1})
    finally:
        dbapi.close()
    with psycopg.connect(postgres_dsn) as check:
        ids = check.execute(f"SELECT message_id FROM {schema}.workq_outbox ORDER BY id")
        assert [r[0] for r in ids.fetchall()] == ["m-sync", "m-orm", "m-dbapi"]


async def test_bad_input_is_refused_before_anything_is_written(
    postgres_dsn: str, conn: psycopg.AsyncConnection[Any], schema: str
) -> None:
    outbox = Outbox(schema=schema)
    bad_calls: list[tuple[type[Exception], str, dict[str, Any]]] = [
        (OutboxConfigurationError, "nowhere to publish", {}),
        (OutboxConfigurationError, "not both", {"queue": "q", "exchange": "x"}),
        (OutboxConfigurationError, "non-empty name", {"queue": ""}),
        (OutboxConfigurationError, "delay must be >= 0", {"queue": "q", "delay": -1}),
        (OutboxConfigurationError, "delay must be >= 0", {"queue": "q", "delay": float("nan")}),
        (OutboxConfigurationError, "message_id must be", {"queue": "q", "message_id": ""}),
        (OutboxConfigurationError, "message_id must be", {"queue": "q", "message_id": "x" * 256}),
        (SerializationError, "JSON-serialisable", {"queue": "q", "headers": {"t": object()}}),
    ]
    for error, match, kwargs in bad_calls:
        with pytest.raises(error, match=match):
            await outbox.publish(conn, "body", **kwargs)
    with pytest.raises(SerializationError, match="cannot encode a body of type set"):
        await outbox.publish(conn, {1, 2}, queue="q")
    with pytest.raises(UnsupportedConnectionError, match="publish_sync"):
        with psycopg.connect(postgres_dsn) as sync_conn:
            await outbox.publish(sync_conn, "body", queue="q")
    with pytest.raises(UnsupportedConnectionError, match="await publish"):
        outbox.publish_sync(conn, "body", queue="q")
    with pytest.raises(UnsupportedConnectionError, match="cannot publish through a builtins.dict"):
        await outbox.publish({}, "body", queue="q")
    assert isinstance(UnsupportedConnectionError("x"), OutboxError | TypeError)
    assert await outbox_rows(conn, schema) == []


async def test_a_row_the_relay_could_never_publish_is_refused_before_it_is_written(
    postgres_dsn: str, amqp_url: str, conn: psycopg.AsyncConnection[Any], schema: str
) -> None:
    # Each was written, then failed at every relay pass, retried forever (`last_error`).
    outbox = Outbox(schema=schema)
    bad = OutboxConfigurationError
    bad_calls: list[tuple[type[Exception], str, dict[str, Any]]] = [
        # 200 characters, 400 bytes: AMQP's limit is 255 bytes
        (OutboxConfigurationError, "message_id", {"queue": "q", "message_id": "é" * 200}),
        (OutboxConfigurationError, "queue name", {"queue": "a queue"}),
        (OutboxConfigurationError, "queue name", {"queue": "q" * 256}),
        (bad, "exchange name", {"exchange": "an exchange", "routing_key": "k"}),
        (bad, "routing key", {"exchange": "amq.direct", "routing_key": "k" * 256}),
        (SerializationError, "header 'n'", {"queue": "q", "headers": {"n": 2**80}}),
        (SerializationError, "header name", {"queue": "q", "headers": {"h" * 256: 1}}),
    ]  # fmt: skip
    for error, match, kwargs in bad_calls:
        # in a transaction of its own: a row written holds no lock past the failed check
        with pytest.raises(error, match=match):
            async with conn.transaction():
                await outbox.publish(conn, "body", **kwargs)
        with pytest.raises(error, match=match), psycopg.connect(postgres_dsn) as sync_conn:
            outbox.publish_sync(sync_conn, "body", **kwargs)
    assert await outbox_rows(conn, schema) == []
    # The limits themselves are fine, and the relay publishes them.
    async with conn.transaction():
        await outbox.publish(
            conn, "edge", queue="q" * 200, message_id="é" * 127, headers={"n": 2**63 - 1}
        )
    async with OutboxRelay(postgres_dsn, url=amqp_url, schema=schema, poll_interval=60) as relay:
        assert await relay.drain() == 1
    assert await queue_depth(amqp_url, "q" * 200) == 1


# --- the relay ---


def test_relay_arguments_are_checked(postgres_dsn: str, amqp_url: str) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"batch_size": 0}, "batch_size"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"retry_delay": float("inf")}, "retry_delay"),
        ({"batch_size": True}, "batch_size"),
        ({"publish_timeout": True}, "publish_timeout"),
        ({"schema": "no-dash"}, "identifier"),
        ({"producer": Producer(amqp_url)}, "not both"),
    ]
    for kwargs, match in cases:
        with pytest.raises(OutboxConfigurationError, match=match):
            OutboxRelay(postgres_dsn, url=amqp_url, **kwargs)


async def test_relay_without_the_tables_says_to_migrate(postgres_dsn: str, amqp_url: str) -> None:
    relay = OutboxRelay(postgres_dsn, url=amqp_url, schema="no_such_schema")
    with pytest.raises(OutboxSchemaError, match="migrate"):
        await relay.start()


async def test_relay_wakes_on_notify_and_keeps_the_message_id(
    postgres_dsn: str,
    amqp_url: str,
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    queue_name: str,
    make_worker: Any,
    counter: Counter,
) -> None:
    outbox = Outbox(schema=schema)

    async def handler(job: Job) -> None:
        counter.add((job.message_id, job.data, dict(job.headers), job.content_type))

    await make_worker(queue=queue_name, handler=handler).start()
    # A poll interval of a minute: only the NOTIFY of the commit can wake the relay in time.
    async with OutboxRelay(postgres_dsn, url=amqp_url, schema=schema, poll_interval=60) as relay:
        await wait_until(lambda: asyncio.sleep(0, relay.listening))
        async with conn.transaction():
            for i in range(20):
                await outbox.publish(
                    conn, {"i": i}, queue=queue_name, headers={"i": i}, message_id=f"m{i}"
                )
        got = await counter.wait_for(20)
        assert sorted(got) == sorted(
            (f"m{i}", {"i": i}, {"i": i}, "application/json") for i in range(20)
        )

        async def emptied() -> bool:  # rows are deleted once confirmed
            return not await outbox_rows(conn, schema)

        await wait_until(emptied)
        assert relay.published == 20
        assert relay.failed == 0


async def test_relay_polls_for_delayed_rows(
    postgres_dsn: str,
    amqp_url: str,
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    queue_name: str,
    make_worker: Any,
    counter: Counter,
) -> None:
    outbox = Outbox(schema=schema)

    async def handler(job: Job) -> None:
        counter.add(job.data)

    await make_worker(queue=queue_name, handler=handler).start()
    async with OutboxRelay(postgres_dsn, url=amqp_url, schema=schema, poll_interval=0.1):
        async with conn.transaction():
            await outbox.publish(conn, "later", queue=queue_name, delay=0.5)
            await outbox.publish(conn, "now", queue=queue_name)
        assert await counter.wait_for(2) == ["now", "later"]


async def test_a_failed_publish_stays_in_the_outbox_for_a_retry(
    postgres_dsn: str, amqp_url: str, conn: psycopg.AsyncConnection[Any], schema: str
) -> None:
    outbox = Outbox(schema=schema)
    async with conn.transaction():
        await outbox.publish(conn, "x", exchange="no-such-exchange", routing_key="k")
    async with OutboxRelay(postgres_dsn, url=amqp_url, schema=schema, poll_interval=60) as relay:
        assert await relay.drain() == 0
        assert relay.failed >= 1
    [row] = await outbox_rows(conn, schema)
    assert row[5] >= 1  # attempts
    assert "no-such-exchange" in row[6]  # last_error


async def test_relay_with_a_shared_producer_and_queue_specs(
    postgres_dsn: str,
    amqp_url: str,
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    queue_name: str,
) -> None:
    spec = aio_workq.Queue(queue_name, type="classic")
    async with conn.transaction():
        await Outbox(schema=schema).publish(conn, "x", queue=queue_name)
    async with Producer(amqp_url) as producer:
        relay = OutboxRelay(postgres_dsn, producer=producer, schema=schema, queues=[spec])
        async with relay:
            assert await relay.drain() == 1
        await producer.publish("still open", queue=spec)  # the relay did not close it
    assert await queue_depth(amqp_url, queue_name) == 2


# --- the idempotent consumer ---


async def test_idempotent_consumer_runs_each_message_id_once(
    amqp_url: str,
    pool: AsyncConnectionPool[Any],
    schema: str,
    queue_name: str,
    producer: Producer,
    make_worker: Any,
    counter: Counter,
) -> None:
    await pool.open()
    async with pool.connection() as c:
        await c.execute(f"CREATE TABLE {schema}.effects (message_id text, attempt int)")
    consumer = idempotent(pool, schema=schema)
    failed_once: set[str] = set()

    @consumer
    async def apply(job: Job, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(
            f"INSERT INTO {schema}.effects VALUES (%s, %s)", (job.message_id, job.attempt)
        )
        if job.data == "fails-once" and job.message_id not in failed_once:
            failed_once.add(job.message_id or "")
            raise Retry(delay=0)  # rolls back the effect and the id: the retry runs again

    async def handler(job: Job) -> None:
        await apply(job)
        counter.add(job.message_id)

    await make_worker(queue=queue_name, handler=handler).start()
    for message_id in ["a", "b", "a", "c", "b", "a"]:
        await producer.publish("ok", queue=queue_name, message_id=message_id)
    await producer.publish("fails-once", queue=queue_name, message_id="d")
    await counter.wait_for(7)
    async with pool.connection() as c:
        rows = await (await c.execute(f"SELECT message_id FROM {schema}.effects")).fetchall()
    assert sorted(r[0] for r in rows) == ["a", "b", "c", "d"]
    assert consumer.skipped == 3
    assert consumer.name is not None and consumer.name.endswith("apply")
    assert await consumer.seen("d") and not await consumer.seen("e")


async def test_idempotent_consumer_purges_ids_after_the_window(
    pool: AsyncConnectionPool[Any], schema: str
) -> None:
    await pool.open()
    consumer = idempotent(pool, name="purger", schema=schema, keep=3600, purge_every=None)
    async with pool.connection() as c:
        await c.execute(
            f"INSERT INTO {schema}.workq_processed (consumer, message_id, processed_at) VALUES "
            "('purger', 'old', now() - interval '2 hours'), ('purger', 'new', now())"
        )
    assert await consumer.purge() == 1
    assert not await consumer.seen("old")
    assert await consumer.seen("new")


async def test_idempotent_arguments_are_checked(pool: AsyncConnectionPool[Any]) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"keep": 0}, "keep"),
        ({"keep": True}, "keep"),  # was taken as 1 s: every id forgotten at once
        ({"purge_every": -1}, "purge_every"),
        ({"purge_every": float("nan")}, "purge_every"),  # was: a purge after every job
        ({"purge_every": "300"}, "purge_every"),  # was: TypeError
        ({"key": "message_id"}, "key"),  # was: TypeError at the first delivery
        ({"name": ""}, "name"),
        ({"schema": "a b"}, "identifier"),
    ]
    for kwargs, match in cases:
        with pytest.raises(OutboxConfigurationError, match=match):
            idempotent(pool, **kwargs)
    with pytest.raises(OutboxConfigurationError, match="AsyncConnectionPool"):
        idempotent("postgresql://x")  # type: ignore[arg-type]

    async def first(job: Job, conn: psycopg.AsyncConnection[Any]) -> None: ...

    consumer = idempotent(pool)
    consumer(first)
    with pytest.raises(OutboxConfigurationError, match="one per handler"):
        consumer(first)
    shared = idempotent(pool, name="shared")
    shared(first)
    shared(first)  # an explicit name may be shared on purpose


async def test_idempotent_worker_smoke(
    amqp_url: str, pool: AsyncConnectionPool[Any], schema: str, queue_name: str
) -> None:
    """A Worker takes the wrapped handler directly (it is a coroutine function of the job)."""
    await pool.open()
    done = asyncio.Event()

    @idempotent(pool, name="smoke", schema=schema)
    async def handler(job: Job, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SELECT 1")
        done.set()

    async with Worker(amqp_url, queue=queue_name, handler=handler), Producer(amqp_url) as p:
        await p.publish("x", queue=queue_name)
        async with asyncio.timeout(10):
            await done.wait()


# --- the command line ---


async def test_cli_prints_and_applies_the_migration(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from aio_workq.outbox.__main__ import main

    assert main(["schema", "--schema", "cli_print"]) == 0
    assert 'CREATE TABLE IF NOT EXISTS "cli_print".workq_outbox' in capsys.readouterr().out
    name = f"cli_{uuid.uuid4().hex[:8]}"
    assert await asyncio.to_thread(main, ["migrate", "--dsn", postgres_dsn, "--schema", name]) == 0
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as c:
        assert await (await c.execute(f"SELECT count(*) FROM {name}.workq_outbox")).fetchone()
        await c.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.mark.parametrize("command", ["migrate", "relay"])
async def test_cli_says_in_one_line_that_the_database_cannot_be_reached(
    command: str, amqp_url: str
) -> None:
    """A DSN whose PostgreSQL refuses the connection is one line naming it (no password) and
    the fix, exit code 1, in `python -m aio_workq.outbox` and in `aio-workq outbox`."""
    import subprocess
    import sys

    errors = {}
    with socket.socket() as closed:  # bound, not listening: a connection to it is refused
        closed.bind(("127.0.0.1", 0))
        dsn = f"postgresql://app:s3cret-pw@127.0.0.1:{closed.getsockname()[1]}/app"
        for prog, module in [("python -m aio_workq.outbox", "aio_workq.outbox"),
                             ("aio-workq", "aio_workq outbox")]:  # fmt: skip
            proc = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", *module.split(), command, "--dsn", dsn, "--url", amqp_url],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert proc.returncode == 1, proc.stderr
            errors[prog] = proc.stderr
    for prog, err in errors.items():
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"{prog}: error: cannot connect to PostgreSQL"), err
        assert "postgresql://app:***@127.0.0.1" in err and "--dsn" in err
        assert "Connection refused" in err and "s3cret-pw" not in err


async def test_relay_without_listen_only_polls(
    postgres_dsn: str, amqp_url: str, conn: psycopg.AsyncConnection[Any], schema: str
) -> None:
    async with OutboxRelay(
        postgres_dsn, url=amqp_url, schema=schema, listen=False, poll_interval=0.05
    ) as relay:
        async with conn.transaction():
            await Outbox(schema=schema).publish(conn, "x", routing_key="amq.nothing")
        await wait_until(lambda: asyncio.sleep(0, relay.failed > 0))  # polled, tried, failed
        assert not relay.listening


@pytest.mark.slow
async def test_a_relay_cut_off_from_its_database_mid_batch_goes_on_over_another_route(
    postgres_dsn: str,
    amqp_url: str,
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    queue_name: str,
    make_worker: Any,
    counter: Counter,
) -> None:
    """A partition between the relay and PostgreSQL while the relay holds a batch (its rows
    locked, published, not yet deleted): the relay gives the batch up within its bound, its
    next connection goes the other way (a DSN with two hosts), and the rows its cut-off session
    still locks come free once PostgreSQL ends that session (idle in its transaction too
    long): every message arrives. Before, the relay waited on the dead connection forever."""
    from urllib.parse import urlsplit

    from tests.faultproxy import FaultProxy

    pg = urlsplit(postgres_dsn)
    outbox = Outbox(schema=schema)

    async def handler(job: Job) -> None:
        counter.add(job.message_id)

    await make_worker(queue=queue_name, handler=handler).start()
    broker_port = int(urlsplit(amqp_url).port or 5672)
    async with (
        FaultProxy(upstream_port=pg.port or 5432) as db,
        FaultProxy(upstream_port=broker_port) as mq,
    ):
        # The first host is the route that breaks, the second one the way around it.
        dsn = (
            f"host=127.0.0.1,127.0.0.1 port={db.port},{pg.port} user={pg.username} "
            f"dbname={pg.path.lstrip('/') or 'postgres'}"
        )
        mq.latency = 0.5  # a confirm takes about a second: the batch is held that long
        relay = OutboxRelay(
            dsn, url=mq.url(amqp_url), schema=schema, poll_interval=0.2, listen=False,
            publish_timeout=5, db_timeout=1,
        )  # fmt: skip
        async with relay:
            async with conn.transaction():
                for i in range(20):
                    await outbox.publish(conn, i, queue=queue_name, message_id=f"p{i}")

            async def holding() -> bool:  # the relay's session: in its transaction, publishing
                cursor = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
                    "AND pid <> pg_backend_pid()"
                )
                row = await cursor.fetchone()
                await conn.commit()
                return bool(row and row[0])

            await wait_until(holding, timeout=15)
            db.black_hole()  # the DELETE of the confirmed rows never arrives

            async def emptied() -> bool:
                return not await outbox_rows(conn, schema)

            await wait_until(emptied, timeout=60)  # republished over the second route
        db.heal()
    delivered = list(counter.items)
    assert set(delivered) == {f"p{i}" for i in range(20)}  # some twice: at-least-once
    print(f"LEDGER outbox partition: committed=20 delivered={len(delivered)} lost=0")  # noqa: T201


async def test_a_nul_in_a_header_is_refused_before_the_database_sees_it(
    postgres_dsn: str, conn: psycopg.AsyncConnection[Any], schema: str
) -> None:
    # PostgreSQL's jsonb refuses \u0000: the insert failed with psycopg's error and aborted
    # the caller's transaction (the order it was written with rolled back too).
    outbox = Outbox(schema=schema)
    for headers in ({"h": "a\x00b"}, {"h\x00": 1}, {"h": ["x", {"y": "\x00"}]}):
        async with conn.transaction():
            await conn.execute("SELECT 1")  # the caller's own work, kept
            with pytest.raises(SerializationError, match="NUL"):
                await outbox.publish(conn, "body", queue="q", headers=headers)
            await conn.execute("SELECT 1")  # the transaction is still usable
        with pytest.raises(SerializationError, match="NUL"), psycopg.connect(postgres_dsn) as sync:
            outbox.publish_sync(sync, "body", queue="q", headers=headers)
    bad: list[tuple[str, dict[str, Any]]] = [
        ("message_id", {"queue": "q", "message_id": "m\x00"}),
        ("queue name", {"queue": "q\x00"}),
        ("routing key", {"exchange": "amq.direct", "routing_key": "k\x00"}),
    ]
    for match, kwargs in bad:
        with pytest.raises(OutboxConfigurationError, match=match):
            async with conn.transaction():
                await outbox.publish(conn, "body", **kwargs)
    assert await outbox_rows(conn, schema) == []


async def test_idempotent_consumer_rejects_a_message_id_its_table_cant_keep(
    pool: AsyncConnectionPool[Any], schema: str
) -> None:
    # AMQP carries a NUL in a message id (another client's); PostgreSQL's text refuses it.
    # The insert raised psycopg's DataError: the message was retried, failing the same way at
    # every attempt until the last dead-lettered it, with the driver's message as the reason.
    from aio_workq.testing import run_handler

    await pool.open()
    consumer = idempotent(pool, schema=schema)
    ran: list[str | None] = []

    @consumer
    async def apply(job: Job, conn: psycopg.AsyncConnection[Any]) -> None:
        ran.append(job.message_id)

    outcome = await run_handler(apply, "x", message_id="m\x00")
    assert outcome.kind == "dead-lettered", outcome
    assert outcome.reason is not None and "NUL" in outcome.reason
    assert ran == []
    outcome = await run_handler(apply, "x", message_id="m")
    assert outcome.kind == "acked" and ran == ["m"]


def test_a_relay_starts_again_after_a_stop_also_under_another_event_loop(
    postgres_dsn: str, amqp_url: str, queue_name: str
) -> None:
    # Its own producer, closed by stop(), could not start again: a second `async with relay`
    # (an app's second lifespan, the next test) raised IntegrationError ("make a new
    # Producer"); and its lock and events stayed bound to the first `asyncio.run()`'s loop.
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(schema_sql(name))
    relay = OutboxRelay(postgres_dsn, url=amqp_url, schema=name, poll_interval=60)
    outbox = Outbox(schema=name)

    async def once(n: int) -> int:
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
            async with conn.transaction():
                await outbox.publish(conn, {"n": n}, queue=queue_name)
        async with relay:
            async with asyncio.timeout(20):
                return await relay.drain()

    try:
        assert asyncio.run(once(1)) == 1
        assert asyncio.run(once(2)) == 1  # another loop
        assert asyncio.run(once(3)) == 1
        assert asyncio.run(queue_depth(amqp_url, queue_name)) == 3
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')
