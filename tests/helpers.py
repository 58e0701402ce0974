"""Helpers shared by the broker tests."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aio_pika

import aio_workq
from aio_workq._wire.frames import HEADER_FRAME_OVERHEAD, Properties, encode_properties
from scripts.broker import LocalBroker


class Counter:
    """Counts calls and lets a test wait, with a timeout, until a count is reached."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def add(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Any]:
        async with asyncio.timeout(timeout):
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.items


async def _declared(amqp_url: str, name: str) -> Any:
    """A passive declare's answer: the queue's message and consumer counts."""
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        channel = await conn.channel()
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result


async def queue_depth(amqp_url: str, name: str) -> int:
    """Messages ready in a queue."""
    return int((await _declared(amqp_url, name)).message_count or 0)


async def queue_consumers(amqp_url: str, name: str) -> int:
    """Consumers on a queue."""
    return int((await _declared(amqp_url, name)).consumer_count or 0)


@asynccontextmanager
async def worker_process(
    url: str, queue: str, mode: str, *, stderr: bool = False
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`tests.worker_proc` in a process of its own, once it says READY; killed on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.worker_proc", url, queue, mode,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE if stderr else None,
    )  # fmt: skip
    try:
        assert await read_line(proc) == "READY"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def run_script(script: str, *, timeout: float = 30) -> tuple[int, str]:
    """Run `python -c script` within `timeout` seconds; its exit code and its output (stdout
    and stderr together). Killed if it overruns."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def read_line(proc: asyncio.subprocess.Process, timeout: float = 20) -> str:
    """The next line the process prints, stripped ("" once it has exited)."""
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        return (await proc.stdout.readline()).decode().strip()


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll an async predicate every 50 ms until it holds, failing after `timeout`."""
    async with asyncio.timeout(timeout):
        while not await predicate():  # noqa: ASYNC110 - broker state has no event
            await asyncio.sleep(0.05)


async def negotiated_frame_max(amqp_url: str) -> int:
    """The frame_max the broker at `amqp_url` negotiates with a client."""
    async with await aio_workq.connect(amqp_url) as connection:
        channel = await connection.channel()
        negotiated = int(channel.connection.connection_tune.frame_max)
        await channel.close()
    return negotiated


def header_room(frame_max: int, message_id: str) -> int:
    """How long the value of one header `h` of a message `message_id` (no other property) can
    be, with the content header still in one frame of `frame_max`."""
    props = Properties(message_id=message_id, headers={"h": ""})
    return frame_max - HEADER_FRAME_OVERHEAD - len(encode_properties(props)[1])


@asynccontextmanager
async def running(
    workers: Sequence[aio_workq.Worker], stop_timeout: float = 1.0
) -> AsyncIterator[None]:
    """Start `workers` (e.g. a `Tasks.workers()` list); stop every one of them on the way out,
    whatever raised."""
    try:
        for worker in workers:
            await worker.start()
        yield
    finally:
        for worker in workers:
            await worker.stop(timeout=stop_timeout)


async def heartbeat_connection(amqp_url: str, heartbeat: int) -> aio_workq.Connection:
    """An aio-workq connection with a short heartbeat (its `reconnects` counts the losses)."""
    return await aio_workq.connect(f"{amqp_url}?heartbeat={heartbeat}")


def connection_names(node: LocalBroker) -> list[str]:
    """The names of the client connections open on the node (rabbitmqctl, so in a thread)."""
    out = node.ctl("list_connections", "-q", "--formatter", "json", "client_properties")
    return [
        value  # rabbitmqctl lists a client's properties as [name, type, value]
        for connection in json.loads(out)
        for name, _, value in connection["client_properties"]
        if name == "connection_name"
    ]
