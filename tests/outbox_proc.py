"""Outbox actors in processes of their own, for the ledger tests that SIGKILL them.

    python -m tests.outbox_proc app DSN SCHEMA QUEUE N
    python -m tests.outbox_proc relay DSN SCHEMA AMQP_URL [STALL_AFTER]
    python -m tests.outbox_proc worker DSN SCHEMA AMQP_URL QUEUE

`app` runs N transactions, each inserting an order row and its outbox message; every 4th one
rolls back. It prints `COMMITTED <id>` or `ROLLEDBACK <id>` after each, then `DONE`, and waits to
be killed (no relay runs in it). `relay` relays until killed; with STALL_AFTER it stops inside
its first batch once that many messages are confirmed (printing `STALLED`), the rows not yet
deleted. `worker` consumes QUEUE with the idempotent consumer, whose handler inserts an effect
row; after the handler's transaction commits it prints `COMMITTED <id>` and never acks.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from aio_workq import Job, Producer, Worker
from aio_workq.outbox import Outbox, OutboxRelay, idempotent


async def app(dsn: str, schema: str, queue: str, n: str) -> None:
    outbox = Outbox(schema=schema)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for i in range(int(n)):
            message_id = f"order-{i}"
            rollback = i % 4 == 3
            try:
                async with conn.transaction():
                    await conn.execute(
                        f"INSERT INTO {schema}.orders (message_id) VALUES (%s)", (message_id,)
                    )
                    await outbox.publish(conn, {"order": i}, queue=queue, message_id=message_id)
                    if rollback:
                        raise RuntimeError("the app changed its mind")
            except RuntimeError:
                print("ROLLEDBACK", message_id, flush=True)
            else:
                print("COMMITTED", message_id, flush=True)
    print("DONE", flush=True)
    await asyncio.Event().wait()


class StallingProducer(Producer):
    """Sends `limit` messages, waits for their confirms, then hangs in the next send."""

    def __init__(self, url: str, limit: int) -> None:
        super().__init__(url)
        self.limit = limit
        self.sent: list[asyncio.Future[str]] = []

    async def send(self, *args: Any, **kwargs: Any) -> asyncio.Future[str]:
        if len(self.sent) == self.limit:
            await asyncio.gather(*self.sent)
            print("STALLED", flush=True)
            await asyncio.Event().wait()
        confirm = await super().send(*args, **kwargs)
        self.sent.append(confirm)
        return confirm


async def relay(dsn: str, schema: str, url: str, stall_after: str = "") -> None:
    if stall_after:
        producer = StallingProducer(url, int(stall_after))
        await producer.start()
        relay = OutboxRelay(dsn, producer=producer, schema=schema, batch_size=100)
    else:
        relay = OutboxRelay(dsn, url=url, schema=schema, batch_size=100)
    await relay.start()
    print("READY", flush=True)
    await asyncio.Event().wait()


async def worker(dsn: str, schema: str, url: str, queue: str) -> None:
    async with AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False) as pool:
        consumer = idempotent(pool, name="effects", schema=schema)

        @consumer
        async def apply(job: Job, conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                f"INSERT INTO {schema}.effects (message_id) VALUES (%s)", (job.message_id,)
            )

        async def handler(job: Job) -> None:
            await apply(job)
            print("COMMITTED", job.message_id, flush=True)
            await asyncio.Event().wait()  # die before the ack

        async with Worker(url, queue=queue, handler=handler, concurrency=1, prefetch=1):
            print("READY", flush=True)
            await asyncio.Event().wait()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    actors: dict[str, Callable[..., Coroutine[Any, Any, None]]] = {
        "app": app,
        "relay": relay,
        "worker": worker,
    }
    asyncio.run(actors[mode](*args))
