"""Helpers shared by the broker tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika


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


async def queue_depth(amqp_url: str, name: str) -> int:
    """Messages ready in a queue, read with a passive declare."""
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        channel = await conn.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def queue_consumers(amqp_url: str, name: str) -> int:
    """Consumers on a queue, read with a passive declare."""
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        channel = await conn.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.consumer_count or 0)


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll an async predicate every 50 ms until it holds, failing after `timeout`."""
    async with asyncio.timeout(timeout):
        while not await predicate():  # noqa: ASYNC110 - broker state has no event
            await asyncio.sleep(0.05)
