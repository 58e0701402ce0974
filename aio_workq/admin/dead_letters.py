"""Dead letters for `aio-workq dlq` and the dashboard: which ones a command means, and how
they are shown.

Reading and replaying are the library's (`Producer.dead_letters(queue)`): one pass over the dead
letters there when the command began, every read leaving them as they were.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aio_workq import DeadLetter, DeadLetters
from aio_workq._publish.dead_letters import public_name

from ._errors import AdminError

__all__ = (
    "DeadLetterFilter",
    "Listing",
    "find_one",
    "letter_ids",
    "letter_json",
    "listing",
    "parse_when",
    "resolve_ids",
    "short_ids",
)

_SHORT_ID_MIN = 8
_SHORT_PREFIX_MAX = 12
_TAIL_MIN = 4
_ELLIPSIS = "\u2026"
_CANDIDATES_SHOWN = 10


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters a command applies to (`None` fields match everything).

    Args:
        exception: the exception class, by qualified (`app.errors.Timeout`) or bare name.
        message_ids: these message ids (full ids: see `resolve_ids` for prefixes).
        since: dead-lettered at or after this time.
        before: dead-lettered before this time.
    """

    exception: str | None = None
    message_ids: frozenset[str] | None = None
    since: datetime.datetime | None = None
    before: datetime.datetime | None = None

    @property
    def empty(self) -> bool:
        """True when it matches every dead letter."""
        return self.exception is None and self.message_ids is None and not self._timed

    @property
    def _timed(self) -> bool:
        return self.since is not None or self.before is not None

    def __call__(self, letter: DeadLetter) -> bool:
        if self.message_ids is not None and letter.message_id not in self.message_ids:
            return False
        if self.exception is not None:
            kind = letter.exception_type or ""
            wanted = public_name(self.exception)
            if wanted not in (kind, kind.rsplit(".", 1)[-1]):
                return False
        if self._timed:
            when = letter.failed_at
            if when is None:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.before is not None and when >= self.before:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Listing:
    """What a listing of a dead-letter queue shows, from one read pass.

    Attributes:
        letters: the first matching dead letters (at most the limit), each with at most the
            body limit of its body.
        ids: the message id of every dead letter read (for `short_ids`).
        total: how many the pass read.
        matching: how many of them the filter matched.
    """

    letters: tuple[DeadLetter, ...]
    ids: tuple[str, ...]
    total: int
    matching: int


async def listing(
    dead: DeadLetters, where: DeadLetterFilter, *, limit: int, body_limit: int | None
) -> Listing:
    """One read pass over `dead` that keeps only what a listing shows: the first `limit`
    letters `where` matches, each with at most `body_limit` bytes of its body, and the ids of
    all. A queue of large dead letters is never held: a pass holds a batch (a few MiB) at a
    time (`dlq list`, the dashboard's listing)."""
    ids: list[str] = []
    counted = [0, 0]  # total, matching

    def shown(letter: DeadLetter) -> bool:
        counted[0] += 1
        if letter.message_id:
            ids.append(letter.message_id)
        if not where(letter):
            return False
        counted[1] += 1
        return counted[1] <= limit

    letters = await dead.find(shown, body_limit=body_limit)
    return Listing(tuple(letters), tuple(ids), counted[0], counted[1])


async def letter_ids(dead: DeadLetters) -> list[str]:
    """The message id of every dead letter, oldest first, from one read pass that keeps no
    letter."""
    return list((await listing(dead, DeadLetterFilter(), limit=0, body_limit=0)).ids)


async def find_one(dead: DeadLetters, given: str) -> DeadLetter:
    """The dead letter `given` names (as `resolve_ids` takes it), whole, from one read pass
    that keeps only it, and the ids of the others (when `given` is ambiguous, the pass keeps
    one more letter to say so).

    Raises:
        AdminError: as `resolve_ids`.
    """
    ids: list[str] = []
    partial = [0]  # letters kept that `given` names by a part of their id

    def named(letter: DeadLetter) -> bool:
        ident = letter.message_id or ""
        if not ident:
            return False
        ids.append(ident)
        if ident == given:  # a whole id wins over other ids it starts
            return True
        if partial[0] < 2 and _names(given, ident):
            partial[0] += 1
            return True
        return False

    found = await dead.find(named)
    [full] = resolve_ids([given], ids, dead.name)
    return next(letter for letter in found if letter.message_id == full)


def _parts(text: str) -> tuple[str, str, str]:
    return text.replace(_ELLIPSIS, "..").strip().partition("..")


def _empty(text: str) -> bool:
    """True for "" or "..", which would name every id."""
    head, _, tail = _parts(text)
    return not head and not tail


def _names(text: str, ident: str) -> bool:
    """True when `text` names `ident` by a prefix or `HEAD..TAIL` (see `resolve_ids`)."""
    if _empty(text):
        return False
    head, sep, tail = _parts(text)
    return ident.startswith(head) and (not sep or ident[len(head) :].endswith(tail))


