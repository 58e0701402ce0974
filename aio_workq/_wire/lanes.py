"""How a publishing channel's messages go out and their confirms come back: two lanes.

Each lane is made for one channel, with that channel's own `ConfirmTracker` (`tracker`).
`FastLane` (connections aio-workq opened): frames are marshalled by `_wire`, tagged by the lane's
own counter and written by the connection's one ordered `FrameWriter`; confirms and returns come
straight off the socket from the `FrameDemux`. `PlainLane` (an aio-pika connection someone else
opened, or `AIO_WORKQ_FAST_PATH=0`): each message is one `aiormq.Channel.basic_publish()` call,
aiormq's public API, whose result settles that message.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import aiormq
from pamqp.commands import Basic

from .frames import (
    BASIC_CLASS,
    BODY_FRAME,
    BODY_FRAME_AFTER,
    CONTENT_HEADER,
    FRAME_END,
    FRAME_END_OCTET,
    HEADER_FRAME,
    LARGE_BODY,
    Chunked,
    EncodedProperties,
    Properties,
    decode_header,
    method_frame,
    publish_write,
)
from .seams import Wire, await_written, channel_closing
from .tracker import ConfirmTracker, Outgoing

__all__ = (
    "FastLane",
    "Lane",
    "PlainLane",
    "negotiated_frame_max",
    "pamqp_properties",
    "plain_properties",
)

log = logging.getLogger("aio_workq")

_BURST = 256  # buffered writes after which a long burst is written out at once


def negotiated_frame_max(channel: aiormq.abc.AbstractChannel) -> int:
    """The connection's negotiated frame_max (0: no limit): `connection_tune`, a public
    attribute of `aiormq.abc.AbstractConnection` (reliance 5 in `_seams`)."""
    tune = channel.connection.connection_tune
    return int(tune.frame_max or 0) if tune is not None else 0


class Lane(Protocol):
    """Writes messages on one channel and records them in its tracker under their tags."""

    channel: aiormq.abc.AbstractChannel
    tracker: ConfirmTracker

    def write(self, out: Outgoing) -> bool:
        """Write `out`; True when a long burst is buffered (time to `flush`)."""
        ...

    def flush(self) -> None: ...

    def when_flushed(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the frames of every message written so far have left us."""


class FastLane:
    """aio-workq's own tags and ordered writer; confirms from the demux (see `_seams`)."""

    __slots__ = (
        "_frame_max", "_gate", "_number", "_small", "_tag", "_writer", "channel", "tracker"
    )  # fmt: skip

    def __init__(
        self,
        channel: aiormq.abc.AbstractChannel,
        wire: Wire,
        tracker: ConfirmTracker,
        frame_max: int,
    ) -> None:
        self.channel = channel
        self.tracker = tracker
        self._number = channel.number
        self._writer = wire.writer
        self._tag = 0  # the broker numbers a confirm channel's publishes from 1
        self._frame_max = frame_max or 131072  # 0 is "no limit": body frames of the default size
        # The largest body `publish_write` sends in one frame joined with the rest (its first
        # road), which `write` takes itself.
        self._small = min(self._frame_max - 8, LARGE_BODY)
        self._gate = wire.demux.attach(channel, confirms=self)

    def write(self, out: Outgoing) -> bool:
        number = self._number
        size = out.size
        if 0 < size <= self._small:
            # `publish_write`'s first road (a body of one frame, joined with the method and
            # the content header), inline with the size the record measured: one Python call
            # and a `len` less per message (#22). A test keeps the two alike.
            flags, properties = out.encoded
            frames: bytes | Chunked = b"".join(
                (
                    method_frame(number, out.exchange, out.routing_key, out.mandatory),
                    CONTENT_HEADER.pack(
                        HEADER_FRAME, number, 14 + len(properties), BASIC_CLASS, 0, size, flags
                    ),
                    properties,
                    BODY_FRAME_AFTER.pack(FRAME_END_OCTET, BODY_FRAME, number, size),
                    out.body,
                    FRAME_END,
                )
            )
        else:
            frames = publish_write(
                number,
                out.exchange,
                out.routing_key,
                out.mandatory,
                out.encoded,
                out.body,
                self._frame_max,
            )
        # `self.tracker.record(tag, out)`, inline.
        self._tag = tag = self._tag + 1
        out.tag = tag
        out.tracker = tracker = self.tracker
        tracker.pending[tag] = out
        out.sent = True  # in the writer's buffer: it leaves unless the connection dies first
        writer = self._writer
        writer.write(self._gate, frames)
        return writer.buffered >= _BURST

    def flush(self) -> None:
        self._writer.flush()

    def when_flushed(self, callback: Callable[[], None]) -> None:
        self._writer.when_flushed(callback)

    # The demux's `Confirms`.
    def on_confirm(self, delivery_tag: int, multiple: bool, ack: bool) -> None:
        self.tracker.on_confirm(delivery_tag, multiple, ack)

    def on_return(self, reply_code: int, reply_text: str, header: bytes) -> None:
        # The broker returns the content header it was sent: aio-workq's own encoding, which
        # always decodes back with its message id (tests/test_publish_returns.py), and a return
        # comes before the ack of its message. So a return is never dropped here for its
        # header, which would let that ack count the message as confirmed.
        message_id = decode_header(header).properties.message_id
        if not self.tracker.on_return(message_id):
            log.debug(
                "returned message %s is not pending (%d %s)", message_id, reply_code, reply_text
            )


