"""Typed task definitions: declare a function once with its queue, enqueue it with checked
arguments, run every task of a registry with one worker per queue."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
import time
import typing
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, ParamSpec, TypeVar, overload

from .._consume.retry import RetryPolicy
from .._consume.typed import Validator, build_validator
from .._exceptions import (
    ConfigurationError,
    PayloadError,
    SerializationError,
)
from .._link.specs import Queue
from .._publish.serialization import JSON
from ._errors import TaskArgumentError
from ._groups import Signature
from ._handle import TASK_HEADER, Context, JobHandle, Publisher
from ._json import encode_typed
from ._lent import LentProducers
from ._rate import RateLimit
from ._recorder import GroupCommit, unbound
from ._running import build_workers
from ._status import JobState, Write, new_write, unstorable_id
from ._store import JobStore

if typing.TYPE_CHECKING:
    from .._consume.worker import Worker
    from .._hooks import Hook
    from .._link.settings import URLs

__all__ = ("TASK_HEADER", "Task", "Tasks")


P = ParamSpec("P")
R = TypeVar("R")

_NAME = re.compile(r"[A-Za-z_][\w.:-]{0,199}")
"""What a task's name (and alias) may be: it travels in the `x-workq-task` header."""


class _Unset:
    """A parameter not given at enqueue: the function's own default applies at the worker."""

    def __repr__(self) -> str:
        return "<unset>"

    def __copy__(self) -> _Unset:
        return self

    def __deepcopy__(self, memo: Any) -> _Unset:
        return self


_UNSET: Any = _Unset()