def resolve_ids(given: Sequence[str], ids: Sequence[str], dlq: str) -> set[str]:
    """The full message id each of `given` names among `ids`: a whole id, a unique prefix,
    or a unique `HEAD..TAIL` (also `HEAD…TAIL`, as `dlq list` shows long ids).

    Raises:
        AdminError: one names no dead letter, or more than one (the candidates are listed), or
            is empty.
    """
    ids = [ident for ident in ids if ident]
    resolved: set[str] = set()
    for text in given:
        if text in ids:
            resolved.add(text)
            continue
        if _empty(text):  # the start of every id: `--id "$ID"` with ID unset
            raise AdminError(
                f"an empty message id ({text!r}) names no dead letter: give an id, or its "
                "start, as `aio-workq dlq list` shows it"
            )
        matches = sorted({i for i in ids if _names(text, i)})
        if not matches:
            raise AdminError(
                f"no dead letter with message id {text!r} in {dlq!r}{_hint(text, ids)}"
            )
        if len(matches) > 1:
            shown = ", ".join(matches[:_CANDIDATES_SHOWN])
            more = len(matches) - _CANDIDATES_SHOWN
            raise AdminError(
                f"message id {text!r} is ambiguous in {dlq!r}: {len(matches)} dead letters "
                f"match ({shown}{f', and {more} more' if more > 0 else ''}); give more of it"
            )
        resolved.add(matches[0])
    return resolved


def _hint(text: str, ids: Sequence[str]) -> str:
    """What an id that named nothing could have been: the forms an id takes, and the dead
    letters whose id ends with it (the part `dlq list` shows after the ellipsis)."""
    hint = ": give the whole id, its start, or HEAD…TAIL as `aio-workq dlq list` shows it"
    ending = sorted(i for i in ids if text and i.endswith(text))
    if not ending:
        return hint
    shorts = short_ids(ids)
    named = ", ".join(shorts[i] for i in ending[:_CANDIDATES_SHOWN])
    more = len(ending) - _CANDIDATES_SHOWN
    verb = "ends" if len(ending) == 1 else "end"
    return f"{hint} ({named}{f', and {more} more' if more > 0 else ''} {verb} with it)"


def short_ids(ids: Sequence[str]) -> dict[str, str]:
    """For each id, a short form that names it alone among `ids` (`resolve_ids` takes it): its
    shortest unique prefix of at least 8 characters when that is short, else `HEAD…TAIL` (ids
    of one producer share their first 16 characters and differ at the end)."""
    unique = sorted(set(ids))
    short: dict[str, str] = {}
    for index, ident in enumerate(unique):
        common = max(
            (_common(ident, other) for other in unique[max(index - 1, 0) : index + 2]
             if other != ident),
            default=0,
        )  # fmt: skip
        size = max(_SHORT_ID_MIN, common + 1)
        if size <= _SHORT_PREFIX_MAX:
            short[ident] = ident[:size]
            continue
        head = ident[:_SHORT_ID_MIN]
        same_head = [other[len(head) :] for other in unique if other.startswith(head)]
        rest = ident[len(head) :]
        tail = _TAIL_MIN
        while tail < len(rest) and sum(other.endswith(rest[-tail:]) for other in same_head) > 1:
            tail += 1
        short[ident] = ident if tail >= len(rest) - 1 else f"{head}{_ELLIPSIS}{rest[-tail:]}"
    return short


def _common(a: str, b: str) -> int:
    size = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        size += 1
    return size


def letter_json(letter: DeadLetter) -> dict[str, Any]:
    """A JSON-able dict: the body as text when it is UTF-8, else base64."""
    try:
        body: str = letter.body.decode()
        encoding = "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(letter.body).decode(), "base64"
    failed_at = letter.failed_at
    return {
        "message_id": letter.message_id,
        "reason": letter.reason,
        "exception_type": letter.exception_type,
        "attempts": letter.attempts,
        "failed_at": failed_at.isoformat() if failed_at is not None else None,
        "content_type": letter.content_type,
        "body": body,
        "body_encoding": encoding,
        "headers": json.loads(json.dumps(dict(letter.headers), default=_jsonable)),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return str(value)


_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(text: str, *, now: datetime.datetime | None = None) -> datetime.datetime:
    """A time as a filter takes it: ISO 8601 (without an offset: local time) or a duration ago
    (`30m`, `2h`, `1d`), as an aware UTC datetime.

    Raises:
        AdminError: neither.
    """
    text = text.strip()
    if match := _AGO.match(text):
        delta = datetime.timedelta(**{_UNITS[match[2]]: float(match[1])})
        return (now or datetime.datetime.now(datetime.UTC)) - delta
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise AdminError(
            f"{text!r} is neither ISO 8601 (2024-05-01, 2024-05-01T12:00, "
            "2024-05-01T12:00+02:00) nor a time ago (30m, 2h, 1d)"
        ) from None
    return when.astimezone(datetime.UTC)
