"""AMQP 0-9-1 frames for the hot paths, marshalled with `struct` instead of pamqp objects.

A confirmed publish is three frames (Basic.Publish, content header, body); building them through
pamqp's frame classes costs more than the rest of the publish. Here the method frame for an
(exchange, routing key) pair is built once and cached, the content header is packed directly,
and acks are 21 bytes. `tests/test_wire.py` checks every encoder against pamqp byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from pamqp.encode import field_table

__all__ = ("Properties", "ack_frame", "nack_frame", "publish_frames", "reject_frame")

FRAME_END = b"\xce"
_FRAME_HEADER = struct.Struct(">BHI")
_HEADER_PREFIX = struct.Struct(">BHIHHQH")  # frame type, channel, size | class, weight, size, flags
_ACK = struct.Struct(">BHIHHQB")  # frame type, channel, size | class, method, tag, bits
_ACK_SIZE = 13  # class + method + delivery tag + bits

_BASIC = 60
_METHOD, _HEADER, _BODY = 1, 2, 3

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


def _shortstr(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(data),)) + data


@lru_cache(maxsize=1024)
def _method_payload(exchange: str, routing_key: str, mandatory: bool) -> bytes:
    return (
        struct.pack(">HHH", _BASIC, 40, 0)
        + _shortstr(exchange)
        + _shortstr(routing_key)
        + bytes((1 if mandatory else 0,))
    )


@lru_cache(maxsize=1024)
def _method_frame(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    payload = _method_payload(exchange, routing_key, mandatory)
    return _FRAME_HEADER.pack(_METHOD, channel, len(payload)) + payload + FRAME_END


def _properties(props: Properties) -> tuple[int, bytes]:
    flags = 0
    parts: list[bytes] = []
    if props.content_type is not None:
        flags |= _CONTENT_TYPE
        parts.append(_shortstr(props.content_type))
    if props.headers:
        flags |= _HEADERS
        parts.append(field_table(dict(props.headers)))
    if props.delivery_mode is not None:
        flags |= _DELIVERY_MODE
        parts.append(bytes((props.delivery_mode,)))
    if props.priority is not None:
        flags |= _PRIORITY
        parts.append(bytes((props.priority,)))
    if props.correlation_id is not None:
        flags |= _CORRELATION_ID
        parts.append(_shortstr(props.correlation_id))
    if props.reply_to is not None:
        flags |= _REPLY_TO
        parts.append(_shortstr(props.reply_to))
    if props.expiration is not None:
        flags |= _EXPIRATION
        parts.append(_shortstr(props.expiration))
    flags |= _MESSAGE_ID
    parts.append(_shortstr(props.message_id))
    if props.timestamp is not None:
        flags |= _TIMESTAMP
        parts.append(struct.pack(">Q", props.timestamp))
    if props.type is not None:
        flags |= _TYPE
        parts.append(_shortstr(props.type))
    return flags, b"".join(parts)


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    props: Properties,
    body: bytes,
    frame_max: int,
) -> bytes:
    """Basic.Publish, its content header and body frame(s), as one byte string."""
    flags, encoded = _properties(props)
    body_size = len(body)
    header = (
        _HEADER_PREFIX.pack(_HEADER, channel, 14 + len(encoded), _BASIC, 0, body_size, flags)
        + encoded
        + FRAME_END
    )
    out = [_method_frame(channel, exchange, routing_key, mandatory), header]
    chunk = frame_max - 8
    for start in range(0, body_size, chunk):
        piece = body[start : start + chunk]
        out.append(_FRAME_HEADER.pack(_BODY, channel, len(piece)))
        out.append(piece)
        out.append(FRAME_END)
    return b"".join(out)


def ack_frame(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    """Basic.Ack."""
    return _ACK.pack(_METHOD, channel, _ACK_SIZE, _BASIC, 80, delivery_tag, multiple) + FRAME_END


def nack_frame(channel: int, delivery_tag: int, requeue: bool) -> bytes:
    """Basic.Nack of one delivery."""
    bits = 2 if requeue else 0
    return _ACK.pack(_METHOD, channel, _ACK_SIZE, _BASIC, 120, delivery_tag, bits) + FRAME_END


def reject_frame(channel: int, delivery_tag: int, requeue: bool) -> bytes:
    """Basic.Reject of one delivery."""
    return _ACK.pack(_METHOD, channel, _ACK_SIZE, _BASIC, 90, delivery_tag, requeue) + FRAME_END
