"""A cancelled `Worker.start()` (Ctrl-C) settles like a graceful stop (#20 side road 5).

Deliveries can be handled before `start()` returns: the broker's deliveries follow its
`Basic.ConsumeOk` at once, and aiormq hands the `ConsumeOk` to `basic_consume()` a few loop
iterations after the fast path's demux has handed the deliveries to the worker. A cancellation
in that window must write the acks of the handlers that finished before the channel closes, or
those messages run twice.
"""

from __future__ import annotations

import asyncio
import collections

import pytest

from aio_workq import Connection, Job, Producer, Queue, Worker
from tests.helpers import queue_consumers, queue_depth, wait_until

pytestmark = pytest.mark.broker

N = 20


async def _round(
    amqp_url: str, connection: Connection, producer: Producer, name: str
) -> tuple[bool, collections.Counter[str]]:
    """One start cancelled by the first handler; whether start() was cut short, and the runs."""
    runs: collections.Counter[str] = collections.Counter()
    starting: asyncio.Future[None] | None = None

    async def handle(job: Job) -> None:
        runs[str(job.message_id)] += 1
        if starting is not None and len(runs) == 1:
            starting.cancel()  # Ctrl-C, as this handler returns

    queue = Queue(name)
    for i in range(N):
        await producer.publish(i, queue=queue, message_id=f"m{i}")
    worker = Worker(connection=connection, queue=queue, handler=handle, concurrency=N)
    starting = asyncio.ensure_future(worker.start())
    try:
        await starting
        cut_short = False
    except asyncio.CancelledError:
        cut_short = True
        assert runs, "no delivery was handled before start() was cancelled"
    else:
        async with asyncio.timeout(30):
            while len(runs) < N:  # noqa: ASYNC110 - a counter, no event
                await asyncio.sleep(0.01)
        await worker.stop(timeout=30)
    handled = set(runs)

    async def no_consumer() -> bool:
        return await queue_consumers(amqp_url, name) == 0

    await wait_until(no_consumer, timeout=30)
    assert await queue_depth(amqp_url, name) == N - len(handled), "handled messages came back"
    last = asyncio.Event()

    async def again(job: Job) -> None:
        runs[str(job.message_id)] += 1
        if job.message_id == "last":
            last.set()

    await producer.publish("last", queue=queue, message_id="last")
    async with Worker(connection=connection, queue=queue, handler=again, concurrency=N):
        async with asyncio.timeout(30):
            await last.wait()
    return cut_short, runs


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "plain"])
async def test_a_start_cancelled_after_deliveries_were_handled_acks_them_before_closing(
    amqp_url: str, queue_name: str, fast_path: bool
) -> None:
    async with Connection(amqp_url, fast_path=fast_path) as connection:
        async with Producer(connection=connection, timeout=30) as producer:
            cut_short = False
            # On the fast path the scenario needs the first handler to run before start()
            # returns: nearly always, a few rounds make sure. aiormq (the plain path) hands
            # `basic_consume()` its ConsumeOk before any delivery: there, a graceful stop.
            for attempt in range(5 if fast_path else 1):
                cut_short, runs = await _round(
                    amqp_url, connection, producer, f"{queue_name}-{attempt}"
                )
                assert {k: v for k, v in runs.items() if v != 1} == {}
                if cut_short:
                    break
            assert cut_short or not fast_path, "start() was never cut short: no scenario"
