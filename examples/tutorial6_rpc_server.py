"""Answer Fibonacci requests on the queue `rpc_queue` (RabbitMQ tutorial 6, "RPC").

    python examples/tutorial6_rpc_server.py [--count N]

The handler's return value is the reply. An exception it raises reaches the caller as `RPCError`.
Ctrl-C stops it; `--count N` exits after N requests. The broker URL comes from `AMQP_URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aio_workq import Job, Worker


def fib(n: int) -> int:
    if n < 0:
        raise ValueError(f"fib({n}): n must be >= 0")
    return n if n < 2 else fib(n - 1) + fib(n - 2)


async def main(count: int | None) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    served = 0

    async def on_request(job: Job) -> int:
        nonlocal served
        served += 1
        if served == count:
            stop.set()  # the worker still replies and acks before it stops
        n = int(job.data)
        print(f" [.] fib({n})")
        return await asyncio.to_thread(fib, n)  # CPU work in a thread: the loop stays free

    print(" [x] Awaiting RPC requests")
    async with Worker(queue="rpc_queue", handler=on_request):
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help="exit after N requests")
    asyncio.run(main(parser.parse_args().count))
