"""Retries and dead letters: a flaky job succeeds on its third attempt, a bad one is rejected.

Run it with a broker URL in AMQP_URL:
`AMQP_URL=amqp://guest:guest@localhost:5672/ python docs/examples/retries.py`.
It declares a fresh queue, finishes within seconds and deletes what it declared.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

import aio_workq
from aio_workq import Job, Producer, Queue, Reject, Retry, RetryPolicy, Worker

URL = os.environ.get("AMQP_URL")  # None: RABBITMQ_* variables, else amqp://guest:guest@localhost/
QUEUE = f"docs-retries-{uuid.uuid4().hex[:8]}"


# --8<-- [start:main]
# Waits 0.5 s after the first failure, 1 s after the second; the third failure dead-letters.
POLICY = RetryPolicy(max_attempts=3, initial_delay=0.5, max_delay=1.0, jitter=0.0)


async def main() -> None:
    succeeded: list[str] = []
    both_succeeded = asyncio.Event()

    async def handle(job: Job) -> None:
        kind = job.data["kind"]
        print(f"{kind}: attempt {job.attempt}")
        if kind == "flaky" and job.attempt < 3:
            raise ConnectionError("the image service is down")  # retried per POLICY
        if kind == "busy" and job.attempt == 1:
            raise Retry(delay=1)  # explicitly: run again in (at least) 1 s
        if kind == "bad":
            raise Reject("no such image")  # straight to the dead-letter queue
        succeeded.append(kind)
        if len(succeeded) == 2:
            both_succeeded.set()

    async with Producer(URL) as producer:
        kinds = [{"kind": "flaky"}, {"kind": "busy"}, {"kind": "bad"}]
        await producer.publish_many(kinds, queue=QUEUE)

        async with Worker(URL, queue=QUEUE, handler=handle, retry=POLICY, concurrency=3) as w:
            await both_succeeded.wait()
        print(w.state)

        # The dead letter: body untouched, the reason in x-workq-* headers.
        dead_letters = producer.dead_letters(QUEUE)
        print(f"{await dead_letters.count()} dead letter(s) in {dead_letters.name}")
        for letter in await dead_letters.read():
            print(f"{letter.body!r}: {letter.reason} after {letter.attempts} attempt(s)")
            for name, value in sorted(letter.headers.items()):
                if name.startswith("x-workq-") and name != "x-workq-traceback":
                    print(f"  {name}: {value!r}")
        await dead_letters.purge()  # or .replay() to move them back to the work queue


# --8<-- [end:main]


async def delete_queues() -> None:
    """Delete the queues this example declared: the work queue, its .dlq and delay queues."""
    queue = Queue(QUEUE)
    names = [queue.name, queue.dead_letter_queue]
    names += [queue.delay_queue(ms) for ms in POLICY.levels_ms()]
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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run())
