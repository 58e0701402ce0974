"""The worker's side of tracking: claim each job at delivery, record every transition.

The `Recorder` is a `Hook` on the task workers. A task's handler claims its job before it runs
(the store's check at delivery: a cancelled or already succeeded job is skipped), and the hook's
`after_handle` records how the delivery was settled: succeeded with the return value, retrying
with the next run's time, failed for good, cancelled, or back in the queue.

Writes go through a flusher that commits what has gathered in one store transaction, with up
to `LANES` such batches in flight at once: a claim does not wait behind a batch being written,
and a batch never holds a job that one in flight holds (a job's writes reach the store in the
order they were made). While the store is unreachable the queue does not wait for it: claims
are granted, and the latest state of each job is kept here (at most `buffer` jobs) and written
once the store answers again: the status catches up.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import qualname
from .._hooks import HandleInfo, Hook, JobView, Outcome
from ._errors import Cancelled
from ._handle import TASK_HEADER
from ._status import JobState, Write
from ._store import JobStore

__all__ = ("GroupCommit", "Recorder", "Running", "current_job")

log = logging.getLogger("aio_workq.jobs")

DEFERS_HEADER = "x-workq-defers"
_ERROR_LIMIT = 1000
_RETRY_FIRST, _RETRY_CAP = 0.5, 10.0
LANES = 2
"""Store transactions a recorder (or an enqueue's `GroupCommit`) has in flight at once."""

_current: contextvars.ContextVar[Running | None] = contextvars.ContextVar(
    "aio_workq_job", default=None
)


def current_job() -> Running | None:
    """The task job running in this context (its id, attempt, cancel flag), or None.

    Plain `def` tasks run in threads with a copy of the context, so they see it too.
    """
    return _current.get()


def defers_of(job: JobView) -> int:
    value = job.headers.get(DEFERS_HEADER, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(eq=False, slots=True)
class Running:
    """A task job on this worker: what `current_job()` returns inside a task."""

    job_id: str
    task: str
    queue: str
    attempt: int
    defers: int = 0
    handler: asyncio.Task[Any] | None = None
    """The task running an async handler (cancelled by a cancel request)."""
    claimed: asyncio.Future[bool] | None = None
    """The claim, sent when the delivery arrived (`Recorder.handling`)."""
    skipped: bool = False
    result: tuple[bytes, str | None] | None = None
    _flag: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        """True once a cancel was requested for this job (a thread handler polls it)."""
        return self._flag.is_set()

    def check(self) -> None:
        """Raise `Cancelled` if a cancel was requested: the job ends as cancelled.

        Raises:
            Cancelled: the job's cancel was requested.
        """
        if self._flag.is_set():
            raise Cancelled(f"job {self.job_id} was cancelled")

    def request_cancel(self) -> None:
        self._flag.set()
        handler = self.handler
        if handler is not None and not handler.done():
            handler.cancel("aio-workq: the job was cancelled")

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
    return {"error_type": qualname(exc), "error_message": str(exc)[:_ERROR_LIMIT]}


class Recorder(Hook):
    """Records the task jobs of one process's workers in `store`.

    Args:
        store: the job store.
        buffer: most jobs whose latest state is kept while the store is unreachable; beyond
            it the oldest is dropped (logged), and its status stays at what was recorded.
        timeout: seconds one store transaction may take before the store counts as down.
    """

    def __init__(self, store: JobStore, *, buffer: int = 10_000, timeout: float = 5.0) -> None:
        self.store = store
        self._buffer = buffer
        self._timeout = timeout
        self._jobs: dict[JobView, Running] = {}
        self._by_id: dict[str, Running] = {}
        self._queued: list[tuple[Write, asyncio.Future[bool] | None]] = []
        self._pending: dict[str, Write] = {}  # catch-up: the latest write per job
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._lanes: set[asyncio.Task[Any]] = set()  # batches in flight
        self._busy: set[str] = set()  # the jobs they hold
        self._idle = asyncio.Event()
        self._idle.set()
        self.down = False
        self._backoff = _RETRY_FIRST
        self._closed = False

    # -- the task handler's side ------------------------------------------------------------

    def begin(self, job: JobView, running: Running) -> None:
        self._jobs[job] = running
        self._by_id[running.job_id] = running

    def running(self, job: JobView) -> Running | None:
        """The tracked job of this delivery (`handling` made it), if any."""
        return self._jobs.get(job)

    def arrived(self, job: JobView, queue: str) -> Running | None:
        """A delivery arrived: follow its job (if it has an id) and send its claim now."""
        job_id = job.message_id
        if not job_id:
            return None
        name = job.headers.get(TASK_HEADER)
        running = Running(job_id, str(name), queue, job.attempt, defers_of(job))
        self.begin(job, running)
        running.claimed = self._claim(running)
        return running

    def _claim(self, running: Running) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self.down:
            self._keep(running.write(JobState.RUNNING))
            future.set_result(True)
        elif self._closed:
            self._enqueue(running.write(JobState.RUNNING), None)
            future.set_result(True)
        else:
            self._enqueue(running.write(JobState.RUNNING, claim=True), future)
        return future

    async def claim(self, running: Running) -> bool:
        """Whether the job may run: False if it was cancelled or already succeeded (the
        store's answer to its claim, sent when it arrived or now).

        Granted without waiting while the store is down (the job runs; its state is recorded
        when the store is back)."""
        claimed = running.claimed
        if claimed is None:
            claimed = running.claimed = self._claim(running)
        return await claimed

    def cancel_local(self, job_id: str) -> bool:
        """A cancel request from the control exchange: stop the job if it runs here."""
        running = self._by_id.get(job_id)
        if running is None:
            return False
        log.info("job %s (%s): cancel requested, stopping it", job_id, running.task)
        running.request_cancel()
        return True

    # -- the hook ---------------------------------------------------------------------------

    def handling(self, job: JobView, queue: str) -> None:
        """A delivery arrived, before it waits for a free handler (with `prefetch` above
        `concurrency`): its claim goes out now, so the round trip overlaps the handlers
        running. The handler still runs only once the claim is granted."""
        if job not in self._jobs:
            self.arrived(job, queue)

    def after_handle(self, info: HandleInfo) -> None:
        running = self._jobs.pop(info.job, None)
        if running is None:
            return
        self._by_id.pop(running.job_id, None)
        if running.skipped:
            return
        outcome = info.outcome
        if outcome is Outcome.OK:
            if running.cancelled and running.result is None:
                write = running.write(JobState.CANCELLED)
            else:
                body, content_type = running.result or (None, None)
                write = running.write(JobState.SUCCEEDED, result=body, content_type=content_type)
        elif outcome in (Outcome.RETRY, Outcome.DEFERRED):
            retry_at = time.time() + (info.delay or 0.0)
            write = running.write(JobState.RETRYING, next_retry_at=retry_at, **_error(info.error))
        elif outcome is Outcome.REQUEUED:
            write = running.write(JobState.QUEUED, requeue=True)
        else:  # DEAD_LETTERED, REJECTED, FAILED
            write = running.write(JobState.FAILED, **_error(info.error))
        self.write(write)

    # -- writing ----------------------------------------------------------------------------

    def write(self, write: Write) -> None:
        """Record `write` soon (batched with others); never waits."""
        if self.down:
            self._keep(write)
        else:
            self._enqueue(write, None)

    def _enqueue(self, write: Write, future: asyncio.Future[bool] | None) -> None:
        self._queued.append((write, future))
        self._kick()

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())

    def _keep(self, write: Write, *, older: bool = False) -> None:
        """Keep `write` for the catch-up: the latest write of each job is kept (`older`: a
        write made before the one kept, if any, which then stays)."""
        pending = self._pending
        if older and write.job_id in pending:
            return
        pending.pop(write.job_id, None)
        pending[write.job_id] = write  # the latest last: the oldest go first when full
        if len(pending) > self._buffer:
            dropped = next(iter(pending))
            del pending[dropped]
            log.error(
                "job store unreachable and %d job states waiting: job %s's state is dropped "
                "(its status stays at what was recorded before)", self._buffer, dropped,
            )  # fmt: skip
        self._idle.clear()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())
        if not self.down:
            self._wake.set()

    async def _flush_loop(self) -> None:
        """Start batches while there is room; while the store is down, retry what is kept in
        one batch at a time, backing off."""
        while True:
            self._wake.clear()
            if self.down:
                if self._lanes:
                    await self._wake.wait()  # the batches in flight settle first
                    continue
                if not await self._send():
                    if self._closed:
                        self._idle.set()
                        return
                    try:  # wait before trying again, unless close() hurries us
                        async with asyncio.timeout(self._backoff):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                    self._backoff = min(self._backoff * 2, _RETRY_CAP)
                continue
            while len(self._lanes) < LANES and (self._queued or self._pending):
                if not self._start():
                    break  # what is left waits for its job's batch in flight
            if not self._lanes and not self._queued and not self._pending:
                self._idle.set()
                if self._closed:
                    return
            await self._wake.wait()

    def _start(self) -> bool:
        """Start a batch of what is kept and queued, leaving out the jobs a batch in flight
        holds (and so their later writes); False if there was nothing to send."""
        busy = self._busy
        caught_up = [w for job_id, w in self._pending.items() if job_id not in busy]
        batch: list[tuple[Write, asyncio.Future[bool] | None]] = []
        held: list[tuple[Write, asyncio.Future[bool] | None]] = []
        for item in self._queued:
            (held if item[0].job_id in busy else batch).append(item)
        if not caught_up and not batch:
            return False
        self._queued = held
        ids = {write.job_id for write in caught_up}
        ids.update(write.job_id for write, _ in batch)
        busy |= ids
        self._lanes.add(asyncio.ensure_future(self._send(caught_up, batch, ids)))
        return True

    async def _send(
        self,
        caught_up: list[Write] | None = None,
        batch: list[tuple[Write, asyncio.Future[bool] | None]] | None = None,
        ids: set[str] | None = None,
    ) -> bool:
        """Record one batch (a lane's: the jobs `ids` are busy until it settles); False if
        the store failed it (then it is kept for the catch-up, and the store counts as down).
        Without arguments: everything kept and queued, the retry while the store is down."""
        if caught_up is None:
            caught_up = list(self._pending.values())
        if batch is None:
            batch, self._queued = self._queued, []
        writes = caught_up + [write for write, _ in batch]
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    applied = await self.store.record(writes)
            except Exception as exc:
                self._store_down(exc, caught_up, batch)
                return False
            if self.down and ids is None:
                log.warning("job store reachable again: %d job state(s) caught up", len(caught_up))
                self.down = False
                self._backoff = _RETRY_FIRST
            for write in caught_up:
                if self._pending.get(write.job_id) is write:
                    del self._pending[write.job_id]
            for (write, future), granted in zip(batch, applied[len(caught_up) :], strict=True):
                if future is not None and not future.done():
                    future.set_result(granted)
                if write.claim and not granted:  # cancelled, or a cancel was requested
                    self._enqueue(_cancelled(write), None)
            return True
        finally:
            if ids is not None:
                self._busy -= ids
                task = asyncio.current_task()
                if task is not None:
                    self._lanes.discard(task)
            self._wake.set()

    def _store_down(
        self, exc: Exception, caught_up: list[Write], batch: list[tuple[Write, Any]]
    ) -> None:
        if not self.down:
            log.warning(
                "job store %r unreachable (%s): jobs go on running, their states are kept "
                "and recorded when it answers again", self.store, str(exc) or type(exc).__name__,
            )  # fmt: skip
        self.down = True
        # What failed is older than what was kept since the store went down (kept: newer
        # wins); the writes queued behind it are newer, and replace it.
        held, self._queued = self._queued, []
        for write in caught_up:
            self._keep(write, older=True)
        for items, older in ((batch, True), (held, False)):
            for write, future in items:
                if future is not None and not future.done():
                    future.set_result(True)  # the job runs: the queue does not wait for it
                self._keep(write if not write.claim else _plain(write), older=older)

    async def close(self, timeout: float = 5.0) -> None:
        """Record what is pending, waiting at most `timeout` seconds; what is left then is
        logged as lost."""
        self._closed = True
        flusher = self._flusher
        if flusher is None:
            return
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            pass
        stuck = [task for task in (flusher, *self._lanes) if not task.done()]
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
        left = len(self._pending) + len(self._queued)
        if left:
            log.error(
                "job store unreachable at shutdown: the states of %d job(s) were not recorded "
                "(their status stays at what was recorded before)", left,
            )  # fmt: skip


