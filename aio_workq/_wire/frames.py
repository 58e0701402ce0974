"""AMQP 0-9-1 frames for the hot paths, marshalled with `struct` instead of pamqp objects.

A confirmed publish is three frames (Basic.Publish, content header, body); building them through
pamqp's frame classes costs more than the rest of the publish. Here the method frame for an
(exchange, routing key) pair is built once and cached, the content header is packed directly,
and acks are 21 bytes. `tests/test_wire.py` checks every encoder against pamqp byte for byte.

Validation comes first: `encode_properties` and `check_destination` raise `SerializationError`
naming the field for anything that can't go on the wire, before a delivery tag is taken or
anything is recorded; `publish_frames` then only packs what was validated and cannot fail.

The one decoder, `decode_header`, reads a delivery's content header (its properties) a few
times faster than pamqp's generic one; anything unusual is left to pamqp.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from pamqp import commands, decode
from pamqp.encode import encode_table_value, short_string
from pamqp.header import ContentHeader

from .._exceptions import SerializationError

__all__ = (
    "BASIC_CLASS",
    "BODY_FRAME",
    "BODY_FRAME_AFTER",
    "CONTENT_HEADER",
    "FRAME_END",
    "FRAME_END_OCTET",
    "HEADER_FRAME",
    "METHOD_FRAME",
    "NAME_PATTERN",
    "HEADER_FRAME_OVERHEAD",
    "EncodedProperties",
    "Properties",
    "ack_frame",
    "check_destination",
    "decode_header",
    "encode_properties",
    "header_too_large",
    "method_frame",
    "nack_frame",
    "properties_limit",
    "publish_frames",
    "publish_write",
    "Chunked",
    "LARGE_BODY",
    "reject_frame",
    "usual_properties",
)

# What a writer that packs the usual publish itself (`FastLane.write`, inline: no call more
# per message) and the demux that reads frames share with the encoders here.
METHOD_FRAME, HEADER_FRAME, BODY_FRAME = 1, 2, 3
"""The AMQP 0-9-1 frame types aio-workq writes and reads."""
FRAME_END_OCTET = 0xCE
"""The octet that ends every frame."""
FRAME_END = b"\xce"
BASIC_CLASS = 60
"""The class id of Basic's methods and content headers."""
CONTENT_HEADER = struct.Struct(">BHIHHQH")
"""A content header frame up to its property list: frame type, channel, frame size | class,
weight, body size, property flags."""
BODY_FRAME_AFTER = struct.Struct(">BBHI")
"""A frame's end octet, then the header of the body frame after it: type, channel, size."""

_FRAME_HEADER = struct.Struct(">BHI")
_ACK = struct.Struct(">BHIHHQB")  # frame type, channel, size | class, method, tag, bits
_ACK_SIZE = 13  # class + method + delivery tag + bits

# Property flags, in wire order (AMQP 0-9-1, section 4.2.6.1).
_CONTENT_TYPE = 1 << 15
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_PRIORITY = 1 << 11
_CORRELATION_ID = 1 << 10
_REPLY_TO = 1 << 9
_EXPIRATION = 1 << 8
_MESSAGE_ID = 1 << 7
_TIMESTAMP = 1 << 6
_TYPE = 1 << 5


# Basic's properties in wire order: (name, flag, kind); kinds: s shortstr, o octet, t table,
# T timestamp. (Bits 2 and 1 are cluster_id, which pamqp checks, and the flag continuation.)
_LAYOUT = (
    ("content_type", 1 << 15, "s"),
    ("content_encoding", 1 << 14, "s"),
    ("headers", _HEADERS, "t"),
    ("delivery_mode", _DELIVERY_MODE, "o"),
    ("priority", _PRIORITY, "o"),
    ("correlation_id", _CORRELATION_ID, "s"),
    ("reply_to", _REPLY_TO, "s"),
    ("expiration", _EXPIRATION, "s"),
    ("message_id", _MESSAGE_ID, "s"),
    ("timestamp", _TIMESTAMP, "T"),
    ("message_type", _TYPE, "s"),
    ("user_id", 1 << 4, "s"),
    ("app_id", 1 << 3, "s"),
)
_PAMQP_ONLY = (1 << 2) | 1
_HEADER_FIELDS = struct.Struct(">HHQH")  # class, weight, body size, flags


