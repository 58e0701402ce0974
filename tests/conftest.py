from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import aio_workq
from scripts.broker import BrokerError, LocalBroker, TLSListener, ensure_installed
from scripts.cluster import LocalCluster, ensure_iptables
from scripts.postgres import LocalPostgres, PostgresError
from scripts.tls import PKI, make_pki
from tests.helpers import Counter

# --- broker ---
# Tests get a broker URL from `amqp_url`: AIO_WORKQ_AMQP_URL if set, else a RabbitMQ node of our own
# started once per session (the `workq_amqp_url` fixture of aio_workq.testing's pytest plugin).
# Tests that stop, kill or pause the node take `local_broker`, which needs that node and brings it
# back up after the test.

AMQP_URL_ENV = "AIO_WORKQ_AMQP_URL"


@pytest.fixture(scope="session")
def broker(workq_broker: LocalBroker | None) -> LocalBroker | None:
    """The session's node, from aio-workq's own pytest plugin (`aio_workq.testing`)."""
    return workq_broker


@pytest.fixture(scope="session")
def amqp_url(workq_amqp_url: str) -> str:
    return workq_amqp_url


@pytest.fixture
def local_broker(broker: LocalBroker | None) -> Iterator[LocalBroker]:
    if broker is None:
        pytest.fail(
            f"this test stops/kills/pauses the broker, so it needs the session's own node: "
            f"unset {AMQP_URL_ENV} (needs rabbitmq-server installed) or deselect it",
            pytrace=False,
        )
    yield broker
    try:  # leave the node running for the next test
        broker.resume()
    except BrokerError:
        broker.start()


SMALL_MESSAGES = 256 * 1024
"""The broker's max_message_size under the `small_messages` fixture."""


@pytest.fixture
def small_messages(local_broker: LocalBroker) -> Iterator[int]:
    """The session's broker refusing messages over SMALL_MESSAGES bytes (channels opened from
    now on), put back to RabbitMQ's default after the test."""
    local_broker.ctl("eval", f"application:set_env(rabbit, max_message_size, {SMALL_MESSAGES}).")
    try:
        yield SMALL_MESSAGES
    finally:
        local_broker.ctl("eval", "application:set_env(rabbit, max_message_size, 134217728).")


# --- library fixtures ---


@pytest.fixture
def queue_name() -> str:
    """A fresh queue name per test."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def connection(amqp_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A shared robust connection named after the test."""
    conn = await aio_workq.connect(amqp_url, name=request.node.nodeid)
    yield conn
    await conn.close()


@pytest.fixture
async def producer(amqp_url: str) -> AsyncIterator[aio_workq.Producer]:
    async with aio_workq.Producer(amqp_url) as p:
        yield p


@pytest.fixture
async def make_worker(amqp_url: str) -> AsyncIterator[Callable[..., aio_workq.Worker]]:
    """A factory of started-on-use workers that are all stopped at the end of the test."""
    made: list[aio_workq.Worker] = []

    def factory(**kwargs: Any) -> aio_workq.Worker:
        kwargs.setdefault("url", None if "connection" in kwargs else amqp_url)
        worker = aio_workq.Worker(**kwargs)
        made.append(worker)
        return worker

    yield factory
    for worker in made:
        await worker.stop(timeout=1)


@pytest.fixture
def counter() -> Counter:
    return Counter()


# --- cluster and TLS nodes (scripts/cluster.py, scripts/tls.py) ---
# Own nodes even when AIO_WORKQ_AMQP_URL is set: these tests need RabbitMQ installed locally.


def _own_nodes_or_fail(what: str, error: Exception) -> None:
    pytest.fail(
        f"no local RabbitMQ for the {what} tests: {error}\n"
        "They start nodes of their own, so rabbitmq-server must be installed "
        "(`sudo apt-get install rabbitmq-server`); or deselect them.",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def management_broker(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LocalBroker]:
    """A node of its own with the management plugin, one per test module (slow to start)."""
    module = request.module.__name__.rpartition(".")[2].removeprefix("test_").replace("_", "")
    node = LocalBroker(tmp_path_factory.mktemp("mgmt"), name=f"workqmgmt{module}", management=True)
    node.start()
    yield node
    node.close()


@pytest.fixture(scope="session")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA, a server certificate (localhost, 127.0.0.1), a client one, and an unrelated CA."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def tls_nodes(
    tmp_path_factory: pytest.TempPathFactory, tls_pki: PKI
) -> Iterator[tuple[LocalBroker, LocalBroker]]:
    """Two TLS nodes started side by side: server-authenticated TLS, and mutual TLS."""
    files = (str(tls_pki.ca_cert), str(tls_pki.server_cert), str(tls_pki.server_key))
    nodes = (
        LocalBroker(tmp_path_factory.mktemp("tls"), name="workqtls", tls=TLSListener(*files)),
        LocalBroker(
            tmp_path_factory.mktemp("mtls"),
            name="workqmtls",
            tls=TLSListener(*files, verify_peer=True),
        ),
    )
    try:
        ensure_installed()
        with ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(n.start) for n in nodes]:
                started.result()
    except BrokerError as e:
        for n in nodes:
            n.close()
        _own_nodes_or_fail("TLS", e)
    yield nodes
    for n in nodes:
        n.close()


