"""The tasks of the kill -9 group test, run in worker processes (no tests here):

    WORKQ_GROUPS_DB=jobs.db WORKQ_GROUPS_DIE=die.mark WORKQ_GROUPS_QUEUE=q \\
        aio-workq worker tests.jobs_groups_app:workers --processes 2

The store kills its own process with SIGKILL right after the transaction that claimed a
group's callback committed, before the callback is published and the member acked (once: the
marker file says it happened).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from aio_workq import Worker
from aio_workq.jobs import GroupResult, SQLiteStore, Tasks, Write
from aio_workq.jobs._groupstore import CallbackDue


def _first_death() -> bool:
    """True the first time, in any process (the marker file is created exclusively)."""
    try:
        Path(os.environ.get("WORKQ_GROUPS_DIE", "die.mark")).open("x").close()
    except FileExistsError:
        return False
    return True


class DyingStore(SQLiteStore):
    async def finish_member(self, write: Write, *, group_id: str, index: int) -> CallbackDue | None:
        due = await super().finish_member(write, group_id=group_id, index=index)
        if due is not None and due.claimed_now and _first_death():
            sys.stdout.write(f"DYING {os.getpid()} {write.job_id}\n")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return due


tasks = Tasks(
    store=DyingStore(os.environ.get("WORKQ_GROUPS_DB", "groups-jobs.db"), busy_timeout=30)
)
QUEUE = os.environ.get("WORKQ_GROUPS_QUEUE", "groups-test")


@tasks.task(queue=QUEUE, name="g.square")
async def square(n: int) -> int:
    return n * n


@tasks.task(queue=f"{QUEUE}-report", name="g.report")
async def report(results: list[GroupResult]) -> int:
    sys.stdout.write(f"CALLBACK {os.getpid()} {len(results)}\n")
    sys.stdout.flush()
    return sum(r.value for r in results if r.ok)


def workers() -> list[Worker]:
    return tasks.workers(concurrency=4)
