"""TLS nodes made by scripts/broker.py + scripts/tls.py: amqps://, mutual TLS, and refusals.

Raw aiormq here proves the nodes themselves; the library's own `ssl_context=` is tested on them too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiormq
import pytest

import aio_workq
from scripts.broker import LocalBroker, TLSListener
from scripts.tls import PKI, make_pki
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


def test_the_test_pki_chains_to_its_ca_and_names_localhost(tls_pki: PKI) -> None:
    assert TLSListener("ca", "cert", "key", verify_peer=True).config(5671)[-2:] == [
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
    ]
    assert oct(tls_pki.server_key.stat().st_mode & 0o777) == "0o600"
    assert make_pki(tls_pki.ca_cert.parent) == tls_pki  # kept, not remade
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(tls_pki.server_cert)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:localhost, IP Address:127.0.0.1" in text
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tls_pki.ca_cert), str(tls_pki.server_cert)],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    wrong = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tls_pki.other_ca_cert), str(tls_pki.client_cert)],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode != 0


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


# --- the library over TLS: ssl_context= on Producer and Worker ---


async def test_producer_and_worker_work_over_amqps(
    tls_broker: LocalBroker, tls_pki: PKI, queue_name: str
) -> None:
    context = client_context(tls_pki)
    seen: list[object] = []
    done = asyncio.Event()

    async def handle(job: aio_workq.Job) -> None:
        seen.append(job.data)
        done.set()

    async with asyncio.timeout(30):
        async with aio_workq.Producer(tls_broker.tls_url, ssl_context=context) as producer:
            await producer.publish({"n": 1}, queue=queue_name)
            async with aio_workq.Worker(
                tls_broker.tls_url, ssl_context=context, queue=queue_name, handler=handle
            ):
                await done.wait()
                # The producer's, the worker's and its presence beats' (#25, opened in the
                # background): all three over TLS.
                listed: list[dict[str, object]] = []

                async def three() -> bool:
                    listed[:] = await asyncio.to_thread(connections, tls_broker)
                    return len(listed) == 3

                await wait_until(three, timeout=20)
    assert seen == [{"n": 1}]
    assert all(c["ssl"] is True for c in listed)


async def test_producer_with_a_client_certificate_passes_mutual_tls(
    mtls_broker: LocalBroker, tls_pki: PKI, queue_name: str
) -> None:
    context = client_context(tls_pki, cert=True)
    async with asyncio.timeout(30):
        async with aio_workq.Producer(mtls_broker.tls_url, ssl_context=context) as producer:
            assert await producer.publish(b"over mTLS", queue=queue_name)
            listed = await asyncio.to_thread(connections, mtls_broker)
    assert [c["ssl"] for c in listed] == [True]
    assert "CN=aio-workq-client" in str(listed[0]["peer_cert_subject"])


def ssl_causes(exc: BaseException) -> list[ssl.SSLError]:
    """The ssl errors in exc's chain of causes."""
    found: list[ssl.SSLError] = []
    cause: BaseException | None = exc
    while cause is not None and len(found) < 10:
        if isinstance(cause, ssl.SSLError):
            found.append(cause)
        cause = cause.__cause__ or cause.__context__
    return found


@pytest.mark.usefixtures("quiet_aiormq")
@pytest.mark.parametrize(
    ("case", "reason", "detail"),
    [
        ("another CA", "CERTIFICATE_VERIFY_FAILED", "self-signed certificate in certificate chain"),
        ("wrong host name", "CERTIFICATE_VERIFY_FAILED", "Hostname mismatch"),
        ("amqps to the plain port", "WRONG_VERSION_NUMBER", "wrong version number"),
    ],
)
async def test_tls_failures_raise_tls_error_naming_the_cause(
    tls_broker: LocalBroker,
    tls_pki: PKI,
    case: str,
    reason: str,
    detail: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, context = tls_broker.tls_url, client_context(tls_pki)
    if case == "another CA":
        context = client_context(tls_pki, ca=tls_pki.other_ca_cert)
    elif case == "wrong host name":
        url = url.replace("@localhost:", "@127.1:")
    else:
        url = f"amqps://guest:guest@localhost:{tls_broker.amqp_port}/"
    await no_connections(tls_broker)
    with pytest.raises(aio_workq.TLSError) as info:
        async with asyncio.timeout(30):
            await aio_workq.Producer(url, ssl_context=context, connect_timeout=5).start()
    assert isinstance(info.value, aio_workq.BrokerConnectionError)
    assert reason in str(info.value)
    # The precise cause travels in the chain (see /work/notes/requests-cluster.md: the message
    # could carry it too).
    assert detail in " ".join(str(e) for e in ssl_causes(info.value))
    assert "guest:guest" not in str(info.value) and "guest:guest" not in caplog.text
    # Never a plaintext fallback: the node saw no AMQP connection at all.
    assert await asyncio.to_thread(connections, tls_broker) == []


@pytest.mark.usefixtures("quiet_aiormq")
async def test_mutual_tls_without_a_client_certificate_is_a_typed_error(
    mtls_broker: LocalBroker, tls_pki: PKI
) -> None:
    await no_connections(mtls_broker)
    # TLS 1.3: the broker's alert (a TLSError) or, when the reset wins the race, a
    # BrokerConnectionError; both say to look at the client certificate.
    with pytest.raises(aio_workq.BrokerConnectionError, match="client certificate"):
        async with asyncio.timeout(30):
            await aio_workq.Producer(
                mtls_broker.tls_url, ssl_context=client_context(tls_pki), connect_timeout=5
            ).start()
    assert await asyncio.to_thread(connections, mtls_broker) == []


@pytest.mark.slow
def test_broker_cli_starts_a_mutual_tls_node(tmp_path: Path) -> None:
    """`python -m scripts.broker start --tls DIR --mtls` prints both URLs; status and stop work."""
    root = Path(__file__).resolve().parent.parent
    node_dir = tmp_path / "node"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scripts.broker", *args, "--dir", str(node_dir)],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
        )

    started = cli("start", "--tls", str(tmp_path / "pki"), "--mtls", "--url-only")
    try:
        assert started.returncode == 0, started.stderr
        plain, tls = started.stdout.split()
        assert plain.startswith("amqp://") and tls.startswith("amqps://guest:guest@localhost:")
        status = cli("status", "--url-only")
        assert status.returncode == 0 and tls in status.stdout
        shown = cli("status")
        assert "amqps://guest:***@localhost:" in shown.stdout and "guest:guest" not in shown.stdout
        conf = (node_dir / "rabbitmq.conf").read_text()
        assert "ssl_options.fail_if_no_peer_cert = true" in conf
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert cli("status").returncode == 1


async def test_the_demo_runs_over_tls_with_the_ca_in_the_url(
    tls_broker: LocalBroker, tls_pki: PKI
) -> None:
    from urllib.parse import quote

    from tests.test_examples import run

    url = f"{tls_broker.tls_url}?cafile={quote(str(tls_pki.ca_cert))}"
    output = await run("demo.py", env={**os.environ, "AMQP_URL": url}, timeout=90)
    assert "nothing lost" in output
    assert "guest:guest" not in output
