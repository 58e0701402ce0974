"""The election: one candidacy per channel, the lease held by the single active consumer.

Every replica consumes the quorum queue `{group}.lease`, declared with
`x-single-active-consumer`, with a prefetch of 1. RabbitMQ delivers only to the active consumer;
the replica that holds the lease message (never acked) may become the active scheduler, once
it also holds the guard (`_guard`: the queue can briefly grant two leases). When its
connection ends (a stop, `kill -9`: the kernel closes the socket at once; a partition: after the
heartbeat timeout), the broker requeues the lease and makes the next consumer active.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from aiormq.abc import AbstractChannel, DeliveredMessage

from .._exceptions import BrokerConnectionError
from .._link.connection import Connection
from .._link.errors import translate_errors
from ._broker import Names, declare_state, publish_confirmed

__all__ = ("Lease", "any_of")

_CHANNEL_CLOSE_GRACE = 5.0  # seconds for a polite channel close before the connection goes
_WATCH_EVERY = 0.5  # seconds between looks at the connection's and channel's state


class Lease:
    """A candidacy: a channel on `connection` that consumes the lease queue.

    `async with Lease(...) as lease:` opens the channel, declares the group's queues, adds one
    lease message and consumes; `await lease.granted(stopping)` waits to be made active. On
    exit the channel is closed, which gives the lease back to the broker (should the broker not
    answer, the whole connection is closed instead). `lost` is set as soon as the channel or the
    connection closes: holding a dead lease must never look like holding one.

    Args:
        connection: an open connection.
        names: the group's broker objects.
        open_timeout: seconds to open the channel.
    """

    def __init__(self, connection: Connection, names: Names, *, open_timeout: float) -> None:
        self.names = names
        self.lost = asyncio.Event()
        self._connection = connection
        self._open_timeout = open_timeout
        self._granted = asyncio.Event()
        self._channel: AbstractChannel | None = None
        self._watch: asyncio.Future[None] | None = None

    @property
    def channel(self) -> AbstractChannel:
        """The candidacy's channel (publisher confirms on): the state travels on it too."""
        assert self._channel is not None, "use the Lease in `async with`"
        return self._channel

    async def __aenter__(self) -> Lease:
        """Stand: open the channel, declare, add a lease message, consume the lease queue.

        Raises:
            BrokerConnectionError: the connection or the channel was lost (or never came).
            WorkqError: a declare failed.
        """
        channel = await self._connection.channel(
            publisher_confirms=True, timeout=self._open_timeout
        )
        self._channel = channel
        channel.closing.add_done_callback(lambda _: self.lost.set())
        self._watch = asyncio.ensure_future(self._watching(channel))
        try:
            with translate_errors("taking part in the scheduler election"):
                await channel.basic_qos(prefetch_count=1)
                await declare_state(channel, self.names)
                # A lease message per candidacy: the queue keeps at most one ready.
                await publish_confirmed(
                    channel, b"lease", exchange="", routing_key=self.names.lease
                )
                await channel.basic_consume(self.names.lease, self._on_lease, no_ack=False)
        except BaseException:
            await self._end()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._end()

    async def _on_lease(self, message: DeliveredMessage) -> None:
        self._granted.set()  # held, never acked: the broker requeues it when we go

    async def granted(self, stopping: asyncio.Event) -> bool:
        """Wait for the lease; False when `stopping` is set first.

        Raises:
            BrokerConnectionError: the connection or the channel closed first.
        """
        await any_of(self._granted, self.lost, stopping)
        if self.lost.is_set():
            raise BrokerConnectionError("the connection (or the channel) to the broker closed")
        return self._granted.is_set() and not stopping.is_set()

    async def confirm_held(self) -> None:
        """One round trip on the lease's channel: a process that was frozen (a partition,
        SIGSTOP) and has lost the lease learns it here, before it fires anything.

        Raises:
            aiormq.exceptions.AMQPError, ConnectionError: the channel is gone.
        """
        await self.channel.queue_declare(self.names.lease, passive=True)

    async def _watching(self, channel: AbstractChannel) -> None:
        """Set `lost` once the connection or the channel is closed, should a close callback
        not come (belt and braces)."""
        while not self.lost.is_set():
            if not self._connection.is_connected or channel.is_closed:
                self.lost.set()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_WATCH_EVERY):
                    await self.lost.wait()

    async def _end(self) -> None:
        """Close the lease's channel (the lease goes back to the broker); should the broker
        not answer in time, close the whole connection instead (its socket aborted if need
        be), so that a lease is never kept by a channel left open."""
        if self._watch is not None:
            self._watch.cancel()
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        try:
            async with asyncio.timeout(_CHANNEL_CLOSE_GRACE):
                await channel.close()
        except Exception:  # any failure: the connection goes instead
            if not channel.is_closed:
                await self._connection.close(0)


async def any_of(*events: asyncio.Event) -> None:
    """Return once any of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
