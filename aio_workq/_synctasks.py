"""Typed tasks from synchronous code: `SyncProducer.enqueue(task, ...)`, `SyncProducer.job()`
and the blocking `SyncJobHandle`.

The calls are the async ones (`Task.send`, `JobHandle`), run on the SyncProducer's event-loop
thread: the job store is used only there (a SQLite connection, a PostgreSQL pool belong to one
thread, one loop). The arguments are bound and checked in the caller's thread, before the
producer connects. `SyncProducer` inherits these methods from `SyncTaskCalls` (one class would
be over 250 lines).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, overload

from ._exceptions import ConfigurationError, PublishTimeoutError, WorkqError
from ._link.settings import check_seconds
from ._web import ProducerView
from .jobs._errors import JobTimeoutError, StoreError
from .jobs._handle import JobHandle
from .jobs._status import JobState, JobStatus
from .jobs._store import JobStore
from .jobs._tasks import Task, Tasks

__all__ = ("SLACK", "Closeable", "SyncJobHandle", "SyncTaskCalls")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

SLACK = 2.0
"""How much longer than its own bound a caller waits for the loop thread's answer. The loop
thread bounds every call itself; this only guards against a loop that is stuck."""

Make = Callable[[ProducerView], Coroutine[Any, Any, T]]


class Closeable(Protocol):
    """A job store, as the loop thread closes it."""

    async def close(self) -> None: ...


class Runner(Protocol):
    """The SyncProducer's loop thread, as these calls use it."""

    @property
    def view(self) -> ProducerView | None: ...

    def hold(self, resource: Closeable) -> None: ...

    def submit(
        self,
        coro: Coroutine[Any, Any, T],
        bound: float | None,
        doing: str,
        stuck: Callable[[str], WorkqError] = ...,
        interruptible: bool = ...,
    ) -> T: ...


@dataclass(frozen=True, slots=True)
class _Context:
    """A handle's store and publisher, made on the loop thread for one call."""

    store: JobStore | None
    publisher: ProducerView


async def _bounded(call: Awaitable[T], seconds: float, job_id: str) -> T:
    """`call` within `seconds`; a store that does not answer by then is a `StoreError`."""
    try:
        async with asyncio.timeout(seconds):
            return await call
    except TimeoutError as exc:
        if isinstance(exc, WorkqError):  # the call's own typed timeout
            raise
        raise StoreError(
            f"job {job_id}: no answer from the job store within {seconds:g} s",
            job_id=job_id,
            unreachable=True,
        ) from None


