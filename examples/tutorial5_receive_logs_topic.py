"""Print the log messages matching binding keys (RabbitMQ tutorial 5, "Topics").

    python examples/tutorial5_receive_logs_topic.py [--count N] "kern.*" "*.critical"

In a binding key `*` stands for one word and `#` for zero or more. Ctrl-C stops it; `--count N`
exits after N messages. The broker URL comes from `AMQP_URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aio_workq import Exchange, Job, Queue, Worker

TOPIC_LOGS = Exchange("topic_logs", "topic")


async def main(binding_keys: list[str], count: int | None) -> None:
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

    async with Worker(
        queue=Queue(""), handler=callback, exchange=TOPIC_LOGS, binding_keys=binding_keys
    ):
        print(" [*] Waiting for logs. To exit press CTRL+C")
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binding_keys", nargs="+", help='e.g. "kern.*" "*.critical" "#"')
    parser.add_argument("--count", type=int, help="exit after N messages")
    args = parser.parse_args()
    asyncio.run(main(args.binding_keys, args.count))
