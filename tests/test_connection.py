"""Connections: host lists, reconnect backoff, and typed errors that never show a password."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import aiormq
import pytest

import aio_workq
from aio_workq import (
    AccessRefusedError,
    AuthenticationError,
    Backoff,
    BrokerConnectionError,
    ConfigurationError,
    Connection,
    Producer,
)
from aio_workq._link.errors import connect_error
from scripts.broker import LocalBroker
from tests.helpers import wait_until

pytestmark = pytest.mark.broker


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_password(url: str, password: str) -> str:
    return url.replace("guest:guest@", f"guest:{password}@")


async def test_a_host_list_with_a_dead_first_entry_connects_to_the_next(amqp_url: str) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    for urls in ([dead, amqp_url], f"{dead},{amqp_url}"):
        connection = Connection(urls, connect_timeout=5)
        await connection.open()  # one round: tries each URL once, whatever the shuffled start
        try:
            assert connection.is_connected
            assert connection.url is not None and "guest:***@" in connection.url
        finally:
            await connection.close()


async def test_no_url_answering_is_a_typed_error_and_leaves_nothing_running() -> None:
    urls = [f"amqp://guest:s3cr3t@127.0.0.1:{closed_port()}/" for _ in range(2)]
    tasks_before = len(asyncio.all_tasks())
    with pytest.raises(BrokerConnectionError) as info:
        await aio_workq.connect(urls, timeout=2)
    assert "s3cr3t" not in str(info.value)
    await wait_until(lambda: _true(len(asyncio.all_tasks()) == tasks_before), timeout=5)


async def test_wrong_password_and_unknown_vhost_are_typed_and_redacted(amqp_url: str) -> None:
    with pytest.raises(AuthenticationError) as auth:
        await aio_workq.connect(with_password(amqp_url, "n0t-the-pa55"), timeout=5)
    assert "n0t-the-pa55" not in str(auth.value)
    with pytest.raises(AccessRefusedError, match="no-such-vhost") as vhost:
        await aio_workq.connect(amqp_url.rstrip("/") + "/no-such-vhost", timeout=5)
    assert "vhost" in str(vhost.value) and "guest:guest" not in str(vhost.value)


@pytest.mark.parametrize("password", ["pa/ss", "pa#ss", "pa?ss"])
def test_unencoded_special_characters_in_a_password_are_refused_and_hidden(password: str) -> None:
    with pytest.raises(ConfigurationError, match="percent-encode") as info:
        Producer(f"amqp://user:{password}@host/")
    assert password not in str(info.value)


async def test_reconnects_back_off_to_the_cap_with_one_warning_per_attempt(
    local_broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    backoff = Backoff(initial=0.2, cap=0.8)
    connection = Connection(local_broker.url, connect_timeout=2, backoff=backoff)
    await connection.open()
    try:
        with caplog.at_level(logging.DEBUG):
            local_broker.stop()
            await wait_until(lambda: _true(len(_attempts(caplog)) >= 6), timeout=30)
            attempts = _attempts(caplog)
            local_broker.start()
            await wait_until(lambda: _true(connection.is_connected), timeout=30)
    finally:
        await connection.close()
    # Between attempts: at least half of min(cap, initial * 2**(n-1)) (full jitter); growing.
    gaps = [b.created - a.created for a, b in zip(attempts, attempts[1:], strict=False)]
    ceilings = [min(0.8, 0.2 * 2**n) for n in range(len(gaps))]
    assert all(gap >= ceiling / 2 * 0.9 for gap, ceiling in zip(gaps, ceilings, strict=True))
    assert all(r.levelno == logging.WARNING for r in attempts)
    assert all("guest:***@" in r.getMessage() for r in attempts)
    aiormq_errors = [
        r for r in caplog.records if r.name.startswith("aiormq") and r.levelno >= logging.ERROR
    ]
    assert not [r for r in aiormq_errors if "creating transport" in r.getMessage()]
    assert connection.reconnects == 1


def _attempts(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "aio_workq" and r.getMessage().startswith("connecting to ")
    ]


async def _true(value: bool) -> bool:
    return value


async def test_a_publish_to_an_undeclared_queue_is_bounded_while_the_broker_is_paused(
    local_broker: LocalBroker, queue_name: str
) -> None:
    async with Producer(local_broker.url, timeout=2) as producer:
        local_broker.pause()  # SIGSTOP: connects succeed, nothing answers
        try:
            with pytest.raises(aio_workq.PublishTimeoutError, match="declared within 2 s"):
                async with asyncio.timeout(30):  # a hang guard: the 2 s timeout fails it first
                    await producer.publish("x", queue=queue_name)
        finally:
            local_broker.resume()


async def test_a_connect_to_a_paused_broker_times_out_and_leaves_nothing_running(
    local_broker: LocalBroker,
) -> None:
    tasks_before = len(asyncio.all_tasks())
    local_broker.pause()
    try:
        with pytest.raises(BrokerConnectionError, match="no answer within 1 s"):
            await aio_workq.connect(local_broker.url, timeout=1)
    finally:
        local_broker.resume()
    # aiormq's own clean-up finishes; nothing keeps running (no reconnect loop).
    await wait_until(lambda: _true(len(asyncio.all_tasks()) == tasks_before), timeout=5)


def _looped(first: BaseException, second: BaseException) -> BaseException:
    first.__cause__ = second
    second.__context__ = first  # a chain that loops, as aiormq's re-raises can make
    return first


def test_a_reset_over_tls_names_the_client_certificate_and_a_looping_chain_ends() -> None:
    reset = ConnectionResetError(104, "Connection reset by peer")
    error = connect_error(
        _looped(aiormq.exceptions.AMQPConnectionError("reset"), reset),
        "amqps://guest:secret@localhost:5671/",
    )
    assert type(error) is aio_workq.BrokerConnectionError
    assert "Connection reset by peer" in str(error) and "client certificate" in str(error)
    assert "secret" not in str(error)
    plain = connect_error(
        _looped(aiormq.exceptions.AMQPConnectionError("reset"), reset),
        "amqp://guest:secret@localhost:5672/",
    )
    assert "certificate" not in str(plain)
    alert = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] certificate required")
    alert.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    tls = connect_error(
        _looped(aiormq.exceptions.AMQPConnectionError("tls"), alert), "amqps://localhost/"
    )
    assert isinstance(tls, aio_workq.TLSError) and "CERTIFICATE_REQUIRED" in str(tls)
