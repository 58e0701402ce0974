"""An image service on FastAPI: enqueue resize jobs, work through them, read their status.

    pip install 'aio-workq[fastapi]' uvicorn
    python examples/fastapi_app.py          # http://127.0.0.1:8000 (PORT to change it)

    curl -X POST localhost:8000/images -H 'content-type: application/json' \\
         -d '{"name": "cat.png", "width": 64, "height": 48}'        # 202 {"job_id": "..."}
    curl localhost:8000/images/JOB_ID                              # {"status": "done", ...}

For a small deployment the app runs its workers in-process: `resize` does the (fake) resize,
`lookup` answers the status endpoint's RPC calls. A larger one runs the workers elsewhere
(`aio_workq.run_workers`) and keeps results in its database. While the broker is down, POST
answers 503 within the request timeout and nothing is enqueued. The broker URL comes from
`AMQP_URL`, the queue name from `IMAGES_QUEUE` (default `images`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import PurePath
from typing import Literal

# --8<-- [start:imports]
from fastapi import FastAPI
from pydantic import BaseModel, Field

from aio_workq import Job
from aio_workq.fastapi import ProducerDep, Workq

# --8<-- [end:imports]

QUEUE = os.environ.get("IMAGES_QUEUE", "images")
# Done jobs by job id: this process's memory stands in for the application's database.
RESULTS: dict[str, dict[str, str]] = {}


class ResizeRequest(BaseModel):
    name: str
    width: int = Field(gt=0, le=10_000)
    height: int = Field(gt=0, le=10_000)


class Accepted(BaseModel):
    job_id: str


class Status(BaseModel):
    job_id: str
    status: Literal["pending", "done"]
    thumbnail: str | None = None
    checksum: str | None = None


def resize(job: Job) -> None:
    """The worker's handler (a plain def runs in a thread): a stand-in for real image work."""
    image = ResizeRequest.model_validate(job.data)
    size = f"{image.width}x{image.height}"
    assert job.message_id is not None  # the producer always sets one: it is the job id
    RESULTS[job.message_id] = {
        "name": image.name,
        "thumbnail": f"{PurePath(image.name).stem}_{size}.png",
        "checksum": hashlib.sha256(f"{image.name}:{size}".encode()).hexdigest(),
    }


def lookup(job: Job) -> dict[str, str] | None:
    """Answers the status endpoint's RPC calls: the job's result, or None while pending."""
    return RESULTS.get(job.data["job_id"])


# --8<-- [start:app]
def create_app(
    url: str | None = None, *, queue: str = QUEUE, request_timeout: float = 3
) -> FastAPI:
    workq = Workq(url, request_timeout=request_timeout)  # publishes wait at most this long
    workq.add_worker(resize, queue=queue, concurrency=4)  # in-process workers (optional)
    workq.add_worker(lookup, queue=f"{queue}.status", retry=None)
    app = FastAPI(title="images", lifespan=workq.lifespan)
    workq.add_exception_handlers(app)  # broker down or unreachable: 503

    @app.post("/images", status_code=202)
    async def enqueue(image: ResizeRequest, producer: ProducerDep) -> Accepted:
        return Accepted(job_id=await producer.publish(image.model_dump(), queue=queue))

    @app.get("/images/{job_id}")
    async def status(job_id: str, producer: ProducerDep) -> Status:
        result = await producer.call({"job_id": job_id}, queue=f"{queue}.status")
        if result is None:
            return Status(job_id=job_id, status="pending")
        return Status(
            job_id=job_id, status="done", thumbnail=result["thumbnail"], checksum=result["checksum"]
        )

    return app


# --8<-- [end:app]


app = create_app()  # uvicorn examples.fastapi_app:app

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
