"""Print the log messages of the given severities (RabbitMQ tutorial 4, "Routing").

    python examples/tutorial4_receive_logs_direct.py [--count N] info warning error

Ctrl-C stops it; `--count N` exits after N messages. The broker URL comes from `AMQP_URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aio_workq import Exchange, Job, Queue, Worker

DIRECT_LOGS = Exchange("direct_logs", "direct")


async def main(severities: list[str], count: int | None) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    received = 0

    async def callback(job: Job) -> None:
        nonlocal received
        print(f" [x] {job.routing_key}:{job.data}")
        received += 1
        if received == count:
            stop.set()

    # One binding per severity: the queue gets the messages whose routing key is one of them.
    async with Worker(
        queue=Queue(""), handler=callback, exchange=DIRECT_LOGS, binding_keys=severities
    ):
        print(" [*] Waiting for logs. To exit press CTRL+C")
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("severities", nargs="+", help="e.g. info warning error")
    parser.add_argument("--count", type=int, help="exit after N messages")
    args = parser.parse_args()
    asyncio.run(main(args.severities, args.count))
