"""The dashboard as an ASGI application: `app.mount("/workq", asgi_app(...))` in FastAPI or
Starlette, or served by any ASGI server.

A mounted ASGI app gets no lifespan events of its own: close the dashboard in the host
application's lifespan (`await dashboard.close()`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from ._app import Dashboard
from ._http import MAX_BODY, Request, parse_form

__all__ = ("asgi_app",)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def asgi_app(dashboard: Dashboard) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI application serving `dashboard`."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(dashboard, receive, send)
            return
        if scope["type"] != "http":
            return
        root = str(scope.get("root_path", "")).rstrip("/")
        raw = scope.get("raw_path")
        path = raw.decode("latin-1").split("?", 1)[0] if raw else str(scope["path"])
        # Starlette's Mount keeps the full path (new) or strips the mount point (old).
        if root and path.startswith(root + "/") or path == root:
            path = path[len(root) :]
        body = b""
        if scope["method"] == "POST":
            while True:
                message = await receive()
                body += message.get("body", b"")
                if len(body) > MAX_BODY:
                    await _send(send, 413, b"request body too large", [])
                    return
                if not message.get("more_body"):
                    break
        headers = {
            key.decode("latin-1").lower(): value.decode("latin-1")
            for key, value in scope.get("headers", [])
        }
        client = scope.get("client")
        request = Request(
            method=scope["method"],
            path=path or "/",
            prefix=root,
            query=parse_qs(
                scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
            ),
            form=parse_form(body) if body else {},
            headers=headers,
            remote=str(client[0]) if client else "-",
            secure=scope.get("scheme") == "https",
        )
        response = await dashboard.handle(request)
        await _send(send, response.status, response.body, response.all_headers())

    return app


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(dashboard: Dashboard, receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await dashboard.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
