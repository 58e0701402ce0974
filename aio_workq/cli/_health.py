"""`/healthz` for probes: a tiny asyncio HTTP server, and the rule that decides 200 or 503."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from aio_workq import Worker

__all__ = ("Debounce", "HealthServer", "WorkersHealth")

log = logging.getLogger("aio_workq.cli")

_POLL = 0.2
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Debounce:
    """Healthy until a condition has been false for `grace` seconds (at once with 0).

    Before the condition first held (still starting) it is unhealthy.
    """

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._ever_ok = False
        self._bad_since: float | None = None

    def update(self, ok: bool, now: float | None = None) -> bool:
        """Record the condition now; returns whether it counts as healthy."""
        now = time.monotonic() if now is None else now
        if ok:
            self._ever_ok = True
            self._bad_since = None
            return True
        if self._bad_since is None:
            self._bad_since = now
        return self._ever_ok and now - self._bad_since < self._grace


class WorkersHealth:
    """Healthy while every worker consumes (a lapse of up to `grace` seconds is forgiven).

    `run()` polls the workers' `state` and calls `on_change(healthy)` when the verdict changes.
    """

    def __init__(
        self,
        workers: Sequence[Worker],
        *,
        grace: float,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._workers = list(workers)
        self._debounce = Debounce(grace)
        self._on_change = on_change
        self.healthy = False

    def check(self) -> tuple[bool, dict[str, Any]]:
        """The verdict and a JSON-able body naming each worker's state."""
        states = [worker.state for worker in self._workers]
        healthy = self._debounce.update(all(state.consuming for state in states))
        if healthy != self.healthy:
            self.healthy = healthy
            if self._on_change is not None:
                self._on_change(healthy)
        body = {
            "status": "ok" if healthy else "unavailable",
            "workers": [
                {
                    "queue": s.queue,
                    "connected": s.connected,
                    "consuming": s.consuming,
                    "in_flight": s.in_flight,
                    "processed": s.processed,
                    "failed": s.failed,
                }
                for s in states
            ],
        }
        return healthy, body

    async def run(self) -> None:
        """Poll until cancelled, so a lapse is timed from when it began, not from a probe."""
        while True:
            self.check()
            await asyncio.sleep(_POLL)


class HealthServer:
    """Serves `GET /healthz`: 200 or 503 with a JSON body from `check()`; nothing else.

    Args:
        check: returns `(healthy, body)`.
        host: address to listen on (`0.0.0.0` in a container, for the kubelet's probes).
        port: TCP port; 0 picks a free one (see `port` once started).
    """

    def __init__(
        self, check: Callable[[], tuple[bool, dict[str, Any]]], *, host: str, port: int
    ) -> None:
        self._check = check
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Listen.

        Raises:
            OSError: the address is taken or not available.
        """
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("health endpoint on http://%s:%d/healthz", self._host, self.port)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = path.split("?", 1)[0]
            if path not in ("/healthz", "/healthz/"):
                status, body = 404, {"error": "not found: try /healthz"}
            elif method not in ("GET", "HEAD"):
                status, body = 405, {"error": "GET only"}
            else:
                healthy, body = self._check()
                status = 200 if healthy else 503
            payload = json.dumps(body).encode()
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head if method == "HEAD" else head + payload)
            await writer.drain()
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a probe that hung up or sent garbage gets nothing
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
