"""Running tasks: one worker per queue, dispatching by the task header; cancel requests from
the control exchange; the recorder's lifecycle tied to the workers'."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from .._consume.execution import within_handler_timeout
from .._consume.failures import MAX_DEFERS
from .._consume.job import Job
from .._consume.retry import RetryPolicy
from .._consume.worker import Worker
from .._exceptions import ConfigurationError, Reject
from .._hooks import Hook
from .._link.settings import check_seconds
from .._link.specs import Queue
from ._errors import Cancelled
from ._groups import GROUP_HEADER
from ._groupstore import RateStore
from ._handle import CONTROL_EXCHANGE, TASK_HEADER
from ._lent import Lease, LentProducers, ProducerSettings
from ._members import Members
from ._rate import RateLimit, acquire
from ._recorder import Recorder, Running, _current

if TYPE_CHECKING:
    from .._link.settings import URLs
    from ._store import JobStore

__all__ = ("TaskWorker", "build_workers", "call_task")

log = logging.getLogger("aio_workq.jobs")

CLAIM_AHEAD = 4
"""With a store, task workers prefetch this many times `concurrency` by default (Celery's
`worker_prefetch_multiplier` is 4 too): a delivery's claim must be answered before its task
runs, and the deliveries waiting in the worker's line keep the store's batches large enough
to hide its round trips and commits (#23; at 2× a tracked consume was bound by the prefetch
over that latency: about 8,000–13,000 jobs/s here against 17,500–19,400 at 4× and 8×)."""


class TaskArguments(Protocol):
    def decode(self, body: bytes, content_type: str | None) -> dict[str, Any]: ...


class RunnableTask(Protocol):
    """What running needs of a `Task` (`_tasks` imports this module, never the reverse)."""

    @property
    def name(self) -> str: ...
    @property
    def queue(self) -> Queue: ...
    @property
    def is_async(self) -> bool: ...
    @property
    def arguments(self) -> TaskArguments: ...

    @property
    def rate_limit(self) -> RateLimit | None: ...

    def fn(self, **kwargs: Any) -> Any: ...


class _Session:
    """The workers one `tasks.workers()` call built, and their recorder: closed (what is
    pending recorded) once the last of them stops; and the producer they bring for their
    jobs' enqueues when the registry has none bound (`_lent`), with its settings."""

    def __init__(
        self,
        recorder: Recorder | None,
        producers: LentProducers | None = None,
        settings: ProducerSettings | None = None,
    ) -> None:
        self.recorder = recorder
        self.open: set[Worker] = set()
        self.producers = producers
        self.settings = settings

    async def stopped(self, worker: Worker) -> None:
        if worker not in self.open:
            return
        self.open.discard(worker)
        if self.open:
            return
        if self.recorder is not None:
            await self.recorder.close()


class TaskWorker(Worker):
    """A `Worker` built by `Tasks.workers()`: stopping the last one records what its job
    recorder still holds. Without a producer bound to the registry, each holds a use of the
    producer the workers bring (`LentProducers`) from its start until it stopped: the last
    one's stop, its handlers done, closes it."""

    def __init__(self, url: URLs | None = None, *, session: _Session, **options: Any) -> None:
        super().__init__(url, **options)
        self._session = session
        self._lease: Lease | None = None
        self._leased = self._given_back = False
        self._added: tuple[Hook, ...] = ()
        session.open.add(self)

    def add_hooks(self, *hooks: Hook) -> None:
        super().add_hooks(*hooks)
        self._added = (*self._added, *hooks)  # the producer it brings sees them too

    async def start(self, *, wait_for_broker: float | None = None) -> None:
        session = self._session
        fresh = not (self._leased or self._started or self._stopping)  # else a no-op or refused
        if session.producers is not None and session.settings is not None and fresh:
            self._leased = True
            settings = session.settings
            if self._added:
                settings = replace(settings, hooks=(*settings.hooks, *self._added))
            lease = await session.producers.acquire(settings, wait_for_broker)
            if self._given_back and lease is not None:  # a stop() ended while it opened
                await session.producers.release(lease)
            else:
                self._lease = lease
        try:
            await super().start(wait_for_broker=wait_for_broker)
        except BaseException:
            await self._give_back()
            raise

    async def stop(self, timeout: float | None = None) -> None:
        try:
            await super().stop(timeout)
        finally:
            try:
                await self._session.stopped(self)
            finally:
                await self._give_back()

    async def _give_back(self) -> None:
        self._given_back = True
        lease, self._lease = self._lease, None
        if lease is not None and self._session.producers is not None:
            await self._session.producers.release(lease)


