"""aiohttp integration: a producer in the app's cleanup context, a typed `AppKey`, 503 on errors.

Install with `pip install 'aio-workq[aiohttp]'`. Three lines of glue:

```python
from aio_workq.aiohttp import PRODUCER, Workq

workq = Workq(request_timeout=3)  # URL from AMQP_URL
app = web.Application()
workq.setup(app)  # cleanup_ctx + 503 middleware


async def enqueue(request: web.Request) -> web.Response:
    job_id = await request.app[PRODUCER].publish(await request.json(), queue="images")
    return web.json_response({"job_id": job_id}, status=202)
```

`@workq.worker(queue=..., **options)` also runs a `Worker` inside the app process while the app
runs (for small deployments). The "Web apps" guide in the docs has the whole recipe.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from ._web import ANSWERED, Integration, ProducerView, answered, error_response

__all__ = ("PRODUCER", "ProducerView", "Workq", "error_middleware")

PRODUCER = web.AppKey("aio_workq_producer", ProducerView)
"""`request.app[PRODUCER]`: the running app's `ProducerView`, typed."""


class Workq(Integration):
    """The aio-workq side of an aiohttp app: `workq.setup(app)` before the app starts.

    Its cleanup context starts a `Producer` (and the workers added with `@workq.worker(...)`)
    when the app starts, stores a `ProducerView` bounded by `request_timeout` under
    `app[PRODUCER]`, and on cleanup stops the workers gracefully, then waits up to
    `close_timeout` for outstanding confirms. Takes the arguments of `Integration`: `url`,
    `request_timeout` (5 s), `close_timeout` (10 s), `connect_timeout`, `queue_type`, and the
    producer's and connection's own (`ssl_context`, `name`, `backoff`, `hooks`, `window`,
    `window_bytes`, `on_reconnect`).

    `schedules=[Schedule(...), ...]` (or a `Scheduler`) hosts the periodic jobs: every
    replica of the app is a candidate, the broker makes one active, and the scheduler starts
    and stops with the app (`workq.scheduler.active` tells whether this one fires).
    """

    def setup(self, app: web.Application) -> None:
        """Add the cleanup context and `error_middleware` to `app` (before it starts)."""
        app.cleanup_ctx.append(self.cleanup_ctx)
        app.middlewares.append(error_middleware)

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """The cleanup context, for apps that list their contexts themselves.

        Raises:
            BrokerConnectionError: the broker can't be reached at startup.
            TopologyError: a worker's queue exists with other arguments.
        """
        async with self.running() as view:
            app[PRODUCER] = view
            yield


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer `PublishError` and `BrokerConnectionError` with 503, `RPCTimeoutError` with 504,
    and a `StoreError` of a job store that can't be reached (`StoreError.unreachable`) with 503.

    The 503 carries `Retry-After` (the request timeout); the JSON body is
    `{"detail": "..."}`, naming the error class but no broker or store address. Any other
    `StoreError` (the tables missing) is the app's: a 500, as without this middleware.
    So is a `TaskArgumentError`: a wrong call is a bug (500); a route whose arguments come
    from the request catches it and answers 422.
    """
    try:
        return await handler(request)
    except ANSWERED as exc:
        if not answered(exc):
            raise
        view = request.config_dict.get(PRODUCER)
        status, headers, detail = error_response(exc, view.timeout if view else 5.0)
        return web.json_response({"detail": detail}, status=status, headers=headers)
