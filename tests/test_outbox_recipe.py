"""The guide's FastAPI + SQLAlchemy recipe (docs/examples/outbox/) works end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import psycopg
import pytest

from tests.helpers import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.broker]

RECIPE = Path(__file__).parent.parent / "docs" / "examples" / "outbox"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"outbox_recipe_{name}", RECIPE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def clean(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("DROP TABLE IF EXISTS orders")
    if await (await conn.execute("SELECT to_regclass('public.workq_processed')")).fetchone() != (
        None,
    ):
        await conn.execute("DELETE FROM workq_processed WHERE consumer = 'confirm-order'")


async def test_an_order_posted_to_the_app_is_confirmed_by_the_worker(
    postgres_dsn: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", postgres_dsn)
    monkeypatch.setenv("AMQP_URL", amqp_url)
    app, worker = load("outbox_app"), load("outbox_worker")
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await clean(conn)
        try:
            async with app.app.router.lifespan_context(app.app):
                transport = httpx.ASGITransport(app=app.app)
                async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                    response = await client.post("/orders", params={"item": "book"})
                assert response.status_code == 200, response.text
                order_id = response.json()["order_id"]
                async with worker.pool, worker.worker():

                    async def confirmed() -> bool:
                        cursor = await conn.execute(
                            "SELECT confirmed FROM orders WHERE id = %s", (order_id,)
                        )
                        return await cursor.fetchone() == (True,)

                    await wait_until(confirmed, timeout=20)
        finally:
            await clean(conn)
