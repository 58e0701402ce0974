"""The schedules' state as the broker keeps it: one JSON message, the newest one wins.

The active scheduler publishes the whole state (with publisher confirms) after each round of
ticks it fired: per schedule, the due time of the last tick fired and the spec it fired on.
The broker keeps only the newest state message (`x-max-length: 1`, `drop-head`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ("RETAIN_UNKNOWN", "Entry", "State")

RETAIN_UNKNOWN = timedelta(days=7)
"""How long the state of a schedule this process does not know is kept (a rolling deploy's
other version may still know it); after that it is dropped."""

FORMAT = 1


@dataclass(slots=True)
class Entry:
    """One schedule's state: every tick up to `cursor` has fired (the last at `last`)."""

    cursor: datetime
    fingerprint: str
    last: datetime | None = None
    next: datetime | None = None
    describe: str = ""
    tz: str = "UTC"
    queue: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor.isoformat(),
            "fingerprint": self.fingerprint,
            "last": None if self.last is None else self.last.isoformat(),
            "next": None if self.next is None else self.next.isoformat(),
            "describe": self.describe,
            "tz": self.tz,
            "queue": self.queue,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(
            cursor=_time(data["cursor"]),
            fingerprint=str(data["fingerprint"]),
            last=None if data.get("last") is None else _time(data["last"]),
            next=None if data.get("next") is None else _time(data["next"]),
            describe=str(data.get("describe", "")),
            tz=str(data.get("tz", "UTC")),
            queue=str(data.get("queue", "")),
        )


@dataclass(slots=True)
class State:
    """Every schedule's entry, and which process published it when."""

    entries: dict[str, Entry] = field(default_factory=dict)
    active: str = ""
    updated: datetime | None = None

    def encode(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "active": self.active,
                "updated": None if self.updated is None else self.updated.isoformat(),
                "schedules": {name: e.to_json() for name, e in sorted(self.entries.items())},
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, body: bytes) -> State:
        """The state in `body`; an unreadable one is an empty state (logged by the caller).

        Raises:
            ValueError: `body` is not a state message.
        """
        data = json.loads(body)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a schedules state message of format {FORMAT}")
        entries = {str(k): Entry.from_json(v) for k, v in data.get("schedules", {}).items()}
        updated = data.get("updated")
        return cls(
            entries=entries,
            active=str(data.get("active", "")),
            updated=None if updated is None else _time(updated),
        )


def _time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
