"""The consuming layer's view of one delivered message: its fields as the broker sent them, and
its properties decoded on first use.

The wire layer hands a delivery's fields to a callback (`FrameDemux`) or aiormq hands a
`DeliveredMessage` (the plain path); either way the worker sees a `Delivery`, a type of this layer,
so a change to how frames are read never reaches the worker's code.
"""

from __future__ import annotations

import struct

from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands
from pamqp.header import ContentHeader

from .._wire.frames import decode_header

__all__ = ("HEADERS_FLAG", "REPLY_TO_FLAG", "REPLY_TO_BYTE", "Delivery", "header_flag")

_FLAGS = struct.Struct(">H")
REPLY_TO_FLAG = 1 << 9
HEADERS_FLAG = 1 << 13
REPLY_TO_BYTE = REPLY_TO_FLAG >> 8  # the flag in the flags' first octet (offset 12)


def header_flag(header: bytes | ContentHeader, flag: int) -> bool | None:
    """Whether a content header's property `flag` is set, read off its flags without decoding
    it; None for a header decoded already (read its properties)."""
    if isinstance(header, bytes):
        return bool(_FLAGS.unpack_from(header, 12)[0] & flag)
    return None


class Delivery:
    """One message delivered to a consumer, with its properties decoded on first use."""

    __slots__ = (
        "_header",
        "body",
        "channel",
        "consumer_tag",
        "delivery_tag",
        "exchange",
        "is_request",
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
        self.body = body
        # An RPC request (it has a `reply_to`): read off the property flags here, one byte,
        # where the `reply_to` property costs the dispatcher a call per delivery.
        self.is_request: bool = (
            header[12] & REPLY_TO_BYTE != 0
            if isinstance(header, bytes)
            else header.properties.reply_to is not None
        )

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
            self._header = header = decode_header(header)
        return header

    @property
    def properties(self) -> commands.Basic.Properties:
        return self.header.properties

    @property
    def reply_to(self) -> str | None:
        """`properties.reply_to`, without decoding the properties when the flag is not set."""
        header = self._header
        if isinstance(header, bytes):
            if not _FLAGS.unpack_from(header, 12)[0] & REPLY_TO_FLAG:
                return None
            header = self.header
        return header.properties.reply_to

    @property
    def has_headers(self) -> bool:
        """Whether the message carries a headers table, without decoding the properties when
        the flag is not set (a message with none: `Job.headers` and `attempt` cost nothing)."""
        header = self._header
        if isinstance(header, bytes):
            return bool(_FLAGS.unpack_from(header, 12)[0] & HEADERS_FLAG)
        return bool(header.properties.headers)

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
