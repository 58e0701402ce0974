"""Broadcast a log message to every subscriber (RabbitMQ tutorial 3, "Publish/Subscribe").

    python examples/tutorial3_emit_log.py [message]

The broker URL comes from `AMQP_URL` (default `amqp://guest:guest@localhost/`).
"""

from __future__ import annotations

import asyncio
import sys

from aio_workq import Exchange, Producer

LOGS = Exchange("logs", "fanout")


async def main() -> None:
    message = " ".join(sys.argv[1:]) or "info: Hello World!"
    async with Producer() as producer:
        # Fire and forget, like the tutorial: with no subscriber the broker drops the message.
        # By default (mandatory=True) that raises UnroutableError instead.
        await producer.publish(message, exchange=LOGS, mandatory=False)
    print(f" [x] Sent {message!r}")


if __name__ == "__main__":
    asyncio.run(main())
