"""Ask the RPC server for fib(n) and print the answer (RabbitMQ tutorial 6, "RPC").

    python examples/tutorial6_rpc_client.py [n] [--timeout SECONDS]

The reply comes back over direct reply-to (`amq.rabbitmq.reply-to`): no reply queue to declare.
The broker URL comes from `AMQP_URL` (default `amqp://guest:guest@localhost/`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aio_workq import Producer, RPCError, RPCTimeoutError


async def main(n: int, timeout: float) -> int:
    async with Producer() as producer:
        print(f" [x] Requesting fib({n})")
        try:
            response = await producer.call(n, queue="rpc_queue", timeout=timeout)
        except RPCError as exc:  # the server's handler raised: its type and message
            print(f" [!] The server failed: {exc}")
            return 1
        except RPCTimeoutError as exc:  # no reply in time: is a server running?
            print(f" [!] {exc}")
            return 1
    print(f" [.] Got {response!r}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=30)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.n, args.timeout)))
