"""The README's first command (`make demo`): two workers share a batch of tasks.

Uses the broker at `AMQP_URL` when it is set; otherwise starts a throwaway local RabbitMQ node
(scripts/broker.py) and stops it at the end. Two workers on one connection, one task at a time
each, take tasks from a queue; each `.` in a task is 0.2 s of work. Prints who took what and a
final tally that checks every task was done and the queue is empty.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from aio_workq import (
    Connection,
    Handler,
    Job,
    Producer,
    Queue,
    RetryPolicy,
    Worker,
    connect,
    redact_url,
)

QUEUE = Queue("workq-demo")
TASKS = [f"task {i} {'.' * random.randint(0, 3)}".strip() for i in range(1, 11)]
SECONDS_PER_DOT = 0.2
WORKERS = ("worker 1", "worker 2")


async def demo(url: str) -> bool:
    """Run the demo against `url`; True when every task was done and the queue is empty."""
    t0 = time.monotonic()
    taken: Counter[str] = Counter()
    done: list[str] = []
    all_done = asyncio.Event()

    def handler_for(name: str) -> Handler:
        async def handler(job: Job) -> None:
            task: str = job.data
            print(f"  {time.monotonic() - t0:4.1f} s  {name} took {task!r}")
            await asyncio.sleep(task.count(".") * SECONDS_PER_DOT)
            taken[name] += 1
            done.append(task)
            if len(done) >= len(TASKS):
                all_done.set()

        return handler

    async with await connect(url, name="aio-workq demo") as connection:
        await delete_queues(connection)  # leftovers of an interrupted run would skew the tally
        try:
            # The two workers share one connection, a channel each. The producer gets its own:
            # a broker alarm that blocks publishers must not stall the workers' acks.
            worker_1, worker_2 = (
                Worker(connection=connection, queue=QUEUE, handler=handler_for(name), concurrency=1)
                for name in WORKERS
            )
            async with worker_1, worker_2, Producer(url) as producer:
                print(
                    f"Two workers share one connection and take one task at a time.\n"
                    f"Publishing {len(TASKS)} tasks to queue {QUEUE.name!r} "
                    f"(each '.' is {SECONDS_PER_DOT} s of work):\n"
                )
                await producer.publish_many(TASKS, queue=QUEUE)  # returns once all are confirmed
                try:
                    async with asyncio.timeout(30):
                        await all_done.wait()
                except TimeoutError:
                    print("\nGave up waiting after 30 s.")
            # Leaving `async with` stopped the workers: every task they finished is acknowledged.
            left = await queue_length(connection)
        finally:
            await delete_queues(connection)

    per_worker = ", ".join(f"{name} did {taken[name]}" for name in WORKERS)
    ok = sorted(done) == sorted(TASKS) and left == 0
    verdict = (
        f"all {len(TASKS)} tasks done, nothing lost"
        if ok
        else f"{len(done)} of {len(TASKS)} tasks done, {left} left in the queue"
    )
    print(f"\nTally: {per_worker}: {verdict} ({time.monotonic() - t0:.1f} s).")
    return ok


async def queue_length(connection: Connection) -> int:
    channel = await connection.channel()  # a plain aiormq channel
    try:
        ok = await channel.queue_declare(QUEUE.name, passive=True)
        return ok.message_count or 0
    finally:
        await channel.close()


async def delete_queues(connection: Connection) -> None:
    """Remove the demo's queue with its dead-letter and retry queues (they are re-declared)."""
    delays = RetryPolicy().levels_ms()  # the workers' default policy: one delay queue per level
    names = [QUEUE.name, QUEUE.dead_letter_queue, *(QUEUE.delay_queue(ms) for ms in delays)]
    channel = await connection.channel()
    try:
        for name in names:
            await channel.queue_delete(name)
    finally:
        await channel.close()


def main() -> int:
    print("aio-workq demo: the RabbitMQ work-queues tutorial with two workers\n")
    url = os.environ.get("AMQP_URL")
    if url:
        print(f"Using the broker at AMQP_URL={redact_url(url)}")
        return 0 if asyncio.run(demo(url)) else 1

    # No broker given: start a throwaway local node (stdlib-only helper in scripts/).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from scripts.broker import BrokerError, LocalBroker, ensure_installed

    # SIGTERM unwinds like Ctrl-C, so the node is stopped either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="workq-demo-") as tmp:
        broker = LocalBroker(Path(tmp), name="workqdemo")
        started = False
        try:
            print("AMQP_URL is not set: starting a local RabbitMQ node (about 5 s) ...")
            t0 = time.monotonic()
            ensure_installed()
            started = True
            broker.start()
            print(f"RabbitMQ is up at {redact_url(broker.url)} ({time.monotonic() - t0:.1f} s)")
            return 0 if asyncio.run(demo(broker.url)) else 1
        except BrokerError as exc:
            print(f"\nCould not start a local RabbitMQ: {exc}", file=sys.stderr)
            return 1
        finally:
            # Stop what we started, also after an error or Ctrl-C; a second Ctrl-C must not
            # leave the node behind, so signals wait until it is down (a few seconds).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if started:
                print("Stopping the local RabbitMQ node ...", end=" ", flush=True)
                broker.close()
                print("stopped.")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        sys.exit(130)
