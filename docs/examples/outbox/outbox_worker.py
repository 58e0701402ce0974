"""The worker side of the recipe: each order is confirmed exactly once, however often delivered.

DATABASE_URL=postgresql://... AMQP_URL=amqp://... python -m docs.examples.outbox.outbox_worker
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from aio_workq import Job, Worker, run_workers
from aio_workq.outbox import idempotent

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@localhost/postgres")
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost/")

pool = AsyncConnectionPool(DATABASE_URL, open=False)


@idempotent(pool, name="confirm-order")
async def confirm_order(job: Job, conn: AsyncConnection[Any]) -> None:
    # Runs in the transaction that also records job.message_id: both commit, or neither.
    await conn.execute("UPDATE orders SET confirmed = true WHERE id = %s", (job.data["order_id"],))


def worker() -> Worker:
    return Worker(AMQP_URL, queue="orders.confirm", handler=confirm_order, concurrency=8)


async def main() -> None:
    async with pool:
        await run_workers(worker())


if __name__ == "__main__":
    asyncio.run(main())