class SyncJobHandle(Generic[R]):
    """One job, followed from sync code: `JobHandle`'s calls, blocking the calling thread.

    `SyncProducer.enqueue()` returns one; `SyncProducer.job(task_or_tasks, job_id)` makes one
    from a job id (for a status view). Each call runs on the producer's event-loop thread and
    is bounded: `status()` and `cancel()` by `timeout` (default: the producer's), `result()`
    and `wait()` by theirs.
    """

    __slots__ = ("_producer", "_registry", "_validate", "job_id")

    def __init__(
        self,
        job_id: str,
        *,
        producer: SyncTaskCalls,
        registry: Tasks,
        validate: Callable[[bytes, str | None], Any] | None,
    ) -> None:
        self.job_id = job_id
        self._producer = producer
        self._registry = registry
        self._validate = validate

    def __repr__(self) -> str:
        return f"<SyncJobHandle {self.job_id}>"

    def _run(
        self,
        doing: str,
        bound: float | None,
        call: Callable[[JobHandle[R]], Coroutine[Any, Any, T]],
        stuck: Callable[[str], WorkqError],
        interruptible: bool = False,
    ) -> T:
        def make(view: ProducerView) -> Coroutine[Any, Any, T]:
            context = _Context(self._registry.store, view)
            return call(JobHandle(self.job_id, context=context, validate=self._validate))

        doing = f"{doing} job {self.job_id}"
        store = self._registry.store
        return self._producer._submit(make, bound, doing, stuck, store, interruptible)

    def _store_stuck(self, message: str) -> WorkqError:
        return StoreError(message, job_id=self.job_id, unreachable=True)

    def _late(self, message: str) -> WorkqError:
        return JobTimeoutError(message, job_id=self.job_id)

    def status(self, *, timeout: float | None = None) -> JobStatus:
        """The job's recorded status.

        Raises:
            JobNotFoundError: the store has no record of it.
            StoreError: the store can't be reached, or did not answer within `timeout`.
            ConfigurationError: the registry has no store.
            BrokerConnectionError: the producer's first connection failed (it connects on
                first use, also for reading a status).
            IntegrationError: the producer is closed, or called from its own loop thread.
        """
        seconds = self._producer._seconds(timeout)
        return self._run(
            "reading the status of",
            seconds,
            lambda handle: _bounded(handle.status(), seconds, self.job_id),
            self._store_stuck,
        )

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the job is done; its final status (see `JobHandle.wait`).

        Raises:
            JobTimeoutError: not done within `timeout` seconds (`None`: no bound).
            JobNotFoundError, StoreError, ConfigurationError: as `status()`.
            IntegrationError: the producer was closed meanwhile (by another thread).
        """
        seconds = None if timeout is None else check_seconds("timeout", timeout)
        return self._run("waiting for", seconds, lambda h: h.wait(seconds), self._late, True)

    def result(self, timeout: float | None = None) -> R:
        """Block until the job is done and return the task's return value (see
        `JobHandle.result`).

        Raises:
            JobTimeoutError: not done within `timeout` seconds (`None`: no bound).
            JobFailedError: it failed for good; `error_type` and `error_message` say why.
            JobCancelledError: it was cancelled.
            PayloadError: the stored value does not validate as the task's return type.
            JobNotFoundError, StoreError, ConfigurationError: as `status()`.
            IntegrationError: the producer was closed meanwhile (by another thread).
        """
        seconds = None if timeout is None else check_seconds("timeout", timeout)
        return self._run(
            "waiting for the result of", seconds, lambda h: h.result(seconds), self._late, True
        )

    def cancel(self, *, timeout: float | None = None) -> JobStatus:
        """Cancel the job from any process; its status after the request (see
        `JobHandle.cancel`). The store's part is bounded by `timeout` (default: the
        producer's), as `status()` is; for a running job, the request to its worker then
        waits up to `timeout` more for the broker's confirm.

        Raises:
            JobNotFoundError: the store has no record of it.
            StoreError: as `status()`.
            PublishError: the cancel request to the workers was not confirmed.
        """
        seconds = self._producer._seconds(timeout)

        async def cancelling(view: ProducerView) -> JobStatus:
            context = _Context(self._registry.store, view)
            handle = JobHandle[R](self.job_id, context=context, validate=self._validate)
            status = await _bounded(handle._cancel_recorded(), seconds, self.job_id)
            if status.state is JobState.RUNNING:
                await handle._tell_workers(view.with_timeout(seconds))
            return status

        doing = f"cancelling job {self.job_id}"
        store = self._registry.store
        return self._producer._submit(cancelling, 2 * seconds, doing, self._store_stuck, store)


class SyncTaskCalls:
    """`SyncProducer`'s task methods, on top of its loop thread (`_running()`)."""

    _timeout: float

    def _running(self) -> Runner:
        raise NotImplementedError

    def _seconds(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else check_seconds("timeout", timeout)

    def _submit(
        self,
        make: Make[T],
        bound: float | None,
        doing: str,
        stuck: Callable[[str], WorkqError] = PublishTimeoutError,
        store: JobStore | None = None,
        interruptible: bool = False,
        commits: Closeable | None = None,
    ) -> T:
        """Run `make(view)` on the loop thread (connecting on first use); its result here.
        `bound` is the call's own bound: the wait for the loop thread adds `SLACK` to it.
        A `store` the call uses is closed with the loop (its connections live there), and
        before it the registry's `commits` there (what they kept goes to another loop)."""
        runner = self._running()
        if store is not None:
            runner.hold(store)
        if commits is not None:
            runner.hold(commits)  # closed before the store: held after it
        view = runner.view
        assert view is not None

        async def run() -> T:
            return await make(view)

        slack = None if bound is None else bound + SLACK
        return runner.submit(run(), slack, doing, stuck, interruptible)

    def enqueue(self, task: Task[P, R], /, *args: P.args, **kwargs: P.kwargs) -> SyncJobHandle[R]:
        """Enqueue a job of `task` (made by `@tasks.task`) and block until the broker
        confirmed it; returns its blocking handle.

        `resize.options(delay=60, job_id=...)` gives the options, as for `await
        task.enqueue(...)`. The arguments are bound to the function's signature and validated
        as its parameters' types in the calling thread, before anything is sent or connected.
        With a store, the job is recorded as queued before this returns; a store that can't
        be reached does not stretch the call (the job is sent anyway and its record written
        when the store is back), as `Task.enqueue` does. The publish and the record's wait
        together are bounded by the producer's `timeout` (or the task's `options(timeout=)`).

        Raises:
            TaskArgumentError: the arguments don't fit the signature (nothing was sent).
            ConfigurationError: `task` is not a task.
            PublishTimeoutError: not confirmed within the timeout (e.g. the broker is down).
            PublishError (and its subclasses): the broker did not confirm the job.
            BrokerConnectionError: connecting on first use failed (bounded by
                `connect_timeout`).
            IntegrationError: called from the producer's own loop thread, or after `close()`.
        """
        if not isinstance(task, Task):
            raise ConfigurationError(
                f"enqueue() takes a task declared with @tasks.task(queue=...), got {task!r}; "
                "to send a plain message use publish()"
            )
        body = task.arguments.encode(args, kwargs)
        registry = task.registry
        bound = self._seconds(task.publish_options.get("timeout"))  # the record's wait too

        def make(view: ProducerView) -> Coroutine[Any, Any, JobHandle[R]]:
            return task._send(body, view, _Context(registry.store, view))

        doing = f"enqueueing a job of task {task.name!r}"
        store = registry.store
        commits = None if store is None else registry.commits(store)
        handle = self._submit(make, bound, doing, PublishTimeoutError, store, commits=commits)
        return SyncJobHandle(
            handle.job_id, producer=self, registry=registry, validate=task.result_validator()
        )

    @overload
    def job(self, of: Task[..., R], job_id: str) -> SyncJobHandle[R]: ...

    @overload
    def job(self, of: Tasks, job_id: str) -> SyncJobHandle[Any]: ...

    def job(self, of: Task[..., Any] | Tasks, job_id: str) -> SyncJobHandle[Any]:
        """A blocking handle on a job by its id, for a status view: typed as the task's
        return type given the task, the decoded JSON given the `Tasks` registry. Nothing is
        read until a call on the handle.

        Raises:
            ConfigurationError: `of` is neither a task nor a `Tasks`, or `job_id` not a string.
        """
        if not isinstance(job_id, str):
            raise ConfigurationError(f"job() takes the job id as a string, got {job_id!r}")
        if isinstance(of, Task):
            return SyncJobHandle(
                job_id, producer=self, registry=of.registry, validate=of.result_validator()
            )
        if isinstance(of, Tasks):
            return SyncJobHandle(job_id, producer=self, registry=of, validate=None)
        raise ConfigurationError(
            f"job() takes a task (@tasks.task) or its Tasks registry, then the job id; got {of!r}"
        )
