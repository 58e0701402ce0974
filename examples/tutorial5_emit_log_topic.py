"""Send a log message with a `<facility>.<severity>` routing key (RabbitMQ tutorial 5, "Topics").

    python examples/tutorial5_emit_log_topic.py [routing.key] [message]

The broker URL comes from `AMQP_URL` (default `amqp://guest:guest@localhost/`).
"""

from __future__ import annotations

import asyncio
import sys

from aio_workq import Exchange, Producer

TOPIC_LOGS = Exchange("topic_logs", "topic")


async def main() -> None:
    routing_key = sys.argv[1] if len(sys.argv) > 1 else "anonymous.info"
    message = " ".join(sys.argv[2:]) or "Hello World!"
    async with Producer() as producer:
        # Fire and forget: a key no binding matches is dropped (mandatory=True would raise
        # UnroutableError instead).
        await producer.publish(
            message, exchange=TOPIC_LOGS, routing_key=routing_key, mandatory=False
        )
    print(f" [x] Sent {routing_key}:{message!r}")


if __name__ == "__main__":
    asyncio.run(main())
