"""Fan-out / fan-in: a group of jobs and a callback that runs once after all of them finished.

```python
handle = await group([resize.s("a.png"), resize.s("b.png")], then=report).enqueue()
summary = await handle.result(timeout=60)  # report's return value
```

The group and its member count are recorded in the store before any member is published.
Each member's terminal outcome (succeeded, failed for good, cancelled) is written by its
worker *before the member's message is acked*, in one store transaction that also marks the
member done and counts the group down; the transaction that reaches zero claims the callback
(a flag set once). The claiming worker publishes the callback job (its id is
`<group id>.callback`), waits for the broker's confirm, then records it published. A worker
killed between the claim and the publish leaves the member unacked: its redelivery finds the
member done and the callback claimed but unpublished, and publishes it (the same id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from .._exceptions import (
    ConfigurationError,
    IntegrationError,
    PayloadError,
    SerializationError,
)
from .._link.specs import Queue
from .._publish.serialization import JSON, decode_body, encode_body
from ._errors import TaskArgumentError
from ._groupstore import CallbackDue, GroupSpec, GroupStore
from ._handle import TASK_HEADER, JobHandle, Publisher
from ._json import encode_typed
from ._recorder import unbound
from ._status import JobState, Write, unstorable_id
from ._store import JobStore

__all__ = (
    "GROUP_HEADER",
    "INDEX_HEADER",
    "Group",
    "GroupHandle",
    "GroupResult",
    "Signature",
    "callback_body",
    "group",
)

log = logging.getLogger("aio_workq.jobs")

R = TypeVar("R")

GROUP_HEADER = "x-workq-group"
"""The header naming the group a member job belongs to."""
INDEX_HEADER = "x-workq-group-index"
"""The header giving a member's place in its group (0-based)."""


class Registry(Protocol):
    """What a group needs of the `Tasks` registry."""

    @property
    def store(self) -> JobStore | None: ...

    @property
    def publisher(self) -> Publisher | None: ...


class GroupTask(Protocol[R]):
    """What a group needs of a `Task` (`_tasks` imports this module, never the reverse)."""

    @property
    def name(self) -> str: ...
    @property
    def queue(self) -> Queue: ...
    @property
    def arguments(self) -> Any: ...
    @property
    def registry(self) -> Any: ...
    @property
    def publish_options(self) -> dict[str, Any]: ...

    def job(self, job_id: str) -> JobHandle[R]: ...


@dataclass(frozen=True, slots=True)
class GroupResult:
    """One member's outcome, as a group's callback receives it (in the members' order).

    Annotate the callback's first parameter as `list[GroupResult]`.
    """

    job_id: str
    state: str
    """`succeeded`, `failed` or `cancelled`."""
    value: Any = None
    """The member's return value (as JSON data) when it succeeded."""
    error_type: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        """True when the member succeeded."""
        return self.state == JobState.SUCCEEDED.value


class Signature(Generic[R]):
    """A task with its arguments, not sent yet: `resize.s("a.png", width=400)`.

    `then=report.partial(title="x")` gives a callback its other arguments (the first one is
    the members' results).
    """

    __slots__ = ("args", "complete", "kwargs", "task")

    def __init__(
        self,
        task: GroupTask[R],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        complete: bool = True,
    ) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.complete = complete

    def __repr__(self) -> str:
        return f"<Signature {self.task.name} args={self.args!r} kwargs={self.kwargs!r}>"


class GroupHandle(Generic[R]):
    """An enqueued group: its id, a handle on each member, and one on the callback.

    `await handle.result(timeout)` waits for the callback's result.
    """

    def __init__(
        self, group_id: str, members: list[JobHandle[Any]], callback: JobHandle[R] | None
    ) -> None:
        self.group_id = group_id
        self.members = members
        self.callback = callback

    def __repr__(self) -> str:
        return f"<GroupHandle {self.group_id} members={len(self.members)}>"

    async def result(self, timeout: float | None = None) -> R:
        """The callback's return value, once it ran.

        Raises:
            ConfigurationError: the group has no callback.
            JobFailedError, JobCancelledError, JobTimeoutError: as `JobHandle.result`.
        """
        if self.callback is None:
            raise ConfigurationError(f"group {self.group_id} has no callback (then=...)")
        return await self.callback.result(timeout)


def member_id(group_id: str, index: int) -> str:
    return f"{group_id}.{index}"


def callback_id(group_id: str) -> str:
    return f"{group_id}.callback"