async def call_task(
    task: RunnableTask,
    kwargs: dict[str, Any],
    running: Running | None,
    current: asyncio.Task[Any] | None = None,
) -> Any:
    """Call the task's function with `kwargs`: an `async def` in the delivery's task (a cancel
    request cancels that task while the function runs, and the cancellation is taken back
    here), a plain `def` in a thread; `running` is the tracked job (`current_job()` inside),
    `current` the task running this (default: `asyncio.current_task()`).

    Returns the function's value; `None` when it was cancelled (`running.stopped` then says
    so: a function that returns None as the request arrives ran to its end).
    """
    if running is None:
        try:
            if task.is_async:
                return await task.fn(**kwargs)
            return await asyncio.to_thread(task.fn, **kwargs)
        except Cancelled:
            return None
    if running._cancel:  # `cancelled`, between its claim and now (e.g. waiting for a slot)
        running.stopped = True
        return None
    token = _current.set(running)  # running.enter(), a call less per job
    try:
        if task.is_async:
            # No task of its own per job: `request_cancel` cancels this one, only while the
            # function runs (`handler` is set), and the count it added is taken back here so
            # the worker does not read it as its own stop (`Task.uncancel`).
            outer = current or asyncio.current_task()
            assert outer is not None
            running.handler = outer
            try:
                return await task.fn(**kwargs)
            except asyncio.CancelledError:
                if running.interrupted:
                    running.interrupted = False
                    if outer.uncancel() == 0:
                        running.stopped = True  # only the request's: the job ends cancelled
                        return None
                raise  # the worker stopping, a timeout, or the function's own
            finally:
                running.handler = None
                if running.interrupted:  # the function swallowed the cancel request's
                    running.interrupted = False
                    outer.uncancel()
        return await asyncio.to_thread(task.fn, **kwargs)
    except Cancelled:
        running.request_cancel()  # the task stopped itself: recorded as cancelled
        running.stopped = True
        return None
    finally:
        _current.reset(token)


