"""One of the many apps: publish JSON messages to the central app's topic exchange.

    python examples/central_publisher.py [--count N] [routing_key ...]

Sends N numbered messages (default 1), cycling through the routing keys (default `routine1_json`
and `routine2_json`). The broker URL comes from `AMQP_URL` (default `amqp://guest:guest@localhost/`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys

from aio_workq import Exchange, Producer, UnroutableError

EXCHANGE = Exchange("test_exchange", "topic")


async def main(count: int, routing_keys: list[str]) -> int:
    async with Producer() as producer:
        for seq, routing_key in zip(range(1, count + 1), itertools.cycle(routing_keys)):
            data = {"seq": seq, "message": "Hello World!", "detail": "example json"}
            try:
                # Returns once the broker has the message in the central app's queue.
                await producer.publish(data, exchange=EXCHANGE, routing_key=routing_key)
            except UnroutableError:  # no queue is bound for this key: nobody would get it
                print(f" [!] No queue is bound to {routing_key!r}: message {seq} not sent")
                return 1
            print(f" [x] Sent {routing_key} {json.dumps(data)}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1, help="messages to send")
    parser.add_argument("routing_keys", nargs="*", default=["routine1_json", "routine2_json"])
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.count, args.routing_keys)))
