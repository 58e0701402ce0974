"""Tasks you can call and follow: typed task definitions, job handles, job stores.

```python
from aio_workq.jobs import SQLiteStore, Tasks

tasks = Tasks(store=SQLiteStore("jobs.db"))


@tasks.task(queue="images")
async def resize(path: str, width: int = 800) -> Thumb: ...


job = await resize.enqueue("cat.png", width=400)  # after tasks.bind(producer)
print((await job.status()).state)
thumb = await job.result(timeout=30)
```

See the guide "Following jobs". The PostgreSQL store is in `aio_workq.jobs.postgres` (the
`postgres` extra).
"""

from __future__ import annotations

from ._errors import Cancelled as Cancelled
from ._errors import JobCancelledError as JobCancelledError
from ._errors import JobError as JobError
from ._errors import JobFailedError as JobFailedError
from ._errors import JobNotFoundError as JobNotFoundError
from ._errors import JobTimeoutError as JobTimeoutError
from ._errors import StoreError as StoreError
from ._errors import TaskArgumentError as TaskArgumentError
from ._groups import Group as Group
from ._groups import GroupHandle as GroupHandle
from ._groups import GroupResult as GroupResult
from ._groups import Signature as Signature
from ._groups import group as group
from ._groupstore import GroupStore as GroupStore
from ._groupstore import RateStore as RateStore
from ._handle import CONTROL_EXCHANGE as CONTROL_EXCHANGE
from ._handle import TASK_HEADER as TASK_HEADER
from ._handle import JobHandle as JobHandle
from ._handle import Publisher as Publisher
from ._rate import RateLimit as RateLimit
from ._recorder import Running as Running
from ._recorder import current_job as current_job
from ._running import TaskWorker as TaskWorker
from ._sqlite import SQLiteStore as SQLiteStore
from ._status import JobRecord as JobRecord
from ._status import JobState as JobState
from ._status import JobStatus as JobStatus
from ._status import Write as Write
from ._store import CancelRequests as CancelRequests
from ._store import JobStore as JobStore
from ._store import MemoryStore as MemoryStore
from ._store import Withdrawals as Withdrawals
from ._tasks import Task as Task
from ._tasks import Tasks as Tasks

__all__ = [
    "Cancelled",
    "CancelRequests",
    "CONTROL_EXCHANGE",
    "current_job",
    "group",
    "Group",
    "GroupHandle",
    "GroupResult",
    "GroupStore",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobHandle",
    "JobNotFoundError",
    "JobRecord",
    "JobState",
    "JobStatus",
    "JobStore",
    "JobTimeoutError",
    "MemoryStore",
    "Publisher",
    "RateLimit",
    "RateStore",
    "Running",
    "Signature",
    "SQLiteStore",
    "StoreError",
    "Task",
    "TASK_HEADER",
    "TaskArgumentError",
    "Tasks",
    "TaskWorker",
    "Withdrawals",
    "Write",
]
