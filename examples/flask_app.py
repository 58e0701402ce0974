"""Enqueue image-resize jobs from Flask, or any sync code, with `aio_workq.sync.SyncProducer`.

    pip install aio-workq flask
    flask --app examples/flask_app run      # any WSGI server, threaded or not

    curl -X POST localhost:5000/images -H 'content-type: application/json' \\
         -d '{"name": "cat.png", "width": 64, "height": 48}'        # 202 {"job_id": "..."}

One `SyncProducer` per process publishes for every request thread over one connection; each
`publish()` blocks its thread until the broker confirms, at most `timeout` seconds. The workers
run elsewhere (`examples/fastapi_app.py` has a `resize` handler). While the broker is down,
POST answers 503 after the timeout and nothing is enqueued. The broker URL comes from
`AMQP_URL`, the queue name from `IMAGES_QUEUE` (default `images`).
"""

from __future__ import annotations

import os

# --8<-- [start:imports]
from flask import Flask, abort, request

from aio_workq import BrokerConnectionError, PublishError
from aio_workq.sync import SyncProducer

# --8<-- [end:imports]

QUEUE = os.environ.get("IMAGES_QUEUE", "images")


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

    def unavailable(exc: Exception) -> tuple[dict[str, str], int, dict[str, str]]:
        detail = f"the job queue is unavailable, try again later ({type(exc).__name__})"
        return {"detail": detail}, 503, {"Retry-After": str(int(timeout) or 1)}

    app.register_error_handler(PublishError, unavailable)
    app.register_error_handler(BrokerConnectionError, unavailable)
    return app


# --8<-- [end:app]


app = create_app()

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")))
