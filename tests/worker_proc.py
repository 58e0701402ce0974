"""A worker in its own process, for tests that kill or signal it.

    python -m tests.worker_proc URL QUEUE MODE

Modes: `hang` prints `STARTED <id>` and never finishes; `crash-on-poison` exits hard on the body
"poison" and prints `DONE <body>` for others; `slow` takes 1 s a message and prints `DONE <body>`.
"""

from __future__ import annotations

import asyncio
import os
import sys

from aio_workq import Job, Worker, run_workers


async def main(url: str, queue: str, mode: str) -> None:
    async def handler(job: Job) -> None:
        print("STARTED", job.data, flush=True)
        if mode == "hang":
            await asyncio.Event().wait()
        if mode == "crash-on-poison" and job.data == "poison":
            os._exit(3)
        if mode == "slow":
            await asyncio.sleep(1)
        print("DONE", job.data, flush=True)

    worker = Worker(url, queue=queue, handler=handler, concurrency=5, shutdown_timeout=10)
    await worker.start()
    print("READY", flush=True)
    await run_workers(worker)
    print("STOPPED", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
