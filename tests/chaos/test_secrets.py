"""A distinctive password never shows: not in logs (DEBUG, every logger), reprs, errors, tracebacks.

A broker user gets a password with special characters; the tests drive the error paths a user
meets (wrong password, unreachable host, connection lost, publish timeout in a black hole, bad
URL) with the root logger at DEBUG, then search every captured record, the str and repr of every
public object and error, and every formatted traceback (causes included) for the password, raw or
percent-encoded.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import pytest

from aio_workq import (
    AuthenticationError,
    BrokerConnectionError,
    ConfigurationError,
    Producer,
    PublishError,
    Worker,
    resolve_url,
)
from scripts.broker import LocalBroker, free_port
from scripts.tls import PKI
from tests.faultproxy import FaultProxy

pytestmark = [pytest.mark.broker]

USER = "chaos-secret"
PASSWORD = "Tr0ub4dor/#?@:%&3-Zx"  # every URL delimiter, and a distinctive stem
ENCODED = quote(PASSWORD, safe="")
FORMATTER = logging.Formatter("%(name)s %(levelname)s %(message)s")


def leaks(text: str) -> bool:
    return PASSWORD in text or ENCODED in text or "Tr0ub4dor" in text


def _text(value: object) -> str:
    try:
        return repr(value)
    except Exception as exc:  # aio-pika's OneShotCallback repr can raise: skip it, say so
        return f"<repr failed: {type(exc).__name__}>"


def _format(record: logging.LogRecord) -> str:
    try:
        return FORMATTER.format(record)
    except Exception:  # a record whose arguments cannot be shown (aio-pika's, as above)
        return f"{record.name} {record.msg}"


class Evidence:
    """Everything a user could see: texts of objects, errors and their tracebacks."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.texts: list[str] = []
        self._caplog = caplog

    def obj(self, value: object) -> None:
        self.texts += [str(value), repr(value)]

    def error(self, exc: BaseException) -> None:
        self.obj(exc)
        self.texts.append("".join(traceback.format_exception(exc)))
        cause = exc.__cause__ or exc.__context__
        while cause is not None:
            self.obj(cause)
            cause = cause.__cause__ or cause.__context__

    def check(self) -> None:
        """Assert the password shows nowhere (call at the end of the test)."""
        records = self._caplog.records
        texts = self.texts + [_format(r) for r in records]
        texts += [_text(arg) for r in records for arg in (r.args or ())]
        shown = [t for t in texts if leaks(t)]
        assert not shown, f"the password shows in {len(shown)} places, e.g. {shown[0][:300]!r}"
        assert records, "nothing was logged: the DEBUG capture did not work"


@pytest.fixture
def evidence(caplog: pytest.LogCaptureFixture) -> Iterator[Evidence]:
    caplog.set_level(logging.DEBUG)  # the root logger: every library's records
    yield Evidence(caplog)


@pytest.fixture
def secret_user(local_broker: LocalBroker) -> Iterator[str]:
    """A broker user with the distinctive password; the URL to the broker with it."""
    local_broker.ctl("add_user", USER, PASSWORD)
    local_broker.ctl("set_permissions", "-p", "/", USER, ".*", ".*", ".*")
    yield f"amqp://{USER}:{ENCODED}@127.0.0.1:{local_broker.amqp_port}/"
    local_broker.ctl("delete_user", USER)


@pytest.fixture
async def proxy(local_broker: LocalBroker) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream_port=local_broker.amqp_port) as proxy:
        yield proxy


async def test_wrong_password(local_broker: LocalBroker, evidence: Evidence) -> None:
    url = f"amqp://guest:{ENCODED}@127.0.0.1:{local_broker.amqp_port}/"
    producer = Producer(url, connect_timeout=10)
    evidence.obj(producer)
    with pytest.raises(AuthenticationError) as info:
        await producer.start()
    evidence.error(info.value)
    worker = Worker(url, queue="secret-wrong", handler=lambda job: None)
    evidence.obj(worker)
    with pytest.raises(BrokerConnectionError) as refused:
        await worker.start()
    evidence.error(refused.value)
    await worker.stop(timeout=1)
    evidence.check()


async def test_unreachable_host(evidence: Evidence) -> None:
    url = f"amqp://{USER}:{ENCODED}@127.0.0.1:{free_port()}/"
    producer = Producer(url, connect_timeout=2)
    evidence.obj(producer)
    with pytest.raises(BrokerConnectionError) as info:
        await producer.start()
    evidence.error(info.value)
    evidence.check()


async def test_connection_lost_and_publish_timeout(
    secret_user: str, proxy: FaultProxy, queue_name: str, evidence: Evidence
) -> None:
    url = proxy.url(secret_user)
    async with Producer(url, on_reconnect="fail", timeout=2) as producer:
        evidence.obj(producer)
        await producer.declare(queue_name)
        confirms = [await producer.send(b"x", queue_name) for _ in range(200)]
        proxy.cut()
        for outcome in await asyncio.gather(*confirms, return_exceptions=True):
            if isinstance(outcome, BaseException):
                evidence.error(outcome)
        async with proxy.black_holed_for(30):
            with pytest.raises(PublishError) as info:
                await producer.publish(b"y", queue=queue_name, timeout=2)
            evidence.error(info.value)
            evidence.obj(producer)
            proxy.cut()
    evidence.check()


async def test_bad_url_with_an_encoded_password(evidence: Evidence) -> None:
    for url in (
        f"amqp://{USER}:{ENCODED}@127.0.0.1:notaport/",
        f"http://{USER}:{ENCODED}@127.0.0.1:5672/",
        f"amqp://{USER}:{ENCODED}@:5672/",
    ):
        with pytest.raises(ConfigurationError) as info:
            resolve_url(url)
        evidence.error(info.value)
    logging.getLogger("tests").debug("bad URLs checked")  # the capture itself is checked
    evidence.check()


def test_bad_url_with_an_unencoded_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_url(f"amqp://{USER}:{PASSWORD}@127.0.0.1:5672/")
    assert not leaks(str(info.value)), str(info.value)


async def test_a_tls_failure(tls_broker: LocalBroker, tls_pki: PKI, evidence: Evidence) -> None:
    from aio_workq import TLSError
    from tests.test_tls import client_context

    wrong_ca = client_context(tls_pki, ca=tls_pki.other_ca_cert)
    url = tls_broker.tls_url.replace("guest:guest@", f"{USER}:{ENCODED}@")
    producer = Producer(url, ssl_context=wrong_ca, connect_timeout=10)
    evidence.obj(producer)
    with pytest.raises(TLSError) as info:
        await producer.start()
    evidence.error(info.value)
    evidence.check()