class QueueRunner:
    """The handler of one queue's worker: finds the task by its header and runs it."""

    def __init__(
        self,
        queue: str,
        tasks: Mapping[str, RunnableTask],
        recorder: Recorder | None,
        members: Members | None = None,
        timeout: float | None = None,
    ):
        self.queue = queue
        self._tasks = dict(tasks)
        self._recorder = recorder
        self._members = members
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _run(
        self,
        task: RunnableTask,
        kwargs: dict[str, Any],
        running: Running | None,
        current: asyncio.Task[Any] | None = None,
    ) -> Any:
        """`call_task`, within the worker's `handler_timeout`: it times the task, not the
        claim nor the wait for a rate-limit slot before it."""
        if self._timeout is None:
            return await call_task(task, kwargs, running, current)
        return await within_handler_timeout(
            self._timeout, call_task(task, kwargs, running, current)
        )

    def __workq_name__(self, job: Job | None) -> str:
        """How the logs name what ran `job`: its task (`NamedHandler`)."""
        name = job.headers.get(TASK_HEADER) if job is not None else None
        return f"task {name!r}" if isinstance(name, str) else f"a task of queue {self.queue!r}"

    async def __call__(self, job: Job) -> Any:
        recorder = self._recorder
        running = None
        if recorder is not None:
            # Made (and claimed) when the delivery arrived, before anything can fail here: a
            # job that fails here is recorded as failed too.
            running = recorder.jobs.get(job) or recorder.follow(job, self.queue)
        # read once for the headers and content type (the recorder's read, if it has it)
        properties = running._properties if running is not None else None
        if properties is None:
            properties = job.delivery.properties
        headers = properties.headers or {}
        name = headers.get(TASK_HEADER)
        task = self._tasks.get(name) if isinstance(name, str) else None
        members = self._members
        if task is None:
            unknown = Reject(_no_task(name, self.queue, self._tasks))
            if running is not None and members is not None:
                member = members.member_of(job, headers)
                if member is not None:  # dead-lettered: final, so its group counts it
                    await member.failed_for_good(unknown, running)
            raise unknown
        if recorder is not None and running is not None and members is not None:
            # (a group member has its header: `member_of` is not asked for every job, #23)
            member = members.member_of(job, headers) if GROUP_HEADER in headers else None
            if member is not None:
                return await member.handle(task, running, recorder, self._run)
        kwargs = task.arguments.decode(job.body, properties.content_type)
        limit = task.rate_limit
        if recorder is None or running is None:
            return await self._run(task, kwargs, None)
        claimed = running.claimed  # sent when the delivery arrived, often answered by now
        if claimed is None:
            if not await recorder.claim(running):
                return None
        elif not await claimed:  # the future itself: no coroutine for it (#23)
            recorder.refused(running)
            return None
        if limit is not None and members is not None and members.rates is not None:
            await acquire(members.rates, task.name, limit, kwargs)
        current = None
        if task.is_async:
            # The delivery's task, which the worker's dispatcher runs this in (it keeps it on
            # the job while it runs: no `current_task()` a job, #23), else looked up.
            current = job._task
            loop = self._loop
            if current is None and loop is not None:
                current = asyncio.current_task(loop)
            if current is None:  # first call, or another event loop: without its loop
                self._loop = loop = asyncio.get_running_loop()  # this asks the OS for its pid
                current = asyncio.current_task(loop)
        value = await self._run(task, kwargs, running, current)
        if running.stopped:
            return None
        running.keep_result(value)
        return value


def _no_task(name: Any, queue: str, tasks: Mapping[str, Any]) -> str:
    """Why a delivery has no task to run it (it is dead-lettered)."""
    runs = f"this worker runs {', '.join(sorted(tasks))}"
    if name is None:
        return (
            f"the message names no task (no {TASK_HEADER} header: it was published with "
            f"producer.publish(), not task.enqueue()) and queue {queue!r} runs tasks ({runs}): "
            "enqueue it with its task, or publish it to a queue of its own"
        )
    return (
        f"no task {name!r} runs on queue {queue!r} ({runs}): deploy the task, or replay the "
        "message once it is (a task renamed since: @tasks.task(..., aliases=[its old name]); "
        "the workers of another registry on this queue: keep a queue's tasks in one Tasks "
        "registry)"
    )


