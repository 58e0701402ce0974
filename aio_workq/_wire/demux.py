"""The hot paths' reader: deliveries and confirms taken off the socket before aiormq parses them.

aiormq reads every frame with three awaited `readexactly` calls, unmarshals it with pamqp into
objects, and passes it through two `asyncio.Queue`s (connection, then channel) before a consumer
or a publisher sees it: about half of a worker's CPU per message. A `FrameDemux` stands in for
the `asyncio.StreamReader` that aiormq's frame receiver reads from. It reads the socket in large
chunks and splits them into frames. On the channels attached to it, it takes
- `Basic.Deliver` with its content header and body, handed to the consumer's callback as its
  fields (the consuming layer makes its `Delivery` of them)
  (properties are decoded by pamqp only when something reads them);
- `Basic.Ack` / `Basic.Nack` (publisher confirms) and `Basic.Return` with its content, handed to
  the channel's `ConfirmPublisher`, which settles by delivery tag (`multiple` honoured).
Every other frame is passed on to aiormq byte for byte, in order.

aiormq also takes the time of the last frame it read as the connection's sign of life; while
frames are taken here it sees none, so the demux passes it `alive_frame` (a heartbeat) now and
then: reliance 3 in `_seams`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Protocol

from aiormq.abc import AbstractChannel

from .frames import BASIC_CLASS, BODY_FRAME, FRAME_END_OCTET, HEADER_FRAME, METHOD_FRAME

__all__ = ("Confirms", "FrameDemux", "OnDelivery", "Tap")

_FRAME = struct.Struct(">BHI")  # type, channel, payload size
# A frame header and, were it a method frame, its class and method ids (read for any frame:
# the ids of another kind are not looked at).
_FRAME_METHOD = struct.Struct(">BHIHH")
_TAG_BITS = struct.Struct(">QB")  # delivery tag, bits (multiple first)
_U16 = struct.Struct(">H")
_SIZE = struct.Struct(">I")
_BODY_SIZE = struct.Struct(">Q")
# A content header frame's type, channel and payload size, then (past its class and weight) its
# body size.
_HEADER_HEAD = struct.Struct(">BHI4xQ")
_CHANNEL, _CLOSE, _CLOSE_OK = 20, 40, 41
_RETURN, _DELIVER, _ACK, _NACK = 50, 60, 80, 120
_READ_SIZE = 1 << 18
_ALIVE_EVERY = 1.0  # seconds between heartbeats passed to aiormq while deliveries are taken

log = logging.getLogger("aio_workq")

OnDelivery = Callable[[AbstractChannel, str, int, bool, str, str, bytes, bytes], None]
"""Takes a delivery's fields as the demux read them: channel, consumer tag, delivery tag,
redelivered, exchange, routing key, the content header's payload and the body. The consuming
layer makes its `Delivery` of them; the demux knows no message type of its own."""


Layout = tuple[int, int, bytes, bytes, struct.Struct, str, str, str, int]


class Confirms(Protocol):
    """Takes the publisher confirms and returns of a channel (`ConfirmPublisher`)."""

    def on_confirm(self, delivery_tag: int, multiple: bool, ack: bool) -> None: ...

    def on_return(self, reply_code: int, reply_text: str, header: bytes) -> None:
        """A `Basic.Return`, with the returned message's content header payload."""


