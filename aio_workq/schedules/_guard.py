"""The fence: a queue the broker lets one connection own, held by the scheduler that fires.

The lease (`_lease`) says which scheduler the broker made active, but a quorum queue's single
active consumer can briefly have two consumers that both received the lease around a leader
failover (seen once by the cluster ledger: two standbys made active 11 ms apart). So a scheduler
granted the lease must also hold the guard before it reads the state or fires: the classic
queue `{group}.active`, declared **exclusive** on the lease's connection. The broker's metadata
store gives an exclusive queue one owner: a declare from any other connection fails with
`RESOURCE_LOCKED`. The broker deletes the queue when its owner's connection ends (closed, killed,
or silent past the heartbeat timeout) or the owner's node is lost, so a dead holder frees it
with the lease, and a holder that hands over deletes it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel

from .._exceptions import BrokerConnectionError
from .._link.connection import Connection
from .._link.errors import reason, translate_errors
from ._broker import Names

__all__ = ("Guard",)

log = logging.getLogger("aio_workq.schedules")

_GUARD_ARGS: dict[str, Any] = {"x-queue-type": "classic", "x-max-length": 0}
_FIRST_RETRY = 0.02  # seconds before the first retry of a guard held elsewhere
_MAX_RETRY = 0.5  # seconds between retries at most
_RELEASE_GRACE = 5.0  # seconds to delete the guard before the connection goes instead
# The guard is held by another connection, or its record still names a connection on a node
# that is gone (the broker deletes it once it notices): both clear by themselves.
_HELD_ELSEWHERE = (aiormq.exceptions.ChannelLockedResource, aiormq.exceptions.ChannelNotFoundEntity)


class Guard:
    """The guard of one active term, on the lease's `connection`.

    `async with Guard(...) as guard:` does nothing yet; `await guard.acquire(...)` declares the
    exclusive queue, retrying while another connection holds it. On exit a held guard is
    deleted (should the broker not answer, the whole connection is closed instead: that frees
    it too). `lost` is set as soon as the guard's channel closes.

    Args:
        connection: the lease's (open) connection: the guard lives and dies with it.
        names: the group's broker objects.
        open_timeout: seconds to open a channel.
    """

    def __init__(self, connection: Connection, names: Names, *, open_timeout: float) -> None:
        self.names = names
        self.lost = asyncio.Event()
        self._connection = connection
        self._open_timeout = open_timeout
        self._channel: AbstractChannel | None = None

    @property
    def held(self) -> bool:
        """True from a successful `acquire()` until the guard's channel closes."""
        return self._channel is not None and not self.lost.is_set()

    async def __aenter__(self) -> Guard:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()

    async def acquire(self, stopping: asyncio.Event, lease_lost: asyncio.Event) -> bool:
        """Hold the guard; while another connection does, retry (20 ms, doubling to 0.5 s).

        Returns:
            True once held; False if `stopping` is set first.

        Raises:
            BrokerConnectionError: `lease_lost` was set first, or the connection was lost.
            WorkqError: the declare was refused for another reason (e.g. no `configure`
                permission on the guard's name).
        """
        delay = _FIRST_RETRY
        told = False
        while True:
            if lease_lost.is_set():
                raise BrokerConnectionError("the lease was lost while waiting for the guard")
            if stopping.is_set():
                return False
            channel = await self._connection.channel(timeout=self._open_timeout)
            try:
                with translate_errors("holding the scheduler's guard"):
                    try:
                        await channel.queue_declare(
                            self.names.active,
                            durable=False,
                            exclusive=True,
                            auto_delete=False,
                            arguments=_GUARD_ARGS,
                        )
                    except _HELD_ELSEWHERE as exc:
                        if not told:
                            log.info(
                                "the lease was granted but the guard %r is held elsewhere "
                                "(%s): standing by until it is free",
                                self.names.active,
                                reason(exc),
                            )
                            told = True
                    else:
                        self._hold(channel)
                        return True
            except BaseException:
                await _close_quietly(channel)
                raise
            await _close_quietly(channel)  # the broker closed it already (a channel error)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await _any_of(stopping, lease_lost)
            delay = min(delay * 2, _MAX_RETRY)

    def _hold(self, channel: AbstractChannel) -> None:
        self._channel = channel
        channel.closing.add_done_callback(lambda _: self.lost.set())

    async def confirm_held(self) -> None:
        """One round trip on the guard's channel (a passive declare, which only its owner's
        connection passes): a process frozen past its heartbeat timeout learns here that the
        guard (and the lease) went with its connection, before it fires anything.

        Raises:
            aiormq.exceptions.AMQPError, ConnectionError: the guard or its channel is gone.
        """
        assert self._channel is not None, "acquire() the guard first"
        await self._channel.queue_declare(self.names.active, passive=True)

    async def release(self) -> None:
        """Delete the held guard (the next scheduler may take it at once) and close its channel;
        should the broker not answer in time, or the channel be gone while the connection
        lives, close the whole connection instead: the broker deletes the guard with it.
        Nothing to do once the connection it was held on is gone."""
        channel, self._channel = self._channel, None
        if channel is None or channel.connection.is_closed:
            return  # never held, or gone with its connection
        try:
            if channel.is_closed:
                raise BrokerConnectionError("the guard's channel closed")
            async with asyncio.timeout(_RELEASE_GRACE):
                await channel.queue_delete(self.names.active)
                await channel.close()
        except Exception:  # any failure: the connection goes, and the guard with it
            log.info("the guard %r could not be deleted: closing the connection instead",
                     self.names.active)  # fmt: skip
            await self._connection.close(0)


async def _close_quietly(channel: AbstractChannel) -> None:
    if not channel.is_closed:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_RELEASE_GRACE):
                await channel.close()


async def _any_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
