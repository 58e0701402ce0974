"""The dashboard as an aiohttp application: `aio-workq dashboard` serves it, and an aiohttp
application mounts it with `app.add_subapp("/workq", aiohttp_app(...))`."""

from __future__ import annotations

from aiohttp import web

from ._app import Dashboard
from ._http import MAX_BODY, Request, Response, parse_form

__all__ = ("aiohttp_app",)

_DASHBOARD = web.AppKey("dashboard", Dashboard)


def aiohttp_app(dashboard: Dashboard) -> web.Application:
    """An aiohttp application serving `dashboard` (closed with the application)."""
    app = web.Application(client_max_size=MAX_BODY)
    app[_DASHBOARD] = dashboard
    app.router.add_route("*", "/{tail:.*}", _handle)

    async def close(app: web.Application) -> None:
        await dashboard.close()

    app.on_cleanup.append(close)
    return app


async def _handle(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[_DASHBOARD]
    raw = request.raw_path.split("?", 1)[0]
    tail = request.match_info["tail"]
    # The mount point is what precedes the tail (add_subapp strips nothing from the path).
    prefix = request.path[: len(request.path) - len(tail) - 1] if tail else request.path[:-1]
    prefix = prefix.rstrip("/")
    path = raw[len(prefix) :] or "/"
    form: dict[str, list[str]] = {}
    if request.method == "POST":
        if request.content_length is not None and request.content_length > MAX_BODY:
            return web.Response(status=413, text="request body too large")
        try:
            form = parse_form(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413, text="request body too large")
    ours = Request(
        method=request.method,
        path=path,
        prefix=prefix,
        query={key: request.query.getall(key) for key in request.query},
        form=form,
        headers={key.lower(): value for key, value in request.headers.items()},
        remote=request.remote or "-",
        secure=request.secure,
    )
    return _to_aiohttp(await dashboard.handle(ours))


def _to_aiohttp(response: Response) -> web.Response:
    result = web.Response(status=response.status, body=response.body)
    for name, value in response.all_headers():
        if name == "Content-Type":
            result.headers[name] = value
        else:
            result.headers.add(name, value)
    return result