class Arguments:
    """A task's parameters: bound and checked at enqueue, validated again at the worker.

    The body is a JSON object of the arguments given, by name; parameters left out take the
    function's defaults when it runs. Each value is validated as its parameter's annotation,
    the way typed payloads are (pydantic where installed).
    """

    def __init__(self, fn: Callable[..., Any], task: str) -> None:
        self.task = task
        self.signature = inspect.signature(fn)
        for p in self.signature.parameters.values():
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                raise ConfigurationError(
                    f"task {task!r}: parameter {p.name!r} is {p.kind.description}; a task's "
                    "arguments travel by name: use plain or keyword-only parameters"
                )
        try:
            self.hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as exc:
            raise ConfigurationError(
                f"task {task!r}: can't resolve its annotations ({exc}); define the types at "
                "module level"
            ) from exc
        self._validator: Validator | None = None
        self._fields: tuple[str, ...] = ()

    @property
    def validator(self) -> Validator:
        if self._validator is None:
            fields = []
            for p in self.signature.parameters.values():
                tp = self.hints.get(p.name, Any)
                if p.default is p.empty:
                    fields.append((p.name, tp))
                else:
                    fields.append((p.name, tp, dataclasses.field(default=_UNSET)))  # type: ignore[arg-type]
            cls = dataclasses.make_dataclass(re.sub(r"\W", "_", self.task) + "_arguments", fields)
            self._validator = build_validator(cls)
            self._fields = tuple(self.signature.parameters)
        return self._validator

    def encode(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bytes:
        """The body for these arguments.

        Raises:
            TaskArgumentError: they don't bind to the signature, can't be sent as JSON, or
                don't validate as the parameters' types.
        """
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TaskArgumentError(f"task {self.task!r}: {exc}") from None
        arguments = dict(bound.arguments)
        try:
            body, _ = encode_typed(arguments)
        except SerializationError:
            for name, value in arguments.items():
                try:
                    encode_typed(value)
                except SerializationError as exc:
                    raise TaskArgumentError(
                        f"task {self.task!r}: argument {name!r} can't be sent as JSON: {exc}"
                    ) from None
            raise
        try:
            self.validator(body, JSON)
        except PayloadError as exc:
            raise TaskArgumentError(
                f"task {self.task!r}: the arguments don't validate as its parameters: {exc}"
            ) from None
        return body

    def decode(self, body: bytes, content_type: str | None) -> dict[str, Any]:
        """The keyword arguments to call the function with.

        Raises:
            PayloadError: the body does not validate (dead-lettered, never retried).
        """
        value = self.validator(body, content_type)
        return {
            name: item
            for name in self._fields
            if (item := getattr(value, name, _UNSET)) is not _UNSET
        }


class Task(Generic[P, R]):
    """A function declared as a task: `await task.enqueue(...)` runs it on a worker.

    Made by `@tasks.task(queue=...)`. Calling the task calls the function itself (its
    coroutine, for an `async def`), e.g. in a unit test.
    """

    def __init__(
        self,
        fn: Callable[P, Any],
        *,
        name: str,
        queue: Queue,
        registry: Tasks,
        publish: Mapping[str, Any] | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.queue = queue
        self.is_async = inspect.iscoroutinefunction(fn)
        self._registry = registry
        self._publish = dict(publish or {})
        self._eta: datetime | None = None
        self.arguments = Arguments(fn, name)
        if rate_limit is not None and rate_limit.key is not None and not rate_limit.defaults:
            rate_limit = rate_limit.with_defaults(self.arguments.signature)
        self.rate_limit = rate_limit
        self._returns: Any = self.arguments.hints.get("return", Any)
        self._result_validator: Validator | None = None
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue.name!r}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self.fn(*args, **kwargs)

    def options(
        self,
        *,
        delay: float | timedelta | None = None,
        priority: int | None = None,
        expiration: float | timedelta | None = None,
        timeout: float | None = None,
        job_id: str | None = None,
        eta: datetime | None = None,
    ) -> Task[P, R]:
        """The same task with publish options for its next enqueues:
        `await resize.options(delay=60).enqueue("cat.png")`.

        Args:
            delay: seconds the broker holds the message before it reaches the queue.
            eta: when the job may run, a datetime with a time zone (Celery's `eta=`): the
                delay is `eta` minus the time of each enqueue, 0 once it has passed.
            priority: 0-255, for a queue declared with `x-max-priority`.
            expiration: seconds the message may wait in the queue.
            timeout: seconds the publish may take, to its confirm.
            job_id: the job id (and message id) instead of a fresh one.

        Raises:
            ConfigurationError: a `job_id` that is not a non-empty string, or has a NUL; an
                `eta` that is not a datetime with a time zone, or given with `delay`.
        """
        if eta is not None:
            _check_eta(self.name, eta, delay)
        if job_id is not None and (not isinstance(job_id, str) or not job_id.strip()):
            raise ConfigurationError(
                f"task {self.name!r}: job_id must be a non-empty string (it names the job), "
                f"got {job_id!r}; leave it out for a fresh id"
            )
        if job_id is not None and unstorable_id(job_id):
            raise ConfigurationError(
                f"task {self.name!r}: job_id {job_id!r} has a NUL character, which a job "
                "store can't keep: give an id without one (or leave it out for a fresh id)"
            )
        given = {
            "delay": delay, "priority": priority, "expiration": expiration,
            "timeout": timeout, "message_id": job_id,
        }  # fmt: skip
        publish = {**self._publish, **{k: v for k, v in given.items() if v is not None}}
        clone: Task[P, R] = Task(
            self.fn, name=self.name, queue=self.queue, registry=self._registry, publish=publish,
            rate_limit=self.rate_limit,
        )  # fmt: skip
        clone.arguments = self.arguments
        # the latest of `delay` and `eta` given wins
        clone._eta = eta if eta is not None else None if delay is not None else self._eta
        if eta is not None:
            clone._publish.pop("delay", None)
        return clone

    def _options(self) -> dict[str, Any]:
        """The publish options of an enqueue now: an `eta` becomes the delay until it."""
        options = dict(self._publish)
        if self._eta is not None:
            options["delay"] = max(0.0, (self._eta - datetime.now(UTC)).total_seconds())
        return options

    @property
    def registry(self) -> Tasks:
        """The `Tasks` registry the task was declared in."""
        return self._registry

    @property
    def publish_options(self) -> dict[str, Any]:
        """The publish options set with `options()` (without `job_id`; an `eta` as the delay
        until it, from now)."""
        return {k: v for k, v in self._options().items() if k != "message_id"}

    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """This task with its arguments, for a `group([...])`: `resize.s("a.png")`.

        The arguments are checked when the group is enqueued.
        """
        return Signature(self, args, kwargs)

    def partial(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """This task as a group's callback with its other arguments:
        `group([...], then=report.partial(title="daily"))`; the first parameter receives the
        members' results."""
        return Signature(self, args, kwargs, complete=False)

    def _prepare(self) -> None:
        """Build what running and enqueueing this task need (its arguments' and its result's
        validators; the first imports pydantic) now, not on the event loop at its first job."""
        _ = self.arguments.validator
        self.result_validator()

    def result_validator(self) -> Validator:
        if self._result_validator is None:
            self._result_validator = build_validator(self._returns)
        return self._result_validator

    def job(self, job_id: str) -> JobHandle[R]:
        """A handle on a job of this task by its id (its `result()` is typed as the task's).

        Raises:
            ConfigurationError: `job_id` is not a str.
        """
        _check_id(job_id)
        return JobHandle(job_id, context=self._registry, validate=self.result_validator())

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """Publish a job of this task; returns its handle once the broker confirmed it.

        The arguments are bound to the function's signature and validated as its parameters'
        types before anything is sent. With a store, the job is recorded as queued before this
        returns; if the store is unreachable the job is still sent and the record kept and
        written when the store answers again (the first enqueue to find it down waits for the
        store's timeout, 5 s, the ones after it don't wait). That wait ends by the caller's
        bound: `options(timeout=)`, or a web app's `request_timeout` (a `ProducerView`'s):
        the enqueue returns within it, the job sent, its record kept. With a store that
        implements `Withdrawals` (the three shipped), the record is sent as the publish goes
        out and this waits for both; if the publish fails (or this is cancelled), the record
        is taken back unless a worker's state came after it. With any other store, the record
        is sent once the broker confirmed the publish. Either way, a job whose enqueue raised
        reads as unknown until a worker runs it, if the broker had it after all (a lost
        confirm).

        Raises:
            TaskArgumentError: the arguments don't fit the signature (nothing was sent).
            IntegrationError: the registry has no producer: none bound (`tasks.bind(producer)`),
                and no workers of the registry run on this event loop (they bring one).
            PublishError (and its subclasses): the broker did not confirm the job.
        """
        body = self.arguments.encode(args, kwargs)
        publisher = self._registry.publisher
        if publisher is None:
            raise unbound(f"task {self.name!r}")
        return await self._send(body, publisher, self._registry)

    async def _send(self, body: bytes, publisher: Publisher, context: Context) -> JobHandle[R]:
        """Publish a job whose arguments `arguments.encode()` checked and encoded, through
        `publisher`, and record it as queued in `context`'s store; its handle (on `context`).

        The second half of `enqueue()`, shared with `SyncProducer.enqueue()` (which encodes
        in the caller's thread and sends on its event-loop thread).

        Raises:
            PublishError (and its subclasses): the broker did not confirm the job.
        """
        options = self._options() if self._eta is not None else dict(self._publish)
        job_id = options.pop("message_id", None) or uuid.uuid4().hex
        store = context.store
        committed: asyncio.Future[bool] | None = None  # the record, when sent with the publish
        if store is not None:
            bound = _callers_bound(publisher, options.get("timeout"))
            begun = 0.0 if bound is None else asyncio.get_running_loop().time()
            # Its created time: a worker may start the job before the record is written.
            write = new_write(Write, (
                job_id, self.name, self.queue.name, JobState.QUEUED, time.time(), 1, 0, False,
                False, None, None, None, None, None,
            ))  # fmt: skip
            commits = self._registry.commits(store)
            # With a store that can take a record back (`Withdrawals`), the `queued` record
            # goes out with the publish, batched with the concurrent enqueues' records (one
            # transaction), and the two round trips overlap (#23); a worker's claim or
            # outcome that lands first stays (`RANK`). With any other store it is sent once
            # the broker confirmed the publish. While the store is down, the record is kept
            # and written when it is back (not waited for).
            if commits.overlaps:
                committed = commits.commit(write)
        try:
            await publisher.publish(
                body, self.queue, headers={TASK_HEADER: self.name}, message_id=job_id,
                content_type=JSON, **options,
            )  # fmt: skip
        except BaseException:  # not confirmed (or cancelled): the record is taken back
            if committed is not None:
                commits.withdraw(write)
            raise
        if store is not None:
            if committed is None:
                committed = commits.commit(write)
            if bound is None or committed.done():
                await committed  # a future: no coroutine between (#23)
            else:
                await _until(committed, begun + bound)
        return JobHandle(job_id, context=context, validate=self.result_validator())


def _check_eta(task: str, eta: object, delay: object) -> None:
    """Refuse an `eta` that is not an aware datetime, or that comes with a `delay`.

    Raises:
        ConfigurationError: which, and how to give it.
    """
    if not isinstance(eta, datetime):
        raise ConfigurationError(
            f"task {task!r}: eta= takes a datetime with a time zone (when the job may run), "
            f"got {eta!r}; for seconds from now, pass delay="
        )
    if eta.utcoffset() is None:
        raise ConfigurationError(
            f"task {task!r}: eta={eta!r} has no time zone, so the moment it names is unknown: "
            "give an aware datetime, e.g. datetime.now(UTC) + timedelta(minutes=5), or "
            "eta.replace(tzinfo=ZoneInfo('Europe/Paris')) for a local time"
        )
    if delay is not None:
        raise ConfigurationError(f"task {task!r}: pass eta= or delay=, not both")


def _callers_bound(publisher: Publisher, timeout: object) -> float | None:
    """The seconds an enqueue through `publisher` may take: the task's `options(timeout=)`,
    else a `ProducerView`'s (a web app's request timeout, a `SyncProducer`'s); None for a
    `Producer`'s own (its publish is bounded, the wait for the record by the store's)."""
    if timeout is None:
        timeout = getattr(publisher, "timeout", None)
    if isinstance(timeout, int | float) and not isinstance(timeout, bool):
        return float(timeout)
    return None


async def _until(committed: asyncio.Future[bool], deadline: float) -> bool:
    """Wait for an enqueue's `queued` record until the caller's bound (a web request's):
    past it, the enqueue returns, the record left to its batch (written, or kept and caught
    up if it fails)."""
    letting_go = asyncio.get_running_loop().call_at(deadline, _let_go, committed)
    try:
        return await committed
    finally:
        letting_go.cancel()


def _let_go(committed: asyncio.Future[bool]) -> None:
    """The caller's bound is reached: its enqueue stops waiting for the `queued` record (the
    batch that holds it sets no result on a future already done)."""
    if not committed.done():
        committed.set_result(True)


class _Decorator:
    """What `tasks.task(queue=...)` returns: turns a function into a `Task`."""

    def __init__(
        self,
        registry: Tasks,
        queue: Queue,
        name: str | None,
        rate_limit: RateLimit | None,
        aliases: tuple[str, ...] = (),
    ) -> None:
        self._registry = registry
        self._queue = queue
        self._name = name
        self._rate_limit = rate_limit
        self._aliases = aliases

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> Task[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Task[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Task[P, Any]:
        if not callable(fn) or isinstance(fn, Task):
            raise ConfigurationError(f"@tasks.task(...) decorates a function, got {fn!r}")
        name = self._name or f"{fn.__module__}.{fn.__qualname__}"
        task: Task[P, Any] = Task(
            fn, name=name, queue=self._queue, registry=self._registry, rate_limit=self._rate_limit
        )
        self._registry._add(task, self._aliases)
        return task


class Tasks:
    """A registry of tasks: where they are declared, enqueued from, and run.

    ```python
    tasks = Tasks(store=SQLiteStore("jobs.db"))

    @tasks.task(queue="images")
    async def resize(path: str, width: int = 800) -> Thumb: ...

    # the web app, once its producer is started:
    tasks.bind(producer)
    job = await resize.enqueue("cat.png", width=400)
    thumb = await job.result(timeout=30)

    # the worker process (or `aio-workq worker myapp.tasks:tasks.workers`):
    await run_workers(*tasks.workers())
    ```

    The producer is usually bound later (`bind()`): the registry is made when the module is
    imported, the producer only once an event loop runs (a web app's lifespan). A script can
    pass it here. A worker process binds none: the registry's workers bring a producer for
    the enqueues their tasks make.

    Args:
        producer: a started `Producer` (or a web integration's `ProducerView`).
        store: where job states and results are kept (`SQLiteStore`, `PostgresStore`); without
            one, jobs run but are not tracked.
    """

    def __init__(self, *, producer: Publisher | None = None, store: JobStore | None = None) -> None:
        self._producer = producer
        self._store = store
        self._tasks: dict[str, Task[Any, Any]] = {}
        self._aliases: dict[str, Task[Any, Any]] = {}
        self._commits: GroupCommit | None = None
        self._lent = LentProducers(lambda: self._producer)

    def __repr__(self) -> str:
        return f"<Tasks {len(self._tasks)} task(s) store={self._store!r}>"

    @property
    def publisher(self) -> Publisher | None:
        """The producer enqueues publish through: the one bound, else, while the registry's
        workers run on this event loop, the one they brought; None otherwise."""
        producer = self._producer  # (no call for it: it is read on every enqueue)
        return producer if producer is not None else self._lent.publisher()

    @property
    def store(self) -> JobStore | None:
        """The job store (None: jobs are not tracked)."""
        return self._store

    @property
    def tasks(self) -> Mapping[str, Task[Any, Any]]:
        """The tasks declared, by name."""
        return dict(self._tasks)

    def commits(self, store: JobStore) -> GroupCommit:
        """The enqueues' `queued` records for `store`, batched (a `SyncProducer` closes its
        loop's part with its loop)."""
        commits = self._commits
        if commits is None or commits.store is not store:
            commits = self._commits = GroupCommit(store)
        return commits

    def bind(self, producer: Publisher, *, store: JobStore | None = None) -> Tasks:
        """Enqueue through `producer` from now on (and keep states in `store`, if given).

        Returns the registry itself.
        """
        publish = getattr(producer, "publish", None)
        if not callable(publish):
            raise ConfigurationError(f"bind() takes a Producer, got {producer!r}")
        if not inspect.iscoroutinefunction(publish):
            raise ConfigurationError(
                f"bind() takes an async Producer (or a Workq's producer view), got {producer!r}, "
                "whose publish() blocks: enqueue() awaits it. From sync code, enqueue through "
                "the SyncProducer itself, without bind(): producer.enqueue(task, *args) returns "
                "a blocking handle (see docs/guides/web-apps.md#tasks-from-sync-code)"
            )
        self._producer = producer
        if store is not None:
            self._store = store
        return self

    def task(
        self,
        *,
        queue: str | Queue,
        name: str | None = None,
        queue_type: Literal["quorum", "classic"] | None = None,
        rate_limit: str | float | None = None,
        rate_key: Callable[..., Any] | None = None,
        rate_burst: int = 1,
        rate_max_wait: float = 5.0,
        aliases: Sequence[str] = (),
    ) -> _Decorator:
        """Declare a function as a task of `queue`.

        Args:
            queue: the queue name (or a `Queue`); several tasks may share one.
            name: the task's name in the `x-workq-task` header (default: `module.function`;
                give one for a task defined in a script run as `__main__`).
            queue_type: `"quorum"` (default) or `"classic"`, for a queue given by name.
            rate_limit: at most this many jobs start, for all worker processes together:
                `"50/s"`, `"600/m"`, `"1000/h"` or jobs a second (`10` or `"10"`; needs a
                store).
            rate_key: a bucket per key: called with the job's arguments by name (those it
                left out with the function's defaults), e.g. `lambda customer, **_: customer`.
            rate_burst: jobs that may start at once after an idle time (1: evenly spaced).
            rate_max_wait: longest a worker holds a delivery waiting for its slot (at most
                60 s); a job whose slot is further away is deferred on the broker.
            aliases: names the task had before (a rename, or a move to another module,
                which changes the default name): the workers run the messages of those
                names, enqueued by the release before and still queued, with this task.

        Raises:
            ConfigurationError: a bad name or queue, or a parameter a task can't take
                (`*args`, `**kwargs`, positional-only), when the function is decorated.
        """
        if isinstance(queue, str):
            spec = Queue(queue, type=queue_type or "quorum")
        elif isinstance(queue, Queue) and queue_type is None:
            spec = queue
        else:
            raise ConfigurationError(
                f"queue must be a name or a Queue (with its own type), got {queue!r}"
            )
        if spec.server_named:
            raise ConfigurationError("a task needs a named queue, not ''")
        if isinstance(aliases, str) or not isinstance(aliases, Sequence):
            raise ConfigurationError(
                f"aliases= takes a list of the task's former names, got {aliases!r}"
            )
        for given in (name, *aliases):
            if given is not None and (not isinstance(given, str) or not _NAME.fullmatch(given)):
                raise ConfigurationError(
                    f"task name must be letters, digits, '_', '.', ':' or '-', got {given!r}"
                )
        limit = None
        if rate_limit is not None:
            limit = RateLimit.of(rate_limit, burst=rate_burst, key=rate_key, max_wait=rate_max_wait)
        elif rate_key is not None:
            raise ConfigurationError("rate_key= needs a rate_limit=")
        return _Decorator(self, spec, name, limit, tuple(aliases))

    def _add(self, task: Task[Any, Any], aliases: tuple[str, ...] = ()) -> None:
        for taken in (task.name, *aliases):
            if taken in self._tasks or taken in self._aliases or aliases.count(taken) > 1:
                raise ConfigurationError(
                    f"a task named {taken!r} is declared already (as a task's name or "
                    "alias); give one of them name=..."
                )
        for other in self._tasks.values():
            if other.queue.name == task.queue.name and other.queue != task.queue:
                raise ConfigurationError(
                    f"task {task.name!r}: queue {task.queue.name!r} is declared differently "
                    f"by task {other.name!r}; declare it once as a Queue and pass that"
                )
        self._tasks[task.name] = task
        self._aliases.update(dict.fromkeys(aliases, task))

    def job(self, job_id: str) -> JobHandle[Any]:
        """A handle on any job by its id (its `result()` is the decoded JSON, untyped).

        Raises:
            ConfigurationError: `job_id` is not a str.
        """
        _check_id(job_id)
        return JobHandle(job_id, context=self)

    def workers(
        self,
        url: URLs | None = None,
        *,
        concurrency: int = 1,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, immutable
        queues: Sequence[str] | None = None,
        hooks: Sequence[Hook] = (),
        **options: Any,
    ) -> list[Worker]:
        """One `Worker` per queue that runs its tasks (dispatched by the `x-workq-task`
        header), and with a store, one listening for cancel requests on `workq.control`.

        Call it in each process: `aio-workq worker myapp.tasks:tasks.workers` does (also
        with `--processes`). Start them with `run_workers(*tasks.workers())`. For queues with
        other settings (a retry policy of their own), call it once per set of `queues`.

        Unless a producer is bound, the workers bring one for the enqueues their tasks make
        (a task that enqueues the next) and their groups' callbacks: opened as the first of
        them starts, on their URL and connection settings but a connection of its own (a
        publisher blocked by a memory alarm must not stall their acks), shared by every call
        on this event loop, and closed once the last of them stopped, after its handlers
        finished.

        Args:
            url: the broker URL (default: `AMQP_URL`).
            concurrency: handlers running at once, per queue.
            retry: the retry policy of every queue (`None`: dead-letter on the first failure).
            queues: run only the tasks of these queues.
            hooks: more hooks for every worker.
            **options: more `Worker` arguments (`prefetch`, `handler_timeout`, ...). With a
                store `prefetch` is four times `concurrency` unless given: a delivery's claim
                (the check at delivery) is sent when it arrives, so the claims of the
                deliveries waiting for a handler overlap the handlers running. Such a job
                reads `running` while it waits. `handler_timeout` times the task itself:
                the check at delivery and the wait for a rate-limit slot do not count.

        Raises:
            ConfigurationError: no tasks (on those queues), or a bad worker option.
        """
        # Every task of the registry (those its tasks may enqueue too) is made ready here,
        # not at its first job: pydantic's import and a type's schema took the event loop
        # long enough for the loop watchdog to blame the first handler.
        for task in self.tasks.values():
            task._prepare()
        return build_workers(
            self.tasks.values(), self.store, url, concurrency=concurrency, retry=retry,
            queues=queues, hooks=hooks, options=options, aliases=self._aliases,
            producers=self._lent,
        )  # fmt: skip


def _check_id(job_id: object) -> None:
    """Refuse a job id that is not a str (its calls failed later with a bare `TypeError`)."""
    if not isinstance(job_id, str):
        raise ConfigurationError(f"job() takes the job id as a string, got {job_id!r}")