class GroupCommit:
    """Concurrent callers' writes, committed together: each `record()` joins the next batch
    and returns once that batch is committed (or raises what the store raised for it).

    Up to `LANES` batches are in flight at once; what arrives while they are forms the next
    one, so N concurrent enqueues cost a few store transactions instead of N, and a caller
    does not wait behind a batch it is not in.

    Args:
        store: the job store.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._writes: list[Write] = []
        self._next: asyncio.Future[None] | None = None
        self._flushers: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def record(self, write: Write) -> None:
        """Record `write` with the batch it joins; returns once that batch is committed.

        Raises:
            StoreError: the store could not record the batch.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop: what the old one held is gone
            self._loop, self._writes, self._next, self._flushers = loop, [], None, set()
        if self._next is None:
            self._next = loop.create_future()
        future = self._next
        self._writes.append(write)
        flushers = self._flushers = {f for f in self._flushers if not f.done()}
        if len(flushers) < LANES:
            flushers.add(loop.create_task(self._flush()))
        # shielded: a caller cancelled does not cancel the batch the others wait for
        await asyncio.shield(future)

    async def _flush(self) -> None:
        while self._writes:
            writes, future = self._writes, self._next
            self._writes, self._next = [], None
            assert future is not None
            try:
                await self.store.record(writes)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved: every caller may have been cancelled
            else:
                if not future.done():
                    future.set_result(None)


def _plain(write: Write) -> Write:
    return Write(
        job_id=write.job_id, task=write.task, queue=write.queue, state=write.state,
        at=write.at, attempt=write.attempt, defers=write.defers,
    )  # fmt: skip


def _cancelled(write: Write) -> Write:
    return Write(
        job_id=write.job_id, task=write.task, queue=write.queue, state=JobState.CANCELLED,
        at=time.time(), attempt=write.attempt, defers=write.defers,
    )  # fmt: skip