def decode_header(payload: bytes) -> ContentHeader:
    """A content header frame's payload, decoded as pamqp's `ContentHeader.unmarshal` does.

    Raises:
        ValueError: the payload is malformed (as pamqp raises).
    """
    try:
        _, weight, body_size, flags = _HEADER_FIELDS.unpack_from(payload)
        if flags & _PAMQP_ONLY:
            return _pamqp_header(payload)
        values: dict[str, Any] = {}
        offset = 14
        for name, flag, kind in _LAYOUT:
            if not flags & flag:
                continue
            if kind == "s":
                end = offset + 1 + payload[offset]
                values[name] = payload[offset + 1 : end].decode()
                offset = end
            elif kind == "o":
                values[name] = payload[offset]
                offset += 1
            elif kind == "t":
                consumed, values[name] = decode.field_table(payload[offset:])
                offset += consumed
            else:
                consumed, values[name] = decode.timestamp(payload[offset : offset + 8])
                offset += consumed
        # The constructor checks delivery_mode where pamqp's decoder does not: left to it.
        return ContentHeader(weight, body_size, commands.Basic.Properties(**values))
    except (struct.error, IndexError, ValueError):
        return _pamqp_header(payload)  # unusual or malformed: pamqp decides (or raises)


def _pamqp_header(payload: bytes) -> ContentHeader:
    header = ContentHeader()
    header.unmarshal(payload)
    return header


class Properties:
    """The message properties aio-workq sends; `None` leaves a property out."""

    __slots__ = (
        "content_type",
        "correlation_id",
        "delivery_mode",
        "expiration",
        "headers",
        "message_id",
        "priority",
        "reply_to",
        "timestamp",
        "type",
    )

    def __init__(
        self,
        *,
        message_id: str,
        content_type: str | None = None,
        headers: Mapping[str, Any] | None = None,
        delivery_mode: int | None = 2,
        priority: int | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        expiration: str | None = None,
        timestamp: int | None = None,
        type: str | None = None,
    ) -> None:
        self.message_id = message_id
        self.content_type = content_type
        self.headers = headers
        self.delivery_mode = delivery_mode
        self.priority = priority
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.expiration = expiration
        self.timestamp = timestamp
        self.type = type


def _utf8(value: str, field: str) -> bytes:
    """`value` in UTF-8 (what AMQP's strings are).

    Raises:
        SerializationError: it has a lone surrogate (from `surrogateescape`, say), which no
            UTF-8 holds.
    """
    try:
        return value.encode()
    except UnicodeEncodeError as exc:
        raise SerializationError(
            f"{field} {value[:40]!r} is not valid text ({exc.reason}): AMQP sends it as UTF-8"
        ) from None


def _shortstr(value: str, field: str) -> bytes:
    if not isinstance(value, str):
        raise SerializationError(f"{field} must be a str, got {type(value).__name__}")
    data = _utf8(value, field)
    if len(data) > 255:
        raise SerializationError(
            f"{field} is {len(data)} bytes long: AMQP allows at most 255 ({value[:40]!r}...)"
        )
    return bytes((len(data),)) + data


@lru_cache(maxsize=1024)
def _method_payload(exchange: str, routing_key: str, mandatory: bool) -> bytes:
    return (
        struct.pack(">HHH", BASIC_CLASS, 40, 0)
        + _shortstr(exchange, "the exchange name")
        + _shortstr(routing_key, "the routing key")
        + bytes((1 if mandatory else 0,))
    )


@lru_cache(maxsize=1024)
def method_frame(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """The Basic.Publish frame of a destination on `channel`, built once (cached): the
    destination must have been checked (`check_destination`)."""
    payload = _method_payload(exchange, routing_key, mandatory)
    return _FRAME_HEADER.pack(METHOD_FRAME, channel, len(payload)) + payload + FRAME_END


NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_.:-]*$")
"""The characters AMQP 0-9-1 allows in queue and exchange names."""


@lru_cache(maxsize=1024)
def _valid_name(name: str) -> bool:
    return NAME_PATTERN.match(name) is not None


def check_destination(exchange: str, routing_key: str, mandatory: bool) -> None:
    """Raise `SerializationError` if the exchange name or routing key can't be sent.

    A bad exchange name would make the broker close the channel, failing every other message
    in flight on it: it is refused here instead.
    """
    if exchange and (not isinstance(exchange, str) or not _valid_name(exchange)):
        raise SerializationError(
            f"exchange name {exchange!r} is invalid: use letters, digits, '-', '_', '.', ':'"
        )
    if not isinstance(routing_key, str):
        raise SerializationError(f"the routing key must be a str, got {type(routing_key).__name__}")
    _method_payload(exchange, routing_key, mandatory)


EncodedProperties = tuple[int, bytes]
"""Property flags and the encoded property list of a content header."""


