"""The dashboard: its routes, pages and actions, on the framework-neutral `Request`/`Response`.

`Dashboard.handle(request)` is all an adapter calls (`aiohttp_app`, `asgi_app`). Every answer
is a rendered page or fragment; bad input gets a message page with a 4xx, an unexpected error
a 500 page that names no secret (the traceback goes to the log only).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlencode

import jinja2

from aio_workq import (
    ConfigurationError,
    DeadLetter,
    DeadLetters,
    PresenceWatcher,
    Producer,
    TopologyError,
    WorkerPresence,
    WorkqError,
    __version__,
    redact_url,
)
from aio_workq._link.settings import resolve_url
from aio_workq.admin import AdminError
from aio_workq.admin.dead_letters import DeadLetterFilter, letter_json, parse_when, short_ids
from aio_workq.admin.schedules import schedule_rows
from aio_workq.schedules import GROUP, read_status

from ._actions import Action, Actions, log
from ._auth import COOKIE, Caller, Security
from ._chart import Series, line_chart
from ._data import Cached, QueueData
from ._http import Request, Response, quote_path

__all__ = ("Dashboard", "PageError")

_MAX_NAME = 255
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,199}$")
_STATIC = {
    "htmx.min.js": "application/javascript",
    "dashboard.css": "text/css; charset=utf-8",
}
_SHOWN_LETTERS = 200
_BODY_PREVIEW = 80
_REFRESH = 3
_SCHEDULES_TTL = 10.0


class PageError(Exception):
    """A request the dashboard can't serve: shown as a message page with `status`."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


