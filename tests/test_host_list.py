"""A host list with an unreachable entry tried first: a refused port and a black-holed one.

Runs against the session's broker (no cluster needed): the other entries are a closed port and a
socket that accepts connections and never answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

import aio_workq
from scripts.broker import free_port

pytestmark = pytest.mark.broker

CONNECT_TIMEOUT = 1.0


@pytest.fixture
async def black_hole() -> AsyncIterator[int]:
    """A port on 127.0.0.1 that accepts TCP connections and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("kind", ["refused", "black hole"])
async def test_unreachable_hosts_are_skipped_and_logged_once_each_without_passwords(
    amqp_url: str,
    queue_name: str,
    black_hole: int,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port() if kind == "refused" else black_hole
    dead = f"amqp://guest:dead-secret@127.0.0.1:{port}/"
    caplog.set_level(logging.WARNING, logger="aio_workq")
    # The start of the rotation is random: connect until the dead host was tried first
    # (each try has an even chance; 20 tries miss it with a chance of 1 in a million).
    for _ in range(20):
        caplog.clear()
        # The bound: one refused attempt is immediate, a black hole costs one connect_timeout.
        async with asyncio.timeout(CONNECT_TIMEOUT + 10):
            async with aio_workq.Producer(
                f"{dead},{amqp_url}", connect_timeout=CONNECT_TIMEOUT
            ) as producer:
                assert await producer.publish({"kind": kind}, queue=queue_name)
        warnings = [r for r in caplog.records if f"127.0.0.1:{port}" in r.getMessage()]
        if warnings:
            break
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].levelno == logging.WARNING
    assert "dead-secret" not in caplog.text


async def test_a_list_of_only_unreachable_hosts_fails_with_a_typed_error(
    black_hole: int, caplog: pytest.LogCaptureFixture
) -> None:
    urls = [f"amqp://guest:dead-secret@127.0.0.1:{free_port()}/", f"amqp://127.0.0.1:{black_hole}/"]
    async with asyncio.timeout(2 * CONNECT_TIMEOUT + 10):
        with pytest.raises(aio_workq.BrokerConnectionError) as info:
            await aio_workq.Producer(urls, connect_timeout=CONNECT_TIMEOUT).start()
    assert "dead-secret" not in str(info.value) and "dead-secret" not in caplog.text
