"""A dashboard for aio-workq: queues, workers, dead letters, jobs and schedules in a browser.

```python
from aio_workq.dashboard import Dashboard, aiohttp_app, asgi_app

dashboard = Dashboard(url="amqp://...", queues=["emails"])
fastapi_app.mount("/workq", asgi_app(dashboard))          # FastAPI / Starlette
aiohttp_app_.add_subapp("/workq", aiohttp_app(dashboard))  # aiohttp
```

Needs the `dashboard` extra (`pip install 'aio-workq[dashboard]'`: jinja2 and aiohttp). It is
read-only unless given `Security(allow_actions=True, tokens=...)`; see the guide "Dashboard".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._app import Dashboard as Dashboard
from ._auth import Security as Security
from ._http import Request as Request
from ._http import Response as Response
from ._site import PageError as PageError
from ._stores import store_from_url as store_from_url

if TYPE_CHECKING:
    from aiohttp import web

__all__ = (
    "Dashboard",
    "PageError",
    "Request",
    "Response",
    "Security",
    "aiohttp_app",
    "asgi_app",
    "store_from_url",
)


def aiohttp_app(dashboard: Dashboard | None = None, **options: Any) -> web.Application:
    """An aiohttp application serving `dashboard` (else a `Dashboard(**options)`):
    `app.add_subapp("/workq", ...)` mounts it; its cleanup closes the dashboard.

    Raises:
        ConfigurationError: as `Dashboard`.
    """
    from ._aiohttp import aiohttp_app as build

    return build(dashboard if dashboard is not None else Dashboard(**options))


def asgi_app(dashboard: Dashboard | None = None, **options: Any) -> Any:
    """An ASGI application serving `dashboard` (else a `Dashboard(**options)`):
    `app.mount("/workq", ...)` in FastAPI or Starlette. Served alone, its lifespan closes the
    dashboard; mounted, close it in the host application's lifespan.

    Raises:
        ConfigurationError: as `Dashboard`.
    """
    from ._asgi import asgi_app as build

    return build(dashboard if dashboard is not None else Dashboard(**options))