class Tap:
    """A channel whose deliveries and/or confirms the demux takes: the content being assembled.

    `open` turns False as soon as the broker's `Channel.Close` (or `Close-Ok`) for the channel
    arrives, before aiormq sees it, or when aio-workq closes the channel itself: the
    `FrameWriter` then drops frames still buffered for it, so none reaches the broker after the
    channel's number is freed (which would close the whole connection).
    """

    __slots__ = (
        "body_size",
        "channel",
        "closing",
        "confirms",
        "header",
        "layout",
        "on_delivery",
        "open",
        "number",
        "parts",
        "pending",
        "returned",
        "strings",
    )

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        # Done once the channel closes (aiormq's `is_closed` is its `done()`): a C call where
        # the property is a Python one, on every method frame.
        self.closing = channel.closing
        self.number = channel.number
        self.open = True
        self.on_delivery: OnDelivery | None = None
        self.confirms: Confirms | None = None
        # The method whose content comes next: a delivery's fields, or a return's.
        self.pending: tuple[str, int, bool, str, str] | None = None
        self.returned: tuple[int, str] | None = None  # reply code and text, for a return
        self.header = b""
        self.body_size = 0
        self.parts: list[bytes] = []
        # The short strings of the last delivery, raw and decoded: the consumer tag, the
        # exchange (the last named one) and, mostly, the routing key repeat from one delivery
        # to the next.
        self.strings: tuple[bytes, str, bytes, str, bytes, str] = (b"", "", b"", "", b"", "")
        # The last delivery's method frame (`_parse`): its payload's size, the delivery tag's
        # offset in it, the octets before (the consumer tag) and after the tag and bits (the
        # exchange and routing key), the unpack of the frame and what follows it, the three
        # strings, and the content header length that unpack assumes (12: none yet). A size
        # of `_NO_SIZE` matches no frame.
        self.layout: Layout = _NO_LAYOUT

    def take(
        self,
        kind: int,
        data: bytes | bytearray,
        start: int,
        end: int,
        class_id: int = 0,
        method_id: int = 0,
    ) -> int:
        """Handle one frame's payload `data[start:end]` (its end octet at `end`); a method
        frame's class and method ids, as the demux read them with its frame header: the
        position after what was taken (further than the frame when a whole delivery was), or
        0, which leaves the frame to aiormq."""
        if kind == METHOD_FRAME:
            if self.pending is not None or self.closing.done():
                if class_id == _CHANNEL:
                    self.open = False
                return 0
            if class_id != BASIC_CLASS:
                if class_id == _CHANNEL and method_id in (_CLOSE, _CLOSE_OK):
                    self.open = False
                return 0
            if method_id == _DELIVER and self.on_delivery is not None:
                # A `Basic.Deliver` (here, not in a method of its own: a call per delivery).
                # When its content header and single body frame follow it whole in `data` (a
                # small message, as the broker writes it), the delivery is handed on at once,
                # and so is each delivery after it in `data` whose method frame is this one's
                # but for its delivery tag and redelivered bit (the same consumer tag, exchange
                # and routing key: a run of them, as the broker writes a consumer's): the
                # position after the last one taken is returned. Otherwise its content comes
                # frame by frame.
                total = len(data)
                # The layout of the last delivery's method frame (`_parse`): a frame of its
                # size is checked with two slices at fixed offsets, and read with one unpack
                # (with the content header's frame header and body size), with no walk over
                # the short strings and no call of `_parse`.
                (
                    size, mid, head, tail, layout, consumer_tag, exchange, routing_key, hlen,
                ) = self.layout  # fmt: skip
                if (
                    end - start == size
                    and total - end > hlen + 16  # the body frame's header is in `data`
                    and data[start + 4 : start + mid] == head
                    and data[start + mid + 9 : end] == tail
                ):
                    (
                        *_, delivery_tag, bits, kind, number, length, body_size,
                        body_kind, body_number, body_length,
                    ) = layout.unpack_from(data, start - 7)  # fmt: skip
                    known = hlen  # the body frame's header read, if the content header is hlen long
                else:
                    consumer_tag, delivery_tag, bits, exchange, routing_key = _parse(
                        self, data, start, end
                    )
                    if total - end <= 20:  # its content comes in later reads
                        self.pending = (
                            consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key
                        )  # fmt: skip
                        return end + 1
                    # Its frame header and body size in one unpack (a call each cost more).
                    kind, number, length, body_size = _HEADER_HEAD.unpack_from(data, end + 1)
                    size, mid, head, tail, layout, *_, hlen = self.layout
                    known = body_kind = body_number = body_length = -1  # none read
                while True:
                    after = end + 1
                    header_end: int = after + 7 + length
                    if (
                        kind != HEADER_FRAME
                        or number != self.number
                        or header_end >= total
                        or data[header_end] != FRAME_END_OCTET
                    ):
                        break
                    body_end = header_end + 8 + body_size  # its body frame's end octet
                    if length != known:  # the unpack read no body frame's header
                        if length != hlen and size != _NO_SIZE:  # the next like one's, read with it
                            hlen = length
                            layout = _layout(mid, len(tail), hlen)
                            self.layout = (*self.layout[:4], layout, *self.layout[5:8], hlen)
                        if body_size and body_end < total:
                            body_kind, body_number, body_length = _FRAME.unpack_from(
                                data, header_end + 1
                            )
                    if body_size == 0:
                        body, taken = b"", header_end + 1
                    elif (
                        body_end < total
                        and body_kind == BODY_FRAME
                        and body_number == number
                        and body_length == body_size
                        and data[body_end] == FRAME_END_OCTET
                    ):
                        body, taken = data[header_end + 8 : body_end], body_end + 1  # type: ignore[assignment]
                    else:
                        break
                    header: bytes = data[after + 7 : header_end]  # type: ignore[assignment]
                    if data.__class__ is not bytes:  # slices of a bytearray: copied
                        header, body = bytes(header), bytes(body)
                    on_delivery = self.on_delivery
                    assert on_delivery is not None
                    try:
                        on_delivery(
                            self.channel, consumer_tag, delivery_tag, bool(bits & 1),
                            exchange, routing_key, header, body,
                        )  # fmt: skip
                    except Exception:  # the reader must go on (as in `_complete`)
                        log.exception(
                            "a consumer of channel %d failed to take a delivery", self.number
                        )
                    # The next frame: taken here when it is the same delivery's method frame
                    # but for its tag and bits, with its content header's sizes in `data`.
                    start = taken + 7
                    end = start + size
                    if total - end <= hlen + 16 or self.closing.done():
                        return taken
                    (
                        kind, number, length, class_id, method_id, delivery_tag, bits,
                        header_kind, header_number, header_length, body_size,
                        body_kind, body_number, body_length,
                    ) = layout.unpack_from(data, taken)  # fmt: skip
                    known = hlen
                    if (
                        kind != METHOD_FRAME
                        or number != self.number
                        or length != size
                        or class_id != BASIC_CLASS
                        or method_id != _DELIVER
                        or data[end] != FRAME_END_OCTET
                        or data[start + 4 : start + mid] != head
                        or data[start + mid + 9 : end] != tail
                    ):
                        return taken
                    kind, number, length = header_kind, header_number, header_length
                self.pending = (consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key)
                return end + 1
            confirms = self.confirms
            if confirms is None:
                return 0
            if method_id == _ACK or method_id == _NACK:
                tag, bits = _TAG_BITS.unpack_from(data, start + 4)
                try:
                    confirms.on_confirm(tag, bool(bits & 1), method_id == _ACK)
                except Exception:  # the reader must go on
                    log.exception("settling the confirm of delivery tag %d failed", tag)
                return end + 1
            if method_id == _RETURN:
                reply_code = _U16.unpack_from(data, start + 4)[0]
                reply_text, pos = _shortstr(data, start + 6)
                exchange, pos = _shortstr(data, pos)
                routing_key, _ = _shortstr(data, pos)
                self.returned = (reply_code, reply_text)
                self.pending = ("", 0, False, exchange, routing_key)
                return end + 1
            return 0
        if self.pending is None:
            return 0  # the content of a frame aiormq handles (a basic.get)
        if kind == HEADER_FRAME and not self.header:
            self.header = bytes(data[start:end])
            self.body_size = _BODY_SIZE.unpack_from(data, start + 4)[0]
            if self.body_size == 0:
                self._complete(b"")
            return end + 1
        if kind == BODY_FRAME and self.header:
            self.parts.append(bytes(data[start:end]))
            self.body_size -= end - start
            if self.body_size <= 0:
                parts, self.parts = self.parts, []
                self._complete(parts[0] if len(parts) == 1 else b"".join(parts))
            return end + 1
        return 0

    def _complete(self, body: bytes) -> None:
        fields, self.pending = self.pending, None
        returned, self.returned = self.returned, None
        header, self.header = self.header, b""
        assert fields is not None
        try:
            if returned is not None:
                assert self.confirms is not None
                self.confirms.on_return(*returned, header)
            else:
                assert self.on_delivery is not None
                self.on_delivery(self.channel, *fields, header, body)
        except Exception:  # the reader must go on; the broker redelivers when the channel closes
            log.exception("a consumer of channel %d failed to take a delivery", self.number)


