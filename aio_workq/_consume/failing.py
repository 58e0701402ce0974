"""What a worker does with a delivery whose handler failed (`Dispatcher`'s failure path).

An RPC request's caller gets the error (no retry: it would answer a caller that gave up). Any
other message is routed (`route_failure`: a retry, a deferral, the dead-letter queue, or a drop
when the queue has none), the move carried out by the `Mover` (a copy published and confirmed
before the original is acked), and the delivery settled; a move that fails returns the message
to the queue. Each failed attempt is one WARNING (with its traceback when DEBUG is on).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from .._exceptions import SerializationError, WorkqError, text_of
from .._hooks import Outcome, Settled
from .._link.specs import Queue
from .._publish.confirms import ConfirmPublisher
from .._publish.rpc import send_reply
from .._wire.acker import Acker
from .execution import HandlerRunner
from .failures import Failed, Move, MoveKind, route_failure
from .job import Job
from .mover import Mover
from .retry import RetryPolicy

__all__ = ("Counters", "FailedDeliveries", "log_fields")

log = logging.getLogger("aio_workq")


class Counters:
    """What a worker did since it started."""

    __slots__ = ("dead_lettered", "deferred", "deliveries", "failed", "processed", "retried")

    def __init__(self) -> None:
        self.deliveries = 0
        self.processed = 0
        self.failed = 0
        self.retried = 0
        self.deferred = 0
        self.dead_lettered = 0


class FailedDeliveries:
    """Settles the deliveries of one worker whose handler failed.

    Args:
        runner: the worker's handler (how the logs name it).
        policy: the worker's retry policy (None: no retries).
        queue: the worker's queue.
        publisher: answers RPC callers.
        mover: carries out the moves.
        counters: the worker's counters (failed, retried, deferred, dead-lettered).
        max_defers: most deferrals of one message (None: no limit).
    """

    def __init__(
        self,
        *,
        runner: HandlerRunner,
        policy: RetryPolicy | None,
        queue: Queue,
        publisher: ConfirmPublisher,
        mover: Mover,
        counters: Counters,
        max_defers: int | None,
    ) -> None:
        self._runner = runner
        self._policy = policy
        self._queue = queue
        self._queue_name = queue.name  # the broker's name, for a server-named queue
        self._publisher = publisher
        self._mover = mover
        self._counters = counters
        self._max_defers = max_defers

    def declared(self, name: str) -> None:
        """The queue as declared: a server-named queue's lines name what the broker called it
        (`amq.gen-...`, a new one after each reconnect), not `''`."""
        self._queue_name = name

    async def settle(self, job: Job, acker: Acker, tag: int, exc: BaseException) -> Settled:
        """Answer, move or drop the delivery `tag` whose handler raised `exc`; its outcome."""
        counters = self._counters
        counters.failed += 1
        queue_name = self._queue_name
        if job.reply_to:
            # An RPC caller gets the error; retrying would answer a caller that gave up.
            self._log_attempt(job, exc, "the caller gets the error")
            await send_reply(self._publisher, job.reply_to, job.correlation_id, None, exc)
            acker.ack(tag)
            return Outcome.FAILED, exc, None
        if acker.gone:
            # The channel it came on is gone (e.g. the connection, while a forward waited for
            # its confirm): the broker gives the message back. A retry copy now would run it
            # once more beside that redelivery.
            self._log_attempt(job, exc, "its channel closed: the broker redelivers it")
            return Outcome.REQUEUED, exc, None
        failed = Failed(job.attempt, job.headers, self._queue.name)
        move = route_failure(
            failed, exc, self._policy, self._queue,
            now=datetime.now(UTC), max_defers=self._max_defers,
        )  # fmt: skip
        if move.kind is MoveKind.DROP:
            log.error(
                "dropping message %s from %r after %d attempt(s): %s (the queue has no "
                "dead-letter queue)", job.message_id, queue_name, job.attempt,
                text_of(exc, as_repr=True),
                extra=log_fields(queue_name, job),
            )  # fmt: skip
            acker.nack(tag, requeue=False)
            return Outcome.REJECTED, exc, None
        self._log_attempt(job, exc, _plan(move))
        try:
            await self._mover.move(job, move)
        except SerializationError as error:
            return self._cannot_copy(job, acker, tag, exc, move.target, error)
        except WorkqError as error:
            log.error(
                "could not move failed message %s to %r (%s); returning it to the queue",
                job.message_id, move.target, error, extra=log_fields(queue_name, job),
            )  # fmt: skip
            acker.nack(tag, requeue=True)
            return Outcome.REQUEUED, exc, None
        acker.ack(tag)
        if move.kind is MoveKind.DEAD_LETTER:
            counters.dead_lettered += 1
            return Outcome.DEAD_LETTERED, exc, None
        wait_ms = move.expiration_ms or move.delay_ms
        delay = 0.0 if wait_ms is None else wait_ms / 1000
        if move.kind is MoveKind.DEFER:
            counters.deferred += 1
            return Outcome.DEFERRED, exc, delay
        counters.retried += 1
        return Outcome.RETRY, exc, delay

    def _cannot_copy(
        self, job: Job, acker: Acker, tag: int, exc: BaseException, target: str, error: Exception
    ) -> Settled:
        """The copy can never be sent (e.g. its headers outgrow `frame_max`): back in its queue,
        the message would run again at once, forever on a classic queue. The broker
        dead-letters it instead, by the queue's own `x-dead-letter-*` arguments (with its
        `x-death` reason "rejected", without the `x-workq-*` failure headers)."""
        queue = self._queue
        then = (
            f"rejecting it: the broker dead-letters it to {queue.dead_letter_queue!r}"
            if queue.dead_letter
            else "dropping it (the queue has no dead-letter queue)"
        )
        log.error(
            "could not move failed message %s to %r (%s); %s", job.message_id, target, error,
            then, extra=log_fields(self._queue_name, job),
        )  # fmt: skip
        acker.nack(tag, requeue=False)
        if queue.dead_letter:
            self._counters.dead_lettered += 1
            return Outcome.DEAD_LETTERED, exc, None
        return Outcome.REJECTED, exc, None

    def _log_attempt(self, job: Job, exc: BaseException, then: str) -> None:
        """One WARNING per failed attempt; the traceback too when DEBUG is on."""
        attempts = self._policy.max_attempts if self._policy else 1
        log.warning(
            "%s failed on message %s from %r (attempt %d of %d): %s; %s",
            self._runner.name_for(job), job.message_id, self._queue_name, job.attempt, attempts,
            text_of(exc, as_repr=True), then,
            extra=log_fields(self._queue_name, job),
            exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
        )  # fmt: skip


def _plan(move: Move) -> str:
    if move.kind is MoveKind.DEAD_LETTER:
        return f"dead-lettering it to {move.target!r}"
    if move.delay_ms is None:
        return "retrying it now"
    what = "deferring it" if move.kind is MoveKind.DEFER else "retrying it"
    return f"{what} in {(move.expiration_ms or move.delay_ms) / 1000:g} s"


def log_fields(queue: str, job: Job) -> dict[str, Any]:
    """`extra=` fields of every log line about a message."""
    return {"queue": queue, "message_id": job.message_id, "attempt": job.attempt}
