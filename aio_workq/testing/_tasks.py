"""Run a task on one job without a broker or a store, and read what its worker would record."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from .._consume.retry import RetryPolicy
from .._publish.serialization import JSON
from ..jobs import (
    JobHandle,
    JobState,
    JobStatus,
    JobStore,
    MemoryStore,
    Signature,
    Task,
    TaskArgumentError,
)
from ..jobs._handle import Publisher
from ..jobs._recorder import Recorder
from ..jobs._running import QueueRunner
from ..jobs._tasks import TASK_HEADER
from ._kit import Outcome, run_handler

__all__ = ("TaskRun", "run_task")

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class TaskRun(Generic[R]):
    """One job of a task, run as its worker would: the delivery's outcome, and the status and
    result the worker recorded."""

    outcome: Outcome
    """What the worker did with the message (acked, retried, dead-lettered, ...)."""
    status: JobStatus
    """The status recorded after the run (`succeeded`, `retrying` with `next_retry_at`, ...)."""
    result: R | None
    """The return value as `JobHandle.result()` reads it back (typed); None unless succeeded."""


class _Context:
    def __init__(self, store: JobStore) -> None:
        self.store: JobStore | None = store
        self.publisher: Publisher | None = None


@overload
async def run_task(
    call: Signature[R],
    /,
    *,
    retry: RetryPolicy | None = ...,
    attempt: int = ...,
    handler_timeout: float | None = ...,
) -> TaskRun[R]: ...


@overload
async def run_task(
    task: Task[Any, R],
    args: Sequence[Any] = ...,
    kwargs: Mapping[str, Any] | None = ...,
    *,
    retry: RetryPolicy | None = ...,
    attempt: int = ...,
    handler_timeout: float | None = ...,
) -> TaskRun[R]: ...


async def run_task(
    task: Task[Any, R] | Signature[R],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, immutable
    attempt: int = 1,
    handler_timeout: float | None = None,
) -> TaskRun[R]:
    """Run one job of a task as a worker of its queue would, without a broker, and return
    what was recorded (in a store in memory).

    The task and its arguments come as `task.s(...)`, which mypy checks against the
    function's signature as it checks `enqueue(...)`; the older form `run_task(task, args,
    kwargs)` still works, with the arguments checked when it runs only.

    ```python
    run = await run_task(resize.s("cat.png", width=400))
    assert run.status.state is JobState.SUCCEEDED and run.result == Thumb("cat.png", 400)
    ```

    Args:
        task: `task.s(*args, **kwargs)` of a task declared with `@tasks.task(queue=...)`; or
            the task itself, with `args` and `kwargs`.
        args, kwargs: with a bare task: its arguments, bound and checked as `enqueue()` does.
        retry: the worker's retry policy (`None`: dead-letter on the first failure).
        attempt: the delivery's attempt (e.g. the last one).
        handler_timeout: as for `Worker`.

    Raises:
        ConfigurationError: `attempt` is not an int >= 1.
        TaskArgumentError: the arguments don't fit the task (as `enqueue()` says); a
            `task.partial(...)` (a group's callback misses its first argument); `args` or
            `kwargs` beside a `task.s(...)`.
    """
    if isinstance(task, Signature):
        task, args, kwargs = _unpack(task, args, kwargs)
    body = task.arguments.encode(args, kwargs or {})
    store = MemoryStore()
    recorder = Recorder(store)
    runner = QueueRunner(task.queue.name, {task.name: task}, recorder)
    job_id = uuid.uuid4().hex
    outcome = await run_handler(
        runner, body, queue=task.queue, retry=retry, attempt=attempt,
        handler_timeout=handler_timeout, hooks=[recorder], headers={TASK_HEADER: task.name},
        message_id=job_id, content_type=JSON,
    )  # fmt: skip
    await recorder.close()
    record = await store.get(job_id)
    assert record is not None, "the recorder wrote nothing"
    result: R | None = None
    if record.status.state is JobState.SUCCEEDED:
        handle: JobHandle[R] = JobHandle(
            job_id, context=_Context(store), validate=task.result_validator()
        )
        result = await handle.result(timeout=0)
    return TaskRun(outcome=outcome, status=record.status, result=result)


def _unpack(
    call: Signature[R], args: Sequence[Any], kwargs: Mapping[str, Any] | None
) -> tuple[Task[Any, R], Sequence[Any], Mapping[str, Any]]:
    """The task and arguments of `run_task(task.s(...))`.

    Raises:
        TaskArgumentError: see `run_task`.
    """
    name = call.task.name
    if args or kwargs:
        raise TaskArgumentError(
            f"task {name!r}: run_task(task.s(...)) takes the arguments in s(...): "
            "pass no args or kwargs beside it"
        )
    if not call.complete:
        raise TaskArgumentError(
            f"task {name!r}: run_task got task.partial(...), a group callback's arguments "
            "without its first; give them all with task.s(...)"
        )
    if not isinstance(call.task, Task):
        raise TaskArgumentError(f"run_task needs a task's s(...), got {call!r}")
    return call.task, call.args, call.kwargs
