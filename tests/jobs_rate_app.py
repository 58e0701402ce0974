"""The tasks the rate-limit tests run in worker processes (no tests here):

    WORKQ_RATE_DB=jobs.db WORKQ_RATE=20/s WORKQ_RATE_QUEUE=q \\
        aio-workq worker tests.jobs_rate_app:workers --processes 3

Each job prints `RAN <pid> <unix time>` when it starts.
"""

from __future__ import annotations

import os
import sys
import time

from aio_workq import Worker
from aio_workq.jobs import SQLiteStore, Tasks

tasks = Tasks(store=SQLiteStore(os.environ.get("WORKQ_RATE_DB", "rate-jobs.db"), busy_timeout=30))


@tasks.task(
    queue=os.environ.get("WORKQ_RATE_QUEUE", "rate-test"),
    name="rate.tick",
    rate_limit=os.environ.get("WORKQ_RATE", "20/s"),
)
async def tick(i: int) -> float:
    now = time.time()
    sys.stdout.write(f"RAN {os.getpid()} {now!r}\n")
    sys.stdout.flush()
    return now


def workers() -> list[Worker]:
    return tasks.workers(concurrency=8)
