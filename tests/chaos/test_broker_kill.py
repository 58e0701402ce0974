"""Broker kill -9 and restart, three times, while messages flow: nothing confirmed is lost.

A producer publishes (pipelined, a burst of up to `window` in flight) while a worker consumes; at
three points of the flow the broker node is killed with SIGKILL and started again with its data.
Variants: quorum and classic queues, retries in flight in the delay queues, and chains (a worker
forwards each message to a second queue with `job.forward`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from aio_workq import Job, Producer, Queue, Reject, RetryPolicy, Worker
from scripts.broker import LocalBroker
from tests.chaos.flow import ids, publish_all, recording_handler
from tests.chaos.ledger import Ledger

pytestmark = [pytest.mark.broker]

TOTAL_CHAIN, KILLS_CHAIN = 20_000, 3
FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.5, multiplier=2.0, jitter=0.0)


async def kill_during(broker: LocalBroker, ledger: Ledger, total: int, *, kills: int = 3) -> None:
    """Kill -9 the node and start it again each time another share of `total` is confirmed."""
    for n in range(1, kills + 1):
        await ledger.wait_confirmed(total * n // (kills + 2))
        await asyncio.to_thread(broker.kill)
        ledger.cleared()  # recovery includes the node's restart
        await asyncio.to_thread(broker.start)


async def run_kills(
    broker: LocalBroker,
    ledger: Ledger,
    *,
    total: int,
    kills: int,
    queue: Queue,
    handler: Callable[[Job], Any],
    extra_workers: tuple[Worker, ...] = (),
    window: int = 1024,
) -> None:
    url = broker.url
    message_ids = ids(queue.name, total)
    worker = Worker(url, queue=queue, handler=handler, concurrency=50, retry=FAST_RETRY)
    async with Producer(url, window=window, timeout=60) as producer:
        await producer.declare(queue)
        workers = (worker, *extra_workers)
        for w in workers:
            await w.start()
        try:
            await asyncio.gather(
                publish_all(producer, ledger, message_ids, queue),
                kill_during(broker, ledger, total, kills=kills),
            )
            await ledger.settle(producer.dead_letters(queue))
        finally:
            for w in workers:
                await w.stop(timeout=5)
            ledger.report()  # the figures, also when the scenario failed
            await producer.dead_letters(queue).purge()


def check(ledger: Ledger, total: int) -> None:
    row = ledger.row()
    assert row.confirmed == total
    assert row.lost == 0, row.line()
    assert not row.untyped_errors, row.line()


@pytest.mark.chaos
@pytest.mark.timeout(600)
@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_kill_9_three_times_during_20000_messages(
    local_broker: LocalBroker, queue_name: str, queue_type: str
) -> None:
    ledger = Ledger(f"kill -9 x3, 20,000 msgs, {queue_type}, 1,024 in flight")
    queue = Queue(queue_name, type=queue_type)  # type: ignore[arg-type]
    async with asyncio.timeout(540):
        await run_kills(
            local_broker, ledger, total=20_000, kills=3, queue=queue,
            handler=recording_handler(ledger),
        )  # fmt: skip
    check(ledger, 20_000)
    assert ledger.row().processed == 20_000


@pytest.mark.timeout(300)
async def test_kill_9_once_during_2000_messages(local_broker: LocalBroker, queue_name: str) -> None:
    """The default run's short version: one kill, a quorum queue."""
    ledger = Ledger("kill -9 x1, 2,000 msgs, quorum (default run)")
    async with asyncio.timeout(240):
        await run_kills(
            local_broker, ledger, total=2_000, kills=1, queue=Queue(queue_name),
            handler=recording_handler(ledger), window=256,
        )  # fmt: skip
    check(ledger, 2_000)
    assert ledger.row().processed == 2_000


@pytest.mark.chaos
@pytest.mark.timeout(600)
async def test_kill_9_three_times_with_retries_in_flight(
    local_broker: LocalBroker, queue_name: str
) -> None:
    """Every 5th message fails once (then waits in a delay queue), every 50th is rejected."""
    ledger = Ledger("kill -9 x3, 20,000 msgs, retries + dead letters in flight")

    async def handler(job: Job) -> None:
        number = int((job.message_id or "").rsplit("-", 1)[1])
        if number % 50 == 0:
            raise Reject("poison")
        if number % 5 == 0 and job.attempt == 1:
            raise RuntimeError("first attempt fails")
        ledger.process(job.message_id)

    async with asyncio.timeout(540):
        await run_kills(
            local_broker, ledger, total=20_000, kills=3, queue=Queue(queue_name), handler=handler
        )
    check(ledger, 20_000)
    row = ledger.row()
    assert row.dead_lettered >= 20_000 // 50
    assert row.processed + row.dead_lettered >= 20_000


@pytest.mark.chaos
@pytest.mark.timeout(240)
@pytest.mark.xfail(
    strict=False,  # the broker recovers the queue now and then
    reason="RabbitMQ 3.10.8, one node: a quorum queue being written at a kill -9 may never "
    "elect its leader again (a fresh producer gets no confirm for it either), so forwards to it "
    "time out and the chain stalls; nothing confirmed is lost (issue 15)",
)
async def test_kill_9_three_times_during_chains(local_broker: LocalBroker, queue_name: str) -> None:
    """Stage 1 forwards each message to stage 2 (same id); the ledger counts stage 2."""
    ledger = Ledger(f"kill -9 x{KILLS_CHAIN}, {TOTAL_CHAIN:,} msgs, chains (job.forward)")
    downstream = Queue(f"{queue_name}-down")

    async def forward(job: Job) -> None:
        await job.forward(job.data, downstream, message_id=job.message_id)

    second = Worker(
        local_broker.url, queue=downstream, handler=recording_handler(ledger), concurrency=50
    )
    async with asyncio.timeout(150):
        await run_kills(
            local_broker, ledger, total=TOTAL_CHAIN, kills=KILLS_CHAIN, queue=Queue(queue_name),
            handler=forward, extra_workers=(second,),
        )  # fmt: skip
    check(ledger, TOTAL_CHAIN)
