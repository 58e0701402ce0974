"""`python -m bench.typed`: typed consume (a small pydantic model) against untyped consume.

One run, one broker, the two alternating: each round publishes N small orders to a fresh
classic queue, then one worker consumes them, either with `async def handle(job: Job)` reading
`job.data` (json) or with `async def handle(order: Order)` (validated by pydantic's
`TypeAdapter.validate_json`). The consume rate is from the worker's start to the N-th handler
call. Prints each round and the ratio of the medians (typed / untyped).

    python -m bench.typed --quick          # 2,000 messages, 1 round each (seconds)
    python -m bench.typed                  # 20,000 messages, 5 rounds each
    AMQP_URL=amqp://... python -m bench.typed --messages 50000

Starts a RabbitMQ node of its own (aio_workq.testing.LocalBroker, in a temporary directory,
on free loopback ports) unless `--url` or `AMQP_URL` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic

from aio_workq import Job, Producer, Queue, Worker

CONCURRENCY = 50
PREFETCH = 200


class Order(pydantic.BaseModel):
    id: int
    sku: str
    quantity: int
    price: float


def _order(n: int) -> Order:
    return Order(id=n, sku=f"sku-{n % 97:03d}", quantity=n % 7 + 1, price=9.99)


async def _round(url: str, typed: bool, n: int) -> float:
    """Publish `n` orders, then consume them; the consume rate in messages per second."""
    queue = Queue(f"bench-typed-{uuid.uuid4().hex[:8]}", type="classic", dead_letter=False)
    done = asyncio.Event()
    seen = 0
    total = 0

    def count(quantity: int) -> None:
        nonlocal seen, total
        seen += 1
        total += quantity
        if seen == n:
            done.set()

    async def untyped(job: Job) -> None:
        count(job.data["quantity"])

    async def typed_handler(order: Order) -> None:
        count(order.quantity)

    handler: Callable[..., Any] = typed_handler if typed else untyped
    async with Producer(url) as producer:
        await producer.declare(queue)
        await producer.publish_many((_order(i) for i in range(n)), queue=queue)
    worker = Worker(
        url, queue=queue, handler=handler, concurrency=CONCURRENCY, prefetch=PREFETCH, retry=None
    )
    started = time.perf_counter()
    async with worker:
        await asyncio.wait_for(done.wait(), timeout=max(60, n / 100))
        seconds = time.perf_counter() - started
    if total != sum(i % 7 + 1 for i in range(n)):
        raise RuntimeError("the handlers saw other orders than were published")
    return n / seconds


async def _main(url: str, n: int, rounds: int) -> int:
    rates: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for typed in (False, True) if r % 2 == 0 else (True, False):
            rate = await _round(url, typed, n)
            rates[typed].append(rate)
            print(f"round {r + 1}: {'typed  ' if typed else 'untyped'} {rate:10,.0f} msg/s")
    untyped_rate, typed_rate = statistics.median(rates[False]), statistics.median(rates[True])
    print(
        f"median of {rounds} round(s), {n:,} messages each: untyped {untyped_rate:,.0f} msg/s, "
        f"typed (pydantic) {typed_rate:,.0f} msg/s, typed/untyped = {typed_rate / untyped_rate:.2f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.typed", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 messages, 1 round")
    parser.add_argument("--messages", type=int, default=None, help="messages per round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of each")
    parser.add_argument("--url", default=os.environ.get("AMQP_URL"), help="use this broker")
    args = parser.parse_args(argv)
    n = args.messages or (2_000 if args.quick else 20_000)
    rounds = args.rounds or (1 if args.quick else 5)
    if args.url:
        return asyncio.run(_main(args.url, n, rounds))
    from aio_workq.testing import LocalBroker

    with tempfile.TemporaryDirectory(prefix="workq-bench-typed-") as tmp:
        with LocalBroker(Path(tmp), name="benchtyped") as broker:
            return asyncio.run(_main(broker.url, n, rounds))


if __name__ == "__main__":
    sys.exit(main())
