"""From a delivery to its settlement: run the handler, then ack, answer, or move the message.

Outcomes: the handler returns → ack (after the confirms of what it forwarded), and for an RPC
request the return value is the reply; it raises `Reject` → dead-letter queue; `Defer` → a
delay queue, same attempt; anything else → a delayed retry, or the dead-letter queue after the
last attempt (`_failures.route_failure`), carried out by the `Mover`. Every delivery is settled
exactly once, whatever the handler does: a `CancelledError` or other `BaseException` from it is
a failure like any other; only the worker's own stop cancels, and then the message is requeued.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import Task
from time import perf_counter
from typing import Any

from aiormq.abc import AbstractChannel

from .._hooks import Hooks, Outcome, Settled
from .._link.specs import Queue, QueueType
from .._logs import set_handling
from .._publish.confirms import ConfirmPublisher
from .._publish.rpc import send_reply
from .._wire.acker import Acker
from .._wire.writer import Gate
from .delivery import REPLY_TO_BYTE, Delivery
from .execution import HandlerRunner
from .failing import Counters, FailedDeliveries, log_fields
from .failures import MAX_DEFERS
from .job import _UNSET, Forwarder, Job, _new_job
from .line import Line
from .linked import Linked
from .mover import Mover
from .retry import RetryPolicy

__all__ = ("Counters", "Dispatcher")

log = logging.getLogger("aio_workq")
_ACKED: Settled = (Outcome.OK, None, None)


class Dispatcher(Line):
    """Runs each delivery's handler in a task of its own and settles the delivery; the
    deliveries that wait for their turn wait in its `Line`.

    Built in the event loop it dispatches on, and keeps it: on Python 3.11 every
    `asyncio.get_running_loop()`, and `current_task()` without its loop, is a getpid() system
    call, which the hot path makes none of.
    """

    def __init__(
        self,
        *,
        runner: HandlerRunner,
        policy: RetryPolicy | None,
        queue: Queue,
        publisher: ConfirmPublisher,
        mover: Mover,
        forwarder: Forwarder,
        concurrency: int,
        prefetch: int,
        hooks: Hooks | None = None,
        max_defers: int | None = MAX_DEFERS,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._hooks = hooks
        self._call = runner.caller()
        # The handler is timed only for a hook that reads how long it ran (`after_handle`).
        self._durations = hooks.durations if hooks is not None and hooks.times else None
        self._queue = queue
        self._publisher = publisher
        self._forwarder = forwarder
        self._line(concurrency, prefetch, hooks)
        self.queue_name = queue.name
        # Every delivery's task has this name: asyncio.all_tasks() says whose it is, and on
        # Python 3.11 a task without one formats a "Task-N" of its own.
        self._task_name = f"aio-workq worker {queue.name!r}"
        self.counters = Counters()
        self._failed = FailedDeliveries(
            runner=runner, policy=policy, queue=queue, publisher=publisher, mover=mover,
            counters=self.counters, max_defers=max_defers,
        )  # fmt: skip
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        # Whether a stop leaves its unrun deliveries to the channel's close (`_requeue`).
        self._unrun_to_close = queue.single_active_consumer or queue.type is QueueType.QUORUM
        # A chain step's delivery waits for its one confirm without a task (`Linked`) when
        # the hooks' `end` may run outside it.
        self._detach = hooks is None or hooks.anywhere
        self._linked = Linked(
            loop=self._loop, hooks=hooks, counters=self.counters, failed=self._failed,
            tasks=self.tasks, queue_name=queue.name, task_name=self._task_name,
        )  # fmt: skip

    def declared(self, name: str) -> None:
        """The queue was declared as `name` (the broker's, for a server-named queue): the
        failure lines name it. Hooks and metrics keep the worker's `queue` (a server-named
        queue's label stays `''`, not a new series per reconnect)."""
        self._failed.declared(name)

    def dispatch(self, delivery: Delivery, acker: Acker) -> None:
        """Start handling one delivery (called for each delivery, in order)."""
        tag = delivery.delivery_tag
        acker.track(tag)
        self.counters.deliveries += 1
        job = Job(delivery, self._forwarder)
        if self._waits:
            self._admit(job, acker, tag, delivery.is_request)
            return
        process = self._process(job, acker, tag, delivery.is_request)
        # The delivery's task, made as `loop.create_task` makes it but without its Python
        # frame and its closed check (the task's first `call_soon` checks it), unless the
        # application set a task factory, which then makes it. The job carries its task
        # until it ends: `_process` reads it there, where `asyncio.current_task()` is a
        # Python function on 3.11. The task takes itself out of `tasks` as it ends: a done
        # callback would cost the loop a callback more per delivery.
        loop = self._loop
        if loop.get_task_factory() is None:
            task = Task(process, loop=loop, name=self._task_name)
            job._task = task
            self.tasks.add(task)
        else:
            self._start_by_factory(job, process)

    def take(
        self, gate: Gate, acker: Acker, channel: AbstractChannel, consumer_tag: str,
        delivery_tag: int, redelivered: bool, exchange: str, routing_key: str, header: bytes,
        body: bytes,
    ) -> None:  # fmt: skip
        """`dispatch` for a delivery the demux took off the socket, as its fields (the tap's
        `on_delivery`, with `gate` and `acker` bound: no function of the subscription's in
        between). Dropped when the channel is closing: the broker redelivers it."""
        if not gate.open or acker.closed:
            return
        acker.track(delivery_tag)
        self.counters.deliveries += 1
        # The job as `job_of` makes it, inline (a call of nine arguments less per delivery).
        job = _new_job(Job)
        job._delivery = job.links = job._sent = job._task = None
        job._channel = channel
        job._consumer_tag = consumer_tag
        job._tag = delivery_tag
        job._redelivered = redelivered
        job._exchange = exchange
        job._routing_key = routing_key
        job._header = header
        job._body = body
        job._forwarder = self._forwarder
        job._data = _UNSET
        # An RPC request (a `reply_to`), read off one byte of the property flags.
        request = header[12] & REPLY_TO_BYTE != 0
        if self._waits:
            self._admit(job, acker, delivery_tag, request)
            return
        process = self._process(job, acker, delivery_tag, request)
        # As in `dispatch` (inline: once per delivery).
        loop = self._loop
        if loop.get_task_factory() is None:
            task = Task(process, loop=loop, name=self._task_name)
            job._task = task
            self.tasks.add(task)
        else:
            self._start_by_factory(job, process)

    async def _process(self, job: Job, acker: Acker, tag: int, reply: bool) -> None:
        """The task of one delivery; `reply`: it is an RPC request (it has a `reply_to`)."""
        set_handling((self.queue_name, job))  # log lines in this task name the message
        task = job._task  # this task (`dispatch`, `take`)
        if task is None:  # its first step ran in `create_task` (an eager task factory)
            task = job._task = asyncio.current_task(self._loop)
        assert task is not None
        hooks = self._hooks
        try:
            # With hooks: `begin` and `end` around the delivery, no coroutine more per message.
            begin = self._begin
            entered = begin(job, self.queue_name) if begin is not None else None
            try:
                # `_handle`'s steps here, in one coroutine, slots or not (#23: a tracked
                # worker prefetches beyond its concurrency, and its deliveries took two
                # coroutines more each, `_handle` and the timing wrapper, and a third for
                # the slot). With `_limited`, this task holds a handler slot (`_admit`).
                slots = self._limited
                if self.stopping:
                    if slots:
                        self._release()
                    settled = self._requeue(acker, tag)
                else:
                    failure: BaseException | None = None
                    result: Any = None
                    durations = self._durations
                    started = perf_counter() if durations is not None else 0.0
                    try:
                        result = await self._call(job)
                    except asyncio.CancelledError as exc:
                        if task.cancelling():
                            raise  # the worker is stopping: requeued below
                        failure = exc  # the handler's own cancellation: a failure like any other
                    except BaseException as exc:  # noqa: B036 - every delivery is settled
                        failure = exc
                    finally:
                        if durations is not None:  # for `after_handle` (`Hooks.durations`)
                            durations[job] = perf_counter() - started
                        if slots:  # the handler ended: settling needs no slot
                            self._free += 1
                            if self._waiting:  # the next one's, now
                                self._pump()
                    links = job.links
                    if failure is None and links and len(links) == 1 and not task.cancelling():
                        # The usual chain step: one confirm to wait for (as _first_failure).
                        confirm, links = links[0], None
                        sent = job._sent
                        if (
                            sent is not None
                            and sent.future is confirm
                            and self._detach
                            and not reply
                            and not confirm.done()
                        ):
                            # Not in this task: the confirm's record settles the delivery
                            # (`Linked`), without waking a task (#22). The task ends here.
                            linked = self._linked
                            linked.pending[sent] = (job, acker, tag)
                            sent.then = linked.then
                            return
                        try:
                            await confirm
                        except asyncio.CancelledError as exc:
                            if task.cancelling():
                                raise  # the worker is stopping: requeued below
                            failure = exc  # the confirm itself was cancelled
                        except BaseException as exc:  # noqa: B036 - as gather(return_exceptions)
                            failure = exc
                    if failure is None and not links and not reply and not task.cancelling():
                        acker.ack(tag)
                        self.counters.processed += 1
                        settled = _ACKED
                    else:
                        settled = await self._settle(job, acker, tag, task, failure, result, links)
            except BaseException as exc:
                if hooks is not None:
                    hooks.end(job, self.queue_name, entered, None, exc)
                raise
            if hooks is not None:
                hooks.end(job, self.queue_name, entered, settled, None)
        except BaseException as exc:
            acker.nack(tag, requeue=True)  # not settled yet: back to the queue
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.error(
                "worker %r failed to settle message %s; it goes back to the queue: %r",
                self.queue_name, job.message_id, exc,
                extra=log_fields(self.queue_name, job), exc_info=exc,
            )  # fmt: skip
        finally:
            job._task = None  # a job a handler keeps does not keep its task
            self.tasks.discard(task)

    def _requeue(self, acker: Acker, tag: int) -> Settled:
        """The worker is stopping: the delivery goes back to the queue, its handler not run.

        From a classic queue it is nacked at once. From a quorum or single-active-consumer
        queue it is left unacked: the stop's close of the channel gives it back. A single
        active consumer's queue then hands over in order (see `Worker.stop`); a quorum queue
        is spared a burst of nacks, each a command of its own to the queue that the broker's
        channel counts until the queue has applied it: from 32 on the channel holds the acks
        that follow instead of sending them, and a channel closed meanwhile drops them, so
        that deliveries acked by the stop came back and ran twice (rabbitmq-server#10327, seen
        on 3.10.8; tests/test_chain_stop.py).
        """
        if not self._unrun_to_close:
            acker.nack(tag, requeue=True)
        return Outcome.REQUEUED, None, None

    async def _settle(
        self,
        job: Job,
        acker: Acker,
        tag: int,
        task: asyncio.Task[Any],
        failure: BaseException | None,
        result: Any,
        links: list[asyncio.Future[str]] | None,
    ) -> Settled:
        """Settle the delivery once the handler returned `result` or raised `failure`, and
        the confirms of what it forwarded (`links`, unless awaited already) settled."""
        if task.cancelling():
            raise asyncio.CancelledError  # returned after a stop cancelled it: requeued
        if failure is None and links:
            failure = await _first_failure(links, self._loop)
        if failure is None:
            if job.reply_to:
                await send_reply(self._publisher, job.reply_to, job.correlation_id, result, None)
            acker.ack(tag)
            self.counters.processed += 1
            return _ACKED
        return await self._failed.settle(job, acker, tag, failure)


async def _first_failure(
    links: list[asyncio.Future[str]], loop: asyncio.AbstractEventLoop
) -> BaseException | None:
    if len(links) == 1:  # the usual chain step: one message sent; no gather for it
        try:
            await links[0]
        except asyncio.CancelledError as exc:
            task = asyncio.current_task(loop)
            if task is not None and task.cancelling():
                raise  # this task is stopping (as gather would raise)
            return exc  # the confirm itself was cancelled: as gather returns it
        except BaseException as exc:  # noqa: B036 - as gather(return_exceptions=True)
            return exc
        return None
    results = await asyncio.gather(*links, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            return result
    return None
