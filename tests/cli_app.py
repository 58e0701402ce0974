"""Targets for the `aio-workq worker` tests (tests/test_cli.py), run in subprocesses.

Handlers print `STARTED <pid> <body>` and `DONE <pid> <body>` so a test can follow them.
"""

from __future__ import annotations

import asyncio
import os

from aio_workq import Job, Worker


async def slow(job: Job) -> None:
    """Takes a second."""
    print("STARTED", os.getpid(), job.data, flush=True)
    await asyncio.sleep(1)
    print("DONE", os.getpid(), job.data, flush=True)


async def hold_unless_redelivered(job: Job) -> None:
    """Holds a first delivery for a minute (to be killed); finishes a redelivery at once."""
    print("STARTED", os.getpid(), job.data, job.redelivered, flush=True)
    if not job.redelivered:
        await asyncio.sleep(60)
    print("DONE", os.getpid(), job.data, flush=True)


async def quick(job: Job) -> None:
    """Does nothing."""


def slow_workers() -> list[Worker]:
    """A factory: one `slow` worker, concurrency 2, on the queue in CLI_TEST_QUEUE."""
    return [Worker(queue=os.environ["CLI_TEST_QUEUE"], handler=slow, concurrency=2)]


def broken_factory() -> list[Worker]:
    """A factory that always fails: its processes keep crashing."""
    raise RuntimeError("no workers today")
