"""How a publishing channel's messages go out and their confirms come back: two lanes.

`FastLane` (connections aio-workq opened): frames are marshalled by `_wire`, tagged by the lane's
own counter and written by the connection's one ordered `FrameWriter`; confirms and returns come
straight off the socket from the `FrameDemux`. `PlainLane` (an aio-pika connection someone else
opened, or `AIO_WORKQ_FAST_PATH=0`): each message is one `aiormq.Channel.basic_publish()` call,
aiormq's public API, whose result settles it. Both record every message in the same
`ConfirmTracker` before it can be confirmed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import aiormq
from pamqp.commands import Basic

from .demux import Delivery
from .frames import Properties, publish_frames
from .seams import Wire
from .tracker import ConfirmTracker, Outgoing

__all__ = ("FastLane", "Lane", "PlainLane", "pamqp_properties")

log = logging.getLogger("aio_workq")

_BURST = 256  # buffered writes after which a long burst is written out at once


class Lane(Protocol):
    """Writes messages on one channel and records them in the tracker under their tags."""

    channel: aiormq.abc.AbstractChannel

    def write(self, out: Outgoing) -> None: ...

    def burst_full(self) -> bool: ...

    def flush(self) -> None: ...

    def when_flushed(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the frames of every message written so far have left us."""


class FastLane:
    """aio-workq's own tags and ordered writer; confirms from the demux (see `_seams`)."""

    __slots__ = ("_frame_max", "_gate", "_number", "_tag", "_tracker", "_writer", "channel")

    def __init__(
        self, channel: aiormq.abc.AbstractChannel, wire: Wire, tracker: ConfirmTracker
    ) -> None:
        self.channel = channel
        self._number = channel.number
        self._writer = wire.writer
        self._tracker = tracker
        self._tag = 0  # the broker numbers a confirm channel's publishes from 1
        tune = channel.connection.connection_tune  # reliance 5 in _seams
        self._frame_max = (tune.frame_max if tune is not None else 0) or 131072
        self._gate = wire.demux.attach(channel, confirms=self)

    def write(self, out: Outgoing) -> None:
        frames = publish_frames(
            self._number,
            out.exchange,
            out.routing_key,
            out.mandatory,
            out.encoded,
            out.body,
            self._frame_max,
        )
        self._tag += 1
        self._tracker.record(self._tag, out)
        self._writer.write(self._gate, frames)

    def burst_full(self) -> bool:
        return self._writer.buffered >= _BURST

    def flush(self) -> None:
        self._writer.flush()

    def when_flushed(self, callback: Callable[[], None]) -> None:
        self._writer.when_flushed(callback)

    # The demux's `Confirms`.
    def on_confirm(self, delivery_tag: int, multiple: bool, ack: bool) -> None:
        self._tracker.on_confirm(delivery_tag, multiple, ack)

    def on_return(self, reply_code: int, reply_text: str, message: Delivery) -> None:
        message_id = message.properties.message_id
        if not self._tracker.on_return(message_id):
            log.debug(
                "returned message %s is not pending (%d %s)", message_id, reply_code, reply_text
            )


class PlainLane:
    """One `basic_publish()` per message through aiormq's public API."""

    __slots__ = ("_loop", "_seq", "_tasks", "_tracker", "channel")

    def __init__(self, channel: aiormq.abc.AbstractChannel, tracker: ConfirmTracker) -> None:
        self.channel = channel
        self._tracker = tracker
        self._seq = 0
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()

    def write(self, out: Outgoing) -> None:
        assert out.props is not None
        self._seq += 1
        self._tracker.record(self._seq, out)
        task = self._loop.create_task(self._publish(out, self._seq, pamqp_properties(out.props)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def burst_full(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def when_flushed(self, callback: Callable[[], None]) -> None:
        # aiormq holds a message until its publish returns: at its confirm, or its channel's end.
        tasks = [task for task in self._tasks if not task.done()]
        if not tasks:
            callback()
            return
        remaining = len(tasks)

        def done(_: asyncio.Task[None]) -> None:
            nonlocal remaining
            remaining -= 1
            if not remaining:
                callback()

        for task in tasks:
            task.add_done_callback(done)

    async def _publish(self, out: Outgoing, seq: int, props: Basic.Properties) -> None:
        try:
            result = await self.channel.basic_publish(
                out.body,
                exchange=out.exchange,
                routing_key=out.routing_key,
                properties=props,
                mandatory=out.mandatory,
            )
        except aiormq.exceptions.PublishError:  # returned (the channel raises on returns)
            self._tracker.on_return(out.message_id)
            return
        except aiormq.exceptions.DeliveryError:  # nacked
            self._tracker.on_confirm(seq, False, False)
            return
        except Exception:
            return  # the channel closed: the publisher resends or fails the record
        if isinstance(result, Basic.Ack):
            self._tracker.on_confirm(seq, False, True)
        elif isinstance(result, Basic.Nack):
            self._tracker.on_confirm(seq, False, False)


def pamqp_properties(props: Properties) -> Basic.Properties:
    """`props` as pamqp properties, for aiormq's `basic_publish`."""
    extra: dict[str, Any] = {}
    if props.timestamp is not None:
        extra["timestamp"] = datetime.fromtimestamp(props.timestamp, UTC)
    return Basic.Properties(
        content_type=props.content_type,
        headers=dict(props.headers) if props.headers else None,
        delivery_mode=props.delivery_mode,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        expiration=props.expiration,
        message_id=props.message_id,
        message_type=props.type,
        **extra,
    )
