"""The connection a group's callbacks are published on: apart from the workers'.

RabbitMQ blocks a connection that publishes during a memory or disk alarm and then reads
nothing more from it, acks included. A callback published on the connection its member's
worker consumes on would stop that worker's acks (and so its work, which is what frees the
broker's memory) until the alarm clears. On a connection of its own, only the member that
completed the group waits for the callback's confirm.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from .._link.connection import Connection
from .._publish.producer import Producer

if TYPE_CHECKING:
    from .._link.settings import URLs

__all__ = ("CallbackLink",)


class CallbackLink:
    """The producer of one `tasks.workers()` call's group callbacks, started on first use and
    closed when the last of those workers stops.

    Args:
        url: the workers' broker URL(s) (None: `AMQP_URL`), when they have no `connection=`.
        connection: the workers' `connection=`: an aio-workq `Connection` gets a sibling
            (the same brokers and TLS); an aio-pika connection none (`producer()` is None,
            and the callbacks go on the worker's connection, as before).
    """

    def __init__(self, url: URLs | None, connection: Any) -> None:
        self._url = url
        self._connection = connection
        self._sibling: Connection | None = None
        self._producer: Producer | None = None
        self._starting: asyncio.Lock | None = None

    async def producer(self) -> Producer | None:
        """The started producer (started now if need be), or None (publish on the worker's
        connection).

        Raises:
            BrokerConnectionError (and its subclasses): no broker answered.
        """
        if self._connection is not None and not isinstance(self._connection, Connection):
            return None
        producer = self._producer
        if producer is not None:
            return producer
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._producer is None:
                self._producer = await self._start()
            return self._producer

    async def _start(self) -> Producer:
        name = "aio-workq group callbacks"
        if self._connection is None:
            producer = Producer(self._url, name=name)
        else:
            self._sibling = sibling = self._connection.sibling(name=name)
            producer = Producer(connection=sibling)
        try:
            if self._sibling is not None:
                await self._sibling.open()  # a producer opens no connection it was given
            await producer.start()
        except BaseException:
            await self._close_sibling()
            raise
        return producer

    async def close(self, timeout: float = 5.0) -> None:
        """Close the producer (what it still has unconfirmed fails) and its connection."""
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.close(timeout)
        await self._close_sibling()

    async def _close_sibling(self) -> None:
        sibling, self._sibling = self._sibling, None
        if sibling is not None:
            with contextlib.suppress(Exception):
                await sibling.close()