def _octet(value: object, field: str, low: int, high: int) -> bytes:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SerializationError(f"{field} must be an int from {low} to {high}, got {value!r}")
    return bytes((value,))


_DOUBLE = struct.Struct(">d")
_LONG = struct.Struct(">I")
_OWN = (float, dict, list)  # the values encoded here; the rest by pamqp


def _field_table(table: Mapping[str, Any]) -> bytes:
    """An AMQP field table, as pamqp's `field_table` encodes it but for floats: a Python float
    is a 64-bit double ('d'), where pamqp sends a 32-bit float ('f') and 16777217.0 would
    arrive as 16777216.0 (#20). Keys are sorted, like pamqp's."""
    if not table:
        return b"\x00\x00\x00\x00"
    parts = []
    for key in sorted(table):
        value = table[key]
        parts.append(short_string(key))
        parts.append(_field_value(value) if isinstance(value, _OWN) else encode_table_value(value))
    data = b"".join(parts)
    return _LONG.pack(len(data)) + data


def _field_value(value: Any) -> bytes:
    if isinstance(value, float):
        if value - value != 0.0:  # NaN or an infinity (x - x is NaN for both)
            raise ValueError(
                f"{value!r} is not a finite number: RabbitMQ closes the whole connection on it "
                "(541 INTERNAL_ERROR); send a finite float, None, or a str such as 'nan'"
            )
        return b"d" + _DOUBLE.pack(value)
    if isinstance(value, dict):
        return b"F" + _field_table(value)
    if isinstance(value, list):
        data = b"".join([_field_value(item) for item in value])
        return b"A" + _LONG.pack(len(data)) + data
    return encode_table_value(value)


def _table(headers: Mapping[str, Any]) -> bytes:
    try:
        return _field_table(headers)
    except Exception:
        pass
    for key, value in headers.items():  # find the culprit, to name it
        if not isinstance(key, str) or len(_utf8(key, "header name")) > 255:
            raise SerializationError(f"header name {key!r} must be a str of at most 255 bytes")
        try:
            _field_table({key: value})
        except Exception as exc:
            raise SerializationError(
                f"header {key!r}: cannot encode a value of type {type(value).__name__} ({exc}); "
                "use str, int, float, bool, None, datetime, Decimal, or lists and dicts of "
                "those"
            ) from None
    raise SerializationError("the headers cannot be encoded")  # pragma: no cover


_COMMON: dict[tuple[str | None, int], tuple[int, bytes]] = {}
"""(content_type, delivery_mode) -> their flags and encoding, for the usual properties."""


def _common_prefix(content_type: str | None, delivery_mode: int) -> tuple[int, bytes]:
    flags = _DELIVERY_MODE
    prefix = bytes((delivery_mode,))
    if content_type is not None:
        flags |= _CONTENT_TYPE
        prefix = _shortstr(content_type, "content_type") + prefix
    if len(_COMMON) < 256:
        _COMMON[(content_type, delivery_mode)] = (flags, prefix)
    return flags, prefix


_LENGTH = tuple(bytes((n,)) for n in range(256))  # a short string's length octet


def usual_properties(message_id: str, content_type: str | None) -> EncodedProperties:
    """`encode_properties` of `Properties(message_id=..., content_type=...)` (persistent, no
    other property), without its checks: for a message id made by aio-workq and a content
    type of its own (`build_usual`), both valid by construction.

    Raises:
        SerializationError: the content type or the message id is over 255 bytes.
    """
    common = _COMMON.get((content_type, 2))
    flags, prefix = common if common is not None else _common_prefix(content_type, 2)
    data = message_id.encode()
    if len(data) > 255:
        raise SerializationError(f"message_id is {len(data)} bytes long: AMQP allows at most 255")
    return flags | _MESSAGE_ID, prefix + _LENGTH[len(data)] + data


