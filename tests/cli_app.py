"""Targets for the `aio-workq worker` tests (tests/test_cli.py), run in subprocesses.

Handlers print `STARTED <pid> <body>` and `DONE <pid> <body>` so a test can follow them.
"""

from __future__ import annotations

import asyncio
import os
import sys

from aio_workq import Job, Producer, Worker


async def slow(job: Job) -> None:
    """Takes a second."""
    _say("STARTED", os.getpid(), job.data)
    await asyncio.sleep(1)
    _say("DONE", os.getpid(), job.data)


async def hold_unless_redelivered(job: Job) -> None:
    """Holds a first delivery for a minute (to be killed); finishes a redelivery at once."""
    _say("STARTED", os.getpid(), job.data, job.redelivered)
    if not job.redelivered:
        await asyncio.sleep(60)
    _say("DONE", os.getpid(), job.data)


async def quick(job: Job) -> None:
    """Does nothing."""


def slow_workers() -> list[Worker]:
    """A factory: one `slow` worker, concurrency 2, on the queue in CLI_TEST_QUEUE."""
    return [Worker(queue=os.environ["CLI_TEST_QUEUE"], handler=slow, concurrency=2)]


def broken_factory() -> list[Worker]:
    """A factory that always fails: its processes keep crashing."""
    raise RuntimeError("no workers today")


def _say(*parts: object) -> None:
    """One line in one write: the two children of a test share a pipe."""
    sys.stdout.write(" ".join(str(part) for part in parts) + "\n")
    sys.stdout.flush()


async def tally(job: Job) -> None:
    """Says which process handled each message; holds a first delivery of "hold" a minute."""
    if job.data == "hold" and not job.redelivered:
        _say("HOLDING", os.getpid(), job.data)
        await asyncio.sleep(60)
    _say("DONE", os.getpid(), job.data)


def metered_workers() -> list[Worker]:
    """A factory whose worker brings its own `PrometheusHook`, as the docs show it."""
    from aio_workq.metrics import PrometheusHook

    return [Worker(queue=os.environ["CLI_TEST_QUEUE"], handler=tally, hooks=[PrometheusHook()])]


async def workers_with_a_producer_left_open() -> list[Worker]:
    """A factory that starts a `Producer` (for its handlers) and never closes it."""
    producer = Producer(os.environ["AMQP_URL"])
    await producer.start()
    _LEFT_OPEN.append(producer)
    return [Worker(queue=os.environ["CLI_TEST_QUEUE"], handler=quick)]


_LEFT_OPEN: list[Producer] = []


def _tasks() -> object:
    from aio_workq.jobs import Tasks

    registry = Tasks()

    @registry.task(queue="cli-app-tasks")
    async def noop() -> None: ...

    return registry


tasks = _tasks()  # `aio-workq worker tests.cli_app:tasks` names the registry, not its factory
