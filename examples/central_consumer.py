"""The central app: handle the messages of many apps one at a time, in order.

    python examples/central_consumer.py [--count N]

Many apps publish JSON messages to the topic exchange `test_exchange` (see
`examples/central_publisher.py`); this consumer gets the ones with routing keys `routine1_json`
and `routine2_json` from its durable queue `central`, which keeps them while it is down. Start a
second one as a hot standby: the queue has a single active consumer, so the standby gets nothing
until the active one stops or dies, then goes on where it stopped.

Ctrl-C stops it; `--count N` exits after N messages. The broker URL comes from `AMQP_URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from aio_workq import Exchange, Job, Queue, Worker

EXCHANGE = Exchange("test_exchange", "topic")
# Classic, not quorum: on RabbitMQ 3.10 a quorum queue puts a message returned by a consumer
# that died behind the others, so a takeover would break the order.
QUEUE = Queue("central", type="classic", single_active_consumer=True)


async def main(count: int | None) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    received = 0

    async def process_message(job: Job) -> None:
        nonlocal received
        print(f" [x] {job.routing_key} {json.dumps(job.data)}")
        received += 1
        if received == count:
            stop.set()

    async with Worker(
        queue=QUEUE,
        handler=process_message,
        exchange=EXCHANGE,
        binding_keys=["routine1_json", "routine2_json"],
        concurrency=1,  # one message at a time, the next only once this one is acked
        retry=None,  # a retry would come back behind later messages: dead-letter it at once
    ):
        print(" [*] Waiting for messages. To exit press CTRL+C")
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help="exit after N messages")
    asyncio.run(main(parser.parse_args().count))
