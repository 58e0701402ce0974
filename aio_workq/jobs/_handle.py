"""A handle on one job: its status, its result, and cancelling it, from any process."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, Unpack

from .._exceptions import ConfigurationError, IntegrationError, PayloadError
from .._link.settings import check_seconds
from .._link.specs import Exchange, ExchangeType, Queue
from .._publish.message import PublishOptions
from .._publish.serialization import decode_body
from ._errors import (
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    JobTimeoutError,
    StoreError,
)
from ._status import JobRecord, JobState, JobStatus, unstorable_id
from ._store import JobStore

__all__ = ("CONTROL_EXCHANGE", "TASK_HEADER", "Context", "JobHandle", "Publisher")

log = logging.getLogger("aio_workq.jobs")

R = TypeVar("R")

TASK_HEADER = "x-workq-task"
"""The header that names a job's task (several tasks can share a queue)."""

CONTROL_EXCHANGE = Exchange("workq.control", ExchangeType.FANOUT)
"""The fanout exchange every task worker process listens on (cancel requests)."""

_POLL_FIRST, _POLL_FACTOR = 0.05, 1.5


class Publisher(Protocol):
    """What enqueues and cancels publish through: a `Producer`, or a web integration's
    `ProducerView`."""

    async def publish(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        **options: Unpack[PublishOptions],
    ) -> str: ...


class Context(Protocol):
    """Where a handle finds the store and the publisher (the `Tasks` registry)."""

    @property
    def store(self) -> JobStore | None: ...

    @property
    def publisher(self) -> Publisher | None: ...


