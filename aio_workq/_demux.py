"""The consume hot path: deliveries taken off the socket before aiormq parses them.

aiormq reads every frame with three awaited `readexactly` calls, unmarshals it with pamqp into
objects, and passes it through two `asyncio.Queue`s (connection, then channel) before a consumer
sees a message: about half of a worker's CPU per message. A `FrameDemux` stands in for the
`asyncio.StreamReader` that aiormq's frame receiver reads from. It reads the socket in large
chunks and splits them into frames; the `Basic.Deliver` frames of a channel that a worker
attached to — with their content header and body — are handed to the worker as a `Delivery`
right there, and every other frame is passed on to aiormq byte for byte, in order. Properties
are decoded (by pamqp) only when something reads them.

aiormq also takes the time of the last frame it read as the connection's sign of life; while
deliveries are taken here it sees none, so the demux passes it a heartbeat frame now and then.
"""

from __future__ import annotations

import asyncio
import struct
import weakref
from collections.abc import Callable
from typing import Any

from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from pamqp import commands
from pamqp.header import ContentHeader
from yarl import URL

__all__ = ("Delivery", "DemuxTransportFactory", "FrameDemux", "demux_of", "register")

_FRAME = struct.Struct(">BHI")  # type, channel, payload size
_DELIVER = struct.Struct(">HH")  # class, method
_U64 = struct.Struct(">Q")
_BODY_SIZE = struct.Struct(">Q")
_FLAGS = struct.Struct(">H")
_METHOD, _HEADER, _BODY = 1, 2, 3
_FRAME_END = 0xCE
_BASIC_DELIVER = (60, 60)
_HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"
_REPLY_TO_FLAG = 1 << 9
_READ_SIZE = 1 << 18
_ALIVE_EVERY = 1.0  # seconds between heartbeats passed to aiormq while deliveries are taken

OnDelivery = Callable[["Delivery"], None]


class Delivery:
    """One message delivered to a consumer, with its properties decoded on first use."""

    __slots__ = (
        "_header",
        "_properties",
        "body",
        "channel",
        "consumer_tag",
        "delivery_tag",
        "exchange",
        "redelivered",
        "routing_key",
    )

    def __init__(
        self,
        channel: AbstractChannel,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        header: bytes | ContentHeader,
        body: bytes,
    ) -> None:
        self.channel = channel
        self.consumer_tag = consumer_tag
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self._header = header
        self._properties: commands.Basic.Properties | None = None
        self.body = body

    @classmethod
    def of(cls, message: DeliveredMessage) -> Delivery:
        """The same, from a message aiormq delivered (a connection without a demux)."""
        deliver = message.delivery
        assert isinstance(deliver, commands.Basic.Deliver)
        return cls(
            message.channel,
            deliver.consumer_tag or "",
            deliver.delivery_tag or 0,
            bool(deliver.redelivered),
            deliver.exchange,
            deliver.routing_key or "",
            message.header,
            message.body,
        )

    @property
    def header(self) -> ContentHeader:
        header = self._header
        if isinstance(header, bytes):
            decoded = ContentHeader()
            decoded.unmarshal(header)
            self._header = header = decoded
        return header

    @property
    def properties(self) -> commands.Basic.Properties:
        return self.header.properties

    @property
    def reply_to(self) -> str | None:
        """`properties.reply_to`, without decoding the properties when the flag is not set."""
        header = self._header
        if isinstance(header, bytes) and not _FLAGS.unpack_from(header, 12)[0] & _REPLY_TO_FLAG:
            return None
        return self.properties.reply_to

    def message(self) -> DeliveredMessage:
        """As aiormq would have delivered it."""
        deliver = commands.Basic.Deliver(
            consumer_tag=self.consumer_tag,
            delivery_tag=self.delivery_tag,
            redelivered=self.redelivered,
            exchange=self.exchange,
            routing_key=self.routing_key,
        )
        return DeliveredMessage(
            delivery=deliver, header=self.header, body=self.body, channel=self.channel
        )


