"""Do the tasks from the work queue (RabbitMQ tutorial 2, "Work queues").

    python examples/worker.py [--count N]

Each `.` in a task is one second of work. Run several workers: each takes one task at a time
(fair dispatch). A task is acknowledged only when its handler returns; if the worker dies, the
broker gives the task to another worker. Ctrl-C (or SIGTERM) stops gracefully: the task under way
is finished first. `--count N` exits after N tasks. The broker URL comes from `AMQP_URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aio_workq import Job, Worker


async def main(count: int | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    done = 0

    async def callback(job: Job) -> None:
        nonlocal done
        print(f" [x] Received {job.data!r}")
        await asyncio.sleep(job.body.count(b"."))
        print(" [x] Done")
        done += 1
        if done == count:
            stop.set()

    print(" [*] Waiting for messages. To exit press CTRL+C")
    async with Worker(queue="task_queue", handler=callback, queue_type="classic"):
        await stop.wait()
    # Leaving `async with` stopped the worker: no new deliveries, the running task finished.


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help="exit after N tasks")
    asyncio.run(main(parser.parse_args().count))
