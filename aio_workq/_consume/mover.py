"""Carrying out a failure's `Move`: publish a copy, wait for its confirm, then ack the original.

A crash at any point leaves the message on the broker (possibly twice, never zero times).
"""

from __future__ import annotations

from .._link.router import Router
from .._link.specs import Queue
from .._publish.confirms import ConfirmPublisher
from .._publish.message import new_message_id
from .._wire.frames import Properties
from .failures import Move
from .job import Job

__all__ = ("Mover",)


class Mover:
    """Publishes the copies of failed messages into delay and dead-letter queues."""

    def __init__(self, publisher: ConfirmPublisher, router: Router, queue: Queue) -> None:
        self._publisher = publisher
        self._router = router
        self._queue = queue
        self._levels: set[int] = set()

    def declared(self, levels: tuple[int, ...]) -> None:
        """The delay queues of these levels exist (the worker declared them at start)."""
        self._levels.update(levels)

    async def move(self, job: Job, move: Move) -> None:
        """Publish the copy `move` asks for and wait for its confirm.

        Raises:
            WorkqError: the copy was not confirmed (the caller returns the original to its
                queue instead).
        """
        level = move.delay_ms
        if level is not None and level not in self._levels:
            await self._router.declare(self._queue, delays_ms=(level,))
            self._levels.add(level)
        original = job.delivery.properties
        props = Properties(
            message_id=original.message_id or new_message_id(),
            content_type=original.content_type,
            headers=move.headers,
            priority=original.priority,
            correlation_id=original.correlation_id,
            reply_to=original.reply_to,
            expiration=None if move.expiration_ms is None else str(move.expiration_ms),
            timestamp=int(original.timestamp.timestamp()) if original.timestamp else None,
            type=original.message_type,
        )
        confirm = await self._publisher.send("", move.target, job.body, props, mandatory=True)
        await confirm
