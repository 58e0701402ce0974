"""Thumbnails on FastAPI with followed jobs: POST answers 202 and a job id, GET the job's status.

    pip install 'aio-workq[fastapi]' uvicorn
    python examples/jobs_fastapi.py          # http://127.0.0.1:8000 (PORT to change it)

    curl -X POST localhost:8000/thumbnails -H 'content-type: application/json' \\
         -d '{"path": "cat.png", "width": 400}'                       # 202 {"job_id": "..."}
    curl localhost:8000/jobs/JOB_ID        # {"state": "succeeded", "result": {...}, ...}
    curl -X DELETE localhost:8000/jobs/JOB_ID     # cancel it (409 once it succeeded or failed)

The task is declared once (`resize`); the route enqueues it with checked arguments, and the
status route reads the job store (SQLite here: `JOBS_DB`, default `jobs.db`; PostgresStore in
production). The app runs the workers in-process for the demo; a larger deployment runs
`aio-workq worker examples.jobs_fastapi:tasks.workers` instead. The broker URL comes from
`AMQP_URL`, the queue from `THUMBNAILS_QUEUE` (default `thumbnails`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from aio_workq import Producer
from aio_workq.jobs import JobNotFoundError, JobState, JobStore, SQLiteStore, StoreError, Tasks

QUEUE = os.environ.get("THUMBNAILS_QUEUE", "thumbnails")

# --8<-- [start:tasks]
tasks = Tasks(store=SQLiteStore(os.environ.get("JOBS_DB", "jobs.db")))


class Thumb(BaseModel):
    path: str
    width: int


@tasks.task(queue=QUEUE, name="thumbnails.resize")
async def resize(path: str, width: int = 800) -> Thumb:
    """A stand-in for real image work."""
    await asyncio.sleep(0.01)
    return Thumb(path=f"{path.rsplit('.', 1)[0]}_{width}.png", width=width)


# --8<-- [end:tasks]


class ResizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, not a default

    path: str
    width: int = Field(default=800, gt=0, le=10_000)


class Accepted(BaseModel):
    job_id: str


class JobView(BaseModel):
    job_id: str
    state: JobState
    attempt: int
    next_retry_at: datetime | None = None
    error: str | None = None
    result: Thumb | None = None


# --8<-- [start:app]
def create_app(
    url: str | None = None, *, store: JobStore | None = None, workers: bool = True
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            producer = await stack.enter_async_context(Producer(url))
            tasks.bind(producer, store=store)  # enqueue through the app's producer
            if workers:  # in-process workers, for a small deployment
                for worker in tasks.workers(url, concurrency=4):
                    await stack.enter_async_context(worker)
            yield

    app = FastAPI(title="thumbnails", lifespan=lifespan)

    @app.exception_handler(StoreError)  # the store is down: the status routes can't answer
    async def store_down(request: Request, exc: StoreError) -> JSONResponse:
        logging.getLogger("thumbnails").warning("job store unavailable: %s", exc)
        detail = "the job store is unavailable, try again later"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})

    @app.post("/thumbnails", status_code=202)
    async def create(request: ResizeRequest) -> Accepted:
        job = await resize.enqueue(request.path, width=request.width)
        return Accepted(job_id=job.job_id)

    @app.get("/jobs/{job_id}")
    async def status(job_id: str) -> JobView:
        job = resize.job(job_id)
        try:
            status = await job.status()
        except JobNotFoundError:
            raise HTTPException(404, f"no job {job_id}") from None
        error = f"{status.error_type}: {status.error_message}" if status.error_type else None
        result = await job.result() if status.state is JobState.SUCCEEDED else None
        return JobView(
            job_id=job_id, state=status.state, attempt=status.attempt,
            next_retry_at=status.next_retry_at, error=error, result=result,
        )  # fmt: skip

    @app.delete("/jobs/{job_id}", status_code=202)
    async def cancel(job_id: str) -> dict[str, Any]:
        try:
            status = await resize.job(job_id).cancel()
        except JobNotFoundError:
            raise HTTPException(404, f"no job {job_id}") from None
        if status.state in (JobState.SUCCEEDED, JobState.FAILED):  # too late: it ended
            raise HTTPException(409, f"job {job_id} has already {status.state.value}")
        return {
            "job_id": job_id,
            "state": status.state,
            "cancel_requested": status.cancel_requested,
        }

    return app


# --8<-- [end:app]


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(create_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
