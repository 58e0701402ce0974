"""A worker process killed with SIGKILL mid-batch: the other worker and a restarted one finish.

Two worker processes (`tests.worker_proc`, 1 s per message, 5 at a time) share a queue; one is
killed while it holds a batch of unacked messages, and a supervisor-style restart brings up a new
one. The ledger reads each process's `DONE <id>` lines: every confirmed id must be done, and the
ids the killed worker had done but not yet acked come back as duplicates.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

from aio_workq import Producer
from tests.chaos.flow import ids, publish_all
from tests.chaos.ledger import Ledger
from tests.helpers import read_line

pytestmark = [pytest.mark.broker]


@asynccontextmanager
async def slow_worker(url: str, queue: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`tests.worker_proc` in `slow` mode, killed on exit.

    Unlike `tests.helpers.worker_process` it does not wait for READY: a worker restarted onto a
    full queue prints its first STARTED lines before it.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.worker_proc", url, queue, "slow", stdout=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def record_done(
    proc: asyncio.subprocess.Process, ledger: Ledger, *, mid_batch: asyncio.Event | None = None
) -> None:
    """Feed a worker process's `DONE` lines to the ledger until it exits.

    `mid_batch` is set once the process has started 12 messages (a batch under way after the
    first ones are done).
    """
    started = 0
    while line := await read_line(proc, timeout=120):
        word, _, message_id = line.partition(" ")
        if word == "DONE":
            ledger.process(message_id)
        elif word == "STARTED":
            started += 1
            if mid_batch is not None and started >= 12:
                mid_batch.set()


@pytest.mark.timeout(180)
async def test_worker_sigkill_mid_batch_another_finishes(amqp_url: str, queue_name: str) -> None:
    ledger = Ledger("worker SIGKILL mid-batch, other worker + restart finish")
    message_ids = ids(queue_name, 60)
    async with Producer(amqp_url) as producer, AsyncExitStack() as stack:
        # Workers first: a worker process says READY before it takes its first message.
        victim = await stack.enter_async_context(slow_worker(amqp_url, queue_name))
        other = await stack.enter_async_context(slow_worker(amqp_url, queue_name))
        mid_batch = asyncio.Event()
        readers = [
            asyncio.create_task(record_done(victim, ledger, mid_batch=mid_batch)),
            asyncio.create_task(record_done(other, ledger)),
        ]
        async with asyncio.timeout(60):
            await publish_all(producer, ledger, message_ids, queue_name)
            await mid_batch.wait()
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        ledger.cleared()
        restarted = await stack.enter_async_context(slow_worker(amqp_url, queue_name))
        readers.append(asyncio.create_task(record_done(restarted, ledger)))
        try:
            async with asyncio.timeout(90):
                await ledger.wait_processed(message_ids)
        finally:
            for reader in readers:
                reader.cancel()
            ledger.report()
    row = ledger.row()
    assert victim.returncode == -signal.SIGKILL
    assert row.confirmed == 60 and row.lost == 0, row.line()
    assert not row.untyped_errors, row.line()
