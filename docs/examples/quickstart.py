"""Quickstart: a producer publishes three tasks, a worker with concurrency 2 runs them.

Run it with a broker URL in AMQP_URL (`make broker-start` prints one):
`AMQP_URL=amqp://guest:guest@localhost:5672/ python docs/examples/quickstart.py`.
It declares the queue `quickstart`, finishes within seconds and deletes what it declared.
The docs show the part between the `--8<--` markers, followed by `asyncio.run(main())`.
"""

from __future__ import annotations

# --8<-- [start:main]
import asyncio
import os

from aio_workq import Job, Producer, Worker

URL = os.environ.get("AMQP_URL")  # None: RABBITMQ_* variables, else amqp://guest:guest@localhost/
QUEUE = "quickstart"
TASKS = ["resize cat.png", "resize dog.png", "resize owl.png"]


async def main() -> None:
    done = asyncio.Event()
    seen: list[str] = []

    async def handle(job: Job) -> None:
        await asyncio.sleep(0.2)  # the work; job.data is the decoded JSON body
        print(f"attempt {job.attempt} of {job.message_id}: {job.data['task']}")
        seen.append(job.data["task"])
        if len(seen) == len(TASKS):
            done.set()

    async with Producer(URL) as producer:
        for task in TASKS:
            await producer.publish({"task": task}, queue=QUEUE)  # returns once confirmed

    async with Worker(URL, queue=QUEUE, handler=handle, concurrency=2) as worker:
        await done.wait()
    print(f"processed {worker.state.processed} tasks")


# --8<-- [end:main]


async def delete_queues() -> None:
    """Delete the queues this example declared: the work queue, its .dlq and delay queues."""
    from aio_workq import Queue, RetryPolicy, connect

    queue = Queue(QUEUE)
    names = [queue.name, queue.dead_letter_queue]
    names += [queue.delay_queue(ms) for ms in RetryPolicy().levels_ms()]
    async with await connect(URL) as connection:
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