_LAYOUTS: dict[tuple[int, int, int], struct.Struct] = {}


def _layout(mid: int, tail: int, header: int) -> struct.Struct:
    """A `Basic.Deliver` frame whose delivery tag is `mid` octets into its payload and
    followed (past its bits) by `tail` octets of exchange and routing key, and what follows
    it: the frame header with its class and method ids (as `_FRAME_METHOD`), the delivery tag
    and bits (the octets between skipped), then past the frame's end octet the content
    header's frame header and body size (as `_HEADER_HEAD`), and past the `header` octets of
    its payload and its end octet the body frame's header (as `_FRAME`)."""
    layout = _LAYOUTS.get((mid, tail, header))
    if layout is None:
        layout = struct.Struct(f">BHIHH{mid - 4}xQB{tail + 1}xBHI4xQ{header - 12}xxBHI")
        _LAYOUTS[mid, tail, header] = layout
    return layout


def _parse(
    tap: Tap, data: bytes | bytearray, start: int, end: int
) -> tuple[str, int, int, str, str]:
    """A `Basic.Deliver` on `tap` whose method frame is not the last one's but for its tag:
    its consumer tag, delivery tag, bits, exchange and routing key; the tap keeps the layout
    the next deliveries are checked against (`Tap.take`)."""
    # The short strings of the last delivery reused when they repeat (compared as slices).
    tag_raw, consumer_tag, exchange_raw, named, key_raw, routing_key = tap.strings
    tag_raw, consumer_tag, pos = _repeated(data, start + 4, tag_raw, consumer_tag)
    mid = pos - start  # the delivery tag's offset in the frame's payload
    delivery_tag, bits = _TAG_BITS.unpack_from(data, pos)
    pos += 9
    if data[pos]:
        exchange_raw, named, pos = _repeated(data, pos, exchange_raw, named)
        exchange = named
    else:  # the default exchange (the last named one's strings kept for the next)
        exchange = ""
        pos += 1
    key_raw, routing_key, pos = _repeated(data, pos, key_raw, routing_key)
    tap.strings = (tag_raw, consumer_tag, exchange_raw, named, key_raw, routing_key)
    if pos == end:
        tail = bytes(data[start + mid + 9 : end])
        tap.layout = (
            end - start, mid, bytes(data[start + 4 : start + mid]), tail,
            _layout(mid, len(tail), 12), consumer_tag, exchange, routing_key, 12,
        )  # fmt: skip
    else:  # a frame longer than its fields: none is taken as its like
        tap.layout = _NO_LAYOUT
    return consumer_tag, delivery_tag, bits, exchange, routing_key