class _Tap:
    """A channel whose deliveries are taken by the demux: the content being assembled."""

    __slots__ = ("body", "body_size", "channel", "deliver", "header", "on_delivery", "parts")

    def __init__(self, channel: AbstractChannel, on_delivery: OnDelivery) -> None:
        self.channel = channel
        self.on_delivery = on_delivery
        self.deliver: tuple[str, int, bool, str, str] | None = None
        self.header = b""
        self.body_size = 0
        self.parts: list[bytes] = []

    def take(self, kind: int, data: bytearray, start: int, end: int) -> bool:
        """Handle one frame's payload `data[start:end]`; False leaves the frame to aiormq."""
        if kind == _METHOD:
            if self.deliver is not None or _DELIVER.unpack_from(data, start) != _BASIC_DELIVER:
                return False
            pos = start + 4
            size = data[pos]
            consumer_tag = data[pos + 1 : pos + 1 + size].decode()
            pos += 1 + size
            delivery_tag = _U64.unpack_from(data, pos)[0]
            redelivered = bool(data[pos + 8] & 1)
            pos += 9
            size = data[pos]
            exchange = data[pos + 1 : pos + 1 + size].decode()
            pos += 1 + size
            size = data[pos]
            routing_key = data[pos + 1 : pos + 1 + size].decode()
            self.deliver = (consumer_tag, delivery_tag, redelivered, exchange, routing_key)
            self.header = b""
            return True
        if self.deliver is None:
            return False  # the content of a frame aiormq handles (a return, a basic.get)
        if kind == _HEADER and not self.header:
            self.header = bytes(data[start:end])
            self.body_size = _BODY_SIZE.unpack_from(data, start + 4)[0]
            if self.body_size == 0:
                self._complete(b"")
            return True
        if kind == _BODY and self.header:
            self.parts.append(bytes(data[start:end]))
            self.body_size -= end - start
            if self.body_size <= 0:
                parts, self.parts = self.parts, []
                self._complete(parts[0] if len(parts) == 1 else b"".join(parts))
            return True
        return False

    def _complete(self, body: bytes) -> None:
        deliver, self.deliver = self.deliver, None
        assert deliver is not None
        header, self.header = self.header, b""
        self.on_delivery(Delivery(self.channel, *deliver, header, body))


class FrameDemux:
    """Reads the socket for aiormq's frame receiver, taking the deliveries of attached channels.

    Implements the part of `asyncio.StreamReader` that aiormq uses: `readexactly`, `read`
    and `at_eof`.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._loop = asyncio.get_running_loop()
        self._raw = bytearray()  # read from the socket, not yet split into frames
        self._out = bytearray()  # whole frames for aiormq
        self._taps: dict[int, _Tap] = {}
        self._alive_at = 0.0

    def attach(self, channel: AbstractChannel, on_delivery: OnDelivery) -> None:
        """Hand `channel`'s deliveries to `on_delivery`, until the channel closes."""
        number = channel.number
        tap = _Tap(channel, on_delivery)
        self._taps[number] = tap
        channel.closing.add_done_callback(lambda _: self._detach(number, tap))

    def _detach(self, number: int, tap: _Tap) -> None:
        if self._taps.get(number) is tap:
            del self._taps[number]

    def at_eof(self) -> bool:
        return not self._out and self._reader.at_eof()

    async def readexactly(self, n: int) -> bytes:
        while len(self._out) < n:
            await self._fill(n)
        data = bytes(self._out[:n])
        del self._out[:n]
        return data

    async def read(self, n: int = -1) -> bytes:
        if not self._out:
            await self._fill(1)
        size = len(self._out) if n < 0 else min(n, len(self._out))
        data = bytes(self._out[:size])
        del self._out[:size]
        return data

    async def _fill(self, wanted: int) -> None:
        chunk = await self._reader.read(_READ_SIZE)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(self._out), wanted)
        raw = self._raw
        raw += chunk
        if not self._taps:
            self._out += raw
            raw.clear()
            return
        taps, out, size, pos, taken = self._taps, self._out, len(raw), 0, False
        while size - pos >= 8:
            kind, number, length = _FRAME.unpack_from(raw, pos)
            end = pos + 7 + length
            if end >= size:
                break
            tap = taps.get(number)
            if (
                tap is not None
                and raw[end] == _FRAME_END
                and not tap.channel.is_closed
                and tap.take(kind, raw, pos + 7, end)
            ):
                taken = True
            else:
                out += raw[pos : end + 1]
            pos = end + 1
        del raw[:pos]
        if taken:
            now = self._loop.time()
            if now - self._alive_at >= _ALIVE_EVERY:
                self._alive_at = now
                out += _HEARTBEAT


_demuxes: weakref.WeakKeyDictionary[AbstractConnection, FrameDemux] = weakref.WeakKeyDictionary()


def register(connection: AbstractConnection, demux: FrameDemux) -> None:
    """Record that `connection` reads its frames through `demux`."""
    _demuxes[connection] = demux


def demux_of(connection: AbstractConnection) -> FrameDemux | None:
    """The demux of an aiormq connection opened by aio-workq (None for any other)."""
    return _demuxes.get(connection)


class DemuxTransportFactory(TransportFactory):
    """aiormq's TCP/TLS transport, with the reader wrapped in a `FrameDemux`."""

    def __init__(self) -> None:
        self.last: FrameDemux | None = None

    async def create(self, url: URL, **kwargs: Any) -> tuple[Any, asyncio.StreamWriter]:
        base = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await base.create(url, **kwargs)
        self.last = FrameDemux(reader)
        return self.last, writer
