"""A registry whose first task enqueues the second, for the command line's tests:

        aio-workq worker tests.chain_app:tasks.workers --processes 2

with nothing bound (the new user's chain, coming from Celery). `WORKQ_CHAIN_DB` is the SQLite
store, `WORKQ_CHAIN_QUEUE` the first task's queue (the second's is it plus `-next`).
"""

from __future__ import annotations

import os

from aio_workq.jobs import SQLiteStore, Tasks, current_job

tasks = Tasks(store=SQLiteStore(os.environ.get("WORKQ_CHAIN_DB", "chain-jobs.db"), busy_timeout=30))
QUEUE = os.environ.get("WORKQ_CHAIN_QUEUE", "chain-test")


@tasks.task(queue=f"{QUEUE}-next", name="chain.second")
async def second(n: int) -> int:
    return n * 10


@tasks.task(queue=QUEUE, name="chain.first")
async def first(n: int) -> str:
    job = current_job()
    assert job is not None
    child = await second.options(job_id=f"{job.job_id}-next").enqueue(n + 1)
    return child.job_id
