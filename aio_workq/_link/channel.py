"""A channel of aio-workq's own that reopens itself and runs its owner's set-up again.

A producer's or worker's channel closes when the connection is lost, or when the broker closes
the channel alone (a 404 on a publish to a missing exchange, a consumer timeout). Either way the
owner hears of it at once (`on_lost`), and the channel is reopened, with backoff, as soon as the
connection is up, then handed to the owner's `setup` (declare, QoS, consume, resend).

Closing a channel has one owner, `ManagedChannel._shut`, whatever the cause (`close()`, a
`recycle()` after the broker cancelled a consumer, a failed set-up): it settles what the owner
has buffered for the channel, hands the connection's buffered frames to the socket (waiting, up
to a few seconds, while the socket is backed up), closes the
channel's gate so no later frame of it is written, and only then sends `Channel.Close`. A frame
written after it would reach the broker once the channel's number is free, and the broker
closes the whole connection for that (504 CHANNEL_ERROR), with every producer and worker on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq

from .._exceptions import BrokerConnectionError, WorkqError
from .._wire.seams import Wire
from .connection import LinkSource, translate_errors

__all__ = ("ManagedChannel",)

log = logging.getLogger("aio_workq")

Setup = Callable[[aiormq.abc.AbstractChannel, Wire | None], Awaitable[None]]
OnLost = Callable[[aiormq.abc.AbstractChannel, BaseException | None], None]
OnClosing = Callable[[aiormq.abc.AbstractChannel], None]

_REOPEN_FIRST = 0.2
_REOPEN_CAP = 15.0
_FLUSH_WAIT = 5.0  # seconds a close waits for the frames buffered before it to reach the socket


class ManagedChannel:
    """One channel at a time on `source`, reopened and set up again until `close()`.

    Args:
        source: the connection (or adapted aio-pika connection) to open channels on.
        confirms: open the channel in publisher-confirm mode (returns raise).
        setup: runs on each new channel before it counts as open.
        on_lost: runs when the current channel closes (not on `close()`).
        on_closing: runs just before aio-workq closes a channel of this owner: write what is
            buffered for it now, and nothing after (e.g. the worker's acks).
        what: how log lines name the owner, e.g. "worker 'tasks'".
    """

    def __init__(
        self,
        source: LinkSource,
        *,
        confirms: bool,
        setup: Setup,
        on_lost: OnLost | None = None,
        on_closing: OnClosing | None = None,
        what: str,
    ) -> None:
        self._source = source
        self._confirms = confirms
        self._setup = setup
        self._on_lost = on_lost
        self._on_closing = on_closing
        self._what = what
        self._loop = asyncio.get_running_loop()
        self.channel: aiormq.abc.AbstractChannel | None = None
        self.wire: Wire | None = None
        self._ready = asyncio.Event()
        self._reopening: asyncio.Task[None] | None = None
        self._recycling: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def is_open(self) -> bool:
        channel = self.channel
        return channel is not None and not channel.is_closed

    async def open(self, timeout: float | None = None) -> None:
        """Open the first channel and set it up.

        Raises:
            BrokerConnectionError: no connection within `timeout`.
            TopologyError: the set-up's declarations failed.
        """
        await self._open(timeout)

    async def wait_open(self, timeout: float | None = None) -> aiormq.abc.AbstractChannel:
        """The open channel, waiting up to `timeout` while it reopens.

        Raises:
            TimeoutError: no channel within `timeout`.
            BrokerConnectionError: closed.
        """
        async with asyncio.timeout(timeout):
            while True:
                channel = self.channel
                if channel is not None and not channel.is_closed:
                    return channel
                if self._closed:
                    raise BrokerConnectionError(f"{self._what} is closed")
                self._ready.clear()
                await self._ready.wait()

    async def _open(self, timeout: float | None) -> None:
        link = await self._source.link(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        with translate_errors(f"opening a channel for {self._what}"):
            async with asyncio.timeout_at(deadline):
                channel = await link.connection.channel(
                    publisher_confirms=self._confirms, on_return_raises=self._confirms
                )
        setup = asyncio.ensure_future(self._setup(channel, link.wire))
        try:
            async with asyncio.timeout_at(deadline):  # declarations, QoS, consume
                await asyncio.shield(setup)
        except BaseException as exc:
            set_up = await self._settle_setup(setup, exc, deadline)
            if set_up and not self._closed and not channel.is_closed:
                # Cancelled (Ctrl-C) once the set-up had gone out: the channel is the owner's,
                # which closes it its graceful way (`close()`: handlers drained, acks written).
                self._adopt(channel, link.connection, link.wire)
                raise
            await self._shut(channel, link.wire)
            if isinstance(exc, TimeoutError) and not isinstance(exc, WorkqError):
                raise BrokerConnectionError(
                    f"{self._what}: the broker did not answer within {timeout:g} s"
                ) from None
            raise
        if self._closed:
            await self._shut(channel, link.wire)
            return
        self._adopt(channel, link.connection, link.wire)

    def _adopt(
        self,
        channel: aiormq.abc.AbstractChannel,
        connection: aiormq.abc.AbstractConnection,
        wire: Wire | None,
    ) -> None:
        self.channel = channel
        self.wire = wire
        channel.closing.add_done_callback(lambda fut: self._on_closed(channel, fut))
        # The connection's end is the channel's too, even when aiormq's own close of the channel
        # does not finish (its Channel.Close RPC is cancelled with the dead connection).
        connection.closing.add_done_callback(lambda fut: self._on_closed(channel, fut))
        self._ready.set()

    async def _settle_setup(
        self, setup: asyncio.Future[None], exc: BaseException, deadline: float | None
    ) -> bool:
        """After the set-up was cut short by `exc`; True when the set-up finished all the same.

        On a cancellation (Ctrl-C during `start()`) its RPC in flight (e.g. `basic_consume`,
        whose deliveries may have been handled already) is let finish, up to `_FLUSH_WAIT` s or
        the deadline: aiormq closes a channel whose RPC is cancelled, and the acks of those
        handlers would be lost with it (#20); the owner's graceful close writes them instead.
        On a timeout, the set-up is cancelled at once.
        """
        if not setup.done() and isinstance(exc, asyncio.CancelledError):
            until = self._loop.time() + _FLUSH_WAIT
            until = until if deadline is None else min(until, deadline)
            with contextlib.suppress(BaseException):
                async with asyncio.timeout_at(until):
                    await asyncio.shield(setup)
        if not setup.done():
            setup.cancel()
        await asyncio.gather(setup, return_exceptions=True)
        return not setup.cancelled() and setup.exception() is None

    def _on_closed(self, channel: aiormq.abc.AbstractChannel, closing: asyncio.Future[Any]) -> None:
        if channel is not self.channel:
            return
        self.channel = None
        self.wire = None
        if self._closed:
            return
        reason = None if closing.cancelled() else closing.exception()
        if self._on_lost is not None:
            self._on_lost(channel, reason)
        self.reopen_soon()

    def reopen_soon(self) -> None:
        """Reopen the channel in the background (once at a time), with backoff."""
        if self._closed or self._source.is_closed:
            return  # e.g. the event loop's end closed the connection (`Connection._supervise`)
        if self._reopening is not None and not self._reopening.done():
            return
        self._reopening = self._loop.create_task(self._reopen())

    async def _reopen(self) -> None:
        delay = _REOPEN_FIRST
        while not self._closed and not self.is_open and not self._source.is_closed:
            try:
                await self._open(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a background loop: log, back off, try again
                if self._closed or self._source.is_closed:
                    return  # closed meanwhile: not the broker's doing
                log.warning("%s can't reopen its channel yet (%s); retrying", self._what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _REOPEN_CAP)
            else:
                log.info("%s has a channel again", self._what)

    def recycle(self) -> None:
        """Close the current channel and open a new one, set up again (in the background).

        For a channel the broker left unusable without closing it: a cancelled consumer.
        """
        channel, wire = self.channel, self.wire
        if self._closed or channel is None or channel.is_closed:
            return
        self.channel = None
        self.wire = None
        if self._on_lost is not None:
            self._on_lost(channel, None)
        self._recycling = self._loop.create_task(self._recycle(channel, wire))

    async def _recycle(self, channel: aiormq.abc.AbstractChannel, wire: Wire | None) -> None:
        await self._shut(channel, wire)
        self.reopen_soon()

    async def close(self) -> None:
        """Close the channel and stop reopening it."""
        self._closed = True
        recycling, self._recycling = self._recycling, None
        if recycling is not None:  # let its close finish (bounded): it no longer reopens
            await asyncio.gather(recycling, return_exceptions=True)
        reopening, self._reopening = self._reopening, None
        if reopening is not None:
            reopening.cancel()
            await asyncio.gather(reopening, return_exceptions=True)
        channel, self.channel = self.channel, None
        wire, self.wire = self.wire, None
        self._ready.set()
        if channel is not None:
            await self._shut(channel, wire)

    async def _shut(self, channel: aiormq.abc.AbstractChannel, wire: Wire | None) -> None:
        """The one way a channel of this owner is closed: what is buffered for it goes out
        first, nothing after the `Channel.Close` (see the module docstring)."""
        if channel.is_closed:
            return
        if self._on_closing is not None:
            try:
                self._on_closing(channel)
            except Exception:  # closing goes on: the broker requeues what is unsettled
                log.exception("%s failed to settle before closing its channel", self._what)
        if wire is not None:
            await self._flushed(wire)
            tap = wire.demux.tap(channel)
            if tap is not None:
                wire.writer.complete(tap)  # a large body partly written: not cut by the Close
                tap.open = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), 5)

    async def _flushed(self, wire: Wire) -> None:
        """Hand the connection's buffered frames to the socket, waiting (up to `_FLUSH_WAIT`)
        while it is backed up: the acks of finished handlers written before the close reach
        the broker instead of being dropped with the channel's gate (#20), and are not
        redelivered. The connection's close (a stop's deadline) ends the wait sooner."""
        writer = wire.writer
        writer.flush()
        if not writer.buffered:
            return
        log.debug(
            "%s waits for its buffered frames (%d writes) to reach the socket before closing "
            "its channel",
            self._what,
            writer.buffered,
        )
        flushed: asyncio.Future[None] = self._loop.create_future()

        def done() -> None:
            if not flushed.done():
                flushed.set_result(None)

        writer.when_flushed(done)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(flushed, _FLUSH_WAIT)
