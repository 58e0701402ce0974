"""The worker's side of tracking: claim each job at delivery, record every transition.

The `Recorder` is a `Hook` on the task workers. A task's handler claims its job before it runs
(the store's check at delivery: a cancelled or already succeeded job is skipped), and the hook's
`after_handle` records how the delivery was settled: succeeded with the return value, retrying
with the next run's time, failed for good, cancelled, or back in the queue.

Writes go through `WriteBatches` (`_batches.py`): batched in store transactions, up to `LANES`
in flight, and kept while the store is unreachable (claims are granted, the queue does not wait
for it) until the status catches up.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from .._consume.job import ATTEMPT_HEADER, Job
from .._exceptions import IntegrationError, Reject, SerializationError, qualname, text_of
from .._hooks import HandleInfo, Hook, JobView, Outcome
from .._publish.serialization import JSON
from ._batches import WriteBatches, ids
from ._errors import Cancelled, StoreError
from ._handle import TASK_HEADER
from ._json import encode_typed
from ._status import JobState, Write, new_write, storable, withdrawal
from ._store import CancelRequests, JobStore, Withdrawals

__all__ = (
    "QUEUED_RECORD_TIMEOUT", "GroupCommit", "Recorder", "Running", "current_job", "unbound",
)  # fmt: skip

log = logging.getLogger("aio_workq.jobs")

DEFERS_HEADER = "x-workq-defers"
_INT_LIMIT = 10**100  # far within the digits an int's str may have
_ERROR_LIMIT = 1000
CANCEL_CHECK_EVERY = 5.0
"""Seconds between a worker's checks of its long-running jobs' cancel flags in the store: the
bound on stopping a job whose cancel request no worker heard (`Recorder._check_cancels`)."""
_CHECK_TIMEOUT = 5.0

_current: contextvars.ContextVar[Running | None] = contextvars.ContextVar(
    "aio_workq_job", default=None
)


def current_job() -> Running | None:
    """The task job running in this context (its id, attempt, cancel flag), or None.

    Plain `def` tasks run in threads with a copy of the context, so they see it too.
    """
    return _current.get()


def unbound(what: str) -> IntegrationError:
    """The error of an enqueue (`what`: a task's, a group's) on a registry without a producer;
    inside a job (one not run by the registry's workers, which bring a producer: a worker of
    your own, `run_task`), it names the worker's fix rather than a web app's."""
    job = current_job()
    if job is None:
        return IntegrationError(
            f"{what}: the tasks are not bound to a producer: call tasks.bind(producer) "
            "(e.g. in your app's lifespan) before enqueueing"
        )
    return IntegrationError(
        f"{what}: the tasks are not bound to a producer, and the job of task {job.task!r} "
        "enqueues outside the registry's workers (which bring one): run it with "
        "tasks.workers() (aio-workq worker myapp.tasks:tasks.workers), or bind a producer "
        "(async with Producer() as producer: tasks.bind(producer)), as "
        "docs/guides/jobs.md#tasks-that-enqueue-tasks shows"
    )


def _defers(headers: Mapping[str, Any]) -> int:
    value = headers.get(DEFERS_HEADER, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class Running:
    """A task job on this worker: what `current_job()` returns inside a task."""

    # A slotted class of its own, not a dataclass (#23): one is made a tracked job, and the
    # dataclass's `__init__` took every field as a parameter (its state's seven too), called
    # with a keyword; this one takes what differs from job to job, in order.
    __slots__ = (
        "job_id", "task", "queue", "attempt", "defers", "since", "redelivered", "handler",
        "claimed", "skipped", "result", "interrupted", "stopped", "_cancel", "_properties",
    )  # fmt: skip

    job_id: str
    task: str
    queue: str
    attempt: int
    defers: int
    since: float
    """When the delivery arrived (`time.time()`)."""
    redelivered: bool
    """The delivery came back to the queue (its claim may take over a job recorded running)."""
    handler: asyncio.Task[Any] | None
    """The task running the job's `async def` function, while it runs it (a cancel request
    cancels it there, and `call_task` takes that cancellation back)."""
    claimed: asyncio.Future[bool] | None
    """The claim, sent when the delivery arrived (`Recorder.arrived`)."""
    skipped: bool
    result: tuple[bytes, str | None] | None
    interrupted: bool
    """`request_cancel` cancelled `handler` (`call_task` undoes that count once it is seen)."""
    stopped: bool
    """The function ended for the job's cancel (it raised `Cancelled`, the request cancelled
    its asyncio task, or it never started): the job ends `cancelled`. One that returns ran
    to its end, whatever it returns and whenever the request came: `succeeded`."""
    _cancel: bool
    """Set once (by the event loop), read by a thread handler: a plain attribute suffices (a
    `threading.Event` per job cost more than the rest of its `Running`)."""
    _properties: Any
    """The delivery's properties as the recorder read them when it arrived (the task runner
    reads them from here: three calls less a job, #23), if it read them."""

    def __init__(
        self,
        job_id: str,
        task: str,
        queue: str,
        attempt: int,
        defers: int = 0,
        since: float = 0.0,
        redelivered: bool = False,
        properties: Any = None,
    ) -> None:
        self.job_id = job_id
        self.task = task
        self.queue = queue
        self.attempt = attempt
        self.defers = defers
        self.since = since
        self.redelivered = redelivered
        self._properties = properties
        self.handler = None
        self.claimed = None
        self.skipped = False
        self.result = None
        self.interrupted = False
        self.stopped = False
        self._cancel = False

    def __repr__(self) -> str:
        return (
            f"Running(job_id={self.job_id!r}, task={self.task!r}, queue={self.queue!r}, "
            f"attempt={self.attempt!r}, defers={self.defers!r}, since={self.since!r}, "
            f"redelivered={self.redelivered!r}, handler={self.handler!r}, "
            f"claimed={self.claimed!r}, skipped={self.skipped!r}, result={self.result!r}, "
            f"interrupted={self.interrupted!r}, stopped={self.stopped!r}, "
            f"_cancel={self._cancel!r})"
        )

    @property
    def cancelled(self) -> bool:
        """True once a cancel was requested for this job (a thread handler polls it)."""
        return self._cancel

    def check(self) -> None:
        """Raise `Cancelled` if a cancel was requested: the job ends as cancelled.

        Raises:
            Cancelled: the job's cancel was requested.
        """
        if self._cancel:
            raise Cancelled(f"job {self.job_id} was cancelled")

    def request_cancel(self) -> None:
        self._cancel = True
        handler = self.handler
        if handler is not None and not self.interrupted and not handler.done():
            self.interrupted = True
            handler.cancel("aio-workq: the job was cancelled")

    def keep_result(self, value: Any) -> None:
        """Encode the task's return value as the job's result.

        Raises:
            Reject: the value can't be encoded, so it can't be stored: the job fails.
        """
        kind = type(value)
        if kind is int and -_INT_LIMIT < value < _INT_LIMIT:  # most tasks' (#23), as json has it
            self.result = b"%d" % value, JSON  # no call: `int.__repr__(value).encode()`
            return
        if value is None or kind is bool:
            self.result = b"null" if value is None else b"true" if value else b"false", JSON
            return
        try:
            self.result = encode_typed(value)
        except SerializationError as exc:
            raise Reject(
                f"task {self.task!r} returned a value that can't be stored: {exc}"
            ) from exc

    def write(self, state: JobState, **fields: Any) -> Write:
        return Write(
            job_id=self.job_id, task=self.task, queue=self.queue, state=state, at=time.time(),
            attempt=self.attempt, defers=self.defers, **fields,
        )  # fmt: skip

    def enter(self) -> contextvars.Token[Running | None]:
        return _current.set(self)

    @staticmethod
    def leave(token: contextvars.Token[Running | None]) -> None:
        _current.reset(token)


