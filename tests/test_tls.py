"""TLS nodes made by scripts/broker.py + scripts/tls.py: amqps://, mutual TLS, and refusals.

Raw aiormq here proves the nodes themselves; the library's own `ssl_context=` is tested on them too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiormq
import pytest

from scripts.broker import LocalBroker
from scripts.tls import PKI
from tests.helpers import wait_until

pytestmark = pytest.mark.broker


def client_context(pki: PKI, *, ca: Path | None = None, cert: bool = False) -> ssl.SSLContext:
    """A client context trusting ca (default: the test CA), with the client cert if cert."""
    context = ssl.create_default_context(cafile=str(ca or pki.ca_cert))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def connections(node: LocalBroker) -> list[dict[str, object]]:
    """The node's client connections, with `ssl` and `peer_cert_subject`."""
    out = node.ctl("list_connections", "-q", "--formatter", "json", "ssl", "peer_cert_subject")
    result: list[dict[str, object]] = json.loads(out)
    return result


async def no_connections(node: LocalBroker) -> None:
    """Wait until the node lists no client connection (earlier tests' ones have gone)."""

    async def none() -> bool:
        return not await asyncio.to_thread(connections, node)

    await wait_until(none)


@pytest.fixture
def quiet_aiormq() -> Iterator[None]:
    """aiormq logs its own ERROR for a failed transport; the tests check the raised error."""
    logger = logging.getLogger("aiormq.connection")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


async def test_amqps_with_the_ca_connects_over_tls(tls_broker: LocalBroker, tls_pki: PKI) -> None:
    async with asyncio.timeout(20):
        conn = await aiormq.connect(tls_broker.tls_url, context=client_context(tls_pki))
        try:
            channel = await conn.channel()
            declared = await channel.queue_declare(exclusive=True)
            assert declared.queue
            listed = await asyncio.to_thread(connections, tls_broker)
        finally:
            await conn.close()
    assert [c["ssl"] for c in listed] == [True]


async def test_mutual_tls_presents_the_client_certificate(
    mtls_broker: LocalBroker, tls_pki: PKI
) -> None:
    context = client_context(tls_pki, cert=True)
    async with asyncio.timeout(20):
        conn = await aiormq.connect(mtls_broker.tls_url, context=context)
        try:
            await conn.channel()
            listed = await asyncio.to_thread(connections, mtls_broker)
        finally:
            await conn.close()
    assert len(listed) == 1
    assert listed[0]["ssl"] is True
    assert "CN=aio-workq-client" in str(listed[0]["peer_cert_subject"])


@pytest.mark.usefixtures("quiet_aiormq")
async def test_mutual_tls_without_a_client_certificate_is_refused(
    mtls_broker: LocalBroker, tls_pki: PKI
) -> None:
    await no_connections(mtls_broker)
    with pytest.raises(aiormq.exceptions.AMQPConnectionError):
        async with asyncio.timeout(20):
            await aiormq.connect(mtls_broker.tls_url, context=client_context(tls_pki))
    assert await asyncio.to_thread(connections, mtls_broker) == []


@pytest.mark.usefixtures("quiet_aiormq")
async def test_a_client_trusting_another_ca_refuses_the_server(
    tls_broker: LocalBroker, tls_pki: PKI
) -> None:
    context = client_context(tls_pki, ca=tls_pki.other_ca_cert)
    await no_connections(tls_broker)
    with pytest.raises(aiormq.exceptions.AMQPConnectionError) as info:
        async with asyncio.timeout(20):
            await aiormq.connect(tls_broker.tls_url, context=context)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert await asyncio.to_thread(connections, tls_broker) == []


@pytest.mark.usefixtures("quiet_aiormq")
async def test_a_host_name_the_certificate_does_not_name_is_refused(
    tls_broker: LocalBroker, tls_pki: PKI
) -> None:
    # 127.1 is 127.0.0.1 for the resolver, but a name the certificate (localhost, 127.0.0.1)
    # does not carry: the same server, reached under a wrong host name.
    url = tls_broker.tls_url.replace("@localhost:", "@127.1:")
    await no_connections(tls_broker)
    with pytest.raises(aiormq.exceptions.AMQPConnectionError) as info:
        async with asyncio.timeout(20):
            await aiormq.connect(url, context=client_context(tls_pki))
    assert "Hostname mismatch" in str(info.value)
    assert await asyncio.to_thread(connections, tls_broker) == []


@pytest.mark.usefixtures("quiet_aiormq")
async def test_amqps_to_a_plain_listener_fails_instead_of_talking_plaintext(
    tls_broker: LocalBroker, tls_pki: PKI
) -> None:
    plain_port_as_tls = f"amqps://guest:guest@localhost:{tls_broker.amqp_port}/"
    await no_connections(tls_broker)
    with pytest.raises((aiormq.exceptions.AMQPConnectionError, ConnectionError, ssl.SSLError)):
        async with asyncio.timeout(20):
            await aiormq.connect(plain_port_as_tls, context=client_context(tls_pki))
    assert await asyncio.to_thread(connections, tls_broker) == []
