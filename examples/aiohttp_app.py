"""An image service on aiohttp: enqueue resize jobs, work through them, read their status.

    pip install 'aio-workq[aiohttp]'
    python examples/aiohttp_app.py          # http://127.0.0.1:8080 (PORT to change it)

    curl -X POST localhost:8080/images -H 'content-type: application/json' \\
         -d '{"name": "cat.png", "width": 64, "height": 48}'        # 202 {"job_id": "..."}
    curl localhost:8080/images/JOB_ID                              # {"status": "done", ...}

The same service as `fastapi_app.py`, with aiohttp's cleanup context and a typed `AppKey`: the
app runs its workers in-process, `resize` does the (fake) resize, `lookup` answers the status
endpoint's RPC calls. While the broker is down, POST answers 503 within the request timeout and
nothing is enqueued. The broker URL comes from `AMQP_URL`, the queue name from `IMAGES_QUEUE`
(default `images`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import PurePath
from typing import Any

# --8<-- [start:imports]
from aiohttp import web

from aio_workq import Job
from aio_workq.aiohttp import PRODUCER, Workq

# --8<-- [end:imports]

QUEUE = os.environ.get("IMAGES_QUEUE", "images")
# Done jobs by job id: this process's memory stands in for the application's database.
RESULTS: dict[str, dict[str, str]] = {}


def parse(data: Any) -> tuple[str, int, int]:
    """The image name and the target size of a resize request, checked."""
    try:
        name, width, height = data["name"], data["width"], data["height"]
    except (KeyError, TypeError):
        raise web.HTTPUnprocessableEntity(text="expected {name, width, height}") from None
    if not isinstance(name, str) or not all(
        isinstance(n, int) and 0 < n <= 10_000 for n in (width, height)
    ):
        raise web.HTTPUnprocessableEntity(text="name: str, width and height: 1..10000")
    return name, width, height


def resize(job: Job) -> None:
    """The worker's handler (a plain def runs in a thread): a stand-in for real image work."""
    name, size = job.data["name"], f"{job.data['width']}x{job.data['height']}"
    assert job.message_id is not None  # the producer always sets one: it is the job id
    RESULTS[job.message_id] = {
        "name": name,
        "thumbnail": f"{PurePath(name).stem}_{size}.png",
        "checksum": hashlib.sha256(f"{name}:{size}".encode()).hexdigest(),
    }


def lookup(job: Job) -> dict[str, str] | None:
    """Answers the status endpoint's RPC calls: the job's result, or None while pending."""
    return RESULTS.get(job.data["job_id"])


# --8<-- [start:app]
def create_app(
    url: str | None = None, *, queue: str = QUEUE, request_timeout: float = 3
) -> web.Application:
    workq = Workq(url, request_timeout=request_timeout)  # publishes wait at most this long
    workq.add_worker(resize, queue=queue, concurrency=4)  # in-process workers (optional)
    workq.add_worker(lookup, queue=f"{queue}.status", retry=None)
    app = web.Application()
    workq.setup(app)  # starts and stops with the app; broker down or unreachable: 503

    async def enqueue(request: web.Request) -> web.Response:
        name, width, height = parse(await request.json())
        image = {"name": name, "width": width, "height": height}
        job_id = await request.app[PRODUCER].publish(image, queue=queue)
        return web.json_response({"job_id": job_id}, status=202)

    async def status(request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        result = await request.app[PRODUCER].call({"job_id": job_id}, queue=f"{queue}.status")
        if result is None:
            return web.json_response({"job_id": job_id, "status": "pending"})
        return web.json_response({"job_id": job_id, "status": "done", **result})

    app.router.add_post("/images", enqueue)
    app.router.add_get("/images/{job_id}", status)
    return app


# --8<-- [end:app]


if __name__ == "__main__":
    web.run_app(create_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
