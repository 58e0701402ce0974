"""Print every log message broadcast from now on (RabbitMQ tutorial 3, "Publish/Subscribe").

    python examples/tutorial3_receive_logs.py [--count N]

Ctrl-C stops it; `--count N` exits after N messages. The broker URL comes from `AMQP_URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aio_workq import Exchange, Job, Queue, Worker

LOGS = Exchange("logs", "fanout")


async def main(count: int | None) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    received = 0

    async def callback(job: Job) -> None:
        nonlocal received
        print(f" [x] {job.data}")
        received += 1
        if received == count:
            stop.set()

    # Queue(""): a fresh server-named, exclusive queue, deleted when this worker stops (and
    # declared and bound again if the connection is lost and restored).
    async with Worker(queue=Queue(""), handler=callback, exchange=LOGS):
        print(" [*] Waiting for logs. To exit press CTRL+C")
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help="exit after N messages")
    asyncio.run(main(parser.parse_args().count))
