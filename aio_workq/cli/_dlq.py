"""Dead letters for `aio-workq dlq`: list, show, replay with a filter, purge.

Unfiltered replays go through `Producer.dead_letters(queue).replay()`. A filtered replay (only
the dead letters of one exception type) has no library call yet, so it is done here, with the
same rule: each copy is confirmed by the broker before its dead letter is acked; dead letters
that don't match stay unacked until the end and then go back to the dead-letter queue in order.
Interrupted at any point, every message is in one of the two queues (possibly both).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from aio_workq import (
    BrokerConnectionError,
    DeadLetter,
    PublishError,
    PublishNackedError,
    UnroutableError,
    redact_url,
)

from .._consume.dead_letters import replay_headers
from ._errors import CliError

__all__ = (
    "DeadLetterFilter",
    "letter_json",
    "replay_matching",
    "scan",
)


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters a command applies to (`None` fields match everything).

    Args:
        exception: the exception class, by qualified (`app.errors.Timeout`) or bare name.
        message_id: one message id.
    """

    exception: str | None = None
    message_id: str | None = None

    @property
    def empty(self) -> bool:
        """True when it matches every dead letter."""
        return self.exception is None and self.message_id is None

    def __call__(self, letter: DeadLetter) -> bool:
        if self.message_id is not None and letter.message_id != self.message_id:
            return False
        if self.exception is not None:
            kind = letter.exception_type or ""
            if self.exception not in (kind, kind.rsplit(".", 1)[-1]):
                return False
        return True


def letter_of(message: AbstractIncomingMessage) -> DeadLetter:
    """The library's view of a dead letter."""
    return DeadLetter(
        body=message.body,
        message_id=message.message_id,
        headers=dict(message.headers or {}),
        content_type=message.content_type,
    )


def letter_json(letter: DeadLetter) -> dict[str, Any]:
    """A JSON-able dict: the body as text when it is UTF-8, else base64."""
    try:
        body: str = letter.body.decode()
        encoding = "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(letter.body).decode(), "base64"
    return {
        "message_id": letter.message_id,
        "reason": letter.reason,
        "exception_type": letter.exception_type,
        "attempts": letter.attempts,
        "content_type": letter.content_type,
        "body": body,
        "body_encoding": encoding,
        "headers": json.loads(json.dumps(dict(letter.headers), default=_jsonable)),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


@asynccontextmanager
async def _channel(url: str, *, confirms: bool) -> AsyncIterator[AbstractChannel]:
    try:
        connection: AbstractConnection = await aio_pika.connect(url, timeout=10)
    except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
        raise BrokerConnectionError(
            f"cannot connect to {redact_url(url)}: {type(exc).__name__}: {exc}"
        ) from None
    async with connection:
        channel = await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
        yield channel  # closing it hands every unacked dead letter back to the queue


async def _passive(channel: AbstractChannel, name: str, what: str) -> aio_pika.abc.AbstractQueue:
    try:
        return await channel.declare_queue(name, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        raise CliError(f"{what} {name!r} does not exist") from None


async def scan(url: str, queue: str, match: Callable[[DeadLetter], bool]) -> list[DeadLetter]:
    """Every dead letter of `queue` that matches, oldest first, all left in place.

    Raises:
        CliError: the dead-letter queue does not exist.
        BrokerConnectionError: the broker cannot be reached.
    """
    found: list[DeadLetter] = []
    async with _channel(url, confirms=False) as channel:
        dlq = await _passive(channel, f"{queue}.dlq", "dead-letter queue")
        while (message := await dlq.get(no_ack=False, fail=False)) is not None:
            letter = letter_of(message)
            if match(letter):
                found.append(letter)
    return found


async def replay_matching(
    url: str,
    queue: str,
    match: Callable[[DeadLetter], bool],
    *,
    limit: int | None = None,
    rate: float | None = None,
    on_moved: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> tuple[int, int]:
    """Move matching dead letters back to `queue`; returns `(moved, left)`.

    Each copy (headers of the failure removed, attempt 1) is confirmed before its dead letter is
    acked. `rate` caps the messages moved per second; once `stop` is set, it returns after the
    message under way.

    Raises:
        CliError: the work or dead-letter queue does not exist.
        PublishError: a copy was not confirmed; it and the rest stay dead letters.
        BrokerConnectionError: the broker cannot be reached.
    """
    moved = left = 0
    async with _channel(url, confirms=True) as channel:
        await _passive(channel, queue, "work queue")
        dlq = await _passive(channel, f"{queue}.dlq", "dead-letter queue")
        while (limit is None or moved < limit) and not (stop is not None and stop.is_set()):
            message = await dlq.get(no_ack=False, fail=False)
            if message is None:
                break
            if not match(letter_of(message)):
                left += 1  # stays unacked until the channel closes: it goes back, in order
                continue
            await _publish_copy(channel, queue, message)
            await message.ack()
            moved += 1
            if on_moved is not None:
                on_moved(moved)
            if rate and stop is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1 / rate):
                        await stop.wait()
            elif rate:
                await asyncio.sleep(1 / rate)
    return moved, left


async def _publish_copy(
    channel: AbstractChannel, queue: str, message: AbstractIncomingMessage
) -> None:
    headers = replay_headers(message.headers or {})  # the library's rule for a replayed copy
    copy = aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )
    ident = message.message_id
    try:
        confirm = await channel.default_exchange.publish(copy, routing_key=queue, mandatory=True)
    except aio_pika.exceptions.DeliveryError as exc:
        if isinstance(exc, aiormq.exceptions.PublishError):
            raise UnroutableError(
                f"replaying {ident}: the work queue {queue!r} took no message; it stays a dead "
                "letter", message_id=ident, routing_key=queue,
            ) from None  # fmt: skip
        raise PublishNackedError(
            f"replaying {ident} into {queue!r}: the broker nacked it; it stays a dead letter",
            message_id=ident, routing_key=queue,
        ) from None  # fmt: skip
    if not isinstance(confirm, aiormq.spec.Basic.Ack):
        raise PublishError(
            f"replaying {ident} into {queue!r} was not confirmed; it stays a dead letter",
            message_id=ident, routing_key=queue,
        )  # fmt: skip
