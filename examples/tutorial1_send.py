"""Send "Hello World!" to the queue `hello` (RabbitMQ tutorial 1, "Hello World!").

    python examples/tutorial1_send.py

The broker URL comes from `AMQP_URL` (default `amqp://guest:guest@localhost/`).
"""

from __future__ import annotations

import asyncio

from aio_workq import Producer


async def main() -> None:
    async with Producer() as producer:
        # Declares the durable queue `hello` on first use, sends a persistent message and waits
        # for the broker's confirm.
        await producer.publish("Hello World!", queue="hello")
    print(" [x] Sent 'Hello World!'")


if __name__ == "__main__":
    asyncio.run(main())
