"""Print the messages of the queue `hello` (RabbitMQ tutorial 1, "Hello World!").

    python examples/tutorial1_receive.py [--count N]

Ctrl-C stops it; `--count N` exits after N messages. The broker URL comes from `AMQP_URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aio_workq import Job, Worker


async def main(count: int | None) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    received = 0

    async def callback(job: Job) -> None:
        nonlocal received
        print(f" [x] Received {job.data!r}")
        received += 1
        if received == count:
            stop.set()

    print(" [*] Waiting for messages. To exit press CTRL+C")
    # Declares the same durable queue; each message is acked once `callback` returns.
    async with Worker(queue="hello", handler=callback):
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help="exit after N messages")
    asyncio.run(main(parser.parse_args().count))