def _repeated(data: bytes | bytearray, pos: int, raw: bytes, text: str) -> tuple[bytes, str, int]:
    """The short string at `pos`, raw and decoded (`raw` and `text` again when its octets are
    `raw`'s: not decoded), and the position after it."""
    first = pos + 1
    end = first + data[pos]
    if data[first:end] != raw:
        raw = bytes(data[first:end])
        text = raw.decode()
    return raw, text, end


# A payload size no frame has (its size field is 32 bits): the layout of no delivery, whose
# run step ends at once (the next frame's end past any read).
_NO_SIZE = 1 << 32
_NO_LAYOUT: Layout = (_NO_SIZE, 4, b"", b"", _layout(4, 0, 12), "", "", "", 12)


def _shortstr(data: bytes | bytearray, pos: int) -> tuple[str, int]:
    """An AMQP short string at `pos`, and the position after it."""
    size = data[pos]
    return data[pos + 1 : pos + 1 + size].decode(), pos + 1 + size


class FrameDemux:
    """Reads the socket for aiormq's frame receiver, taking the deliveries of attached channels.

    Implements the part of `asyncio.StreamReader` that aiormq uses: `readexactly`, `read`
    and `at_eof`.
    """

    def __init__(self, reader: asyncio.StreamReader, *, alive_frame: bytes) -> None:
        self._reader = reader
        self._alive_frame = alive_frame
        self._loop = asyncio.get_running_loop()
        self._raw = bytearray()  # read from the socket, not yet split into frames
        self._out = bytearray()  # whole frames for aiormq
        self._owed = 0  # bytes of a frame partly passed to aiormq untapped, still to come
        self._taps: dict[int, Tap] = {}
        self._alive_at = 0.0

    def attach(
        self,
        channel: AbstractChannel,
        *,
        on_delivery: OnDelivery | None = None,
        confirms: Confirms | None = None,
    ) -> Tap:
        """Tap `channel` until it closes: hand its deliveries to `on_delivery` and/or its
        publisher confirms and returns to `confirms` (each kept if already set).

        Returns the channel's tap (made on the first call), which the `FrameWriter` checks
        before writing aio-workq's frames for the channel. Look a tap up with `tap()`."""
        number = channel.number
        tap = self._taps.get(number)
        if tap is None or tap.channel is not channel:
            new = self._taps[number] = Tap(channel)
            channel.closing.add_done_callback(lambda _: self._detach(number, new))
            tap = new
        if on_delivery is not None:
            tap.on_delivery = on_delivery
        if confirms is not None:
            tap.confirms = confirms
        return tap

    def tap(self, channel: AbstractChannel) -> Tap | None:
        """`channel`'s tap, or None if it is not attached (or closed); changes nothing."""
        tap = self._taps.get(channel.number)
        return tap if tap is not None and tap.channel is channel else None

    def _detach(self, number: int, tap: Tap) -> None:
        tap.open = False
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
        while not self._out:
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
        owed = self._owed
        data: bytes | bytearray = raw
        if owed:  # the rest of a frame whose start went to aiormq before any channel was tapped
            if len(chunk) <= owed:
                self._owed = owed - len(chunk)
                self._out += chunk
                return
            self._owed = 0
            self._out += chunk[:owed]
            raw += memoryview(chunk)[owed:]
        elif raw:  # a frame cut short by the last read
            raw += chunk
        elif self._taps:
            # Split the chunk itself: its slices are the bodies and headers handed on, with
            # no copy of it into `raw` first and none back out of a bytearray per slice.
            data = chunk
        else:
            raw += chunk
        if not self._taps:
            self._pass(raw)
            return
        taps, out, size, pos, taken = self._taps, self._out, len(data), 0, False
        while size - pos >= 8:
            if size - pos >= 11:  # with what would be a method frame's ids: one unpack
                kind, number, length, class_id, method_id = _FRAME_METHOD.unpack_from(data, pos)
            else:  # too short for a method frame's ids (a heartbeat, or cut short)
                kind, number, length = _FRAME.unpack_from(data, pos)
                class_id = method_id = 0
            end = pos + 7 + length
            if end >= size:
                break
            tap = taps.get(number)
            if tap is not None and data[end] == FRAME_END_OCTET:
                after = tap.take(kind, data, pos + 7, end, class_id, method_id)
                if after:
                    taken = True
                    pos = after
                    continue
            out += data[pos : end + 1]
            pos = end + 1
        if data is raw:
            del raw[:pos]
        elif pos < size:  # the start of a frame still to come
            raw += memoryview(data)[pos:]
        if taken:
            now = self._loop.time()
            if now - self._alive_at >= _ALIVE_EVERY:
                self._alive_at = now
                out += self._alive_frame

    def _pass(self, raw: bytearray) -> None:
        """With no channel tapped: pass `raw` to aiormq up to the last frame whose header is
        whole, and remember how much of that frame is still to come (`_owed`), so that a
        channel tapped before the next read does not split the stream inside a frame."""
        size, pos = len(raw), 0
        while size - pos >= 7:  # hop from frame to frame by the payload sizes
            pos += 8 + _SIZE.unpack_from(raw, pos + 3)[0]
        if pos > size:  # the last frame is cut: pass its start, owe the rest
            self._owed = pos - size
            pos = size
        if pos == size:
            self._out += raw
            raw.clear()
        else:  # a frame header cut short stays for the next read
            self._out += raw[:pos]
            del raw[:pos]
