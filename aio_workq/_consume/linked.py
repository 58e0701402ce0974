"""The deliveries whose ack waits only for the confirm of the one message their handler sent
and did not await (the usual chain step, #22), kept without a task.

Their handler returned and their task ended; the confirm's record settles the delivery as
the publisher settles the record (`Outgoing.then`), in the step that handles the confirm
frame: no wake-up of a task for it. Confirmed: acked. Failed, or cancelled by its owner: the
failure path of a handler that failed (`FailedDeliveries`, in a task of its own, since a move
is awaited). A worker that stops waits for them within its timeout (`Dispatcher.drain`), then
sends what is left back to the queue and disarms its records, so that a confirm after that
never settles a delivery twice.
"""

from __future__ import annotations

import asyncio
import logging

from .._hooks import Hooks, Outcome, Settled
from .._logs import set_handling
from .._wire.acker import Acker
from .._wire.tracker import Outgoing, Then
from .failing import Counters, FailedDeliveries, log_fields
from .job import Job

__all__ = ("Linked",)

log = logging.getLogger("aio_workq")
_ACKED: Settled = (Outcome.OK, None, None)


class Linked:
    """A dispatcher's deliveries that wait for their one forward's confirm, without a task.

    A delivery is added by setting `pending[record] = (job, acker, tag)` and `record.then =
    then` together (the dispatcher does, inline); only this class takes it out again.

    Args:
        loop: the dispatcher's event loop.
        hooks: the worker's hooks (their `end` may run outside the task: `Hooks.anywhere`).
        counters: the worker's counters.
        failed: settles a delivery whose confirm failed.
        tasks: the dispatcher's tasks, which its stop waits for (the failure path's join).
        queue_name: how hooks and logs name the queue.
        task_name: the name of a failure path's task.
    """

    __slots__ = ("_counters", "_empty", "_failed", "_hooks", "_loop", "_queue_name",
                 "_task_name", "_tasks", "pending", "then")  # fmt: skip

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        hooks: Hooks | None,
        counters: Counters,
        failed: FailedDeliveries,
        tasks: set[asyncio.Task[None]],
        queue_name: str,
        task_name: str,
    ) -> None:
        self._loop = loop
        self._hooks = hooks
        self._counters = counters
        self._failed = failed
        self._tasks = tasks
        self._queue_name = queue_name
        self._task_name = task_name
        self.pending: dict[Outgoing, tuple[Job, Acker, int]] = {}
        """Each record waited for, and its delivery: the job, its acker and tag."""
        self.then: Then = self._settled  # bound once: no method object per delivery
        self._empty: asyncio.Future[None] | None = None  # `emptied()`'s, while awaited

    def _settled(self, out: Outgoing, error: BaseException | None) -> None:
        """`out.then`: the record was settled (`error` None: confirmed). Never raises: it
        runs in the publisher's settlement of a confirm frame's records."""
        pending = self.pending
        job, acker, tag = pending[out]  # there: `then` is set with the entry, unset without
        del pending[out]
        try:
            if error is None:
                acker.ack(tag)  # on a closed channel's acker, nothing: the broker redelivers
                self._counters.processed += 1
                hooks = self._hooks
                if hooks is not None:
                    hooks.end(job, self._queue_name, None, _ACKED, None)
            else:
                confirm: asyncio.Future[str] = out.future  # type: ignore[assignment]
                if not confirm.cancelled():
                    confirm.exception()  # observed: the delivery's failure (as an await is)
                task = self._loop.create_task(
                    self._fail(job, acker, tag, error), name=self._task_name
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception as exc:  # (defensive: each hook is guarded, the acker does not raise)
            acker.nack(tag, requeue=True)
            log.error(
                "worker %r failed to settle message %s; it goes back to the queue: %r",
                self._queue_name, job.message_id, exc,
                extra=log_fields(self._queue_name, job), exc_info=exc,
            )  # fmt: skip
        if not pending and self._empty is not None:
            self._empty.set_result(None)
            self._empty = None

    async def _fail(self, job: Job, acker: Acker, tag: int, error: BaseException) -> None:
        """The failure path of a delivery whose confirm failed, as `Dispatcher._process`
        takes it for one whose handler failed."""
        set_handling((self._queue_name, job))  # log lines in this task name the message
        hooks = self._hooks
        try:
            try:
                settled = await self._failed.settle(job, acker, tag, error)
            except BaseException as exc:
                if hooks is not None:
                    hooks.end(job, self._queue_name, None, None, exc)
                raise
            if hooks is not None:
                hooks.end(job, self._queue_name, None, settled, None)
        except BaseException as exc:
            acker.nack(tag, requeue=True)  # not settled: back to the queue
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.error(
                "worker %r failed to settle message %s; it goes back to the queue: %r",
                self._queue_name, job.message_id, exc,
                extra=log_fields(self._queue_name, job), exc_info=exc,
            )  # fmt: skip

    def emptied(self) -> asyncio.Future[None]:
        """A future resolved once no delivery waits for its confirm (at once if none does)."""
        empty = self._empty
        if empty is None:
            empty = self._loop.create_future()
            if self.pending:
                self._empty = empty
            else:
                empty.set_result(None)
        return empty

    def requeue(self) -> None:
        """The worker's stop ran out of time: each delivery still waiting for its confirm
        goes back to the queue and its record is disarmed (a confirm after this settles
        nothing here); its hooks are told as for a task the stop cancelled in that wait."""
        pending, self.pending = self.pending, {}
        hooks = self._hooks
        for out, (job, acker, tag) in pending.items():
            out.then = None
            # As the stop's cancel of a task waiting for it cancelled it: its owner sees it
            # cancelled, and the record's later failure is no exception nobody retrieved.
            out.future.cancel()  # type: ignore[union-attr]
            acker.nack(tag, requeue=True)
            if hooks is not None:
                hooks.end(job, self._queue_name, None, None, asyncio.CancelledError())
        empty, self._empty = self._empty, None
        if empty is not None:
            empty.set_result(None)