class JobHandle(Generic[R]):
    """One job, followed from any process that shares the store.

    `Task.enqueue()` returns one; `Tasks.job(id)` / `Task.job(id)` make one from a job id (for
    a status route of a web app). `R` is the task's return type: `result()` returns the stored
    value validated as it, like a typed payload.
    """

    __slots__ = ("_context", "_poll_cap", "_validate", "job_id")

    def __init__(
        self,
        job_id: str,
        *,
        context: Context,
        validate: Callable[[bytes, str | None], Any] | None = None,
        poll_cap: float = 1.0,
    ) -> None:
        self.job_id = job_id
        self._context = context
        self._validate = validate
        self.poll_cap = poll_cap

    @property
    def poll_cap(self) -> float:
        """`wait()`/`result()` poll the store from every 50 ms, backing off to every
        `poll_cap` seconds (default 1).

        Raises:
            ConfigurationError: set to anything but a finite number of seconds >= 0.05 (0
                would poll the store in a tight loop).
        """
        return self._poll_cap

    @poll_cap.setter
    def poll_cap(self, seconds: float) -> None:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not _POLL_FIRST <= seconds < math.inf
        ):
            raise ConfigurationError(
                f"poll_cap must be a finite number of seconds >= {_POLL_FIRST}, got {seconds!r}"
            )
        self._poll_cap = float(seconds)

    def __repr__(self) -> str:
        return f"<JobHandle {self.job_id}>"

    def _store(self) -> JobStore:
        store = self._context.store
        if store is None:
            raise ConfigurationError(
                "job tracking needs a store: Tasks(store=SQLiteStore('jobs.db')) or "
                "PostgresStore(dsn), in the processes that enqueue and that run the workers"
            )
        return store

    async def _record(self) -> JobRecord:
        store = self._store()
        # An id no job can have (a NUL, from a request's path, say) is not the store's failure.
        record = None if unstorable_id(self.job_id) else await store.get(self.job_id)
        if record is None:
            raise self._not_found()
        return record

    def _not_found(self) -> JobNotFoundError:
        return JobNotFoundError(
            f"no record of job {self.job_id}: an unknown id, a record past the store's TTL, "
            "or a job enqueued while the store was unreachable that no worker recorded yet",
            job_id=self.job_id,
        )

    async def status(self) -> JobStatus:
        """The job's recorded status.

        Raises:
            JobNotFoundError: the store has no record of it.
            StoreError: the store can't be reached.
            ConfigurationError: the registry has no store.
        """
        return (await self._record()).status

    async def wait(self, timeout: float | None = None) -> JobStatus:
        """Wait until the job is done (succeeded, failed or cancelled); its final status.

        Polls the store with a backoff: every 50 ms at first, then 1.5 times longer each time
        up to `poll_cap` (1 s), so a long wait costs one read a second. With a `timeout`, a
        store that does not answer does not stretch it: each read ends by the deadline (the
        last one may take 50 ms past it); one that can't be reached (refused, restarting) is
        read again until the deadline, so the wait rides through a short outage. A `timeout`
        of 0 or less reads the status once; an infinite one is no bound, as `None`.

        Raises:
            JobTimeoutError: not done within `timeout` seconds (or the store did not answer
                until then).
            ConfigurationError: `timeout` is not a number of seconds (NaN, a str, a bool).
            JobNotFoundError, StoreError, ConfigurationError: as `status()` (with a
                `timeout`, a `StoreError` only when the store answered with an error).
        """
        return (await self._done(timeout)).status

    async def _done(self, timeout: float | None) -> JobRecord:
        """`wait()`: the record that found the job done (`result()` takes its value from it:
        a second read could fail, or outlast the timeout, with the answer in hand)."""
        timeout = _bound(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pause = _POLL_FIRST
        status: JobStatus | None = None
        outage: StoreError | None = None  # the store's last "can't be reached", if any
        while True:
            if deadline is None:
                record = await self._record()
            else:
                try:
                    async with asyncio.timeout_at(max(deadline, loop.time() + _POLL_FIRST)):
                        record = await self._record()
                except TimeoutError:
                    raise self._late(timeout, status, unanswered=True) from outage
                except StoreError as exc:
                    if not exc.unreachable:
                        raise
                    outage = exc
                    if loop.time() >= deadline:
                        raise self._late(timeout, status, unanswered=True) from exc
                    await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                    pause = min(pause * _POLL_FACTOR, self.poll_cap)
                    continue
            status = record.status
            if status.done:
                return record
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise self._late(timeout, status)
                pause = min(pause, left)
            await asyncio.sleep(pause)
            pause = min(pause * _POLL_FACTOR, self.poll_cap)

    def _late(
        self, timeout: float | None, status: JobStatus | None, unanswered: bool = False
    ) -> JobTimeoutError:
        said = [] if status is None else [f"it is {status.state}, attempt {status.attempt}"]
        if unanswered:
            said.append("the job store did not answer")
        return JobTimeoutError(
            f"job {self.job_id} not done within {timeout:g} s ({'; '.join(said)})",
            job_id=self.job_id,
        )

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the job to finish and return the task's return value (read with the status
        that found it done: no second read of the store, which could fail or outlast
        `timeout` with the answer in hand).

        Raises:
            JobTimeoutError: not done within `timeout` seconds (a `TimeoutError`).
            ConfigurationError: `timeout` is not a number of seconds (see `wait()`).
            JobFailedError: it failed for good; `error_type` and `error_message` say why.
            JobCancelledError: it was cancelled.
            PayloadError: the stored value does not validate as the task's return type (the
                message names the job and its task; `Tasks.job(id)` reads it untyped).
            JobNotFoundError, StoreError, ConfigurationError: as `status()`.
        """
        record = await self._done(timeout)  # one read: the one that found it done
        status = record.status
        if status.state is JobState.FAILED:
            raise JobFailedError(
                f"job {self.job_id} ({status.task}) failed after {status.attempt} attempt(s): "
                f"{status.error_type}: {status.error_message}",
                job_id=self.job_id,
                error_type=status.error_type or "",
                error_message=status.error_message or "",
            )
        if status.state is JobState.CANCELLED:
            raise JobCancelledError(f"job {self.job_id} was cancelled", job_id=self.job_id)
        body = record.result if record.result is not None else b"null"
        content_type = record.content_type if record.result is not None else "application/json"
        if self._validate is None:
            return decode_body(body, content_type)  # type: ignore[no-any-return]
        try:
            return self._validate(body, content_type)  # type: ignore[no-any-return]
        except PayloadError as exc:
            raise PayloadError(
                f"job {self.job_id} ({status.task}) succeeded, but the value it returned does "
                f"not validate as the task's return type: {exc}; fix the task's return "
                "annotation or what it returns, or read the value untyped with "
                f"tasks.job({self.job_id!r}).result()"
            ) from exc

    async def cancel(self) -> JobStatus:
        """Cancel the job from any process; its status after the request.

        A queued or retrying job is marked cancelled at once and skipped when it arrives (acked,
        never run). For a running one, every worker process is told through the control
        exchange: an `async def` task has its asyncio task cancelled, a plain `def` task is
        flagged (`current_job().cancelled`); the status turns `cancelled` when it has stopped
        (`succeeded` if it finished first). A worker that did not hear the request (it was
        reconnecting) finds it in the store: each checks its jobs running for 5 s or more
        every 5 s. A finished job is left as it is.

        Raises:
            JobNotFoundError: the store has no record of it.
            StoreError, ConfigurationError: as `status()`.
            IntegrationError: a running job, and the registry has no producer to tell the
                workers with.
            PublishError: the cancel request to the workers was not confirmed. With this or
                the IntegrationError the cancel is recorded all the same: the job's worker
                finds it in the store and stops the job within about 10 s (as above).
        """
        status = await self._cancel_recorded()
        if status.state is JobState.RUNNING:
            await self._tell_workers(self._context.publisher)
        return status

    async def _cancel_recorded(self) -> JobStatus:
        """`cancel()`'s part in the store: the job marked cancelled (or flagged, running)."""
        store = self._store()
        status = (
            None if unstorable_id(self.job_id) else await store.cancel(self.job_id, now=time.time())
        )
        if status is None:
            raise self._not_found()
        return status

    async def _tell_workers(self, publisher: Publisher | None) -> None:
        """`cancel()`'s request to the worker running the job, on the control exchange."""
        if publisher is None:
            raise IntegrationError(
                f"job {self.job_id} is running: telling its worker to stop needs a "
                "producer (tasks.bind(producer))"
            )
        await publisher.publish(
            {"cancel": self.job_id}, exchange=CONTROL_EXCHANGE, routing_key="",
            mandatory=False, persistent=False,
        )  # fmt: skip


def _bound(timeout: object) -> float | None:
    """A wait's `timeout` once checked: None (or infinite) for no bound, else its seconds (0
    for a number below 0: the status is read once).

    Raises:
        ConfigurationError: not a number (a bool is not one), or NaN: NaN never runs out, and
            the wait would have no bound at all.
    """
    if timeout is None:
        return None
    seconds = check_seconds("timeout", timeout, clamp=True, forever=True, or_none=True)
    return None if math.isinf(seconds) else seconds
