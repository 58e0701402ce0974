"""Publishing claimed outbox rows: every send first (pipelined), then every confirm."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from .. import Producer, Queue, WorkqError
from .._publish.message import settle_in_order

__all__ = ("RowPublisher",)


def _observe(future: asyncio.Future[str]) -> None:
    if not future.cancelled():
        future.exception()


class RowPublisher:
    """Publishes outbox rows through a started `Producer`, with each row's message id.

    Args:
        producer: the producer to send through (its lifecycle is the caller's).
        queues: `Queue` specs by name, declared instead of a row's bare queue name.
    """

    def __init__(self, producer: Producer, queues: Mapping[str, Queue]) -> None:
        self._producer = producer
        self._queues = dict(queues)

    async def publish(self, rows: Sequence[tuple[Any, ...]]) -> list[str | BaseException]:
        """Send every row, then wait for every confirm; returns each row's outcome in order:
        the confirmed message id, or the error (the send's `WorkqError` or the confirm's)."""
        sent: list[asyncio.Future[str] | WorkqError] = []
        for row in rows:
            try:
                confirm = await self._send(row)
            except WorkqError as exc:
                sent.append(exc)
            else:
                # Observed even if the batch is abandoned (stop, a database error).
                confirm.add_done_callback(_observe)
                sent.append(confirm)
        return await settle_in_order(sent)

    async def _send(self, row: tuple[Any, ...]) -> asyncio.Future[str]:
        _, message_id, queue, exchange, routing_key, body, content_type, headers = row
        return await self._producer.send(
            body,
            self._queues.get(queue, queue) if queue is not None else None,
            exchange=exchange,
            routing_key=routing_key or None,
            headers=headers,
            message_id=message_id,
            content_type=content_type,
        )
