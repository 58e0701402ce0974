"""aiormq's per-attempt log filter: installed when a Connection opens, once, not at import."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid

import pamqp.commands
import pamqp.frame
import pytest

from aio_workq import Connection
from scripts.broker import LocalBroker
from tests.faultproxy import FaultProxy
from tests.helpers import wait_until

SCRIPT = """
import asyncio, logging, socket
import aio_workq
from aio_workq._link.quiet import QuietAttempts

logger = logging.getLogger("aiormq.connection")
print(sum(isinstance(f, QuietAttempts) for f in logger.filters))
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

async def main():
    for _ in range(2):
        try:
            await aio_workq.connect(f"amqp://guest:guest@127.0.0.1:{port}/", timeout=1)
        except aio_workq.BrokerConnectionError:
            pass

asyncio.run(main())
print(sum(isinstance(f, QuietAttempts) for f in logger.filters))
"""


def test_the_filter_is_installed_by_the_first_connection_and_only_once() -> None:
    # A process of its own: this one's aiormq logger has seen other tests' connections.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out == ["0", "1"], out


@pytest.mark.broker
async def test_a_connection_the_broker_closes_is_logged_once_with_the_brokers_reason(
    local_broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # A broker restart, or an operator's close: aio-workq logs one WARNING saying why and
    # reconnects. aiormq's ERROR and its traceback for the same close are not printed beside it
    # (they were, for each of a worker's connections, on every broker restart).
    caplog.set_level(logging.INFO)
    name = f"quiet-{uuid.uuid4().hex[:8]}"
    async with Connection(local_broker.url, name=name) as connection:
        listed = await asyncio.to_thread(
            local_broker.ctl, "list_connections", "pid", "client_properties", "-q"
        )
        pids = [line.split("\t")[0] for line in listed.splitlines() if name in line]
        assert len(pids) == 1, listed
        await asyncio.to_thread(local_broker.ctl, "close_connection", pids[0], "maintenance")

        async def reconnected() -> bool:
            return connection.reconnects == 1 and connection.is_connected

        await wait_until(reconnected, timeout=30)
    lost = logged_once(caplog)
    assert "(320 CONNECTION_FORCED - maintenance)" in lost, lost  # was "(320)"
    assert "guest:guest" not in lost


@pytest.mark.broker
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "plain"])
async def test_a_close_aiormq_maps_to_its_own_class_is_logged_once_with_its_code(
    amqp_url: str, caplog: pytest.LogCaptureFixture, fast_path: bool
) -> None:
    # RabbitMQ 3.10 on a cluster closes a connection with 541 INTERNAL_ERROR when a consumer
    # starts on a quorum queue just declared through another node (its local member not yet
    # running). aiormq raises such a close as its own class (`ConnectionInternalError`, the
    # reply text alone): its reader's WARNING and traceback were printed beside aio-workq's
    # line, which said "(INTERNAL_ERROR)" without the code. The close is forged here through a
    # proxy (the race is rare), as the broker sends it.
    caplog.set_level(logging.INFO)
    close = pamqp.frame.marshal(
        pamqp.commands.Connection.Close(
            reply_code=541, reply_text="INTERNAL_ERROR", class_id=0, method_id=0
        ),
        0,
    )
    async with FaultProxy.to(amqp_url) as proxy:
        url = proxy.url(amqp_url)
        async with Connection(url, fast_path=fast_path, name="forged-close") as connection:
            assert proxy.tell_clients(close) == 1

            async def reconnected() -> bool:
                return connection.reconnects == 1 and connection.is_connected

            await wait_until(reconnected, timeout=30)
    assert "(541 INTERNAL_ERROR)" in logged_once(caplog)


def logged_once(caplog: pytest.LogCaptureFixture) -> str:
    """The one line aio-workq logged for the lost connection, aiormq having logged nothing at
    WARNING or above for it (its ERROR and its reader's traceback)."""
    aiormq_lines = [
        f"{r.levelname} {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("aiormq") and r.levelno >= logging.WARNING
    ]
    assert aiormq_lines == []
    lost = [r.getMessage() for r in caplog.records if "lost the connection" in r.getMessage()]
    assert len(lost) == 1, lost
    return lost[0]
