"""examples/jobs_fastapi.py through a real HTTP server: 202 and a job id, then its status."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from aio_workq.jobs import SQLiteStore
from tests.servers import load_example, serve_asgi

pytestmark = pytest.mark.broker

jobs_fastapi = load_example("jobs_fastapi")


async def test_post_answers_202_with_a_job_id_and_the_status_route_follows_it(
    amqp_url: str, tmp_path: Path
) -> None:
    app = jobs_fastapi.create_app(amqp_url, store=SQLiteStore(tmp_path / "jobs.db"))
    async with serve_asgi(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
        accepted = await client.post("/thumbnails", json={"path": "cat.png", "width": 400})
        assert accepted.status_code == 202
        job_id = accepted.json()["job_id"]
        body: dict[str, Any] = {}
        async with asyncio.timeout(20):
            while body.get("state") != "succeeded":
                response = await client.get(f"/jobs/{job_id}")
                assert response.status_code == 200
                body = response.json()
                assert body["state"] in ("queued", "running", "succeeded"), body
                await asyncio.sleep(0.05)
        assert body["result"] == {"path": "cat_400.png", "width": 400}
        assert body["attempt"] == 1 and body["error"] is None
        assert (await client.get("/jobs/no-such-job")).status_code == 404
        assert (await client.post("/thumbnails", json={"width": 3})).status_code == 422
        misspelt = {"path": "cat.png", "widht": 400}  # not the default width in silence
        assert (await client.post("/thumbnails", json=misspelt)).status_code == 422
        done = await client.delete(f"/jobs/{job_id}")  # finished: it stays succeeded
        assert done.status_code == 409 and "already succeeded" in done.json()["detail"]
        assert (await client.get(f"/jobs/{job_id}")).json()["state"] == "succeeded"


async def test_the_status_and_cancel_routes_answer_503_while_the_store_is_down(
    amqp_url: str, tmp_path: Path
) -> None:
    """A store that can't be reached (here a SQLite file whose directory is missing; a
    PostgreSQL that is down) was a 500 with a traceback from the status route: a user copying
    the example got no "try again later" for it. The enqueue still goes through."""
    store = SQLiteStore(tmp_path / "missing-dir" / "jobs.db")
    app = jobs_fastapi.create_app(amqp_url, store=store, workers=False)
    async with serve_asgi(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
        accepted = await client.post("/thumbnails", json={"path": "cat.png"})
        assert accepted.status_code == 202
        job_id = accepted.json()["job_id"]
        for response in (
            await client.get(f"/jobs/{job_id}"),
            await client.delete(f"/jobs/{job_id}"),
        ):
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "5"
            assert "job store is unavailable" in response.json()["detail"]
            assert "missing-dir" not in response.text  # where the store is stays in the log
