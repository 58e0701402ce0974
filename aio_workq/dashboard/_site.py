"""What every page shares: rendering (autoescaped templates), the checks an action passes, the
message page, and the validation and formatting of what a request names."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import jinja2

from aio_workq import __version__

from ._actions import log
from ._auth import COOKIE, Caller, Security
from ._http import Request, Response, quote_path

__all__ = (
    "PageError",
    "Site",
    "clip",
    "cookie",
    "duration",
    "message_id",
    "number",
    "queue_name",
    "shown_queues",
    "when",
)

_MAX_NAME = 255
SHOWN_QUEUES = 200
"""The queue rows a page lists at most (a vhost may hold thousands); a filter finds the rest."""


class PageError(Exception):
    """A request the dashboard can't serve: shown as a message page with `status`."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


class Site:
    """The templates and the security settings, for every page.

    Args:
        security: who may act.
        refresh: seconds between live updates (shown, and put in the htmx triggers).
    """

    def __init__(self, *, security: Security, refresh: float) -> None:
        self.security = security
        self.refresh = refresh
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("aio_workq.dashboard", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )

    def render(
        self, request: Request, template: str, *, status: int = 200, **context: Any
    ) -> Response:
        caller = self.security.caller(request)
        session = request.cookies.get(COOKIE, "") if caller.by_cookie else ""
        body = self._env.get_template(template).render(
            link=request.link,
            q=quote_path,
            prefix=request.prefix,
            path=request.path,
            htmx=request.htmx,
            refresh=int(self.refresh),
            version=__version__,
            actions_allowed=self.security.allow_actions,
            signed_in=caller.token_id is not None,
            csrf=self.security.csrf_token(session) if session else "",
            when=when,
            number=number,
            clip=clip,
            **context,
        )
        return Response(status=status, body=body.encode())

    def message(self, request: Request, status: int, title: str, message: str) -> Response:
        return self.render(request, "message.html", status=status, title=title, message=message)

    def require_action(self, request: Request, what: str) -> Caller:
        """The caller, when it may take an action.

        Raises:
            PageError: read-only (403), no valid token (401), or a bad CSRF token (403).
        """
        caller = self.security.caller(request)
        if not self.security.allow_actions:
            log.warning("refused (read-only dashboard): %s, by %s", what, caller)
            raise PageError(
                403, "Read-only",
                "this dashboard is read-only: start it with --allow-actions and a token "
                "(--token-file PATH or AIO_WORKQ_DASHBOARD_TOKEN) to act",
            )  # fmt: skip
        if caller.token_id is None and caller.wrong_token:
            log.warning("refused (wrong bearer token): %s, by %s", what, caller)
            raise PageError(
                401, "Wrong token",
                "that is not the dashboard's token: send one of the tokens it was started with "
                "(--token-file PATH or AIO_WORKQ_DASHBOARD_TOKEN)",
            )  # fmt: skip
        if caller.token_id is None:
            log.warning("refused (no valid token): %s, by %s", what, caller)
            raise PageError(401, "Sign in first", "this action needs the dashboard's token")
        if caller.by_cookie and not self.security.csrf_ok(request):
            log.warning("refused (bad CSRF token): %s, by %s", what, caller)
            raise PageError(
                403, "Form expired", "the form's CSRF token is missing or wrong: reload the page"
            )
        return caller


def cookie(request: Request, value: str, *, max_age: int) -> str:
    path = request.prefix or "/"
    secure = "; Secure" if request.secure else ""
    return f"{COOKIE}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"


def _shortstr(text: str) -> bool:
    """What AMQP carries as a queue name or a message id: 1-255 bytes, no control characters."""
    return bool(text) and len(text.encode()) <= _MAX_NAME and not any(ord(c) < 32 for c in text)


def queue_name(text: str) -> str:
    """A queue name from a path segment (already percent-decoded by the adapter).

    Raises:
        PageError: 400 when no broker would take it as a queue name.
    """
    if not _shortstr(text):
        raise PageError(
            400, "Bad queue name",
            f"{text[:80]!r} is not a queue name (1-255 bytes, no control characters)",
        )  # fmt: skip
    return text


def message_id(text: str) -> str:
    """A message or job id from the request: whatever a publisher may have chosen (spaces,
    slashes, any script), as long as a message can carry it.

    Raises:
        PageError: 400 for an empty id, one over 255 bytes or one with control characters.
    """
    if not _shortstr(text):
        raise PageError(
            400, "Malformed id",
            f"{text[:80]!r} is not a message or job id (1-255 bytes, no control characters)",
        )  # fmt: skip
    return text


def shown_queues(request: Request, rows: Sequence[Any]) -> dict[str, Any]:
    """The rows a page lists: those whose queue name holds the `q` filter (any case), at most
    `SHOWN_QUEUES` of them; as a page's context: `rows`, `hidden` (how many more match) and
    `wanted` (the filter)."""
    wanted = request.arg("q").strip()[:_MAX_NAME]
    folded = wanted.casefold()
    matching = [row for row in rows if folded in row.queue.casefold()] if wanted else list(rows)
    return {
        "rows": matching[:SHOWN_QUEUES],
        "hidden": max(0, len(matching) - SHOWN_QUEUES),
        "wanted": wanted,
    }


def when(moment: datetime | float | None) -> str:
    if moment is None:
        return "-"
    if isinstance(moment, int | float):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float) -> str:
    """`42 s`, `3 min`, `2 h 5 min`, `3 d 4 h`."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def clip(value: object, limit: int) -> str:
    """`value` as text, at most `limit` characters of it (a page stays small whatever a header,
    an exception message or a traceback holds)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"
