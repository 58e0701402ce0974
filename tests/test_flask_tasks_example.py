"""examples/flask_app.py's task routes through a real WSGI server, a real broker and a SQLite
store: POST enqueues the typed task through the app's `SyncProducer` (202 and a job id), GET
reads its status and result; the task's workers run as `aio-workq worker
examples.flask_app:tasks.workers` would, from a second copy of the module (a store of its own on
the same file, as in another process)."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import EXAMPLES, serve_wsgi

pytestmark = pytest.mark.broker

_copies = itertools.count()


def fresh_example(monkeypatch: pytest.MonkeyPatch, jobs_db: Path, queue: str) -> Any:
    """A copy of examples/flask_app.py of its own, its registry's store on `jobs_db` and its
    task on `queue` (what JOBS_DB and THUMBNAILS_QUEUE say when a process imports it)."""
    monkeypatch.setenv("JOBS_DB", str(jobs_db))
    monkeypatch.setenv("THUMBNAILS_QUEUE", queue)
    name = f"example_flask_app_{next(_copies)}"
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "flask_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_a_typed_task_is_enqueued_and_its_status_read_from_flask(
    amqp_url: str, queue_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs_db = tmp_path / "jobs.db"
    web = fresh_example(monkeypatch, jobs_db, queue_name)
    workers = fresh_example(monkeypatch, jobs_db, queue_name)  # the worker process's
    app = web.create_app(amqp_url, timeout=5)
    producer = app.extensions["aio_workq"]
    try:
        with serve_wsgi(app) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                accepted = await client.post("/thumbnails", json={"path": "cat.png", "width": 400})
                assert accepted.status_code == 202, accepted.text
                job_id = accepted.json()["job_id"]
                queued = await client.get(f"/thumbnails/{job_id}")
                assert queued.json() == {"job_id": job_id, "state": "queued", "result": None}
                # a wrong argument is refused in the request, nothing sent; an unknown id: 404
                wrong = await client.post("/thumbnails", json={"path": "cat.png", "widht": 4})
                assert wrong.status_code == 422 and "widht" in wrong.text, wrong.text
                assert (await client.get("/thumbnails/no-such-job")).status_code == 404
                (worker,) = [
                    w for w in workers.tasks.workers(amqp_url) if w.queue_name == queue_name
                ]
                async with worker:
                    body: dict[str, Any] = {}
                    async with asyncio.timeout(20):
                        while body.get("state") != "succeeded":
                            response = await client.get(f"/thumbnails/{job_id}")
                            assert response.status_code == 200, response.text
                            body = response.json()
                            assert body["state"] in ("queued", "running", "succeeded"), body
                            await asyncio.sleep(0.05)
                assert body == {"job_id": job_id, "state": "succeeded", "result": "cat_400.png"}
    finally:
        await asyncio.to_thread(producer.close)
        await workers.tasks.store.close()
