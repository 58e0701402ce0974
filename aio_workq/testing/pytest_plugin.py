"""The pytest plugin of aio-workq (entry point `pytest11`): a throwaway RabbitMQ per session.

Fixtures (all session-scoped, started only when a test asks for them):

- `workq_amqp_url`: the URL of a broker for the tests: `AIO_WORKQ_AMQP_URL` when set, else a
  local RabbitMQ node of its own (Debian's `rabbitmq-server`, installed with apt-get when
  missing and running as root) on free loopback ports, stopped at the end of the session.
- `workq_broker`: that node (`LocalBroker`: `stop()`, `start()`, `kill()`, `pause()`), or None
  when `AIO_WORKQ_AMQP_URL` is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ._broker import BrokerError, LocalBroker, ensure_installed

__all__ = ("workq_amqp_url", "workq_broker")

AMQP_URL_ENV = "AIO_WORKQ_AMQP_URL"


@pytest.fixture(scope="session")
def workq_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker | None]:
    """A local RabbitMQ node for the session, or None when `AIO_WORKQ_AMQP_URL` is set."""
    if os.environ.get(AMQP_URL_ENV):
        yield None
        return
    node = LocalBroker(tmp_path_factory.mktemp("workq-broker"), name="workqtest")
    try:
        ensure_installed()
        node.start()
    except BrokerError as e:
        pytest.fail(
            f"no RabbitMQ for the tests: {e}\n"
            "Install it (`sudo apt-get install rabbitmq-server`) or point the tests at a running "
            f"broker: {AMQP_URL_ENV}=amqp://guest:guest@localhost:5672/",
            pytrace=False,
        )
    try:
        yield node
    finally:
        node.close()


@pytest.fixture(scope="session")
def workq_amqp_url(workq_broker: LocalBroker | None) -> str:
    """The broker URL for the session's tests."""
    if workq_broker is None:
        return os.environ[AMQP_URL_ENV]
    return workq_broker.url
