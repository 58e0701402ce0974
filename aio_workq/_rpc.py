"""RPC over RabbitMQ's direct reply-to: requests through the producer, replies without a queue."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from ._confirms import new_message_id
from ._exceptions import ConnectionLostError, RPCError
from ._serialization import decode_body

__all__ = ("REPLY_TO", "RPCClient")

log = logging.getLogger("aio_workq")

REPLY_TO = "amq.rabbitmq.reply-to"


class RPCClient:
    """Waits for replies on the pseudo-queue `amq.rabbitmq.reply-to` of the producer's channel.

    Direct reply-to needs the request to be published on the channel that consumes the replies,
    so the client shares the producer's channel, and consumes again when it reopens. Calls that
    were waiting when the channel closed fail: their replies can no longer arrive.
    """

    def __init__(self, channel: AbstractRobustChannel) -> None:
        self._robust = channel
        self._calls: dict[str, asyncio.Future[Any]] = {}
        self._channel: aiormq.Channel | None = None
        self._lock = asyncio.Lock()

    async def ready(self) -> None:
        """Consume replies on the current channel (once per channel)."""
        async with self._lock:
            channel = cast(aiormq.Channel, await self._robust.get_underlay_channel())
            if channel is self._channel and not channel.is_closed:
                return
            await channel.basic_consume(REPLY_TO, self._on_reply, no_ack=True)
            channel.closing.add_done_callback(self._on_closed)
            self._channel = channel

    def expect(self) -> tuple[str, asyncio.Future[Any]]:
        """A fresh correlation id and the future its reply will settle."""
        correlation_id = new_message_id()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[correlation_id] = future
        future.add_done_callback(lambda _: self._calls.pop(correlation_id, None))
        return correlation_id, future

    async def _on_reply(self, message: DeliveredMessage) -> None:
        props = message.header.properties
        future = self._calls.get(props.correlation_id or "")
        if future is None or future.done():
            log.debug("reply for an unknown or finished call %s", props.correlation_id)
            return
        headers = props.headers or {}
        if headers.get("x-workq-status") == "error":
            future.set_exception(
                RPCError(
                    message.body.decode(errors="replace"),
                    remote_type=str(headers.get("x-workq-exception-type", "Exception")),
                )
            )
            return
        try:
            future.set_result(decode_body(message.body, props.content_type))
        except ValueError as exc:
            future.set_exception(RPCError(f"undecodable reply: {exc}", remote_type="ValueError"))

    def _on_closed(self, closing: asyncio.Future[Any]) -> None:
        self._channel = None
        for correlation_id, future in list(self._calls.items()):
            if not future.done():
                future.set_exception(
                    ConnectionLostError(
                        f"call {correlation_id}: the channel closed before the reply arrived; "
                        "the request may or may not have run",
                        message_id=correlation_id,
                    )
                )

    async def close(self) -> None:
        for future in self._calls.values():
            future.cancel()