def encode_properties(props: Properties) -> EncodedProperties:
    """Validate and encode `props`.

    Raises:
        SerializationError: a property can't go on the wire; the message names it.
    """
    if (  # the usual message: a content type, a delivery mode and its id (the hot path)
        (mode := props.delivery_mode) in (1, 2)
        and type(mode) is int
        and not props.headers
        and props.priority is None
        and props.correlation_id is None
        and props.reply_to is None
        and props.expiration is None
        and props.timestamp is None
        and props.type is None
        and type(message_id := props.message_id) is str
        and ((content_type := props.content_type) is None or type(content_type) is str)
    ):
        key = (content_type, mode)
        common = _COMMON.get(key)
        flags, prefix = common if common is not None else _common_prefix(*key)
        try:
            data = message_id.encode()
        except UnicodeEncodeError:
            data = _utf8(message_id, "message_id")  # raises, naming it
        if len(data) > 255:
            raise SerializationError(
                f"message_id is {len(data)} bytes long: AMQP allows at most 255 "
                f"({message_id[:40]!r}...)"
            )
        return flags | _MESSAGE_ID, prefix + _LENGTH[len(data)] + data
    flags = 0
    parts: list[bytes] = []
    if props.content_type is not None:
        flags |= _CONTENT_TYPE
        parts.append(_shortstr(props.content_type, "content_type"))
    if props.headers:
        if not isinstance(props.headers, Mapping):
            raise SerializationError(
                f"headers must be a mapping, got {type(props.headers).__name__}"
            )
        flags |= _HEADERS
        parts.append(_table(props.headers))
    if props.delivery_mode is not None:
        flags |= _DELIVERY_MODE
        parts.append(_octet(props.delivery_mode, "delivery_mode", 1, 2))
    if props.priority is not None:
        flags |= _PRIORITY
        parts.append(_octet(props.priority, "priority", 0, 255))
    if props.correlation_id is not None:
        flags |= _CORRELATION_ID
        parts.append(_shortstr(props.correlation_id, "correlation_id"))
    if props.reply_to is not None:
        flags |= _REPLY_TO
        parts.append(_shortstr(props.reply_to, "reply_to"))
    if props.expiration is not None:
        if not isinstance(props.expiration, str) or not props.expiration.isdigit():
            raise SerializationError(
                f"expiration must be whole milliseconds as a str, got {props.expiration!r}"
            )
        flags |= _EXPIRATION
        parts.append(_shortstr(props.expiration, "expiration"))
    flags |= _MESSAGE_ID
    parts.append(_shortstr(props.message_id, "message_id"))
    if props.timestamp is not None:
        if not isinstance(props.timestamp, int) or not 0 <= props.timestamp < 2**63:
            raise SerializationError(
                f"timestamp must be whole seconds since the epoch, got {props.timestamp!r}"
            )
        flags |= _TIMESTAMP
        parts.append(struct.pack(">Q", props.timestamp))
    if props.type is not None:
        flags |= _TYPE
        parts.append(_shortstr(props.type, "message_type"))
    return flags, b"".join(parts)


HEADER_FRAME_OVERHEAD = 22
"""Bytes of a content header frame besides the encoded properties: the frame's type, channel
and size (7) and end octet (1), then class, weight, body size and property flags (14)."""


def properties_limit(frame_max: int) -> int:
    """The most bytes of encoded properties whose content header fits in one frame of
    `frame_max` bytes (0: the broker set no limit). AMQP sends the content header in one frame
    whatever its size; RabbitMQ closes the connection (501 FRAME_ERROR) on a larger one."""
    return frame_max - HEADER_FRAME_OVERHEAD if frame_max > 0 else 2**63


def header_too_large(props: Properties, size: int, frame_max: int) -> SerializationError:
    """The error for `props` whose `size` bytes of encoded properties are over
    `properties_limit(frame_max)`, naming the field (only the headers can grow that large:
    every other property is at most 255 bytes) and its largest entry."""
    where = "the properties"
    headers = props.headers
    if isinstance(headers, Mapping) and headers:
        sizes = {key: len(_table({key: value})) for key, value in headers.items()}
        largest = max(sizes, key=sizes.__getitem__)
        where = (
            f"the headers ({len(_table(headers)):,} bytes encoded; the largest is {largest!r}, "
            f"{sizes[largest]:,} bytes)"
        )
    return SerializationError(
        f"message {props.message_id}: {where} make a content header of "
        f"{size + HEADER_FRAME_OVERHEAD:,} bytes, over the connection's frame_max of "
        f"{frame_max:,} bytes (the broker would close the connection: the content header must "
        f"fit in one frame, so at most {properties_limit(frame_max):,} bytes of properties); "
        "put large values in the body"
    )


LARGE_BODY = 32 * 1024
"""Bodies larger than this go out as views of the body (`Chunked`), never copied into frames."""