def _error(exc: BaseException | None) -> dict[str, Any]:
    if exc is None:
        return {}
    message = storable(text_of(exc)[:_ERROR_LIMIT])
    return {"error_type": storable(qualname(exc)), "error_message": message}


class Recorder(Hook):
    """Records the task jobs of one process's workers in `store`.

    Args:
        store: the job store.
        buffer: most jobs whose latest state is kept while the store is unreachable; beyond
            it the oldest is dropped (logged), and its status stays at what was recorded.
        timeout: seconds one store transaction may take before the store counts as down.
    """

    _workq_untimed = True
    """Its `after_handle` does not read how long a handler ran: `Hooks` times the handlers
    only for a hook that does (#23)."""

    def __init__(self, store: JobStore, *, buffer: int = 10_000, timeout: float = 5.0) -> None:
        self.store = store
        self.jobs: dict[JobView, Running] = {}
        """The tracked job of each delivery here, from its arrival to its settlement."""
        self._by_id: dict[str, Running] = {}
        self._more: dict[str, list[Running]] = {}
        """Other deliveries of a job id `_by_id` has (a second message, a redelivery while
        the first still runs here): a cancel reaches them too, and one of them takes the
        first's place in `_by_id` when it ends."""
        self._batches = WriteBatches(store, buffer=buffer, timeout=timeout)
        self._checker: asyncio.Task[None] | None = None

    # -- the task handler's side ------------------------------------------------------------

    def begin(self, job: JobView, running: Running) -> None:
        self.jobs[job] = running
        self._follow(running)

    def _follow(self, running: Running) -> None:
        """Find `running` by its id (behind a delivery of the same id that is here first)."""
        if self._by_id.setdefault(running.job_id, running) is not running:
            self._more.setdefault(running.job_id, []).append(running)

    def _forget(self, running: Running) -> None:
        """`running` ended: another delivery of its id here, if any, takes its place."""
        job_id = running.job_id
        if self._by_id.get(job_id) is running:
            del self._by_id[job_id]
            if not self._more:
                return
            more = self._more.get(job_id)
            if more:
                self._by_id[job_id] = more.pop(0)
        else:
            more = self._more.get(job_id)
            if more and running in more:
                more.remove(running)
        if more is not None and not more:
            del self._more[job_id]

    def running(self, job: JobView) -> Running | None:
        """The tracked job of this delivery (`arrived` made it), if any."""
        return self.jobs.get(job)

    def follow(self, job: JobView, queue: str) -> Running | None:
        """Follow a delivery's job and send its claim, if `arrived` has not (a dispatcher
        that does not call it); its tracked job, if it has one."""
        if job not in self.jobs:
            self.arrived(job, queue)
        return self.jobs.get(job)

    def arrived(self, job: JobView, queue: str) -> asyncio.Future[bool] | None:
        """The hook's: a delivery arrived (the dispatcher calls this outside its task, before
        it waits for a free handler with `prefetch` above `concurrency`). Its job is followed
        (if it has an id) and its claim goes out now, so the round trip overlaps the handlers
        running; the claim's future is returned, and the dispatcher starts the delivery's
        task only once it is answered (#23: no task waits for it). The handler then reads
        the answer (`QueueRunner`): a refused claim is skipped, not run."""
        headers: Mapping[str, Any]
        properties = None
        if isinstance(job, Job):  # the worker's: its properties read once for all of these
            # (decoded on the job, no `Delivery` made: an object less a delivery waiting for
            # its turn, for the garbage collector to count, #23)
            properties = job._properties()
            job_id, headers = properties.message_id, properties.headers or {}
            redelivered = job._redelivered
        else:
            job_id, headers, redelivered = job.message_id, job.headers, job.redelivered
        if not job_id or "\x00" in job_id:  # none, or one no store can keep (`unstorable_id`)
            return None
        # (subscripts, not `get`: no call when the header is there or not, #23)
        attempt = headers[ATTEMPT_HEADER] if ATTEMPT_HEADER in headers else 1  # as `Job.attempt`
        if type(attempt) is not int and not isinstance(attempt, int) or attempt < 1:
            attempt = 1
        name = headers[TASK_HEADER] if TASK_HEADER in headers else None
        if type(name) is not str or "\x00" in name:  # as `storable(str(name))`, rarely needed
            name = storable(str(name))
        defers = _defers(headers) if DEFERS_HEADER in headers else 0
        now = time.time()
        running = Running(job_id, name, queue, attempt, defers, now, redelivered, properties)
        self.jobs[job] = running  # as `begin`, `_claim`: fewer calls per job (#23)
        if self._by_id.setdefault(job_id, running) is not running:  # as `_follow`
            self._more.setdefault(job_id, []).append(running)
        running.claimed = claimed = self._batches.commit(
            new_write(Write, (
                job_id, name, queue, JobState.RUNNING, now, attempt, defers, True, redelivered,
                None, None, None, None, None,
            ))
        )  # fmt: skip
        if self._checker is None:
            self._checker = asyncio.get_running_loop().create_task(
                self._check_cancels(), name="aio-workq cancel check"
            )
        return claimed

    def _claim(self, running: Running) -> asyncio.Future[bool]:
        write = Write(
            job_id=running.job_id, task=running.task, queue=running.queue,
            state=JobState.RUNNING, at=time.time(), attempt=running.attempt,
            defers=running.defers, claim=True, requeue=running.redelivered,
        )  # fmt: skip
        return self._batches.commit(write)

    async def claim(self, running: Running) -> bool:
        """Whether the job may run: False if it was cancelled or already succeeded, or if
        this is a second message of a job that runs (the store's answer to its claim, sent
        when it arrived or now; then `running` is marked skipped, and that is logged).

        Granted without waiting while the store is down (the job runs; its state is recorded
        when the store is back)."""
        claimed = running.claimed
        if claimed is None:
            claimed = running.claimed = self._claim(running)
        if await claimed:
            return True
        self.refused(running)
        return False

    def refused(self, running: Running) -> None:
        """`running`'s claim was refused: it is skipped (logged)."""
        running.skipped = True
        log.info(
            "job %s (%s) skipped: it was cancelled, is done, or runs already (this is a second "
            "message of it)", running.job_id, running.task,
        )  # fmt: skip

    async def _check_cancels(self) -> None:
        """Every `CANCEL_CHECK_EVERY` seconds, ask the store whether a job that has been here
        that long had its cancel requested, and stop it if so.

        `JobHandle.cancel()` tells the workers on the control exchange, and a broadcast reaches
        only the workers bound at that moment: not one reconnecting, nor one whose binding went
        with a deleted `workq.control` (bound again within 5 s). The store keeps the request,
        so this finds it: a job whose request no worker heard stops within this interval. A
        round is skipped while the store is down; an error ends the round, not the loop."""
        while True:
            await asyncio.sleep(CANCEL_CHECK_EVERY)
            if self._batches.down:
                continue
            due = time.time() - CANCEL_CHECK_EVERY
            ids = [r.job_id for r in self._by_id.values() if r.since <= due and not r.cancelled]
            if not ids:
                continue
            try:
                for job_id in await self._cancel_requested(ids):
                    self._stop(job_id, "its cancel request was found in the store")
            except (StoreError, TimeoutError) as exc:  # the next round asks again
                log.debug("checking running jobs for cancel requests: %r", exc)
            except Exception:  # a store's own bug must not end the checks (as the rounds')
                log.exception("checking running jobs for cancel requests failed")

    async def _cancel_requested(self, job_ids: list[str]) -> Iterable[str]:
        """Those of `job_ids` whose cancel the store holds: one read (`CancelRequests`), or a
        `get()` each from a store without it."""
        store = self.store
        if isinstance(store, CancelRequests):
            async with asyncio.timeout(_CHECK_TIMEOUT):
                return await store.cancel_requested(job_ids)
        requested = []
        for job_id in job_ids:
            async with asyncio.timeout(_CHECK_TIMEOUT):
                record = await store.get(job_id)
            if record is not None and record.status.cancel_requested:
                requested.append(job_id)
        return requested

    def cancel_local(self, job_id: str) -> bool:
        """A cancel request from the control exchange: stop the job if it runs here."""
        return self._stop(job_id, "cancel requested")

    def _stop(self, job_id: str, why: str) -> bool:
        """Stop every delivery of `job_id` running here; False if none is."""
        running = self._by_id.get(job_id)
        if running is None:
            return False
        log.info("job %s (%s): %s, stopping it", job_id, running.task, why)
        running.request_cancel()
        for other in self._more.get(job_id, ()):
            other.request_cancel()
        return True

    # -- the hook ---------------------------------------------------------------------------

    def after_handle(self, info: HandleInfo) -> None:
        self._workq_settled(info.job, info.outcome, info.error, info.delay)

    def _workq_settled(
        self, job: JobView, outcome: Outcome, error: BaseException | None, delay: float | None
    ) -> None:
        """`after_handle`'s work, which the worker's hooks call without a `HandleInfo` (#23:
        one object and its field setters less per job)."""
        running = self.jobs.pop(job, None)
        if running is None:
            return
        by_id = self._by_id
        if by_id.get(running.job_id) is running and not self._more:  # `_forget`, the usual
            del by_id[running.job_id]
        else:
            self._forget(running)
        if running.skipped:
            return
        if outcome is Outcome.OK:
            if running._cancel and running.result is None:  # `cancelled`, a call less
                write = running.write(JobState.CANCELLED)
            else:
                body, content_type = running.result or (None, None)
                write = new_write(Write, (
                    running.job_id, running.task, running.queue, JobState.SUCCEEDED,
                    time.time(), running.attempt, running.defers, False, False, None, None,
                    None, body, content_type,
                ))  # fmt: skip
        elif outcome in (Outcome.RETRY, Outcome.DEFERRED):
            retry_at = time.time() + (delay or 0.0)
            write = running.write(JobState.RETRYING, next_retry_at=retry_at, **_error(error))
        elif outcome is Outcome.REQUEUED:
            write = running.write(JobState.QUEUED, requeue=True)
        else:  # DEAD_LETTERED, REJECTED, FAILED
            write = running.write(JobState.FAILED, **_error(error))
        self._batches.write(write)

    # -- writing ----------------------------------------------------------------------------

    @property
    def down(self) -> bool:
        """True while the store is unreachable (the jobs' states are kept, then caught up)."""
        return self._batches.down

    def write(self, write: Write) -> None:
        """Record `write` soon (batched with others); never waits."""
        self._batches.write(write)

    async def close(self, timeout: float = 5.0) -> None:
        """Record what is pending, waiting at most `timeout` seconds; what is left then is
        logged as lost."""
        checker = self._checker  # kept, done: no new one starts after close
        if checker is not None:
            checker.cancel()
            await asyncio.gather(checker, return_exceptions=True)
        await self._batches.close(timeout)


