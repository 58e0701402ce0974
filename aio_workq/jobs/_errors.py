"""The errors of `aio_workq.jobs`, under `aio_workq.WorkqError`.

```
WorkqError
├── ConfigurationError(WorkqError, ValueError)
│   └── TaskArgumentError(ConfigurationError, TypeError)
│                                     enqueue() arguments that don't fit the task's signature
└── JobError                          .job_id
    ├── JobNotFoundError(JobError, LookupError)
    │                                 no record: never recorded, or expired (the store's TTL)
    ├── JobFailedError                the job failed for good: .error_type, .error_message
    ├── JobCancelledError             the job was cancelled
    ├── JobTimeoutError(JobError, TimeoutError)
    │                                 result(timeout=) ran out before the job finished
    └── StoreError                    the job store can't be reached or refused the query

Cancelled (Exception)                 raised in a handler that saw its cancel request
```
"""

from __future__ import annotations

from .._exceptions import ConfigurationError, WorkqError

__all__ = (
    "Cancelled",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobNotFoundError",
    "JobTimeoutError",
    "StoreError",
    "TaskArgumentError",
)


class TaskArgumentError(ConfigurationError, TypeError):
    """`enqueue()` got arguments the task does not take, or values that do not validate as
    its parameters' types; the message names the task and the argument. Nothing was sent."""


class JobError(WorkqError):
    """Base class of the errors about one job; `job_id` names it."""

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobNotFoundError(JobError, LookupError):
    """The store has no record of the job: an unknown id, a record past the store's TTL, or
    a job enqueued while the store was unreachable that no worker has recorded yet."""


class JobFailedError(JobError):
    """The job failed for good (dead-lettered): `error_type` and `error_message` say why."""

    def __init__(self, message: str, *, job_id: str, error_type: str, error_message: str) -> None:
        super().__init__(message, job_id=job_id)
        self.error_type = error_type
        self.error_message = error_message


class JobCancelledError(JobError):
    """The job was cancelled before it finished: it has no result."""


class JobTimeoutError(JobError, TimeoutError):
    """`result(timeout=...)` ran out before the job finished (it may still finish)."""


class StoreError(JobError):
    """The job store could not be reached, or failed the query (the message says which).

    `unreachable` is True when the store did not answer (refused, restarting, timed out), which
    waiting may cure: `job.result(timeout=)` reads it again until its deadline. `lasting` is
    True for a failure no wait cures, whose message says the fix (the tables missing)."""

    def __init__(
        self, message: str, *, job_id: str = "", unreachable: bool = False, lasting: bool = False
    ) -> None:
        super().__init__(message, job_id=job_id)
        self.unreachable = unreachable
        self.lasting = lasting


class Cancelled(Exception):
    """Raise in a task to stop it because its cancel was requested (`current_job().check()`
    raises it): the job is recorded as cancelled and acked, never retried."""