class Chunked:
    """A large message's frames: its method and content header frames, then its body frames,
    each a small frame header, a `memoryview` slice of the body and the end octet.

    `len()` is the byte size of all its frames. `write()` hands them to a stream a whole frame
    at a time and may stop between two frames (when the socket is backed up) and go on from
    there later, so a large body is never joined into a second copy of itself, nor handed to a
    transport that would copy what the socket does not take at once (asyncio 3.11's does).
    """

    __slots__ = ("_body", "_channel", "_chunk", "_head", "_next", "size")

    def __init__(self, head: bytes, channel: int, body: memoryview, chunk: int) -> None:
        self._head = head  # the method and content header frames
        self._channel = channel
        self._body = body
        self._chunk = chunk
        self._next = 0  # where in the body the next frame to write starts
        self.size = len(head) + len(body) + 8 * -(-len(body) // chunk)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    @property
    def started(self) -> bool:
        """Some of its frames are written, not all: nothing but the rest may follow them on
        its channel (AMQP sends a message's frames together)."""
        return 0 < self._next < len(self._body)

    @property
    def parts(self) -> list[bytes | memoryview]:
        """All its frames as parts: frame headers (with the method and content header frames
        before the first) and views of the body, joined by the end octets."""
        parts: list[bytes | memoryview] = []
        self._frames(parts.append, 0, None)
        return parts

    def write(
        self, write: Callable[[bytes | memoryview], object], full: Callable[[], bool]
    ) -> bool:
        """Hand the frames not yet written to `write`, whole frames, until `full()` is true
        after one of them; True once the last one is written (else call again to go on)."""
        if self._next >= len(self._body):
            return True
        self._next = self._frames(write, self._next, full)
        return self._next >= len(self._body)

    def _frames(
        self,
        write: Callable[[bytes | memoryview], object],
        start: int,
        full: Callable[[], bool] | None,
    ) -> int:
        body, chunk, channel, pack = self._body, self._chunk, self._channel, _FRAME_HEADER.pack
        end = len(body)
        lead = self._head if start == 0 else b""
        while True:
            piece = body[start : start + chunk]
            write(lead + pack(BODY_FRAME, channel, len(piece)))
            write(piece)
            start += chunk
            if start >= end or (full is not None and full()):
                write(FRAME_END)
                return min(start, end)
            lead = FRAME_END  # the end octet joined to the next frame's header: one write


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    encoded: EncodedProperties,
    body: bytes,
    frame_max: int,
) -> bytes:
    """Basic.Publish, its content header and body frame(s), as one byte string."""
    out = publish_write(channel, exchange, routing_key, mandatory, encoded, body, frame_max)
    return out if type(out) is bytes else bytes(out)


def publish_write(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    encoded: EncodedProperties,
    body: bytes,
    frame_max: int,
) -> bytes | Chunked:
    """Basic.Publish, its content header and body frame(s), as one byte string; a body over
    `LARGE_BODY` as `Chunked` parts that refer to the body instead (`bytes()` joins them).

    The destination and properties must have been validated (`check_destination`,
    `encode_properties`): this only packs them.
    """
    flags, properties = encoded
    body_size = len(body)
    head = CONTENT_HEADER.pack(
        HEADER_FRAME, channel, 14 + len(properties), BASIC_CLASS, 0, body_size, flags
    )
    chunk = frame_max - 8
    method = method_frame(channel, exchange, routing_key, mandatory)
    if 0 < body_size <= chunk and body_size <= LARGE_BODY:  # the usual message: one join
        body_head = BODY_FRAME_AFTER.pack(FRAME_END_OCTET, BODY_FRAME, channel, body_size)
        return b"".join((method, head, properties, body_head, body, FRAME_END))
    header = head + properties + FRAME_END
    if body_size > LARGE_BODY:
        return Chunked(method + header, channel, memoryview(body), chunk)
    out = [method, header]
    for start in range(0, body_size, chunk):
        piece = body[start : start + chunk]
        out.append(_FRAME_HEADER.pack(BODY_FRAME, channel, len(piece)))
        out.append(piece)
        out.append(FRAME_END)
    return b"".join(out)


def ack_frame(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    """Basic.Ack."""
    return (
        _ACK.pack(METHOD_FRAME, channel, _ACK_SIZE, BASIC_CLASS, 80, delivery_tag, multiple)
        + FRAME_END
    )


def nack_frame(channel: int, delivery_tag: int, requeue: bool) -> bytes:
    """Basic.Nack of one delivery."""
    bits = 2 if requeue else 0
    return (
        _ACK.pack(METHOD_FRAME, channel, _ACK_SIZE, BASIC_CLASS, 120, delivery_tag, bits)
        + FRAME_END
    )


def reject_frame(channel: int, delivery_tag: int, requeue: bool) -> bytes:
    """Basic.Reject of one delivery."""
    return (
        _ACK.pack(METHOD_FRAME, channel, _ACK_SIZE, BASIC_CLASS, 90, delivery_tag, requeue)
        + FRAME_END
    )
