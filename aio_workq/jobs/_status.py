"""A job's state as the store keeps it: the states, the status a handle reads, the writes."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

__all__ = (
    "RANK", "TERMINAL", "JobRecord", "JobState", "JobStatus", "Withdrawal", "Write", "new_write",
    "storable", "timestamp", "unstorable_id", "withdrawal",
)  # fmt: skip


class JobState(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    """Published, waiting in its queue (or back in it after a worker stopped)."""
    RUNNING = "running"
    """A worker is running it (`attempt` says which attempt)."""
    RETRYING = "retrying"
    """It failed (or deferred) and waits in a delay queue until `next_retry_at`."""
    SUCCEEDED = "succeeded"
    """It returned; `result()` gives the return value."""
    FAILED = "failed"
    """It failed for good and was dead-lettered; `error_type` and `error_message` say why."""
    CANCELLED = "cancelled"
    """Cancelled: skipped when it arrived, or stopped while running."""


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


def storable(text: str) -> str:
    """`text` as every store can keep it: a NUL (which PostgreSQL's text refuses, failing the
    whole batch of writes it is in) escaped as `\\x00`, as `text_of()` escapes what UTF-8
    can't carry. For what describes a job (an error message, a task name from a header)."""
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def unstorable_id(job_id: str) -> bool:
    """A job id no store can keep (it has a NUL): refused by `options(job_id=)` and `group()`,
    never found by a handle, not recorded by a worker."""
    return "\x00" in job_id


RANK = {
    JobState.QUEUED: 0,
    JobState.RUNNING: 1,
    JobState.RETRYING: 2,
    JobState.FAILED: 3,
    JobState.SUCCEEDED: 3,
    JobState.CANCELLED: 4,
}
"""Order of the states within one run (attempt, deferrals): a write older than what the store
has (a late catch-up) never overwrites a newer state."""


def timestamp(seconds: float | None) -> datetime | None:
    """Unix seconds as an aware UTC datetime."""
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    """A job's recorded status, as `JobHandle.status()` returns it."""

    job_id: str
    task: str
    queue: str
    state: JobState
    attempt: int
    """The attempt running, or the last one that ran (1 before the first)."""
    next_retry_at: datetime | None = None
    """When `retrying`: when the next attempt runs (at the latest; behind a longer-waiting
    message in the same delay queue it can be later)."""
    error_type: str | None = None
    """When `retrying` or `failed`: the exception's class (`module.Name`)."""
    error_message: str | None = None
    cancel_requested: bool = False
    """A cancel was asked for while it ran: its worker was told to stop it."""
    created_at: datetime | None = None
    """When the job was enqueued; when a worker started it before the enqueue's own record
    reached the store (that record is sent as the publish goes out, batched with other
    enqueues), when it was first started, the same as `started_at`."""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def done(self) -> bool:
        """True once the job succeeded, failed for good, or was cancelled."""
        return self.state in TERMINAL


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What a store returns for one job: its status, and its stored result."""

    status: JobStatus
    result: bytes | None = None
    content_type: str | None = None


class _WriteFields(NamedTuple):
    job_id: str
    task: str
    queue: str
    state: JobState
    at: float
    attempt: int = 1
    defers: int = 0
    claim: bool = False
    requeue: bool = False
    next_retry_at: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    result: bytes | None = None
    content_type: str | None = None


_tuple = tuple.__new__


class Write(_WriteFields):
    """One status change, as a worker or producer hands it to the store.

    A store applies a batch of writes in one transaction. A plain write is an upsert applied
    only if it is newer than what the store has: a later run (attempt, deferrals), or a later
    state in the same run (`RANK`); a succeeded or cancelled job is never changed again, and
    a record past its TTL counts as absent. A requeue (`requeue=True`: the worker hands a
    running job back to the queue, `QUEUED` over `RUNNING` in the same run) applies too; the
    enqueue's own `QUEUED` record, which can land after the worker's claim, never does. A claim
    (`claim=True`, state `RUNNING`) is the worker's check at delivery: granted unless the job
    is already succeeded or cancelled, its cancel was requested, or it is running or retrying
    in the same run or a later one and the delivery was not redelivered (`requeue=True` on a
    claim: the message came back to the queue, its worker gone). A refused claim is followed
    by a `CANCELLED` claim, applied only to a job whose cancel was requested. Taking back an
    enqueue's `queued` record whose publish failed is no write: it is the store's
    `withdraw()` (`Withdrawals`, optional), and `record()` is never sent one.

    Immutable, built with keyword arguments: `job_id`, `task`, `queue`, `state`, `at` (Unix
    seconds of the change), then optionally `attempt` (1), `defers` (0), `claim`, `requeue`,
    `next_retry_at`, `error_type`, `error_message`, `result`, `content_type`. A tuple underneath
    (#23: a worker makes two per job; a frozen dataclass cost three times as much to build, and
    a store reads a batch's fields column by column with `zip(*writes)`).
    """

    __slots__ = ()

    def __new__(
        cls,
        *,
        job_id: str,
        task: str,
        queue: str,
        state: JobState,
        at: float,
        attempt: int = 1,
        defers: int = 0,
        claim: bool = False,
        requeue: bool = False,
        next_retry_at: float | None = None,
        error_type: str | None = None,
        error_message: str | None = None,
        result: bytes | None = None,
        content_type: str | None = None,
    ) -> Write:
        return _tuple(cls, (
            job_id, task, queue, state, at, attempt, defers, claim, requeue, next_retry_at,
            error_type, error_message, result, content_type,
        ))  # fmt: skip

    def __getnewargs_ex__(self) -> tuple[tuple[()], dict[str, object]]:
        """Copy and pickle rebuild it with keyword arguments."""
        return (), dict(zip(self._fields, self, strict=True))

    @property
    def rank(self) -> int:
        return RANK[self.state]

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


new_write = cast("Callable[[type[Write], tuple[Any, ...]], Write]", _tuple)
"""`new_write(Write, (job_id, task, queue, state, at, attempt, defers, claim, requeue,
next_retry_at, error_type, error_message, result, content_type))`: a `Write` from all its
fields in order, without `Write.__new__`'s call with keywords (a third of the cost): for the
writes every tracked job makes (its `queued`, its claim, its `succeeded`, #23)."""


class Withdrawal(Write):
    """An enqueue's `queued` record taken back, its publish failed (#23): the kind of write an
    enqueue's batches (`GroupCommit`) carry for it, its job's last write in a batch.
    `WriteBatches` sends it to the store's `withdraw()` (`Withdrawals`: the record is deleted
    only while it still is the enqueue's), never to `record()`, and only to a store that
    declares `withdraw()`. Its fields are the record's, `at` the time it was taken back."""

    __slots__ = ()


def withdrawal(queued: Write, at: float) -> Withdrawal:
    """The `Withdrawal` of the enqueue's `queued` record, taken back at `at`."""
    return _tuple(Withdrawal, (
        queued.job_id, queued.task, queued.queue, JobState.QUEUED, at, queued.attempt, 0,
        False, False, None, None, None, None, None,
    ))  # fmt: skip
