"""The dead-letter pages: the dead-letter queues, a queue's dead letters (filters), one dead
letter, and the replay (in the background, with progress) and purge (asked first) actions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from urllib.parse import urlencode

from aio_workq import ConfigurationError, DeadLetter, DeadLetters, Producer, TopologyError
from aio_workq.admin import AdminError
from aio_workq.admin.dead_letters import (
    DeadLetterFilter,
    letter_json,
    listing,
    parse_when,
    short_ids,
)

from ._actions import Action, Actions, log
from ._data import QueueSnapshot
from ._http import Request, Response, quote_path
from ._shared import SharedReads
from ._site import PageError, Site, message_id, queue_name, shown_queues

__all__ = ("DeadLetterPages",)

_MAX_NAME = 255
_SHOWN_LETTERS = 200
_BODY_PREVIEW = 80
_BODY_SHOWN = 64 * 1024
"""The bytes of a dead letter's body its page shows (`aio-workq dlq show --json` has all)."""


class DeadLetterPages:
    """The dead-letter pages' handlers."""

    def __init__(
        self,
        *,
        site: Site,
        snapshot: Callable[[], Awaitable[QueueSnapshot]],
        producer: Callable[[], Awaitable[Producer]],
        actions: Actions,
    ) -> None:
        self._site = site
        self._snapshot = snapshot
        self._producer = producer
        self._actions = actions
        self._reads = SharedReads()

    async def index(self, request: Request, match: dict[str, str]) -> Response:
        return await self._index(request, "dead_letters.html")

    async def index_fragment(self, request: Request, match: dict[str, str]) -> Response:
        return await self._index(request, "_dead_letters.html")

    async def _index(self, request: Request, template: str) -> Response:
        snap = await self._snapshot()
        known = [row for row in snap.rows if row.dead_letters is not None]
        return self._site.render(request, template, snap=snap, **shown_queues(request, known))

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

    async def _dead_letters(self, queue: str) -> tuple[DeadLetters, int]:
        """The queue's dead letters, and how many wait there.

        Raises:
            PageError: 404 when `queue.dlq` does not exist.
        """
        producer = await self._producer()
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

    async def listing(self, request: Request, match: dict[str, str]) -> Response:
        queue = queue_name(match["queue"])
        where, given = self._filter(request)
        dead, _ = await self._dead_letters(queue)
        # One pass counts them all but keeps only the letters shown, and of their bodies the
        # preview: a queue of large dead letters is not held in memory for a page of 200 rows.
        # Viewers at once share the pass, and for a few seconds its result (`SharedReads`).
        read = await self._reads.get(
            (queue, ("list", *sorted(given.items()))),
            lambda: listing(dead, where, limit=_SHOWN_LETTERS, body_limit=_BODY_PREVIEW),
        )
        short = short_ids(read.ids)
        rows = [
            {
                "id": letter.message_id or "",
                "short": short.get(letter.message_id or "", "-"),
                "reason": letter.reason,
                "attempts": letter.attempts,
                "failed_at": letter.failed_at,
                "body": letter.body[:_BODY_PREVIEW].decode(errors="replace"),
                "too_large": letter.too_large,
            }
            for letter in read.letters
        ]
        return self._site.render(
            request, "dead_letter_list.html", queue=queue, rows=rows, total=read.total,
            matching=read.matching, filtered=not where.empty, given=given,
            filter_query=urlencode({k: v for k, v in given.items() if v}),
        )  # fmt: skip

    async def show(self, request: Request, match: dict[str, str]) -> Response:
        queue = queue_name(match["queue"])
        wanted = message_id(match["id"])
        dead, _ = await self._dead_letters(queue)

        async def read() -> tuple[DeadLetter, int] | None:
            found = await dead.find(lambda one: one.message_id == wanted, limit=1)
            return (
                (replace(found[0], body=_clip(found[0].body)), len(found[0].body))
                if found
                else None
            )

        shown = await self._reads.get((queue, ("show", wanted)), read)
        if shown is None:
            raise PageError(
                404, "No such dead letter",
                f"no dead letter with message id {wanted!r} in {queue + '.dlq'!r} "
                "(replayed or purged meanwhile?)",
            )  # fmt: skip
        letter, size = shown
        data = letter_json(letter)
        headers = sorted(data["headers"].items())
        traceback = str(data["headers"].get("x-workq-traceback", "") or "")
        return self._site.render(
            request, "dead_letter.html", queue=queue, letter=data, headers=headers,
            traceback=traceback, size=size, cut=size > _BODY_SHOWN,
            too_large=letter.too_large,
        )  # fmt: skip

    async def replay(self, request: Request, match: dict[str, str]) -> Response:
        queue = queue_name(match["queue"])
        # The token first: a request without one is refused (and logged) whatever it asks.
        caller = self._site.require_action(request, f"replay dead letters of {queue!r}")
        ids = [message_id(one) for one in request.fields("id")]
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
            log.warning(
                "refused (unknown replay scope %r): replay of %r, by %s", scope, queue, caller
            )
            raise PageError(400, "Bad request", f"unknown replay scope {scope!r}")
        letters, total = await self._dead_letters(queue)
        matcher = None if where.empty else where

        async def run(action: Action) -> None:
            self._reads.forget(queue)
            try:
                async for batch in letters.replay_batches(where=matcher):
                    action.step(len(batch))
            finally:
                self._reads.forget(queue)

        action = self._actions.start(
            what=what, who=str(caller), run=run,
            total=len(ids) if scope == "selected" else total,
            back=f"/dead-letters/{quote_path(queue)}",
        )  # fmt: skip
        return Response.redirect(request.link(f"/actions/{action.id}"))

    async def purge(self, request: Request, match: dict[str, str]) -> Response:
        """Asked first; the confirmed form deletes the letters the user was asked about and no
        other: it carries the count shown, is refused when the count changed meanwhile, and
        deletes at most that many, the oldest (a letter that arrives later waits behind)."""
        queue = queue_name(match["queue"])
        what = f"purge the dead letters of {queue!r}"
        caller = self._site.require_action(request, what)
        letters, waiting = await self._dead_letters(queue)
        seen = _count_field(request, "seen")
        if request.field("confirm") != "yes":
            return self._site.render(
                request, "confirm_purge.html", queue=queue, waiting=waiting, seen=seen,
            )  # fmt: skip
        asked = _count_field(request, "count")
        if asked is None:
            raise PageError(
                400, "Bad request",
                "the confirmation carries no count of the dead letters to delete: "
                "purge from the dead-letter page again",
            )  # fmt: skip
        if asked != waiting:
            log.warning(
                "refused (the count changed: %d asked, %d now): %s, by %s",
                asked, waiting, what, caller,
            )  # fmt: skip
            return self._site.render(
                request, "confirm_purge.html", status=409, queue=queue, waiting=waiting,
                seen=asked,
            )  # fmt: skip
        log.info("action: %s (%d), by %s", what, asked, caller)
        try:
            purged = await letters.purge(limit=asked)
        finally:
            self._reads.forget(queue)
        log.info("action done: %s, by %s: %d purged", what, caller, purged)
        return self._site.message(
            request, 200, "Purged", f"purged {purged} dead letters from {queue + '.dlq'!r}"
        )

    async def action(self, request: Request, match: dict[str, str]) -> Response:
        action = self._actions.get(match["id"])
        if action is None:
            raise PageError(404, "No such action", "it ended long ago, or the dashboard restarted")
        template = "_action.html" if request.htmx else "action.html"
        return self._site.render(request, template, action=action)


def _count_field(request: Request, name: str) -> int | None:
    """The form's count `name` (None when absent).

    Raises:
        PageError: 400, not a whole number >= 0.
    """
    given = request.field(name).strip()
    if not given:
        return None
    if not given.isascii() or not given.isdigit() or len(given) > 12:
        raise PageError(400, "Bad request", f"{name} must be a whole number >= 0")
    return int(given)


def _clip(body: bytes) -> bytes:
    """The first `_BODY_SHOWN` bytes of `body`, a UTF-8 character cut in half left out."""
    if len(body) <= _BODY_SHOWN:
        return body
    shown = body[:_BODY_SHOWN]
    for end in range(len(shown), len(shown) - 4, -1):
        try:
            shown[:end].decode()
        except UnicodeDecodeError:
            continue
        return shown[:end]
    return shown
