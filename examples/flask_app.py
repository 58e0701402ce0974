"""Enqueue image-resize jobs from Flask, or any sync code, with `aio_workq.sync.SyncProducer`:
plain messages (`publish()`) and a typed task whose status the app reads (`enqueue(task)`).

    pip install aio-workq flask
    flask --app examples/flask_app run      # any WSGI server, threaded or not
    aio-workq worker examples.flask_app:tasks.workers      # the task's workers (the cli extra)

    curl -X POST localhost:5000/images -H 'content-type: application/json' \\
         -d '{"name": "cat.png", "width": 64, "height": 48}'        # 202 {"job_id": "..."}
    curl -X POST localhost:5000/thumbnails -H 'content-type: application/json' \\
         -d '{"path": "cat.png", "width": 400}'                     # 202 {"job_id": "..."}
    curl localhost:5000/thumbnails/JOB_ID         # {"state": "succeeded", "result": "cat_400.png"}

One `SyncProducer` per process publishes for every request thread over one connection; each
`publish()` blocks its thread until the broker confirms, at most `timeout` seconds. The workers
run elsewhere (`examples/fastapi_app.py` has a `resize` handler). While the broker is down,
POST answers 503 after the timeout and nothing is enqueued. The task `thumbnail` is enqueued
with its arguments checked in the request's thread (a wrong one: 422); its status is read from
the job store (SQLite here, `JOBS_DB`, default `jobs.db`; `PostgresStore` in production), which
the `SyncProducer` uses on its own thread. The broker URL comes from `AMQP_URL`, the queue names
from `IMAGES_QUEUE` (default `images`) and `THUMBNAILS_QUEUE` (default `thumbnails`).
"""

from __future__ import annotations

import os

# --8<-- [start:imports]
from flask import Flask, abort, request

from aio_workq import BrokerConnectionError, PublishError
from aio_workq.jobs import (
    JobNotFoundError,
    JobState,
    SQLiteStore,
    StoreError,
    TaskArgumentError,
    Tasks,
)
from aio_workq.sync import SyncProducer

# --8<-- [end:imports]

QUEUE = os.environ.get("IMAGES_QUEUE", "images")

# --8<-- [start:tasks]
tasks = Tasks(store=SQLiteStore(os.environ.get("JOBS_DB", "jobs.db")))


@tasks.task(queue=os.environ.get("THUMBNAILS_QUEUE", "thumbnails"), name="flask.thumbnail")
def thumbnail(path: str, width: int = 800) -> str:
    """A stand-in for real image work: the thumbnail's path."""
    return f"{path.rsplit('.', 1)[0]}_{width}.png"


# --8<-- [end:tasks]


# --8<-- [start:app]
def create_app(url: str | None = None, *, queue: str = QUEUE, timeout: float = 3) -> Flask:
    producer = SyncProducer(url, timeout=timeout)  # connects on first use, closed at exit
    app = Flask(__name__)
    app.extensions["aio_workq"] = producer

    @app.post("/images")
    def enqueue() -> tuple[dict[str, str], int]:
        data = request.get_json(silent=True) or {}
        try:
            image = {
                "name": str(data["name"]),
                "width": int(data["width"]),
                "height": int(data["height"]),
            }
        except (KeyError, TypeError, ValueError):
            abort(422, "expected {name, width, height}")
        return {"job_id": producer.publish(image, queue=queue)}, 202

    @app.post("/thumbnails")
    def enqueue_thumbnail() -> tuple[dict[str, str], int]:
        data = request.get_json(silent=True) or {}
        try:  # the arguments are checked against thumbnail's signature, nothing sent if wrong
            job = producer.enqueue(thumbnail, **data)
        except TaskArgumentError as exc:
            abort(422, str(exc))
        return {"job_id": job.job_id}, 202

    @app.get("/thumbnails/<job_id>")
    def thumbnail_status(job_id: str) -> dict[str, str | None]:
        job = producer.job(thumbnail, job_id)
        try:
            status = job.status()
        except JobNotFoundError:
            abort(404, f"no job {job_id}")
        done = status.state is JobState.SUCCEEDED
        return {
            "job_id": job_id,
            "state": status.state.value,
            "result": job.result(timeout=timeout) if done else None,
        }

    def unavailable(exc: Exception) -> tuple[dict[str, str], int, dict[str, str]]:
        detail = f"the job queue is unavailable, try again later ({type(exc).__name__})"
        return {"detail": detail}, 503, {"Retry-After": str(int(timeout) or 1)}

    def store_down(exc: Exception) -> tuple[dict[str, str], int, dict[str, str]]:
        return (
            {"detail": "the job store is unavailable, try again later"},
            503,
            {"Retry-After": "5"},
        )

    app.register_error_handler(PublishError, unavailable)
    app.register_error_handler(BrokerConnectionError, unavailable)
    app.register_error_handler(StoreError, store_down)
    return app


# --8<-- [end:app]


app = create_app()

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")))