class Group(Generic[R]):
    """Jobs enqueued together, and a callback run once after every one of them finished.

    Made by `group(...)`; `await g.enqueue()` sends it.
    """

    def __init__(
        self,
        members: Sequence[Signature[Any]],
        *,
        then: GroupTask[R] | Signature[R] | None = None,
        group_id: str | None = None,
    ) -> None:
        members = list(members)
        if not members:
            raise ConfigurationError("group() needs at least one member: group([task.s(...)])")
        for m in members:
            if not isinstance(m, Signature) or not m.complete:
                raise ConfigurationError(f"a group's members are task.s(...) signatures, got {m!r}")
        registry = members[0].task.registry
        if any(m.task.registry is not registry for m in members):
            raise ConfigurationError("a group's member tasks must come from one Tasks registry")
        if then is not None and not isinstance(then, Signature):
            if not callable(getattr(then, "partial", None)):
                raise ConfigurationError(f"then= takes a task or task.partial(...), got {then!r}")
            then = Signature(then, (), {}, complete=False)
        if group_id is not None and not isinstance(group_id, str):
            raise ConfigurationError(f"group_id must be a str, got {group_id!r}")
        if group_id is not None and unstorable_id(group_id):
            raise ConfigurationError(
                f"group_id {group_id!r} has a NUL character, which a job store can't keep: "
                "give an id without one (or leave it out for a fresh id)"
            )
        if group_id is not None:
            _check_ids_fit(group_id, len(members), then is not None)
        self.members = members
        self.then = then
        self.group_id = group_id or uuid.uuid4().hex
        self._registry: Registry = registry

    def __repr__(self) -> str:
        return f"<Group {self.group_id} members={len(self.members)} then={self.then!r}>"

    def _callback_spec(self) -> tuple[str | None, str | None, str | None, bytes | None]:
        then = self.then
        if then is None:
            return None, None, None, None
        params = list(then.task.arguments.signature.parameters)
        if not params:
            raise ConfigurationError(
                f"callback task {then.task.name!r} takes no parameter: its first parameter "
                "receives the members' results (list[GroupResult])"
            )
        param = params[0]
        try:
            bound = then.task.arguments.signature.bind_partial(None, *then.args, **then.kwargs)
        except TypeError as exc:
            raise TaskArgumentError(f"callback task {then.task.name!r}: {exc}") from None
        extra = {k: v for k, v in bound.arguments.items() if k != param}
        try:
            body, _ = encode_typed(extra)
        except SerializationError as exc:
            raise TaskArgumentError(
                f"callback task {then.task.name!r}: its arguments can't be sent as JSON: {exc}"
            ) from None
        _check_callback(then.task, param, extra)
        return then.task.name, then.task.queue.name, param, body

    async def enqueue(self) -> GroupHandle[R]:
        """Record the group in the store, then publish every member; returns the handle once
        the broker confirmed them all.

        Enqueueing again with the same `group_id` (after an error) is safe: the group is
        recorded once, and a member counts once however often it runs.

        Raises:
            TaskArgumentError: a member's (or the callback's) arguments don't fit (nothing
                was sent).
            IntegrationError: the registry has no producer, or no store that runs groups.
            StoreError: the store could not record the group (nothing was sent).
            ConfigurationError: `group_id` is recorded already as another group (other
                members or another callback; nothing was sent).
            PublishError (and its subclasses): a member was not confirmed (enqueue again).
        """
        registry = self._registry
        store = registry.store
        if not isinstance(store, GroupStore):
            raise IntegrationError(
                "a group needs a job store that runs groups (SQLiteStore, PostgresStore, "
                f"MemoryStore): Tasks(store=...), got {store!r}"
            )
        publisher = registry.publisher
        if publisher is None:
            raise unbound("a group")
        bodies = [m.task.arguments.encode(m.args, m.kwargs) for m in self.members]
        task_name, queue, param, extra = self._callback_spec()
        ids = tuple(member_id(self.group_id, i) for i in range(len(self.members)))
        spec = GroupSpec(
            group_id=self.group_id, member_ids=ids, callback_task=task_name,
            callback_queue=queue, callback_param=param, callback_body=extra,
        )  # fmt: skip
        now = time.time()
        queued = [
            Write(job_id=i, task=m.task.name, queue=m.task.queue.name, state=JobState.QUEUED,
                  at=now)
            for i, m in zip(ids, self.members, strict=True)
        ]  # fmt: skip
        if self.then is not None:  # its handle can wait on it from now on
            queued.append(
                Write(job_id=callback_id(self.group_id), task=self.then.task.name,
                      queue=self.then.task.queue.name, state=JobState.QUEUED, at=now)
            )  # fmt: skip
        await store.create_group(spec, queued)
        await asyncio.gather(
            *(
                publisher.publish(
                    body,
                    m.task.queue,
                    message_id=job_id,
                    content_type=JSON,
                    headers={
                        TASK_HEADER: m.task.name,
                        GROUP_HEADER: self.group_id,
                        INDEX_HEADER: index,
                    },
                    **m.task.publish_options,
                )  # fmt: skip
                for index, (m, body, job_id) in enumerate(
                    zip(self.members, bodies, ids, strict=True)
                )
            )
        )
        handles: list[JobHandle[Any]] = [
            m.task.job(job_id) for m, job_id in zip(self.members, ids, strict=True)
        ]
        callback = None if self.then is None else self.then.task.job(callback_id(self.group_id))
        return GroupHandle(self.group_id, handles, callback)