@dataclass(frozen=True, slots=True)
class _JobContext:
    """What a `JobHandle` needs to cancel: the store, and a producer to tell the workers."""

    store: Any
    publisher: Any


Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]


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

    Raises:
        ConfigurationError: a bad URL or refresh interval.
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
    ) -> None:
        self._url = resolve_url(url)
        self._security = security or Security()
        self._store = store
        self._group = schedules_group
        self._refresh = max(2.0, min(float(refresh), 5.0))
        self.queues = QueueData(
            url=self._url, management_url=management_url, names=queues, ttl=self._refresh - 0.5
        )
        # the schedules change once per tick: read (a connection each time) every 10 s at most
        self._schedules: Cached[Any] = Cached(self._read_schedules, ttl=_SCHEDULES_TTL)
        self.queues.also_watch(self._known_queues)
        self.queues.count_handled(self._handled)
        self._last_schedules: Any = None
        self._producer: Producer | None = None
        self._producer_lock = asyncio.Lock()
        self._watcher: PresenceWatcher | None = None
        self._watcher_error: str | None = None
        self._watcher_lock = asyncio.Lock()
        self.actions = Actions()
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("aio_workq.dashboard", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("GET", re.compile(r"/"), self._overview),
            ("GET", re.compile(r"/fragments/queues"), self._queues_fragment),
            ("GET", re.compile(r"/workers"), self._workers),
            ("GET", re.compile(r"/fragments/workers"), self._workers_fragment),
            ("GET", re.compile(r"/dead-letters"), self._dlq_index),
            ("GET", re.compile(r"/fragments/dead-letters"), self._dlq_index_fragment),
            ("GET", re.compile(r"/dead-letters/(?P<queue>[^/]+)"), self._dlq_list),
            ("GET", re.compile(r"/dead-letters/(?P<queue>[^/]+)/(?P<id>.+)"), self._dlq_show),
            ("POST", re.compile(r"/dead-letters/(?P<queue>[^/]+)/replay"), self._dlq_replay),
            ("POST", re.compile(r"/dead-letters/(?P<queue>[^/]+)/purge"), self._dlq_purge),
            ("GET", re.compile(r"/actions/(?P<id>[0-9a-f]{16})"), self._action),
            ("GET", re.compile(r"/jobs"), self._jobs),
            ("GET", re.compile(r"/jobs/(?P<id>[^/]+)"), self._job),
            ("POST", re.compile(r"/jobs/(?P<id>[^/]+)/cancel"), self._job_cancel),
            ("GET", re.compile(r"/schedules"), self._schedules_page),
            ("GET", re.compile(r"/fragments/schedules"), self._schedules_fragment),
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
        async with self._producer_lock:
            if self._producer is None:
                producer = Producer(self._url, name="aio-workq dashboard")
                await producer.start()
                self._producer = producer
            return self._producer

    async def _presence(self) -> PresenceWatcher | None:
        """The watcher of the workers' beats, opened on first use (None while it can't be)."""
        async with self._watcher_lock:
            if self._watcher is None:
                watcher = PresenceWatcher(self._url)
                try:
                    await watcher.open()
                except WorkqError as exc:
                    self._watcher_error = str(exc)
                    return None
                self._watcher, self._watcher_error = watcher, None
            return self._watcher

    def _workers_seen(self) -> list[WorkerPresence]:
        return [] if self._watcher is None else self._watcher.workers()

    def _known_queues(self) -> list[str]:
        named = [queue for worker in self._workers_seen() for queue in worker.beat.queues]
        return [*self._schedule_queues(), *named]

    def _handled(self) -> int | None:
        """The live workers' handled count (their own counters), for a rate without the
        management API."""
        if self._watcher is None:
            return None
        return sum(w.beat.handled for w in self._watcher.workers() if w.alive)

    async def close(self) -> None:
        """Stop the actions under way and close the broker connections (those opened)."""
        await self.actions.close()
        await self.queues.close()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await watcher.close()
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
            return self._message(request, exc.status, exc.title, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dashboard: %s %s failed", request.method, request.path)
            return self._message(
                request, 500, "Something went wrong",
                "the dashboard could not build this page; the details are in its log",
            )  # fmt: skip

    # -- rendering -----------------------------------------------------------------------------

    def _render(
        self, request: Request, template: str, *, status: int = 200, **context: Any
    ) -> Response:
        caller = self._security.caller(request)
        session = request.cookies.get(COOKIE, "") if caller.by_cookie else ""
        body = self._env.get_template(template).render(
            link=request.link,
            q=quote_path,
            prefix=request.prefix,
            path=request.path,
            htmx=request.htmx,
            refresh=int(self._refresh),
            version=__version__,
            actions_allowed=self._security.allow_actions,
            signed_in=caller.token_id is not None,
            csrf=self._security.csrf_token(session) if session else "",
            when=_when,
            number=_number,
            **context,
        )
        return Response(status=status, body=body.encode())

    def _message(self, request: Request, status: int, title: str, message: str) -> Response:
        return self._render(request, "message.html", status=status, title=title, message=message)

    # -- checks --------------------------------------------------------------------------------

    def _require_action(self, request: Request, what: str) -> Caller:
        """The caller, when it may take an action.

        Raises:
            PageError: read-only (403), no valid token (401), or a bad CSRF token (403).
        """
        caller = self._security.caller(request)
        if not self._security.allow_actions:
            log.warning("refused (read-only dashboard): %s, by %s", what, caller)
            raise PageError(
                403, "Read-only",
                "this dashboard is read-only: start it with --allow-actions and a token "
                "(--token-file PATH or AIO_WORKQ_DASHBOARD_TOKEN) to act",
            )  # fmt: skip
        if caller.token_id is None:
            log.warning("refused (no valid token): %s, by %s", what, caller)
            raise PageError(401, "Sign in first", "this action needs the dashboard's token")
        if caller.by_cookie and not self._security.csrf_ok(request):
            log.warning("refused (bad CSRF token): %s, by %s", what, caller)
            raise PageError(
                403, "Form expired", "the form's CSRF token is missing or wrong: reload the page"
            )
        return caller

    # -- overview ------------------------------------------------------------------------------

    async def _overview_context(self) -> dict[str, Any]:
        await self._presence()  # the workers' queues and counters, without the management API
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
        return {"snap": snap, "chart": chart, "unit": unit}

    async def _overview(self, request: Request, match: dict[str, str]) -> Response:
        return self._render(request, "overview.html", **await self._overview_context())

    async def _queues_fragment(self, request: Request, match: dict[str, str]) -> Response:
        return self._render(request, "_queues.html", **await self._overview_context())

    # -- workers -------------------------------------------------------------------------------

    async def _workers_context(self) -> dict[str, Any]:
        watcher = await self._presence()
        found = [] if watcher is None else watcher.workers()
        now = time.time()
        rows = [
            {
                "id": w.beat.id, "host": w.beat.host, "pid": w.beat.pid,
                "queues": ", ".join(w.beat.queues), "concurrency": w.beat.concurrency,
                "in_flight": w.beat.in_flight, "handled": w.beat.handled,
                "failed": w.beat.failed, "uptime": _duration(w.uptime),
                "version": w.beat.version, "alive": w.alive,
                "seen": _duration(now - w.last_seen),
            }
            for w in found
        ]  # fmt: skip
        return {
            "rows": rows,
            "alive": sum(1 for row in rows if row["alive"]),
            "error": self._watcher_error if watcher is None else None,
        }

    async def _workers(self, request: Request, match: dict[str, str]) -> Response:
        return self._render(request, "workers.html", **await self._workers_context())

    async def _workers_fragment(self, request: Request, match: dict[str, str]) -> Response:
        return self._render(request, "_workers.html", **await self._workers_context())

    # -- dead letters --------------------------------------------------------------------------

    async def _dlq_index(self, request: Request, match: dict[str, str]) -> Response:
        return self._render(request, "dead_letters.html", snap=await self.queues.snapshot())

    async def _dlq_index_fragment(self, request: Request, match: dict[str, str]) -> Response:
        return self._render(request, "_dead_letters.html", snap=await self.queues.snapshot())

    def _filter(
        self, request: Request, *, form: bool = False
    ) -> tuple[DeadLetterFilter, dict[str, str]]:
        get = request.field if form else request.arg
        given = {key: get(key).strip() for key in ("exception", "since", "before")}
        if len(given["exception"]) > _MAX_NAME:
            raise PageError(400, "Bad filter", "the exception class name is too long")
        try:
            since = parse_when(given["since"]) if given["since"] else None
            before = parse_when(given["before"]) if given["before"] else None
        except AdminError as exc:
            raise PageError(400, "Bad filter", str(exc)) from None
        return (
            DeadLetterFilter(exception=given["exception"] or None, since=since, before=before),
            given,
        )

    async def _letters(self, queue: str) -> list[DeadLetter]:
        letters, _ = await self._dead_letters(queue)
        return await letters.find()

    async def _dead_letters(self, queue: str) -> tuple[DeadLetters, int]:
        """The queue's dead letters, and how many wait there.

        Raises:
            PageError: 404 when `queue.dlq` does not exist.
        """
        producer = await self._get_producer()
        try:
            letters = producer.dead_letters(queue)
        except ConfigurationError as exc:
            raise PageError(400, "Not an aio-workq queue", str(exc)) from None
        try:
            return letters, await letters.count()
        except TopologyError:
            raise PageError(
                404, "No such dead-letter queue",
                f"queue {queue!r} has no dead-letter queue ({queue + '.dlq'!r} does not exist)",
            ) from None  # fmt: skip

    async def _dlq_list(self, request: Request, match: dict[str, str]) -> Response:
        queue = _queue_name(match["queue"])
        where, given = self._filter(request)
        every = await self._letters(queue)
        letters = [letter for letter in every if where(letter)]
        short = short_ids([letter.message_id for letter in every if letter.message_id])
        rows = [
            {
                "id": letter.message_id or "",
                "short": short.get(letter.message_id or "", "-"),
                "reason": letter.reason,
                "attempts": letter.attempts,
                "failed_at": letter.failed_at,
                "body": letter.body[:_BODY_PREVIEW].decode(errors="replace"),
            }
            for letter in letters[:_SHOWN_LETTERS]
        ]
        return self._render(
            request, "dead_letter_list.html", queue=queue, rows=rows, total=len(every),
            matching=len(letters), filtered=not where.empty, given=given,
            filter_query=urlencode({k: v for k, v in given.items() if v}),
        )  # fmt: skip

    async def _dlq_show(self, request: Request, match: dict[str, str]) -> Response:
        queue = _queue_name(match["queue"])
        message_id = _message_id(match["id"])
        letters = await self._letters(queue)
        letter = next((one for one in letters if one.message_id == message_id), None)
        if letter is None:
            raise PageError(
                404, "No such dead letter",
                f"no dead letter with message id {message_id!r} in {queue + '.dlq'!r} "
                "(replayed or purged meanwhile?)",
            )  # fmt: skip
        data = letter_json(letter)
        headers = sorted(data["headers"].items())
        traceback = str(data["headers"].get("x-workq-traceback", "") or "")
        return self._render(
            request, "dead_letter.html", queue=queue, letter=data, headers=headers,
            traceback=traceback,
        )  # fmt: skip

    async def _dlq_replay(self, request: Request, match: dict[str, str]) -> Response:
        queue = _queue_name(match["queue"])
        ids = [_message_id(one) for one in request.fields("id")]
        scope = request.field("scope", "selected")
        if scope == "selected" and not ids:
            raise PageError(400, "Nothing selected", "tick the dead letters to replay first")
        where, given = self._filter(request, form=True)
        if scope == "selected":
            where = DeadLetterFilter(message_ids=frozenset(ids))
            what = f"replay {len(ids)} selected dead letters of {queue!r}"
        elif scope == "filter":
            shown = ", ".join(f"{k}={v}" for k, v in given.items() if v) or "all"
            what = f"replay the dead letters of {queue!r} matching {shown}"
        else:
            raise PageError(400, "Bad request", f"unknown replay scope {scope!r}")
        caller = self._require_action(request, what)
        letters, total = await self._dead_letters(queue)
        matcher = None if where.empty else where

        async def run(action: Action) -> None:
            async for batch in letters.replay_batches(where=matcher):
                action.step(len(batch))

        action = self.actions.start(
            what=what, who=str(caller), run=run,
            total=len(ids) if scope == "selected" else total,
            back=f"/dead-letters/{quote_path(queue)}",
        )  # fmt: skip
        return Response.redirect(request.link(f"/actions/{action.id}"))

    async def _dlq_purge(self, request: Request, match: dict[str, str]) -> Response:
        queue = _queue_name(match["queue"])
        what = f"purge the dead letters of {queue!r}"
        caller = self._require_action(request, what)
        letters, waiting = await self._dead_letters(queue)
        if request.field("confirm") != "yes":
            return self._render(request, "confirm_purge.html", queue=queue, waiting=waiting)
        log.info("action: %s, by %s", what, caller)
        purged = await letters.purge()
        log.info("action done: %s, by %s: %d purged", what, caller, purged)
        return self._message(
            request, 200, "Purged", f"purged {purged} dead letters from {queue + '.dlq'!r}"
        )

    async def _action(self, request: Request, match: dict[str, str]) -> Response:
        action = self.actions.get(match["id"])
        if action is None:
            raise PageError(404, "No such action", "it ended long ago, or the dashboard restarted")
        template = "_action.html" if request.htmx else "action.html"
        return self._render(request, template, action=action)

    # -- jobs ----------------------------------------------------------------------------------

    async def _jobs(self, request: Request, match: dict[str, str]) -> Response:
        wanted = request.arg("id").strip()
        if wanted:
            return Response.redirect(request.link(f"/jobs/{quote_path(_message_id(wanted))}"))
        failures: list[Any] = []
        recent = getattr(self._store, "recent", None)
        if recent is not None:
            failures = await recent(state="failed", limit=20)
        return self._render(
            request, "jobs.html", has_store=self._store is not None,
            can_list=recent is not None, failures=failures,
        )  # fmt: skip

    async def _job_record(self, job_id: str) -> Any:
        if self._store is None:
            raise PageError(
                404, "No job store",
                "job tracking is not configured: start the dashboard with --store "
                "sqlite:///path/jobs.db or postgresql://...",
            )  # fmt: skip
        record = await self._store.get(job_id)
        if record is None:
            raise PageError(
                404, "No such job",
                f"no record of job {job_id!r}: an unknown id, or past the store's TTL",
            )  # fmt: skip
        return record

    async def _job(self, request: Request, match: dict[str, str]) -> Response:
        job_id = _message_id(match["id"])
        record = await self._job_record(job_id)
        status = record.status
        timeline = [
            (label, moment)
            for label, moment in (
                ("created", status.created_at), ("started", status.started_at),
                ("next retry", status.next_retry_at), ("finished", status.finished_at),
                ("last change", status.updated_at),
            )
            if moment is not None
        ]  # fmt: skip
        result = None
        if record.result is not None:
            result = record.result[:4096].decode(errors="replace")
        return self._render(
            request, "job.html", job=status, timeline=timeline, result=result,
            content_type=record.content_type,
        )  # fmt: skip

    async def _job_cancel(self, request: Request, match: dict[str, str]) -> Response:
        from aio_workq.jobs import JobHandle

        job_id = _message_id(match["id"])
        caller = self._require_action(request, f"cancel job {job_id}")
        await self._job_record(job_id)
        producer = await self._get_producer()
        handle: JobHandle[Any] = JobHandle(job_id, context=_JobContext(self._store, producer))
        log.info("action: cancel job %s, by %s", job_id, caller)
        status = await handle.cancel()
        log.info("action done: cancel job %s, by %s: now %s", job_id, caller, status.state)
        return Response.redirect(request.link(f"/jobs/{quote_path(job_id)}"))

    # -- schedules -----------------------------------------------------------------------------

    async def _read_schedules(self) -> Any:
        try:
            state = await read_status(self._url, group=self._group)
        except WorkqError as exc:
            return exc
        self._last_schedules = state
        return state

    def _schedule_queues(self) -> list[str]:
        state = self._last_schedules
        return [] if state is None else [row["queue"] for row in schedule_rows(state)]

    async def _schedules_context(self) -> dict[str, Any]:
        state = await self._schedules.get()
        error = str(state) if isinstance(state, Exception) else None
        state = None if error else state
        return {"state": state, "rows": schedule_rows(state), "error": error, "group": self._group}

    async def _schedules_page(self, request: Request, match: dict[str, str]) -> Response:
        return self._render(request, "schedules.html", **await self._schedules_context())

    async def _schedules_fragment(self, request: Request, match: dict[str, str]) -> Response:
        return self._render(request, "_schedules.html", **await self._schedules_context())

    # -- sign in -------------------------------------------------------------------------------

    async def _login_form(self, request: Request, match: dict[str, str]) -> Response:
        return self._render(request, "login.html", failed=False)

    async def _login(self, request: Request, match: dict[str, str]) -> Response:
        if not self._security.allow_actions:
            raise PageError(
                403, "Read-only", "this dashboard is read-only: there is nothing to sign in for"
            )
        token_id = self._security.check_token(request.field("token"))
        if token_id is None:
            log.warning("sign-in refused (wrong token) from %s", request.remote)
            response = self._render(request, "login.html", status=401, failed=True)
            return response
        log.info("signed in: token %s from %s", token_id, request.remote)
        cookie = self._security.session_cookie(token_id)
        response = Response.redirect(request.link("/"))
        response.headers.append(("Set-Cookie", _cookie(request, cookie, max_age=12 * 3600)))
        return response

    async def _logout(self, request: Request, match: dict[str, str]) -> Response:
        response = Response.redirect(request.link("/"))
        response.headers.append(("Set-Cookie", _cookie(request, "", max_age=0)))
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


def _cookie(request: Request, value: str, *, max_age: int) -> str:
    path = request.prefix or "/"
    secure = "; Secure" if request.secure else ""
    return f"{COOKIE}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"


def _queue_name(text: str) -> str:
    """A queue name from a path segment (already percent-decoded by the adapter).

    Raises:
        PageError: 400 when no broker would take it as a queue name.
    """
    if not text or len(text.encode()) > _MAX_NAME or any(ord(c) < 32 for c in text):
        raise PageError(
            400, "Bad queue name",
            f"{text[:80]!r} is not a queue name (1-255 bytes, no control characters)",
        )  # fmt: skip
    return text


def _message_id(text: str) -> str:
    """A message or job id from the request.

    Raises:
        PageError: 400 for anything but letters, digits and `._:@+=/-` (at most 200).
    """
    if not _ID.fullmatch(text):
        raise PageError(
            400, "Malformed id",
            f"{text[:80]!r} is not a message or job id (letters, digits and ._:@+=/- only)",
        )  # fmt: skip
    return text


def _when(moment: datetime | float | None) -> str:
    if moment is None:
        return "-"
    if isinstance(moment, int | float):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    """`42 s`, `3 min`, `2 h 5 min`, `3 d 4 h`."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"