def build_workers(
    tasks: Iterable[RunnableTask],
    store: JobStore | None,
    url: URLs | None,
    *,
    concurrency: int,
    retry: RetryPolicy | None,
    queues: Sequence[str] | None,
    hooks: Sequence[Hook],
    options: dict[str, Any],
    aliases: Mapping[str, RunnableTask] | None = None,
    producers: LentProducers | None = None,
) -> list[Worker]:
    """`Tasks.workers()`: a `TaskWorker` per queue, its `QueueRunner` finding each job's task
    by its header; with a store, one `Recorder` for them all (and `Members` for the jobs of
    groups), and a listener of the cancel requests on the control exchange. With `producers`,
    the workers bring the registry a producer while they run, unless one is bound: their jobs'
    enqueues and their groups' callbacks go through it (or the one bound).

    Raises:
        ConfigurationError: no tasks to run, an option `Tasks.workers()` sets itself, or a
            rate limit without a store that keeps rate limits.
    """
    for key in ("queue", "handler", "exchange", "binding_keys"):
        if key in options:
            raise ConfigurationError(f"tasks.workers() sets {key}= itself")
    tasks = list(tasks)
    by_queue, specs = _tasks_by_queue(tasks, queues, aliases or {})
    _check_rate_limits(by_queue, store)
    # The task workers time the task itself (`QueueRunner._run`), not the claim and the wait
    # for a rate-limit slot before it: a job waiting for its slot must not fail for it.
    options = dict(options)
    timeout = options.pop("handler_timeout", None)
    if timeout is not None:
        timeout = check_seconds("handler_timeout", timeout)
    recorder = members = None
    if store is not None:
        recorder = Recorder(store)
        members = Members(
            store, retry=retry, max_defers=options.get("max_defers", MAX_DEFERS),
            publisher=producers.publisher if producers is not None else lambda: None,
            queues={
                **{alias: task.queue for alias, task in (aliases or {}).items()},
                **{task.name: task.queue for task in tasks},
            },
        )  # fmt: skip
        if options.get("prefetch") is None:
            # Deliveries beyond `concurrency` wait for a free handler with their claims sent
            # (Recorder.arrived): the claim's round trip overlaps the handlers running.
            options = {**options, "prefetch": CLAIM_AHEAD * concurrency}
    settings = None if producers is None else ProducerSettings.of(url, options, hooks)
    session = _Session(recorder, producers, settings)
    extra = [recorder] if recorder is not None else []
    workers: list[Worker] = [
        TaskWorker(
            url,
            session=session,
            queue=specs[name],
            handler=QueueRunner(name, group, recorder, members, timeout),
            concurrency=concurrency,
            retry=retry,
            hooks=[*extra, *hooks],
            **options,
        )  # fmt: skip
        for name, group in by_queue.items()
    ]
    if recorder is not None:
        workers.append(_cancel_listener(recorder, url, session, options.get("connection")))
    return workers


def _tasks_by_queue(
    tasks: list[RunnableTask],
    queues: Sequence[str] | None,
    aliases: Mapping[str, RunnableTask],
) -> tuple[dict[str, dict[str, RunnableTask]], dict[str, Queue]]:
    """The tasks to run (those of `queues`, if given), by queue name, then by the names a
    message can carry (a task's own and its former ones, `aliases`); and each queue's spec.

    Raises:
        ConfigurationError: no task to run.
    """
    by_queue: dict[str, dict[str, RunnableTask]] = {}
    specs: dict[str, Queue] = {}
    for task in tasks:
        if queues is not None and task.queue.name not in queues:
            continue
        by_queue.setdefault(task.queue.name, {})[task.name] = task
        specs[task.queue.name] = task.queue
    for alias, task in aliases.items():  # a former name: its queued jobs run too
        if task.queue.name in by_queue:
            by_queue[task.queue.name][alias] = task
    if not by_queue:
        wanted = f" on queues {list(queues)}" if queues is not None else ""
        raise ConfigurationError(f"no tasks{wanted}: declare them with @tasks.task(queue=...)")
    return by_queue, specs


def _check_rate_limits(
    by_queue: Mapping[str, Mapping[str, RunnableTask]], store: JobStore | None
) -> None:
    """Raises `ConfigurationError` for a task with a rate limit and no store that keeps one."""
    for group in by_queue.values():
        for task in group.values():
            if task.rate_limit is not None and not isinstance(store, RateStore):
                raise ConfigurationError(
                    f"task {task.name!r} has a rate_limit: it needs a job store that keeps "
                    f"rate limits (SQLiteStore, PostgresStore), got {store!r}"
                )


def _cancel_listener(
    recorder: Recorder, url: URLs | None, session: _Session, connection: Any
) -> TaskWorker:
    """The worker of a server-named queue bound to the control exchange: it hands each cancel
    request to `recorder`, which cancels the job if it runs in this process."""
    return TaskWorker(
        None if connection is not None else url,
        session=session,
        queue="",
        exchange=CONTROL_EXCHANGE,
        handler=_control_handler(recorder),
        retry=None,
        connection=connection,
        name="aio-workq control",
        presence=False,  # a listener of aio-workq's own, not a worker to list
    )


def _control_handler(recorder: Recorder) -> Any:
    async def control(job: Job) -> None:
        data = job.data
        job_id = data.get("cancel") if isinstance(data, dict) else None
        if isinstance(job_id, str):
            recorder.cancel_local(job_id)

    control.__qualname__ = "workq.control"
    return control