QUEUED_RECORD_TIMEOUT = 5.0
"""The longest an enqueue waits for its `queued` record (the store's first failure to answer;
then the store counts as down and the record is kept)."""


class GroupCommit:
    """Concurrent callers' writes (the enqueues' `queued` records), committed together:
    each `record()` joins the next batch and returns once that batch is committed.

    Up to `LANES` batches are in flight at once; what arrives while they are forms the next
    one, so N concurrent enqueues cost a few store transactions instead of N, and a caller
    does not wait behind a batch it is not in. The queue does not wait for the store: once
    a batch failed (or took longer than `timeout`), the store counts as down, and until it
    answers again `record()` returns at once, its write kept (at most `buffer` jobs) and
    written when the store is back, as a worker's are (`WriteBatches`).

    The batches belong to an event loop: a registry used from several (a `SyncProducer`'s
    thread and the app's loop) has batches on each. What one kept is not lost when its loop
    closes: `close()` on that loop hands it to another loop's batches, and batches made on
    a new loop take over what those of loops closed meanwhile (an `asyncio.run()` that
    ended) had kept; what no loop can take is logged with its job ids.

    Args:
        store: the job store.
        buffer: most writes kept while the store is down.
        timeout: seconds one store transaction may take before the store counts as down.
    """

    def __init__(
        self, store: JobStore, *, buffer: int = 10_000, timeout: float = QUEUED_RECORD_TIMEOUT
    ) -> None:
        self.store = store
        self.overlaps = isinstance(store, Withdrawals)
        """Whether an enqueue's record may go out with its publish: the store takes a record
        back (`Withdrawals`), so `withdraw()` is sent it; else the enqueue sends its record
        once the publish is confirmed, and `withdraw()` does nothing."""
        self._buffer, self._timeout = buffer, timeout
        self._batches: dict[asyncio.AbstractEventLoop, WriteBatches] = {}
        self._lock = threading.Lock()  # the loops' threads add and take batches
        self._last: tuple[asyncio.AbstractEventLoop, WriteBatches] | None = None
        _ALL_COMMITS.add(self)

    def _forked(self) -> None:
        """In a forked child: a lock of its own (another thread of the parent may have held
        this one at the fork, and no thread releases it here), and none of the parent's
        batches (their loops do not run here; the parent records what they hold)."""
        self._lock = threading.Lock()
        self._batches = {}
        self._last = None

    async def record(self, write: Write) -> None:
        """Record `write` with the batch it joins; returns once that batch is committed, or
        at once while the store is down (the write is kept and caught up)."""
        await self.commit(write)

    def commit(self, write: Write) -> asyncio.Future[bool]:
        """`record()`'s future, to await (an enqueue awaits it without a coroutine between,
        #23); True once the batch `write` joins is committed (or at once while the store is
        down)."""
        loop = asyncio.get_running_loop()
        last = self._last  # one tuple: read whole by another loop's thread (no call, #23)
        if last is not None and last[0] is loop:
            return last[1].commit(write)
        batches = self._batches.get(loop) or self._made_on(loop)
        self._last = (loop, batches)
        return batches.commit(write)

    def withdraw(self, queued: Write) -> None:
        """Take back `queued` (committed with `commit()`, on this loop): its publish failed.
        Sent after it (a batch in flight holding it goes first), never waited for; while the
        store is down it replaces the record kept (`Withdrawals` says what a store does).
        Nothing for a store without `withdraw()` (`overlaps`), which is never sent the record
        of an enqueue not confirmed."""
        batches = self._batches.get(asyncio.get_running_loop())
        if batches is not None and self.overlaps:
            batches.withdraw(withdrawal(queued, time.time()))

    def _made_on(self, loop: asyncio.AbstractEventLoop) -> WriteBatches:
        """The batches of `loop`, made now; they take over what the batches of loops closed
        since had kept."""
        batches = WriteBatches(self.store, buffer=self._buffer, timeout=self._timeout)
        with self._lock:
            closed = [other for other in self._batches if other.is_closed()]
            left = [write for other in closed for write in self._batches.pop(other).left()]
            self._batches[loop] = batches
        if left:
            log.warning(
                "job store: %d queued record(s) kept on an event loop that closed are taken "
                "over by this one: %s", len(left), ids(left),
            )  # fmt: skip
            batches.adopt(left)
        return batches

    async def close(self, timeout: float = 1.5) -> None:
        """Close the running loop's batches: what they hold is recorded within `timeout`,
        else handed to another running loop's batches, which record it when the store
        answers; else logged as lost, by job id."""
        loop = asyncio.get_running_loop()
        with self._lock:
            batches = self._batches.pop(loop, None)
            self._last = None
        if batches is None:
            return
        left = await batches.close(timeout, lost=False)
        if not left:
            return
        with self._lock:
            others = [(other, b) for other, b in self._batches.items() if other.is_running()]
        for other, taker in others:
            try:
                other.call_soon_threadsafe(taker.adopt, left)
            except RuntimeError:  # closed meanwhile
                continue
            log.warning(
                "job store unreachable: %d queued record(s) kept on an event loop that closes "
                "are handed to another one, which records them once the store answers: %s",
                len(left), ids(left),
            )  # fmt: skip
            return
        log.error(
            "job store unreachable: the queued records of %d job(s) were not written, and no "
            "event loop is left to write them (their status reads as unknown until a worker "
            "runs them): %s", len(left), ids(left),
        )  # fmt: skip


_ALL_COMMITS: weakref.WeakSet[GroupCommit] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for commits in list(_ALL_COMMITS):
        commits._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
