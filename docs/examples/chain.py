"""A consume-then-publish chain: `square` forwards each result to `total`.

Each `square` delivery is acked only once the broker has confirmed its forwarded message, so a
crash at any point leaves the number in one queue or the other (possibly in both, never in
neither). Run it with a broker URL in AMQP_URL:
`AMQP_URL=amqp://guest:guest@localhost:5672/ python docs/examples/chain.py`.
It declares fresh queues, finishes within seconds and deletes what it declared.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import aio_workq
from aio_workq import Job, Producer, Queue, RetryPolicy, Worker

URL = os.environ.get("AMQP_URL")  # None: RABBITMQ_* variables, else amqp://guest:guest@localhost/
RUN = uuid.uuid4().hex[:8]
SQUARE, TOTAL = f"docs-square-{RUN}", f"docs-total-{RUN}"


# --8<-- [start:main]
N = 100


async def main() -> None:
    results: dict[str, int] = {}  # by message id: a redelivered duplicate counts once
    all_in = asyncio.Event()

    async def square(job: Job) -> None:
        n = int(job.data)
        # This job is acked only after the broker confirms the forwarded message. A message id
        # derived from the upstream one lets `total` recognise a duplicate.
        await job.forward(n * n, queue=TOTAL, message_id=f"{job.message_id}-squared")

    async def total(job: Job) -> None:
        results[job.message_id or ""] = int(job.data)
        if len(results) == N:
            all_in.set()

    # Workers share one connection (a channel each); the producer has its own.
    async with await aio_workq.connect(URL, name="docs chain workers") as connection:
        first = Worker(
            connection=connection,
            queue=SQUARE,
            handler=square,
            concurrency=10,
            prefetch=50,  # deliveries waiting for their forward's confirm hold a prefetch slot
            shutdown_timeout=5,
        )
        second = Worker(connection=connection, queue=TOTAL, handler=total, concurrency=10)
        async with first, second:
            async with Producer(URL) as producer:
                # Pipelined: send() returns once the message is handed to the connection.
                confirms = [await producer.send(n, queue=SQUARE) for n in range(1, N + 1)]
                await asyncio.gather(*confirms)  # every confirm, or the first error
            await all_in.wait()
        # Leaving `async with` stops both workers gracefully: in-flight handlers finish and
        # the last upstream deliveries are acked once their forwarded messages are confirmed.
    print(f"sum of squares 1..{N}: {sum(results.values())}")
    assert sum(results.values()) == N * (N + 1) * (2 * N + 1) // 6


# --8<-- [end:main]


async def delete_queues() -> None:
    """Delete the queues this example declared: the work queues, their .dlq and delay queues."""
    names: list[str] = []
    for queue in (Queue(SQUARE), Queue(TOTAL)):
        names += [queue.name, queue.dead_letter_queue]
        names += [queue.delay_queue(ms) for ms in RetryPolicy().levels_ms()]
    async with await aio_workq.connect(URL) as connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)


async def run() -> None:
    try:
        async with asyncio.timeout(30):
            await main()
    finally:
        await delete_queues()


if __name__ == "__main__":
    asyncio.run(run())
