"""Count, read, replay and purge a queue's dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

from .._exceptions import (
    BrokerConnectionError,
    ConfigurationError,
    PublishError,
    PublishNackedError,
    UnroutableError,
)
from .._link.connection import LinkSource, translate_errors
from .._link.declare import raw_channel
from .._link.specs import Queue
from .job import ATTEMPT_HEADER, BROKER_HEADERS

__all__ = ("DeadLetter", "DeadLetters", "replay_headers")

_BATCH = 100


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message in a dead-letter queue, with why it got there."""

    body: bytes
    message_id: str | None
    headers: Mapping[str, Any]
    content_type: str | None

    @property
    def reason(self) -> str:
        """`type: message` of the exception, or the broker's reason (e.g. `delivery_limit`)."""
        exc_type = self.headers.get("x-workq-exception-type")
        if exc_type:
            return f"{exc_type}: {self.headers.get('x-workq-exception-message', '')}"
        deaths = self.headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
            return str(deaths[0].get("reason", "dead-lettered by the broker"))
        return "unknown"

    @property
    def exception_type(self) -> str | None:
        """The qualified name of the exception that dead-lettered it (`None` when the broker
        did, e.g. at the delivery limit)."""
        value = self.headers.get("x-workq-exception-type")
        return str(value) if value else None

    @property
    def attempts(self) -> int | None:
        """How many attempts the worker made, when it dead-lettered the message itself."""
        value = self.headers.get("x-workq-attempts")
        return value if isinstance(value, int) else None


class DeadLetters:
    """The dead-letter queue of a work queue: count, read, replay, purge.

    Moves are safe: `replay()` publishes each message back to the work queue and acks it in the
    dead-letter queue only once the broker has confirmed the copy. Killed half-way, it leaves
    every message in one of the two queues (a message can be in both: at-least-once).
    """

    def __init__(self, source: LinkSource, queue: Queue, *, timeout: float = 30.0) -> None:
        if queue.server_named or not queue.dead_letter:
            raise ConfigurationError(f"queue {queue.name!r} has no dead-letter queue")
        self._source = source
        self._queue = queue
        self._timeout = timeout

    @asynccontextmanager
    async def _channel(
        self, doing: str, *, confirms: bool = False
    ) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        """A channel for one operation, which must finish within the timeout (per batch for
        `replay`)."""
        try:
            async with raw_channel(
                self._source, publisher_confirms=confirms, timeout=self._timeout
            ) as channel:
                yield channel
        except TimeoutError:
            raise BrokerConnectionError(
                f"{doing} {self.name!r}: the broker did not answer within {self._timeout:g} s"
            ) from None

    @property
    def name(self) -> str:
        """The dead-letter queue's name."""
        return self._queue.dead_letter_queue

    async def count(self) -> int:
        """Messages waiting in the dead-letter queue."""
        async with self._channel("counting dead letters in") as channel:
            with translate_errors(f"counting dead letters in {self.name!r}"):
                async with asyncio.timeout(self._timeout):
                    ok = await channel.queue_declare(self.name, passive=True)
        return int(ok.message_count or 0)

    async def read(self, limit: int = 10) -> list[DeadLetter]:
        """Up to `limit` dead letters, oldest first, left in the queue."""
        async with self._channel("reading dead letters from") as channel:
            async with asyncio.timeout(self._timeout):
                batch = await self._get_batch(channel, limit)
        return [_letter(message) for message in batch]  # unacked: the broker puts them back

    async def replay(self, limit: int | None = None) -> int:
        """Move dead letters back to the work queue with attempts reset; returns how many."""
        moved = 0
        async with self._channel("replaying", confirms=True) as channel:
            while limit is None or moved < limit:
                async with asyncio.timeout(self._timeout):
                    batch = await self._get_batch(
                        channel, _BATCH if limit is None else min(_BATCH, limit - moved)
                    )
                    if not batch:
                        break
                    await asyncio.gather(*(self._publish_back(channel, m) for m in batch))
                    last = batch[-1].delivery_tag
                    assert last is not None
                    await channel.basic_ack(last, multiple=True)
                moved += len(batch)
        return moved

    async def purge(self) -> int:
        """Delete every dead letter; returns how many."""
        async with self._channel("purging") as channel:
            with translate_errors(f"purging {self.name!r}"):
                async with asyncio.timeout(self._timeout):
                    ok = await channel.queue_purge(self.name)
        return int(ok.message_count or 0)

    async def _get_batch(
        self, channel: aiormq.abc.AbstractChannel, size: int
    ) -> list[DeliveredMessage]:
        batch: list[DeliveredMessage] = []
        with translate_errors(f"reading dead letters from {self.name!r}"):
            while len(batch) < size:
                message = await channel.basic_get(self.name, no_ack=False)
                if message.delivery_tag is None:
                    break
                batch.append(message)
        return batch

    async def _publish_back(
        self, channel: aiormq.abc.AbstractChannel, message: DeliveredMessage
    ) -> None:
        props = message.header.properties
        props.headers = replay_headers(props.headers or {})
        props.delivery_mode = 2
        try:
            with translate_errors(f"replaying into {self._queue.name!r}"):
                confirm = await channel.basic_publish(
                    message.body, exchange="", routing_key=self._queue.name,
                    properties=props, mandatory=True,
                )  # fmt: skip
        except aiormq.exceptions.PublishError as exc:
            raise UnroutableError(
                f"replaying {props.message_id}: the work queue {self._queue.name!r} does not "
                "exist; declare it first. The message stays in the dead-letter queue",
                message_id=props.message_id, routing_key=self._queue.name,
            ) from exc  # fmt: skip
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishNackedError(
                f"replaying {props.message_id} into {self._queue.name!r} failed: {exc}; it stays "
                "in the dead-letter queue",
                message_id=props.message_id, routing_key=self._queue.name,
            ) from exc  # fmt: skip
        if not isinstance(confirm, aiormq.spec.Basic.Ack):
            raise PublishError(
                f"replaying {props.message_id} into {self._queue.name!r} was not confirmed; it "
                "stays in the dead-letter queue",
                message_id=props.message_id, routing_key=self._queue.name,
            )  # fmt: skip


def replay_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of a replayed copy: the failure's and the broker's removed, attempt 1."""
    kept = {
        key: value
        for key, value in headers.items()
        if not key.startswith("x-workq-") and key not in BROKER_HEADERS
    }
    kept[ATTEMPT_HEADER] = 1
    return kept


def _letter(message: DeliveredMessage) -> DeadLetter:
    props = message.header.properties
    return DeadLetter(
        body=message.body,
        message_id=props.message_id,
        headers=dict(props.headers or {}),
        content_type=props.content_type,
    )
