"""FastAPI integration: a producer started with the app, a typed dependency, 503 on broker errors.

Install with `pip install 'aio-workq[fastapi]'`. Four lines of glue:

```python
from aio_workq.fastapi import ProducerDep, Workq

workq = Workq(request_timeout=3)  # URL from AMQP_URL
app = FastAPI(lifespan=workq.lifespan)
workq.add_exception_handlers(app)  # PublishError, BrokerConnectionError, StoreError -> 503


@app.post("/images", status_code=202)
async def enqueue(image: Image, producer: ProducerDep) -> dict[str, str]:
    return {"job_id": await producer.publish(image.model_dump(), queue="images")}
```

`@workq.worker(queue=..., **options)` also runs a `Worker` inside the app process while the app
runs (for small deployments). The "Web apps" guide in the docs has the whole recipe.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from ._web import ANSWERED, Integration, IntegrationError, ProducerView, answered, error_response

__all__ = ("STATE_KEY", "ProducerDep", "ProducerView", "Workq", "get_producer")

STATE_KEY = "aio_workq_producer"
"""The key of the `ProducerView` in the lifespan state (`request.state`)."""


class Workq(Integration):
    """The aio-workq side of a FastAPI app: pass `lifespan=workq.lifespan` to `FastAPI`.

    The lifespan starts a `Producer` (and the workers added with `@workq.worker(...)`) before
    the app serves, puts a `ProducerView` bounded by `request_timeout` into the lifespan state
    for `ProducerDep`, and on shutdown stops the workers gracefully, then waits up to
    `close_timeout` for outstanding confirms. Takes the arguments of `Integration`: `url`,
    `request_timeout` (5 s), `close_timeout` (10 s), `connect_timeout`, `queue_type`, and the
    producer's and connection's own (`ssl_context`, `name`, `backoff`, `hooks`, `window`,
    `window_bytes`, `on_reconnect`).

    `schedules=[Schedule(...), ...]` (or a `Scheduler`) hosts the periodic jobs: every
    replica of the app is a candidate, the broker makes one active, and the scheduler starts
    and stops with the app (`workq.scheduler.active` tells whether this one fires).
    """

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        """The app's lifespan; to combine it with yours, enter it inside your own.

        ```python
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
            async with workq.lifespan(app) as state:
                yield {**state, "db": ...}
        ```

        Raises:
            BrokerConnectionError: the broker can't be reached at startup.
            TopologyError: a worker's queue exists with other arguments.
        """
        async with self.running() as view:
            yield {STATE_KEY: view}

    def add_exception_handlers(self, app: FastAPI) -> None:
        """Answer `PublishError` and `BrokerConnectionError` with 503, `RPCTimeoutError` with 504,
        and a `StoreError` of a job store that can't be reached (`StoreError.unreachable`)
        with 503.

        The 503 carries `Retry-After`; the body is `{"detail": "..."}` like FastAPI's own
        errors, and names the error class but no broker or store address. Any other
        `StoreError` (the tables missing) is the app's: a 500, as without these handlers.
        So is a `TaskArgumentError`: a wrong call is a bug (500); a route whose arguments
        come from the request catches it and answers 422.
        """
        retry_after = self.request_timeout

        async def handle(request: Request, exc: Exception) -> Response:
            if not answered(exc):
                raise exc  # left to the framework: a 500
            status, headers, detail = error_response(exc, retry_after)
            return JSONResponse({"detail": detail}, status_code=status, headers=headers)

        for cls in ANSWERED:
            app.add_exception_handler(cls, handle)


def get_producer(connection: HTTPConnection) -> ProducerView:
    """The dependency behind `ProducerDep`: the app's `ProducerView` from the lifespan state.

    Raises:
        IntegrationError: the app was not created with `FastAPI(lifespan=workq.lifespan)`.
    """
    view = getattr(connection.state, STATE_KEY, None)
    if not isinstance(view, ProducerView):
        raise IntegrationError(
            "no aio-workq producer in this request's state: create the app with "
            "FastAPI(lifespan=workq.lifespan), or yield the lifespan's state from your own"
        )
    return view


ProducerDep = Annotated[ProducerView, Depends(get_producer)]
"""A route parameter typed `ProducerDep` gets the app's started `ProducerView`."""
