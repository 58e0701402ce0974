"""Send a log message with its severity as routing key (RabbitMQ tutorial 4, "Routing").

    python examples/tutorial4_emit_log_direct.py [severity] [message]

The broker URL comes from `AMQP_URL` (default `amqp://guest:guest@localhost/`).
"""

from __future__ import annotations

import asyncio
import sys

from aio_workq import Exchange, Producer

DIRECT_LOGS = Exchange("direct_logs", "direct")


async def main() -> None:
    severity = sys.argv[1] if len(sys.argv) > 1 else "info"
    message = " ".join(sys.argv[2:]) or "Hello World!"
    async with Producer() as producer:
        # Fire and forget: a severity nobody listens to is dropped (mandatory=True would raise
        # UnroutableError instead).
        await producer.publish(message, exchange=DIRECT_LOGS, routing_key=severity, mandatory=False)
    print(f" [x] Sent {severity}:{message!r}")


if __name__ == "__main__":
    asyncio.run(main())
