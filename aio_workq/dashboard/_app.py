"""The dashboard: its routes, pages and actions, on the framework-neutral `Request`/`Response`.

`Dashboard.handle(request)` is all an adapter calls (`aiohttp_app`, `asgi_app`). Every answer
is a rendered page or fragment; bad input gets a message page with a 4xx, a typed `WorkqError`
(a job store or a broker that fails) a 503 page with its message, an unexpected error a 500
page that names no secret (the traceback goes to the log only).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from typing import Any
from urllib.parse import unquote

from aio_workq import (
    BrokerConnectionError,
    ConfigurationError,
    Producer,
    WorkqError,
    redact_url,
)
from aio_workq._link.settings import resolve_url
from aio_workq.schedules import GROUP

from ._actions import Actions, log
from ._auth import Security
from ._chart import Series, line_chart
from ._data import QueueData, QueueSnapshot
from ._dead_letter_pages import DeadLetterPages
from ._http import Request, Response
from ._job_pages import JobPages
from ._schedule_pages import SchedulePages
from ._site import PageError, Site, cookie, shown_queues
from ._worker_pages import WorkerPages

__all__ = ("Dashboard",)

_STATIC = {
    "htmx.min.js": "application/javascript",
    "dashboard.css": "text/css; charset=utf-8",
}
_REFRESH = 3
_CONNECT_TIMEOUT = 3.0
"""Seconds a connection attempt to the broker may take: a page waits for one or two (the
overview: the workers' beats, then the queues), not for the library's default 10 s each."""


Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]


def _unavailable(exc: WorkqError) -> str:
    """The title of the page shown for a typed error: what could not be read."""
    from aio_workq.jobs import StoreError

    if isinstance(exc, StoreError):
        return "The job store failed"
    if isinstance(exc, BrokerConnectionError):
        return "The broker is not reachable"
    return "Could not build this page"


def _connect_timeout(seconds: float) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= 60:
        raise ConfigurationError(
            f"connect_timeout must be a number of seconds in (0, 60], got {seconds!r}"
        )
    return float(seconds)


async def _connected(producer: Producer, url: str, timeout: float) -> None:
    """Wait up to `timeout` for `producer` to be connected (it reconnects by itself).

    Raises:
        BrokerConnectionError: not connected within `timeout`.
    """
    deadline = time.monotonic() + timeout
    while not producer.connected:
        if time.monotonic() >= deadline:
            raise BrokerConnectionError(
                f"the dashboard's connection to {redact_url(url)} is down and not back within "
                f"{timeout:g} s (it keeps reconnecting in the background): check that RabbitMQ "
                "is running; this page works again once it is back"
            )
        await asyncio.sleep(0.1)


class Dashboard:
    """The aio-workq dashboard, served by `aiohttp_app()` / `asgi_app()` or `aio-workq dashboard`.

    Args:
        url: the broker (default: what `aio-workq` resolves from the environment).
        management_url: the management API (default: tried next to the broker; `""`: not
            used, passive declares only).
        queues: queues to show without the management API (passive declares).
        store: a job store (`SQLiteStore`, `PostgresStore`, ...): the Jobs page.
        schedules_group: the schedulers' group, for the Schedules page.
        security: read-only unless it allows actions (`Security.load(...)`).
        refresh: seconds between the pages' live updates (2-5).
        connect_timeout: seconds a connection attempt to the broker may take (3 by default):
            a broker that does not answer costs a page that long, not the library's 10 s.

    Raises:
        ConfigurationError: a bad URL, refresh interval or connect timeout.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        management_url: str | None = None,
        queues: Iterable[str] = (),
        store: Any = None,
        schedules_group: str = GROUP,
        security: Security | None = None,
        refresh: float = _REFRESH,
        connect_timeout: float = _CONNECT_TIMEOUT,
    ) -> None:
        self._url = resolve_url(url)
        self._connect_timeout = _connect_timeout(connect_timeout)
        self._security = security or Security()
        self._refresh = max(2.0, min(float(refresh), 5.0))
        self.queues = QueueData(
            url=self._url, management_url=management_url, names=queues,
            ttl=self._refresh - 0.5, connect_timeout=self._connect_timeout,
        )  # fmt: skip
        self._producer: Producer | None = None
        self._producer_lock = asyncio.Lock()
        self.actions = Actions()
        self._site = Site(security=self._security, refresh=self._refresh)
        self._workers = WorkerPages(
            site=self._site, url=self._url, connect_timeout=self._connect_timeout
        )
        self._schedules = SchedulePages(
            site=self._site, url=self._url, group=schedules_group,
            connect_timeout=self._connect_timeout,
        )  # fmt: skip
        self.queues.also_watch(
            self._known_queues, listening=self._workers.listening, unheard=self._workers.unheard
        )
        self.queues.count_handled(self._workers.handled)
        self._dead_letters = DeadLetterPages(
            site=self._site,
            snapshot=self._snapshot,
            producer=self._get_producer,
            actions=self.actions,
        )
        self._jobs = JobPages(site=self._site, store=store, producer=self._get_producer)
        dead, jobs = self._dead_letters, self._jobs
        workers, schedules = self._workers, self._schedules
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("GET", re.compile(r"/"), self._overview),
            ("GET", re.compile(r"/fragments/queues"), self._queues_fragment),
            ("GET", re.compile(r"/workers"), workers.index),
            ("GET", re.compile(r"/fragments/workers"), workers.fragment),
            ("GET", re.compile(r"/dead-letters"), dead.index),
            ("GET", re.compile(r"/fragments/dead-letters"), dead.index_fragment),
            ("GET", re.compile(r"/dead-letters/(?P<queue>[^/]+)"), dead.listing),
            (
                "GET",
                re.compile(r"/dead-letters/(?P<queue>[^/]+)/(?P<id>.+)"),
                dead.show,
            ),
            (
                "POST",
                re.compile(r"/dead-letters/(?P<queue>[^/]+)/replay"),
                dead.replay,
            ),
            ("POST", re.compile(r"/dead-letters/(?P<queue>[^/]+)/purge"), dead.purge),
            ("GET", re.compile(r"/actions/(?P<id>[0-9a-f]{16})"), dead.action),
            ("GET", re.compile(r"/jobs"), jobs.index),
            ("GET", re.compile(r"/jobs/(?P<id>[^/]+)"), jobs.show),
            ("POST", re.compile(r"/jobs/(?P<id>[^/]+)/cancel"), jobs.cancel),
            ("GET", re.compile(r"/schedules"), schedules.index),
            ("GET", re.compile(r"/fragments/schedules"), schedules.fragment),
            ("GET", re.compile(r"/login"), self._login_form),
            ("POST", re.compile(r"/login"), self._login),
            ("POST", re.compile(r"/logout"), self._logout),
            ("GET", re.compile(r"/static/(?P<name>[a-z.]+)"), self._static),
        ]

    def __repr__(self) -> str:
        mode = "actions allowed" if self._security.allow_actions else "read-only"
        return f"<Dashboard {redact_url(self._url)} {mode}>"

    # -- lifecycle -----------------------------------------------------------------------------

    async def _get_producer(self) -> Producer:
        """The dashboard's producer, started on first use.

        Raises:
            BrokerConnectionError: it can't connect within the connect timeout, or its
                connection is down and not back within it (it reconnects in the background:
                a page says so at once instead of waiting the operations' 30 s).
        """
        async with self._producer_lock:
            if self._producer is None:
                producer = Producer(
                    self._url, name="aio-workq dashboard", connect_timeout=self._connect_timeout
                )
                await producer.start()
                self._producer = producer
            producer = self._producer
        await _connected(producer, self._url, self._connect_timeout)
        return producer

    def _known_queues(self) -> list[str]:
        named = [queue for worker in self._workers.seen() for queue in worker.beat.queues]
        return [*self._schedules.queues(), *named]

    async def _snapshot(self) -> QueueSnapshot:
        return await self.queues.snapshot()

    async def close(self) -> None:
        """Stop the actions under way and close the broker connections (those opened)."""
        await self.actions.close()
        await self.queues.close()
        await self._workers.close()
        if self._producer is not None:
            await self._producer.close()
            self._producer = None

    # -- dispatch ------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """The response to `request`; never raises (but for cancellation)."""
        try:
            for method, pattern, handler in self._routes:
                match = pattern.fullmatch(request.path)
                if match is None:
                    continue
                if method != request.method and not (method == "GET" and request.method == "HEAD"):
                    continue
                params = {key: unquote(value) for key, value in match.groupdict().items()}
                return await handler(request, params)
            allowed = [m for m, p, _ in self._routes if p.fullmatch(request.path)]
            if allowed:
                raise PageError(405, "Method not allowed", f"use {' or '.join(allowed)} here")
            raise PageError(404, "Not found", "there is no page here")
        except PageError as exc:
            return self._site.message(request, exc.status, exc.title, exc.message)
        except asyncio.CancelledError:
            raise
        except WorkqError as exc:  # a typed error says what failed, without a password
            log.warning("dashboard: %s %s: %s", request.method, request.path, exc)
            return self._site.message(request, 503, _unavailable(exc), str(exc))
        except Exception:
            log.exception("dashboard: %s %s failed", request.method, request.path)
            return self._site.message(
                request, 500, "Something went wrong",
                "the dashboard could not build this page; the details are in its log",
            )  # fmt: skip

    # -- overview ------------------------------------------------------------------------------

    async def _overview_context(self, request: Request) -> dict[str, Any]:
        # the workers' queues and counters, without the management API
        await self._workers.presence()
        snap = await self.queues.snapshot()
        now = time.time()
        history = list(self.queues.history)
        span = 600.0
        if snap.management:
            series = [
                Series("published", "pub", [(now - s.at, s.publish_rate or 0.0) for s in history]),
                Series("delivered", "del", [(now - s.at, s.deliver_rate or 0.0) for s in history]),
            ]
            unit = "msg/s"
        else:
            handled = [
                (now - b.at, (b.handled - a.handled) / (b.at - a.at))
                for a, b in zip(history, history[1:], strict=False)
                if a.handled is not None and b.handled is not None and b.at > a.at
                and b.handled >= a.handled
            ]  # fmt: skip
            series = [
                Series("ready", "ready", [(now - s.at, float(s.ready)) for s in history]),
                Series("handled /s (workers' counters)", "pub", handled),
            ]
            unit = "messages, msg/s"
        chart = line_chart(series, span=span, unit=unit)
        return {"snap": snap, "chart": chart, "unit": unit, **shown_queues(request, snap.rows)}

    async def _overview(self, request: Request, match: dict[str, str]) -> Response:
        return self._site.render(request, "overview.html", **await self._overview_context(request))

    async def _queues_fragment(self, request: Request, match: dict[str, str]) -> Response:
        return self._site.render(request, "_queues.html", **await self._overview_context(request))

    # -- sign in -------------------------------------------------------------------------------

    async def _login_form(self, request: Request, match: dict[str, str]) -> Response:
        return self._site.render(request, "login.html", failed=False)

    async def _login(self, request: Request, match: dict[str, str]) -> Response:
        if not self._security.allow_actions:
            raise PageError(
                403, "Read-only", "this dashboard is read-only: there is nothing to sign in for"
            )
        token_id = self._security.check_token(request.field("token"))
        if token_id is None:
            log.warning("sign-in refused (wrong token) from %s", request.remote)
            response = self._site.render(request, "login.html", status=401, failed=True)
            return response
        log.info("signed in: token %s from %s", token_id, request.remote)
        session = self._security.session_cookie(token_id)
        response = Response.redirect(request.link("/"))
        response.headers.append(("Set-Cookie", cookie(request, session, max_age=12 * 3600)))
        return response

    async def _logout(self, request: Request, match: dict[str, str]) -> Response:
        response = Response.redirect(request.link("/"))
        response.headers.append(("Set-Cookie", cookie(request, "", max_age=0)))
        return response

    # -- static --------------------------------------------------------------------------------

    async def _static(self, request: Request, match: dict[str, str]) -> Response:
        name = match["name"]
        if name not in _STATIC:
            raise PageError(404, "Not found", "no such file")
        data = resources.files("aio_workq.dashboard").joinpath("static", name).read_bytes()
        return Response(
            body=data, content_type=_STATIC[name],
            headers=[("Cache-Control", "public, max-age=3600")],
        )  # fmt: skip
