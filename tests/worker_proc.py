"""A worker in its own process, for tests that kill or signal it.

    python -m tests.worker_proc URL QUEUE MODE [DELIVERY_LIMIT]

Modes: `hang` prints `STARTED <body>` and never finishes; `crash-on-poison` exits hard on the
body "poison" and prints `DONE <body>` for others; `slow` takes 1 s a message and prints
`DONE <body>`; `chain-hang` forwards the body to `<QUEUE>-down`, prints `FORWARDED <body>` once
it is confirmed, and never acks.
"""

from __future__ import annotations

import asyncio
import os
import sys

from aio_workq import Job, Queue, Worker, run_workers


async def main(url: str, queue: str, mode: str, delivery_limit: str = "20") -> None:
    async def handler(job: Job) -> None:
        print("STARTED", job.data, flush=True)
        if mode == "hang":
            await asyncio.Event().wait()
        if mode == "crash-on-poison" and job.data == "poison":
            os._exit(3)
        if mode == "slow":
            await asyncio.sleep(1)
        if mode == "chain-hang":  # forward, wait for the confirm, then die before the ack
            await job.forward(job.data, queue=f"{queue}-down")
            print("FORWARDED", job.data, flush=True)
            await asyncio.Event().wait()
        print("DONE", job.data, flush=True)

    concurrency = 1 if mode == "crash-on-poison" else 5
    worker = Worker(
        url,
        queue=Queue(queue, delivery_limit=int(delivery_limit)),
        handler=handler,
        concurrency=concurrency,
        shutdown_timeout=10,
    )
    await worker.start()
    print("READY", flush=True)
    await run_workers(worker)
    print("STOPPED", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
