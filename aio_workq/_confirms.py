"""Pipelined publishing with publisher confirms: the publish hot path.

Each message becomes an `_Outgoing` record. Its frames are marshalled by `_wire` and buffered;
every message sent in one event-loop iteration goes out in one write (a long burst every 256).
Records wait in `_pending` under their delivery tag. On aio-workq's own connections the frame
demux (`_demux`) hands the channel's confirms and returns straight to `on_confirm` and
`on_return`; on other connections the record goes into aiormq's confirmation table, and aiormq's
channel reader settles it through its Future-like methods. Either way the caller gets one
`asyncio.Future` per message. A bounded window of unconfirmed messages (count and bytes) gives
backpressure.

Every record ends in exactly one of: confirmed (the future's result is the message id), or a
typed error on its future: `PublishNackedError`, `UnroutableError`, `PublishTimeoutError`, or
`ConnectionLostError`. When the connection drops, unconfirmed messages are re-sent on the new
channel with the same message id (`resend=True`, at-least-once) or failed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import ChannelFrame

from ._demux import Delivery, demux_of
from ._exceptions import (
    ConnectionLostError,
    PublishError,
    PublishNackedError,
    PublishTimeoutError,
    UnroutableError,
)
from ._wire import Properties, publish_frames

__all__ = ("DEFAULT_WINDOW", "DEFAULT_WINDOW_BYTES", "ConfirmPublisher", "new_message_id")

log = logging.getLogger("aio_workq")

_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)
_SWEEP_INTERVAL = 0.1
DEFAULT_WINDOW = 10_000
DEFAULT_WINDOW_BYTES = 64 * 2**20
_BURST = 256  # messages marshalled before a burst is written out
_UNROUTABLE = (
    "returned as unroutable: no queue is bound for this routing key (declare the queue or a "
    "binding, or publish with mandatory=False)"
)
_MAYBE = "it may or may not have reached the queue"
_NACKED = "nacked by the broker (e.g. the queue is full with overflow=reject-publish)"


def new_message_id() -> str:
    """A message id unique across processes: a random per-process prefix and a counter."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class _Outgoing:
    """One unconfirmed message; aiormq settles it through the Future-like methods below."""

    __slots__ = (
        "body",
        "deadline",
        "exchange",
        "future",
        "mandatory",
        "owner",
        "props",
        "routing_key",
        "settled",
        "tag",
    )

    def __init__(
        self,
        owner: ConfirmPublisher,
        exchange: str,
        routing_key: str,
        props: Properties,
        body: bytes,
        mandatory: bool,
        future: asyncio.Future[str],
        deadline: float,
    ) -> None:
        self.owner = owner
        self.exchange = exchange
        self.routing_key = routing_key
        self.props = props
        self.body = body
        self.mandatory = mandatory
        self.future = future
        self.deadline = deadline
        self.settled = False
        self.tag = 0

    # The part of the asyncio.Future interface that aiormq's channel reader uses.
    def done(self) -> bool:
        return self.settled

    def cancelled(self) -> bool:
        # A confirm that arrives after a timeout is then logged at DEBUG, not WARNING.
        return self.settled

    def set_result(self, frame: Any) -> None:
        if isinstance(frame, aiormq.abc.DeliveredMessage):  # returned, on_return_raises=False
            self.fail(UnroutableError, _UNROUTABLE)
        else:
            self.owner._settle(self, None)

    def set_exception(self, exc: BaseException) -> None:
        if isinstance(exc, aiormq.exceptions.PublishError):
            self.fail(UnroutableError, _UNROUTABLE)
        else:
            self.fail(PublishNackedError, _NACKED)

    def fail(self, cls: type[PublishError], what: str) -> None:
        """Settle with a `cls` error saying what happened to this message."""
        self.owner._settle(
            self,
            cls(
                f"message {self.props.message_id} to exchange {self.exchange!r} routing key "
                f"{self.routing_key!r} was {what}",
                message_id=self.props.message_id,
                exchange=self.exchange,
                routing_key=self.routing_key,
            ),
        )


