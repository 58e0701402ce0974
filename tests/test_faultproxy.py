"""The fault proxy itself, offline: an echo server on loopback behind it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.faultproxy import FaultProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy(upstream_port=port) as proxy:
        yield proxy
    server.close()
    await server.wait_closed()


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await reader.readexactly(len(data))


async def test_forwards_both_ways_and_counts_connections(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    async with asyncio.timeout(5):
        assert await roundtrip(reader, writer, b"hello") == b"hello"
        assert await roundtrip(reader, writer, b"x" * 200_000) == b"x" * 200_000
    assert proxy.accepted == 1 and proxy.connections == 1
    writer.close()


async def test_cut_resets_every_connection(proxy: FaultProxy) -> None:
    links = [await connect(proxy) for _ in range(3)]
    async with asyncio.timeout(5):
        for reader, writer in links:
            assert await roundtrip(reader, writer, b"a") == b"a"
        assert proxy.cut() == 3
        for reader, _ in links:
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await reader.readexactly(1)
    assert proxy.connections == 0 and proxy.cuts == 3
    for _, writer in links:
        writer.close()
    reader, writer = await connect(proxy)  # new connections still work
    async with asyncio.timeout(5):
        assert await roundtrip(reader, writer, b"b") == b"b"
    writer.close()


async def test_cutting_repeats_until_the_block_ends(proxy: FaultProxy) -> None:
    async with asyncio.timeout(10), proxy.cutting(every=0.1):
        for _ in range(3):
            reader, writer = await connect(proxy)
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await reader.readexactly(1)  # the echo never answers: the cut comes first
            writer.close()
    cuts = proxy.cuts
    reader, writer = await connect(proxy)
    async with asyncio.timeout(5):
        assert await roundtrip(reader, writer, b"c") == b"c"
    assert proxy.cuts == cuts  # no more cuts after the block
    writer.close()


async def test_black_hole_holds_bytes_until_healed(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    async with asyncio.timeout(5):
        assert await roundtrip(reader, writer, b"1") == b"1"
    proxy.black_hole()
    writer.write(b"held")
    late_reader, late_writer = await connect(proxy)  # accepted, not connected on
    late_writer.write(b"late")
    async with asyncio.timeout(5):
        await proxy.wait_accepted(2)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await reader.readexactly(1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await late_reader.readexactly(1)
    proxy.heal()
    async with asyncio.timeout(5):
        assert await reader.readexactly(4) == b"held"
        assert await late_reader.readexactly(4) == b"late"
    writer.close()
    late_writer.close()


async def test_black_holed_for_heals_by_itself(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    async with proxy.black_holed_for(0.2):
        assert proxy.black_holed
        writer.write(b"z")
        async with asyncio.timeout(5):
            assert await reader.readexactly(1) == b"z"  # arrives once healed
        assert not proxy.black_holed
    writer.close()


async def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    async with asyncio.timeout(5):
        await roundtrip(reader, writer, b"warm")
        proxy.latency = 0.1
        started = time.monotonic()
        assert await roundtrip(reader, writer, b"slow") == b"slow"
    assert time.monotonic() - started >= 0.2  # 0.1 s there, 0.1 s back
    writer.close()


def test_url_keeps_credentials_and_vhost() -> None:
    proxy = FaultProxy(upstream_port=5672, port=1234)
    assert proxy.url("amqp://u:p%2F@127.0.0.1:5672/vh?heartbeat=5") == (
        "amqp://u:p%2F@127.0.0.1:1234/vh?heartbeat=5"
    )
    assert proxy.url("amqp://localhost/") == "amqp://127.0.0.1:1234/"
