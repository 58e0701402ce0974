"""Typed payloads and delayed publish: the worker gets `Order`s, a bad body is dead-lettered at
once, and a reminder arrives two seconds later.

Run it with a broker URL in AMQP_URL:
`AMQP_URL=amqp://guest:guest@localhost:5672/ python docs/examples/typed.py`.
It declares fresh queues, finishes within seconds and deletes what it declared.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass

import aio_workq
from aio_workq import Job, Producer, Queue, RetryPolicy, Worker

URL = os.environ.get("AMQP_URL")  # None: RABBITMQ_* variables, else amqp://guest:guest@localhost/
QUEUE = f"docs-orders-{uuid.uuid4().hex[:8]}"
REMINDERS = f"{QUEUE}-reminders"


# --8<-- [start:types]
@dataclass
class Order:  # a dataclass, a pydantic model, a TypedDict or a plain type such as list[int]
    id: int
    item: str
    quantity: int = 1


async def handle(order: Order, job: Job) -> None:  # (order: Order) alone works too
    print(f"order {order.id}: {order.quantity} x {order.item} (attempt {job.attempt})")
    await job.forward({"order": order.id}, queue=REMINDERS, delay=2)  # due in 2 s


# --8<-- [end:types]


async def main() -> None:
    reminded = asyncio.Event()
    started = time.monotonic()

    async def remind(reminder: dict[str, int]) -> None:
        print(f"reminder for order {reminder['order']} after {time.monotonic() - started:.1f} s")
        reminded.set()

    # --8<-- [start:publish]
    async with Producer(URL) as producer:
        await producer.publish(Order(id=1, item="tea", quantity=2), queue=QUEUE)  # JSON
        await producer.publish({"id": "one", "item": "cake"}, queue=QUEUE)  # not an Order
        async with (
            Worker(URL, queue=QUEUE, handler=handle) as worker,
            Worker(URL, queue=REMINDERS, handler=remind),
        ):
            await reminded.wait()
        print(f"processed {worker.state.processed}, dead-lettered {worker.state.dead_lettered}")
        [letter] = await producer.dead_letters(QUEUE).read()
        print(letter.headers["x-workq-validation-error"].splitlines()[0])
    # --8<-- [end:publish]


async def delete_queues() -> None:
    """Delete the queues this example declared: the work queues, their .dlq and delay queues.

    The delay ladder `workq.delay.*` that `delay=` publishes through stays: it is shared by every
    delayed publish on the vhost (deleting it would drop other applications' delayed messages).
    """
    names: list[str] = []
    for name in (QUEUE, REMINDERS):  # both workers retry with the default policy
        queue = Queue(name)
        names += [name, queue.dead_letter_queue]
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
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run())
