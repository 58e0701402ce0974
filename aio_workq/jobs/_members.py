"""The worker's side of groups: a member's terminal write before its ack, and the callback.

A group member's outcome is not left to the recorder's batched writes (which may still be in
memory when the process dies after the ack): the handler itself writes the terminal state and
counts the group down (`GroupStore.finish_member`, one transaction) before it returns, so the
message is acked only once that is committed. A failure is written as final when the worker's
failure routing will dead-letter it (the same `route_failure` decision, made in advance).
Whatever can't be finished now (the store down, the callback not confirmed) defers the member
(`Defer`: no attempt used): its next delivery finishes it. A callback too large to send (the
broker's `max_message_size`, or the publisher's own limit) is recorded `failed` instead, and
the member acked: no delivery could send it. The callback goes out through the registry's
publisher, as its jobs' enqueues do (the producer bound, else the one the workers bring, on a
connection apart from theirs: `_lent`), not on the worker's connection: a publish during a
memory alarm blocks the connection it is on, acks included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from .._consume.failures import Failed, MoveKind, defers_used_up, route_failure
from .._consume.job import Job
from .._consume.retry import RetryPolicy
from .._exceptions import (
    Defer,
    IntegrationError,
    MessageTooLargeError,
    SerializationError,
    UnroutableError,
    qualname,
    text_of,
)
from .._link.specs import Queue
from .._publish.serialization import JSON
from .._publish.sizes import MAX_MESSAGE_SIZE
from ._errors import StoreError
from ._groups import GROUP_HEADER, INDEX_HEADER, callback_body, callback_id
from ._groupstore import CallbackDue, GroupStore, RateStore
from ._handle import TASK_HEADER, Publisher
from ._rate import RateLimit, acquire
from ._recorder import Recorder, Running
from ._status import JobState, Write, storable

if TYPE_CHECKING:
    from ._store import JobStore

__all__ = ("Member", "Members")

log = logging.getLogger("aio_workq.jobs")

_RETRY_FINISH = 2.0
_ERROR_LIMIT = 1000
MAX_CALLBACK_SIZE = MAX_MESSAGE_SIZE
"""The largest callback body sent (the publisher's own limit, RabbitMQ's default)."""


class _Task(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def queue(self) -> Queue: ...
    @property
    def rate_limit(self) -> RateLimit | None: ...
    @property
    def arguments(self) -> Any: ...


CallTask = Callable[[Any, dict[str, Any], Running], Awaitable[Any]]
"""`_running.call_task` (passed in: `_running` imports this module)."""


class Members:
    """What the task workers of one process need for groups and rate limits."""

    def __init__(
        self,
        store: JobStore,
        *,
        retry: RetryPolicy | None,
        max_defers: int | None,
        queues: Mapping[str, Queue],
        publisher: Callable[[], Publisher | None],
    ) -> None:
        self.store = store
        self.publisher = publisher
        """What the callbacks are published through (`LentProducers.publisher`)."""
        self.groups: GroupStore | None = store if isinstance(store, GroupStore) else None
        self.rates: RateStore | None = store if isinstance(store, RateStore) else None
        self.retry = retry
        self.max_defers = max_defers
        self.queues = dict(queues)

    def member_of(self, job: Job, headers: Mapping[str, Any] | None = None) -> Member | None:
        """The group member this delivery is, if it is one (`headers`: the job's, if read)."""
        if headers is None:
            headers = job.headers
        group_id = headers.get(GROUP_HEADER)
        index = headers.get(INDEX_HEADER)
        if not isinstance(group_id, str) or self.groups is None:
            return None
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            return None
        return Member(self, self.groups, job, group_id, index)


class Member:
    """One delivery of a group member."""

    def __init__(
        self, members: Members, store: GroupStore, job: Job, group_id: str, index: int
    ) -> None:
        self._members = members
        self._store = store
        self._job = job
        self.group_id = group_id
        self.index = index

    async def handle(
        self, task: _Task, running: Running, recorder: Recorder, call_task: CallTask
    ) -> Any:
        """Run the member's task (with `call_task`) and finish it in the group; the value to
        return."""
        try:
            kwargs = task.arguments.decode(self._job.body, self._job.content_type)
        except Exception as exc:
            await self._failed(exc, running, task.queue)
            raise
        if not await recorder.claim(running):
            await self.skipped(running)
            return None
        try:
            if task.rate_limit is not None and self._members.rates is not None:
                await acquire(self._members.rates, task.name, task.rate_limit, kwargs)
            value = await call_task(task, kwargs, running)
            if not running.stopped:
                running.keep_result(value)
        except Exception as exc:
            await self._failed(exc, running, task.queue)
            raise
        if running.result is None:
            await self._finish(running.write(JobState.CANCELLED))
            return None
        body, content_type = running.result
        await self._finish(
            running.write(JobState.SUCCEEDED, result=body, content_type=content_type)
        )
        return value

    async def skipped(self, running: Running) -> None:
        """The claim found the job succeeded or cancelled (or its cancel requested): count it
        in the group (again: a member counts once) and publish the callback if it was claimed
        and not published. A second message of a member that runs elsewhere (the group was
        enqueued again) counts nothing: that run finishes it."""
        try:
            record = await self._store_get(running.job_id)
        except StoreError as exc:
            log.warning(
                "group %s: job %s can't be read (%s); deferring", self.group_id, running.job_id, exc
            )
            raise Defer(_RETRY_FINISH) from exc
        if record is None:
            write = running.write(JobState.CANCELLED)
        else:
            status = record.status
            if not status.done and not status.cancel_requested:
                log.info(
                    "group %s: job %s runs elsewhere; its second message is skipped",
                    self.group_id, running.job_id,
                )  # fmt: skip
                return
            state = status.state if status.done else JobState.CANCELLED
            write = Write(
                job_id=running.job_id, task=running.task, queue=running.queue, state=state,
                at=time.time(), attempt=status.attempt, defers=running.defers,
                result=record.result, content_type=record.content_type,
                error_type=status.error_type, error_message=status.error_message,
            )  # fmt: skip
        await self._finish(write)

    async def _store_get(self, job_id: str) -> Any:
        return await self._members.store.get(job_id)

    def _final(self, exc: BaseException, queue: Queue) -> bool:
        """Whether the worker's failure routing will end this delivery for good."""
        job = self._job
        if job.reply_to:
            return True
        move = route_failure(
            Failed(job.attempt, job.headers, queue.name), exc, self._members.retry, queue,
            now=datetime.now(UTC), max_defers=self._members.max_defers,
        )  # fmt: skip
        return move.kind in (MoveKind.DEAD_LETTER, MoveKind.DROP)

    async def _failed(self, exc: BaseException, running: Running, queue: Queue) -> None:
        if self._final(exc, queue):
            await self.failed_for_good(exc, running)

    async def failed_for_good(self, exc: BaseException, running: Running) -> None:
        """Count the member failed with `exc` (a delivery dead-lettered: e.g. for a task this
        worker does not run)."""
        await self._finish(
            running.write(
                JobState.FAILED,
                error_type=storable(qualname(exc)),
                error_message=storable(text_of(exc)[:_ERROR_LIMIT]),
            )
        )

    async def _finish(self, write: Write) -> None:
        """Write the member's terminal state and count the group down, before the ack.

        Raises:
            Defer: the store can't be reached, or the callback was not confirmed: the member
                comes back (no attempt used) and finishes then.
        """
        try:
            due = await self._store.finish_member(write, group_id=self.group_id, index=self.index)
        except StoreError as exc:
            log.warning(
                "group %s: job %s's outcome can't be recorded (%s); deferring it to finish "
                "later", self.group_id, write.job_id, exc,
            )  # fmt: skip
            raise Defer(_RETRY_FINISH) from exc
        if due is not None:
            await self._publish(due)

    async def _publish(self, due: CallbackDue) -> None:
        job_id = callback_id(due.group_id)
        queue = self._members.queues.get(due.task)
        body = callback_body(due)
        if len(body) > MAX_CALLBACK_SIZE:  # send() would refuse it: no message to wait for
            limit = f"the {MAX_CALLBACK_SIZE:,} bytes aio-workq sends at most"
            await self._too_large(due, len(body), limit)
            return
        try:
            if queue is None:
                # A task this worker does not run: its queue is known by name only, and
                # declaring that name with the default spec is refused for a queue of another
                # type or arguments. It is sent to the queue as it is; declared only if none
                # exists yet (returned: unroutable).
                try:
                    await self._send(body, None, job_id, due)
                except UnroutableError:
                    queue = Queue(due.queue)
            if queue is not None:
                await self._send(body, queue, job_id, due)
        except MessageTooLargeError as exc:
            # Refused for its size (by the broker, or by the publisher that learned its
            # limit): no retry can send it. The member is acked (its outcome is recorded),
            # the callback recorded failed instead.
            refused = f"the broker's max_message_size ({exc.limit:,} bytes)"
            await self._too_large(due, len(body), refused)
            return
        except Exception as exc:
            if self._last_defer():
                await self._unsent(due, exc)
            else:
                log.warning(
                    "group %s: its callback was not confirmed (%r); deferring member %s to "
                    "publish it again", due.group_id, exc, self._job.message_id,
                )  # fmt: skip
            raise Defer(_RETRY_FINISH) from exc
        try:
            await self._store.callback_published(due.group_id)
        except StoreError as exc:
            log.warning(
                "group %s: callback %s published, but not recorded so (%s): a redelivered "
                "member may publish it again (the same job id)", due.group_id, job_id, exc,
            )  # fmt: skip
        log.info("group %s complete: callback %s (%s) published", due.group_id, job_id, due.task)

    async def _send(self, body: bytes, queue: Queue | None, job_id: str, due: CallbackDue) -> None:
        """Publish the callback's message to `queue` (declared if need be), or with None to
        `due.queue` by name through the default exchange (nothing declared), and wait for its
        confirm.

        Raises:
            IntegrationError: no publisher (none bound, and the workers' not started).
            PublishError (and its subclasses): the broker did not confirm it.
        """
        publisher = self._members.publisher()
        if publisher is None:
            raise IntegrationError("no producer to publish the group's callback through")
        headers = {TASK_HEADER: due.task}
        if queue is None:
            await publisher.publish(
                body, exchange="", routing_key=due.queue, message_id=job_id, headers=headers,
                content_type=JSON,
            )  # fmt: skip
        else:
            await publisher.publish(
                body, queue, message_id=job_id, headers=headers, content_type=JSON
            )

    def _last_defer(self) -> bool:
        """Whether a `Defer` now dead-letters the member: it was deferred the worker's
        `max_defers` times already (the failure routing's own test)."""
        return defers_used_up(self._job.headers, self._members.max_defers)

    async def _unsent(self, due: CallbackDue, exc: Exception) -> None:
        """The callback was never confirmed, and the member that completed the group is
        dead-lettered now (its deferrals used up): record the callback `failed` with the
        reason, so that its handle does not wait forever, and log it at ERROR. The callback is
        not recorded published: the member replayed from its dead-letter queue (once the
        cause is fixed) publishes it."""
        job_id = callback_id(due.group_id)
        deferred = self._members.max_defers
        message = (
            f"group {due.group_id}: its callback {job_id} ({due.task!r}, to queue "
            f"{due.queue!r}) was not published: {text_of(exc)} ({qualname(exc)}); member "
            f"{self._job.message_id} was deferred {deferred} times (the worker's max_defers) "
            "to publish it again and is dead-lettered now. Fix the cause, then replay that "
            "member from its dead-letter queue (aio-workq dlq replay <queue> --id "
            f"{self._job.message_id}): it publishes the callback"
        )
        try:
            await self._record_failed(due, qualname(exc), message)
        except StoreError as store_exc:
            log.error("%s; the callback can't be recorded failed either (%s)", message, store_exc)
            return
        log.error("%s; callback %s recorded failed", message, job_id)

    async def _record_failed(self, due: CallbackDue, error_type: str, message: str) -> None:
        """Record the group's callback job `failed` with this error.

        Raises:
            StoreError: the store can't be reached.
        """
        write = Write(
            job_id=callback_id(due.group_id), task=due.task, queue=due.queue,
            state=JobState.FAILED, at=time.time(), error_type=error_type,
            error_message=storable(message),
        )  # fmt: skip
        await self._members.store.record([write])

    async def _too_large(self, due: CallbackDue, size: int, limit: str) -> None:
        """The callback's message can't be sent for its size: record the callback `failed`
        (saying why, and the fix), then the group's callback as dealt with (no member
        publishes it again); the member is acked.

        Raises:
            Defer: the store can't be reached: the member comes back and tries again.
        """
        job_id = callback_id(due.group_id)
        error = SerializationError(
            f"group {due.group_id}: the callback's message is too large to send: {size:,} "
            f"bytes (it carries the {len(due.members)} members' results), over {limit}; "
            "the callback was not run. Keep the members' results small: store large ones "
            "elsewhere (object storage, a table, a file) and return a reference to them"
        )
        try:
            await self._record_failed(due, qualname(error), str(error))
            await self._store.callback_published(due.group_id)
        except StoreError as exc:
            log.warning(
                "group %s: its callback %s is too large to send, and can't be recorded failed "
                "(%s); deferring member %s", due.group_id, job_id, exc, self._job.message_id,
            )  # fmt: skip
            raise Defer(_RETRY_FINISH) from exc
        log.error("%s; callback %s recorded failed", error, job_id)