@pytest.fixture(scope="session")
def tls_broker(tls_nodes: tuple[LocalBroker, LocalBroker]) -> LocalBroker:
    """A node with an amqps:// listener (`.tls_url`) that verifies no client certificate."""
    return tls_nodes[0]


@pytest.fixture(scope="session")
def mtls_broker(tls_nodes: tuple[LocalBroker, LocalBroker]) -> LocalBroker:
    """A node whose amqps:// listener requires a client certificate signed by the test CA."""
    return tls_nodes[1]


@pytest.fixture(scope="session")
def cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    nodes = LocalCluster(tmp_path_factory.mktemp("cluster"), size=3, prefix="wqtest")
    try:
        ensure_installed()
        ensure_iptables()
        nodes.start()
    except BrokerError as e:
        nodes.close()
        _own_nodes_or_fail("cluster", e)
    yield nodes
    nodes.close()


@pytest.fixture
def cluster(cluster_session: LocalCluster) -> Iterator[LocalCluster]:
    """The session's 3-node cluster; after the test, partitions are healed and nodes restarted."""
    yield cluster_session
    cluster_session.heal()  # a paused minority node resumes by itself once healed
    for node in cluster_session.nodes:
        if node.beam_pid() is None:  # killed or stopped
            node.start()
    cluster_session.wait_running(timeout=90)


# --- postgres ---
# Tests get a PostgreSQL DSN from `postgres_dsn`: AIO_WORKQ_POSTGRES_DSN if set, else a node of our
# own (scripts/postgres.py) in a fresh directory under /tmp (the server runs as the `postgres`
# user, who cannot enter pytest's root-only tmp dirs), stopped and removed after the session.

POSTGRES_DSN_ENV = "AIO_WORKQ_POSTGRES_DSN"


@pytest.fixture(scope="session")
def postgres_node() -> Iterator[LocalPostgres | None]:
    if os.environ.get(POSTGRES_DSN_ENV):
        yield None
        return
    node = LocalPostgres(Path(tempfile.mkdtemp(prefix="aio-workq-pg-")))
    try:
        node.start()
    except PostgresError as e:
        pytest.fail(
            f"no PostgreSQL for the tests: {e}\n"
            "Install it (`sudo apt-get install postgresql`) or point the tests at a running "
            "server: "
            f"{POSTGRES_DSN_ENV}=postgresql://postgres@localhost:5432/postgres",
            pytrace=False,
        )
    yield node
    node.close()
    shutil.rmtree(node.base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_dsn(postgres_node: LocalPostgres | None) -> str:
    return os.environ.get(POSTGRES_DSN_ENV) or (postgres_node.dsn if postgres_node else "")


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL node of the test's own, which it may stop, kill and start again."""
    node = LocalPostgres(Path(tempfile.mkdtemp(prefix="aio-workq-own-pg-")))
    node.start()
    try:
        yield node
    finally:
        node.close()
        shutil.rmtree(node.base_dir, ignore_errors=True)


@pytest.fixture
def restored_loggers() -> Iterator[None]:
    """aiormq's and aio-pika's loggers put back after a test that runs the CLI in-process (it
    sets up logging for a whole process)."""
    saved = [
        (logger, logger.level, logger.propagate, list(logger.handlers))
        for logger in map(logging.getLogger, ("aiormq", "aio_pika"))
    ]
    yield
    for logger, level, propagate, handlers in saved:
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def every_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """Each job store in turn: a `MemoryStore`, a `SQLiteStore` in `tmp_path`, and a
    `PostgresStore` on the suite's PostgreSQL in a schema of its own (dropped afterwards)."""
    from aio_workq.jobs import MemoryStore, SQLiteStore
    from aio_workq.jobs.postgres import PostgresStore, migrate

    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite":
        made = SQLiteStore(tmp_path / "jobs.db")
        yield made
        await made.close()
    else:
        import psycopg

        dsn = request.getfixturevalue("postgres_dsn")
        schema = f"j_{uuid.uuid4().hex[:12]}"
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await migrate(conn, schema=schema)
            pg = PostgresStore(dsn, schema=schema)
            yield pg
            await pg.close()
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
