"""A target for the presence tests' `aio-workq worker` runs (tests/test_presence.py): one worker
on the queue in PRESENCE_TEST_QUEUE that beats every 0.5 s."""

from __future__ import annotations

import os

from aio_workq import Job, Worker


async def quick(job: Job) -> None:
    """Does nothing."""


def workers() -> list[Worker]:
    """A factory: run in each process of `--processes`."""
    return [Worker(queue=os.environ["PRESENCE_TEST_QUEUE"], handler=quick, presence_interval=0.5)]