class PlainLane:
    """One `basic_publish()` per message through aiormq's public API.

    aiormq matches a `Basic.Return` to a publish by message id: to the latest publish with
    that id. So that it is always the right one, a message whose id is the id of a mandatory
    publish still unconfirmed in aiormq waits (with every message after it, to keep their
    order) until that publish is settled. Only mandatory messages are returned, and two of
    them with one id are never in aiormq at once: the return of each reaches its own publish,
    and each publish's result settles only its own record.
    """

    __slots__ = ("_held", "_loop", "_mandatory", "_seq", "_tasks", "_turn", "channel", "tracker")

    def __init__(self, channel: aiormq.abc.AbstractChannel, tracker: ConfirmTracker) -> None:
        self.channel = channel
        self.tracker = tracker
        self._seq = 0
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._mandatory: set[str] = set()  # ids of mandatory publishes unconfirmed in aiormq
        self._held: deque[Outgoing] = deque()  # waiting for one of those, in write order
        self._turn = asyncio.Lock()  # one publish at a time into aiormq (reliance 10)

    def write(self, out: Outgoing) -> bool:
        self._seq += 1
        self.tracker.record(self._seq, out)
        if self._held or out.message_id in self._mandatory:
            self._held.append(out)
        else:
            self._start(out)
        return False

    def _start(self, out: Outgoing) -> None:
        if out.mandatory:
            self._mandatory.add(out.message_id)
        task = self._loop.create_task(self._publish(out, plain_properties(out)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    async def _publish(self, out: Outgoing, props: Basic.Properties) -> None:
        # Each outcome is this publish's own: aiormq settles its future by delivery tag, and
        # its return by message id, which no other publish in aiormq shares (see the class).
        # A multiple ack is split by aiormq into one result per publish, so the order in
        # which these tasks resume cannot give one message another's outcome.
        channel = self.channel
        try:
            # One at a time into aiormq, each once the previous one's frames are written, and
            # never once the broker's Channel.Close is answered: the check and aiormq's
            # taking of its lock and queueing of the frames run in one step (reliance 10).
            await self._turn.acquire()
            if channel_closing(channel):
                self._turn.release()
                return  # still recorded: resent or failed with the channel's end
            self._loop.create_task(self._pass_turn(channel))
            out.sent = True  # aiormq has it: once this call runs, it may reach the queue
            result = await channel.basic_publish(
                out.body,
                exchange=out.exchange,
                routing_key=out.routing_key,
                properties=props,
                mandatory=out.mandatory,
            )
        except aiormq.exceptions.PublishError:  # returned (the channel raises on returns)
            if out.tracker is self.tracker:
                self.tracker.returned(out)
        except aiormq.exceptions.DeliveryError:  # nacked
            self.tracker.settle(out, False)
        except Exception:
            pass  # the channel closed: the publisher resends or fails the record
        else:
            if isinstance(result, Basic.Ack | Basic.Nack):
                self.tracker.settle(out, isinstance(result, Basic.Ack))
        finally:
            if out.mandatory:
                self._mandatory.discard(out.message_id)
                self._release()

    async def _pass_turn(self, channel: aiormq.abc.AbstractChannel) -> None:
        try:
            await await_written(channel)
        finally:
            self._turn.release()

    def _release(self) -> None:
        """Start the held messages, in order, up to the next one that must still wait."""
        held = self._held
        if self.tracker.closed or self.channel.is_closed:
            held.clear()  # handed back to the publisher with the channel's other records
            return
        while held and held[0].message_id not in self._mandatory:
            out = held.popleft()
            if not out.settled:
                self._start(out)


class _Encoded(Basic.Properties):
    """pamqp properties that go on the wire as aio-workq encoded them (`encode_properties`):
    the same bytes as on the fast path, floats in the headers as 64-bit doubles, where
    pamqp's own encoder sends 32-bit floats (#20). aiormq hands them to pamqp's
    `ContentHeader`, whose `marshal()` calls theirs (reliance 7 in `_seams`)."""

    def __init__(self, encoded: EncodedProperties, **fields: Any) -> None:
        super().__init__(**fields)
        self.encoded = encoded

    def marshal(self) -> bytes:
        flags, data = self.encoded
        return _FLAGS.pack(flags) + data


_FLAGS = struct.Struct(">H")
_HEADER = struct.Struct(">HHQH")  # a content header's class, weight, body size and flags
_PAMQP_FIELDS = (
    "content_type", "content_encoding", "headers", "delivery_mode", "priority",
    "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "message_type",
    "user_id", "app_id",
)  # fmt: skip


def plain_properties(out: Outgoing) -> Basic.Properties:
    """The pamqp properties the plain lane hands aiormq for `out`, marshalled as `out.encoded`.

    A message sent while the publisher's channel was on the fast path keeps only its encoding
    (`props` is None: one object fewer for the garbage collector per message in flight, #22);
    resent on a plain channel, its properties are decoded from that encoding."""
    if out.props is not None:
        return pamqp_properties(out.props, out.encoded)
    flags, data = out.encoded
    decoded = decode_header(_HEADER.pack(60, 0, 0, flags) + data).properties
    return _Encoded(out.encoded, **{name: getattr(decoded, name) for name in _PAMQP_FIELDS})


def pamqp_properties(props: Properties, encoded: EncodedProperties) -> Basic.Properties:
    """`props` as pamqp properties, for aiormq's `basic_publish`, marshalled as `encoded`."""
    extra: dict[str, Any] = {}
    if props.timestamp is not None:
        extra["timestamp"] = datetime.fromtimestamp(props.timestamp, UTC)
    return _Encoded(
        encoded,
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
