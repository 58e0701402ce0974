"""FastAPI + SQLAlchemy: an order row and its job commit together; the relay runs in the app.

pip install 'aio-workq[postgres]' fastapi 'sqlalchemy[asyncio]' uvicorn  # asyncio: greenlet
DATABASE_URL=postgresql://... AMQP_URL=amqp://... uvicorn docs.examples.outbox.outbox_app:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from aio_workq.outbox import Outbox, OutboxRelay, schema_sql

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@localhost/postgres")
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost/")

# SQLAlchemy on psycopg 3 (`postgresql+psycopg`); `postgresql+asyncpg` works for the insert too.
engine = create_async_engine(DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1))
Session = async_sessionmaker(engine, expire_on_commit=False)
outbox = Outbox()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:  # in a real app: your migrations (Alembic's op.execute)
        await conn.exec_driver_sql(schema_sql())
        await conn.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS orders "
            "(id bigserial PRIMARY KEY, item text NOT NULL, confirmed boolean DEFAULT false)"
        )
    # The relay publishes committed outbox rows from inside the app; run it in the workers or
    # as `python -m aio_workq.outbox relay` instead, as you like: several can run at once.
    async with OutboxRelay(DATABASE_URL, url=AMQP_URL):
        yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


async def session() -> AsyncIterator[AsyncSession]:
    async with Session() as db:
        yield db


@app.post("/orders")
async def create_order(item: str, db: Annotated[AsyncSession, Depends(session)]) -> dict[str, int]:
    async with db.begin():  # one transaction: the order and its message, or neither
        result = await db.execute(
            text("INSERT INTO orders (item) VALUES (:item) RETURNING id"), {"item": item}
        )
        order_id = int(result.scalar_one())
        await outbox.publish(
            db, {"order_id": order_id}, queue="orders.confirm", message_id=f"order-{order_id}"
        )
    return {"order_id": order_id}
