from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import aio_workq
from scripts.broker import BrokerError, LocalBroker
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
