"""Send a task to the work queue (RabbitMQ tutorial 2, "Work queues").

    python examples/new_task.py "A task that takes three seconds..."

Each `.` in the message is one second of work for `examples/worker.py`. The broker URL comes from
`AMQP_URL` (default `amqp://guest:guest@localhost/`).
"""

from __future__ import annotations

import asyncio
import sys

from aio_workq import Producer


async def main() -> None:
    message = " ".join(sys.argv[1:]) or "Hello World!"
    async with Producer(queue_type="classic") as producer:
        # Declares the durable queue, sends a persistent message and waits for the broker's
        # confirm: once this returns, the task survives a broker restart.
        await producer.publish(message, queue="task_queue")
    print(f" [x] Sent {message!r}")


if __name__ == "__main__":
    asyncio.run(main())