def group(
    members: Sequence[Signature[Any]],
    *,
    then: GroupTask[R] | Signature[R] | None = None,
    group_id: str | None = None,
) -> Group[R]:
    """Jobs that run in parallel, and `then`, a task run once after all of them finished
    (succeeded, failed for good, or cancelled), with their results in order as its first
    argument (`list[GroupResult]`).

    ```python
    handle = await group([resize.s("a.png"), resize.s("b.png")], then=report).enqueue()
    ```

    Args:
        members: `task.s(...)` signatures (tasks of one registry, any queues).
        then: the callback task, or `task.partial(...)` with its other arguments.
        group_id: the group's id (default: a fresh one); member `i`'s job id is
            `<group_id>.<i>`, the callback's `<group_id>.callback`.

    Raises:
        ConfigurationError: no members, or something else than signatures.
    """
    return Group(members, then=then, group_id=group_id)


def _check_ids_fit(group_id: str, size: int, callback: bool) -> None:
    """Refuse a `group_id` whose members' (or callback's) job ids, message ids, would be over
    AMQP's 255 bytes: they could never be sent, after the group was recorded.

    Raises:
        ConfigurationError: the longest id is too long.
    """
    last = member_id(group_id, size - 1)
    longest = callback_id(group_id) if callback and len(last) < len(callback_id(group_id)) else last
    try:
        octets = len(longest.encode())
    except UnicodeEncodeError:  # a lone surrogate: no message id can carry it
        octets = 256
    if octets > 255:
        raise ConfigurationError(
            f"group_id {group_id[:40]!r}... is too long: its job ids, such as "
            f"'<group_id>.{longest.rsplit('.', 1)[1]}', are message ids, 255 bytes (UTF-8) at "
            "most; give a shorter one (or leave it out for a fresh id)"
        )


def _check_callback(task: GroupTask[Any], param: str, extra: dict[str, Any]) -> None:
    """Validate the callback's body as its worker will, with no results yet, so that a
    callback that can't take them (or misses an argument) fails at `enqueue()`, not after
    every member ran.

    Raises:
        TaskArgumentError: it does not validate.
    """
    parameters = list(task.arguments.signature.parameters.values())[1:]
    missing = [p.name for p in parameters if p.default is p.empty and p.name not in extra]
    if missing:
        raise TaskArgumentError(
            f"callback task {task.name!r}: missing a required argument: {missing[0]!r}; give "
            f"it with then={task.name.rsplit('.', 1)[-1]}.partial({missing[0]}=...)"
        )
    try:
        task.arguments.decode(encode_typed({param: [], **extra})[0], JSON)
    except PayloadError as exc:
        raise TaskArgumentError(
            f"callback task {task.name!r}: its first parameter {param!r} receives the members' "
            f"results (annotate it `{param}: list[GroupResult]`), and partial(...) gives the "
            f"others; they don't validate: {exc}"
        ) from None


def _member_value(member: Any) -> Any:
    if member.result is None:
        return None
    try:
        value = decode_body(member.result, member.content_type)
    except ValueError:
        return None
    return value if not isinstance(value, bytes) else None


def callback_body(due: CallbackDue) -> bytes:
    """The callback job's body: its other arguments and, as its first, the results."""
    extra = json.loads(due.body) if due.body else {}
    results = [
        {
            "job_id": m.job_id,
            "state": m.state,
            "value": _member_value(m),
            "error_type": m.error_type,
            "error_message": m.error_message,
        }  # fmt: skip
        for m in due.members
    ]
    body, _ = encode_body({due.param: results, **extra})
    return body
