"""RPC over RabbitMQ's direct reply-to: requests through the producer, replies without a queue.

The producer side is `RPCClient`; the worker side is `send_reply`, which answers a request
with the handler's return value or error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

from .._exceptions import (
    ConnectionLostError,
    PublishError,
    RPCError,
    RPCTimeoutError,
    SerializationError,
    WorkqError,
    qualname,
    text_of,
)
from .._wire.frames import Properties
from .confirms import ConfirmPublisher
from .message import REPLY_TO, new_message_id
from .serialization import decode_body, encode_body

__all__ = ("REPLY_TO", "RPCClient", "send_reply")

_ERROR_TEXT_LIMIT = 1000

log = logging.getLogger("aio_workq")


class RPCClient:
    """Waits for replies on the pseudo-queue `amq.rabbitmq.reply-to` of the producer's channel.

    Direct reply-to needs the request to be published on the channel that consumes the replies,
    so the client shares the producer's channel, and consumes again when it reopens. Calls that
    were waiting when the channel closed fail: their replies can no longer arrive.
    """

    def __init__(self, publisher: ConfirmPublisher) -> None:
        self._publisher = publisher
        self._calls: dict[str, asyncio.Future[Any]] = {}
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()
        publisher.add_channel_listener(self._consume)

    async def ready(self) -> None:
        """Consume replies on the publisher's current channel (once per channel)."""
        channel = self._publisher.channel
        if channel is None or channel is self._channel:
            return  # reopening: the listener consumes on the next channel
        await self._consume(channel)

    async def _consume(self, channel: aiormq.abc.AbstractChannel) -> None:
        async with self._lock:
            if channel is self._channel or channel.is_closed:
                return
            await channel.basic_consume(REPLY_TO, self._on_reply, no_ack=True)
            channel.closing.add_done_callback(self._on_closed)
            self._channel = channel

    async def call(
        self, publish: Callable[[str], Awaitable[object]], target: str | None, timeout: float
    ) -> Any:
        """`publish(correlation_id)` a request, then wait for its reply: all within `timeout`.

        Raises:
            RPCError: the remote handler raised.
            RPCTimeoutError: no reply within `timeout` seconds.
            PublishError: the request was not confirmed.
        """
        try:
            async with asyncio.timeout(timeout):
                await self.ready()
                correlation_id, reply = self.expect()
                try:
                    await publish(correlation_id)
                    return await reply
                finally:
                    reply.cancel()
        except TimeoutError as exc:
            if isinstance(exc, PublishError):
                raise
            raise RPCTimeoutError(
                f"no reply within {timeout:g} s to the call on {target!r}: is a worker consuming "
                "that queue?"
            ) from None

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
        """Fail the calls still waiting (a typed error: cancelling their futures would look,
        to each caller, like its own task being cancelled)."""
        for correlation_id, future in list(self._calls.items()):
            if not future.done():
                future.set_exception(
                    ConnectionLostError(
                        f"call {correlation_id}: the producer was closed before the reply "
                        "arrived; the request may or may not have run",
                        message_id=correlation_id,
                    )
                )


async def send_reply(
    publisher: ConfirmPublisher,
    reply_to: str,
    correlation_id: str | None,
    result: Any,
    error: BaseException | None,
) -> None:
    """Answer an RPC request with the handler's `result`, or its `error`.

    The caller may be gone: the reply is not mandatory, and a lost reply is the caller's
    timeout; failures are logged, not raised.
    """
    if error is None:
        try:
            body, content_type = encode_body(result)
        except WorkqError as exc:
            error = exc
    headers: dict[str, Any] = {"x-workq-status": "ok"}
    if error is not None:
        headers = {"x-workq-status": "error", "x-workq-exception-type": qualname(error)}
        body, content_type = text_of(error)[:_ERROR_TEXT_LIMIT].encode(), "text/plain"
    props = Properties(
        message_id=new_message_id(),
        content_type=content_type,
        headers=headers,
        delivery_mode=1,
        correlation_id=correlation_id,
    )
    try:
        await publisher.send("", reply_to, body, props, mandatory=False)
    except SerializationError as exc:
        if error is None:
            # The result encoded but was refused before anything was sent (over the broker's
            # max_message_size, a header over frame_max): the caller gets that error rather
            # than its timeout (the error reply is small text).
            await send_reply(publisher, reply_to, correlation_id, None, exc)
            return
        log.warning("could not send the RPC reply to %s: %s", reply_to, exc)
    except WorkqError as exc:
        log.warning("could not send the RPC reply to %s: %s", reply_to, exc)