class ConfirmPublisher:
    """Publishes on one robust channel in confirm mode, with a bounded window of unconfirmed."""

    def __init__(
        self,
        channel: AbstractRobustChannel,
        *,
        window: int,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        timeout: float,
        resend: bool,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        if window_bytes < 1:
            raise ValueError(f"window_bytes must be >= 1, got {window_bytes!r}")
        if timeout <= 0:
            raise ValueError(f"publish timeout must be > 0 seconds, got {timeout!r}")
        self._robust = channel
        self._window = window
        self._low_water = window - max(1, window // 4)
        self._window_bytes = window_bytes
        self._low_water_bytes = window_bytes - window_bytes // 4
        self._bytes = 0  # body bytes of the messages in flight
        self._timeout = timeout
        self._resend = resend
        self._loop = asyncio.get_running_loop()
        self._ch: aiormq.Channel | None = None
        self._direct = False  # the channel's confirms come from the demux, not aiormq
        self._frame_max = 131072
        self._pending: dict[int, _Outgoing] = {}
        self._waiting: deque[_Outgoing] = deque()  # to (re)send once a channel is open
        self._buffer: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._space: deque[asyncio.Future[None]] = deque()
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Messages sent or waiting to be sent whose confirm has not arrived."""
        return len(self._pending) + len(self._waiting)

    async def start(self) -> None:
        self._robust.reopen_callbacks.add(self._on_reopen)
        await self._attach()

    async def _attach(self) -> None:
        ch = cast(aiormq.Channel, await self._robust.get_underlay_channel())
        if ch is self._ch or ch.is_closed:
            return
        self._ch = ch
        self._frame_max = ch.connection.connection_tune.frame_max or 131072
        demux = demux_of(ch.connection)
        self._direct = demux is not None
        if demux is not None:
            demux.attach(ch, confirms=self)
        ch.closing.add_done_callback(lambda fut: self._on_channel_closed(ch, fut))
        self._ready.set()
        while self._waiting and self._ch is ch:
            out = self._waiting.popleft()
            if not out.settled:
                self._write(out)

    def _on_reopen(self, *_: Any) -> None:
        if not self._closed:
            task = self._loop.create_task(self._attach())
            task.add_done_callback(_log_failure)

    def _on_channel_closed(self, ch: aiormq.Channel, closing: asyncio.Future[Any]) -> None:
        if ch is not self._ch:
            return
        self._ch = None
        self._ready.clear()
        self._buffer.clear()
        reason = None if closing.cancelled() else closing.exception()
        connection_lost = (
            reason is None
            and ch.connection.is_closed
            or isinstance(
                reason,
                aiormq.exceptions.AMQPConnectionError | ConnectionError | asyncio.CancelledError,
            )
        )
        pending = list(self._pending.values())
        self._pending.clear()
        for out in pending:
            if out.settled:
                continue
            if self._resend and connection_lost and not self._closed:
                self._waiting.append(out)
            else:
                why = f"the channel closed ({reason})" if reason else "the channel closed"
                out.fail(ConnectionLostError, f"not confirmed: {why}; {_MAYBE}")

    async def send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Properties,
        *,
        mandatory: bool = True,
        timeout: float | None = None,
    ) -> asyncio.Future[str]:
        """Hand one message to the connection; the returned future settles with its confirm."""
        if self._closed:
            raise ConnectionLostError(
                "the publisher is closed",
                message_id=props.message_id,
                exchange=exchange,
                routing_key=routing_key,
            )
        timeout = self._timeout if timeout is None else timeout
        deadline = self._loop.time() + timeout
        if self._ch is None or self._full():
            await self._wait_for_space(deadline, props.message_id, exchange, routing_key)
        out = _Outgoing(
            self,
            exchange,
            routing_key,
            props,
            body,
            mandatory,
            self._loop.create_future(),
            deadline,
        )
        self._bytes += len(body)
        self._write(out)
        if len(self._buffer) >= _BURST:
            # A long burst (publish_many): write what is marshalled and let the writer run, so
            # the broker starts on these while the rest are marshalled.
            self._flush()
            await asyncio.sleep(0)
        return out.future

    def _full(self) -> bool:
        return self.in_flight >= self._window or self._bytes >= self._window_bytes

    async def _wait_for_space(
        self, deadline: float, message_id: str, exchange: str, routing_key: str
    ) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                while self._ch is None or self._full():
                    if self._ch is None:
                        await self._ready.wait()
                        continue
                    waiter: asyncio.Future[None] = self._loop.create_future()
                    self._space.append(waiter)
                    try:
                        await waiter
                    finally:
                        if not waiter.done():
                            waiter.cancel()
        except TimeoutError:
            state = "the connection is down" if self._ch is None else "the window is full"
            raise PublishTimeoutError(
                f"message {message_id} could not be sent in time: {state} (the broker may be "
                "blocking publishers on a memory or disk alarm); nothing was sent",
                message_id=message_id,
                exchange=exchange,
                routing_key=routing_key,
            ) from None

    def _write(self, out: _Outgoing) -> None:
        ch = self._ch
        if ch is None:
            self._waiting.append(out)
            return
        tag = ch.delivery_tag + 1
        ch.delivery_tag = tag
        out.tag = tag
        if not self._direct:
            ch.confirmations[tag] = out  # type: ignore[assignment]
            if out.mandatory:
                ch.message_id_delivery_tag[out.props.message_id] = tag
        self._pending[tag] = out
        self._buffer.append(
            publish_frames(
                ch.number,
                out.exchange,
                out.routing_key,
                out.mandatory,
                out.props,
                out.body,
                self._frame_max,
            )
        )
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)
        if self._sweep_handle is None:
            self._sweep_handle = self._loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def _flush(self) -> None:
        self._flush_handle = None
        ch = self._ch
        if not self._buffer or ch is None:
            return
        frame = ChannelFrame(payload=b"".join(self._buffer), should_close=False)
        self._buffer.clear()
        try:
            ch.write_queue.put_nowait(frame)
        except asyncio.QueueFull:
            task = self._loop.create_task(ch.write_queue.put(frame))
            task.add_done_callback(_log_failure)

    def _settle(self, out: _Outgoing, error: PublishError | None) -> None:
        if out.settled:
            return
        out.settled = True
        self._bytes -= len(out.body)
        if self._pending.get(out.tag) is out:
            del self._pending[out.tag]
        ch = self._ch
        if ch is not None and out.mandatory and not self._direct:
            ids: dict[str, int] = ch.message_id_delivery_tag
            if ids.get(out.props.message_id) == out.tag:
                del ids[out.props.message_id]
        if not out.future.done():
            if error is None:
                out.future.set_result(out.props.message_id)
            else:
                out.future.set_exception(error)
        if (
            self._space
            and self.in_flight <= self._low_water
            and self._bytes <= self._low_water_bytes
        ):
            # Hysteresis: senders resume together once a quarter of the window is free, so
            # they refill it in one burst (one write) instead of one message per confirm.
            while self._space:
                waiter = self._space.popleft()
                if not waiter.done():
                    waiter.set_result(None)

    # The demux's `Confirms`: confirms and returns straight off the socket.
    def on_confirm(self, delivery_tag: int, multiple: bool, ack: bool) -> None:
        pending = self._pending
        settled: list[_Outgoing] = []
        if multiple:
            for tag, out in pending.items():  # in delivery-tag order
                if tag > delivery_tag:
                    break
                settled.append(out)
        elif (single := pending.get(delivery_tag)) is not None:
            settled.append(single)
        for out in settled:
            if ack:
                self._settle(out, None)
            else:
                out.fail(PublishNackedError, _NACKED)

    def on_return(self, reply_code: int, reply_text: str, message: Delivery) -> None:
        message_id = message.properties.message_id
        for out in self._pending.values():  # returns are rare: a scan beats an index per message
            if out.props.message_id == message_id and out.mandatory:
                out.fail(UnroutableError, _UNROUTABLE)
                return
        log.debug("returned message %s is not pending (%d %s)", message_id, reply_code, reply_text)

    def _sweep(self) -> None:
        self._sweep_handle = None
        now = self._loop.time()
        expired = [
            out
            for out in itertools.chain(self._pending.values(), self._waiting)
            if out.deadline <= now and not out.settled
        ]
        for out in expired:
            out.fail(
                PublishTimeoutError,
                "not confirmed within its timeout (connection down, or the broker blocks "
                f"publishers on a memory or disk alarm); {_MAYBE}",
            )
        if expired:
            self._waiting = deque(out for out in self._waiting if not out.settled)
        if self._pending or self._waiting:
            self._sweep_handle = self._loop.call_later(_SWEEP_INTERVAL, self._sweep)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every message is settled; False if some are still pending at `timeout`."""
        outstanding = [out.future for out in (*self._pending.values(), *self._waiting)]
        if not outstanding:
            return True
        done, pending = await asyncio.wait(outstanding, timeout=timeout)
        for fut in done:
            if not fut.cancelled():
                fut.exception()  # retrieved: the caller of send() owns the error
        return not pending

    async def close(self, timeout: float = 10.0) -> None:
        """Wait up to `timeout` for outstanding confirms, then fail whatever is left."""
        await self.wait_idle(timeout)
        self._closed = True
        self._robust.reopen_callbacks.discard(self._on_reopen)
        for out in [*self._pending.values(), *self._waiting]:
            out.fail(ConnectionLostError, f"not confirmed before the publisher closed; {_MAYBE}")
        self._waiting.clear()
        for handle in (self._flush_handle, self._sweep_handle):
            if handle is not None:
                handle.cancel()


def make_properties(
    *,
    message_id: str | None,
    content_type: str | None,
    headers: Mapping[str, Any] | None,
    persistent: bool = True,
    **extra: Any,
) -> Properties:
    """Message properties with a fresh message id unless one is given."""
    return Properties(
        message_id=message_id or new_message_id(),
        content_type=content_type,
        headers=headers,
        delivery_mode=2 if persistent else 1,
        **extra,
    )


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("aio-workq background task failed: %r", exc, exc_info=exc)
