"""Module-level handlers, picklable for `executor="process"` tests."""

from __future__ import annotations

import os

from aio_workq import JobData


def square_in_process(job: JobData) -> dict[str, int]:
    """CPU work in a pool process: returns the square and the process id."""
    n = int(job.data)
    return {"square": sum(n for _ in range(n)), "pid": os.getpid()}
