"""A ledger for the fault suite: what the producer was told against what the workers saw.

Each scenario keeps one `Ledger`: the ids the broker confirmed to the producer, the ids a worker
processed (with how often), the ids found in the dead-letter queue, and every error the API raised
on the way. From those it computes one `Row`:

- **lost**: confirmed, yet neither processed nor dead-lettered (the number that must be 0);
- **duplicates**: extra deliveries of an id already processed (at-least-once allows them);
- **typed errors**: errors raised by the API, by class name; an error that is not a `WorkqError`
  is counted under `untyped:<class>` (bad: users could not catch it as documented);
- **recover_s**: after each fault was cleared (for kill -9: the kill itself, so it includes the
  node's restart), the time until both a confirm and a processed message came again; the worst;
- **longest_s**: the longest any one publish (`send()` and its confirm) took to return or raise:
  the bound that held.

`Ledger.report()` appends the row to `.chaos/results.jsonl` (or `$AIO_WORKQ_CHAOS_RESULTS`),
which `python -m scripts.chaos_table` turns into the Markdown table of docs/guarantees.md, and
keeps it for the end-of-session summary that tests/chaos/conftest.py prints. (tests/ledger.py
is the failover tests' own ledger, with failover timings.)
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from aio_workq import DeadLetters, WorkqError

__all__ = ("RESULTS", "Ledger", "Row", "ROWS")

RESULTS = Path(os.environ.get("AIO_WORKQ_CHAOS_RESULTS", ".chaos/results.jsonl"))
ROWS: list[Row] = []  # every row reported in this session, for the terminal summary


@dataclass(frozen=True)
class Row:
    """One scenario's figures."""

    scenario: str
    confirmed: int
    processed: int
    dead_lettered: int
    lost: int
    duplicates: int
    errors: dict[str, int]
    recover_s: float | None
    longest_s: float
    seconds: float
    date: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))

    @property
    def typed_errors(self) -> int:
        return sum(n for name, n in self.errors.items() if not name.startswith("untyped:"))

    @property
    def untyped_errors(self) -> dict[str, int]:
        return {name: n for name, n in self.errors.items() if name.startswith("untyped:")}

    def line(self) -> str:
        recover = "-" if self.recover_s is None else f"{self.recover_s:.1f}"
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"{self.scenario}: confirmed {self.confirmed}, processed {self.processed}, "
            f"dead-lettered {self.dead_lettered}, lost {self.lost}, duplicates {self.duplicates}, "
            f"errors: {errors}, recover {recover} s, longest call {self.longest_s:.1f} s, "
            f"{self.seconds:.0f} s"
        )


class Ledger:
    """Ids confirmed to the producer against ids processed or dead-lettered.

    Args:
        scenario: the row's name.
    """

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.confirmed: set[str] = set()
        self.processed: collections.Counter[str] = collections.Counter()
        self.dead_lettered: set[str] = set()
        self.errors: collections.Counter[str] = collections.Counter()
        self.longest = 0.0
        self._started = time.monotonic()
        self._cleared: list[float] = []
        self._first_confirm_after: dict[int, float] = {}
        self._first_process_after: dict[int, float] = {}
        self._changed = asyncio.Event()

    # -- recording -------------------------------------------------------------------------

    def confirm(self, message_id: str) -> None:
        """The broker confirmed `message_id` to the producer."""
        self.confirmed.add(message_id)
        self._mark(self._first_confirm_after)
        self._changed.set()

    def process(self, message_id: str | None) -> None:
        """A worker's handler ran for `message_id` (call it from the handler)."""
        assert message_id is not None, "every message of the suite has an id"
        self.processed[message_id] += 1
        self._mark(self._first_process_after)
        self._changed.set()

    def error(self, exc: BaseException) -> None:
        """An API call raised `exc` (counted by class; `untyped:` when not a WorkqError)."""
        name = type(exc).__name__
        self.errors[name if isinstance(exc, WorkqError) else f"untyped:{name}"] += 1

    def took(self, seconds: float) -> None:
        """One API call (a publish: send and confirm) took `seconds` until it returned or raised."""
        self.longest = max(self.longest, seconds)

    def cleared(self) -> None:
        """A fault was cleared now (broker back, proxy healed): recovery is timed from here."""
        self._cleared.append(time.monotonic())

    def _mark(self, first_after: dict[int, float]) -> None:
        if self._cleared:
            first_after.setdefault(len(self._cleared) - 1, time.monotonic())

    # -- waiting ---------------------------------------------------------------------------

    async def wait_confirmed(self, count: int) -> None:
        """Wait until `count` ids are confirmed (use under `asyncio.timeout`)."""
        while len(self.confirmed) < count:
            self._changed.clear()
            await self._changed.wait()

    async def wait_processed(self, ids: Iterable[str]) -> None:
        """Wait until every id in `ids` was processed (use under `asyncio.timeout`)."""
        wanted = set(ids)
        while not wanted <= self.processed.keys():
            self._changed.clear()
            await self._changed.wait()

    async def settle(self, dead_letters: DeadLetters | None, *, quiet: float = 2.0) -> None:
        """Wait until every confirmed id was processed or is in the dead-letter queue.

        Waits for processing to go quiet for `quiet` seconds before each read of the dead-letter
        queue; use under `asyncio.timeout` (a lost message never settles).
        """
        while True:
            missing = self.confirmed - self.processed.keys() - self.dead_lettered
            if not missing:
                return
            self._changed.clear()
            try:
                async with asyncio.timeout(quiet):
                    await self._changed.wait()
                continue
            except TimeoutError:
                pass
            if dead_letters is not None:
                await self.read_dead_letters(dead_letters)

    async def read_dead_letters(self, dead_letters: DeadLetters) -> None:
        """Record every id now in the dead-letter queue (the messages stay there)."""
        count = await dead_letters.count()
        if count:
            letters = await dead_letters.read(limit=count)
            self.dead_lettered |= {d.message_id for d in letters if d.message_id is not None}

    # -- the figures -----------------------------------------------------------------------

    def row(self) -> Row:
        """The figures so far."""
        seen = self.processed.keys() | self.dead_lettered
        duplicates = sum(n - 1 for n in self.processed.values())
        duplicates += len(self.processed.keys() & self.dead_lettered)
        recoveries = [
            max(self._first_confirm_after.get(i, at), self._first_process_after.get(i, at)) - at
            for i, at in enumerate(self._cleared)
            if i in self._first_confirm_after or i in self._first_process_after
        ]
        return Row(
            scenario=self.scenario,
            confirmed=len(self.confirmed),
            processed=len(self.processed),
            dead_lettered=len(self.dead_lettered),
            lost=len(self.confirmed - seen),
            duplicates=duplicates,
            errors=dict(self.errors),
            recover_s=round(max(recoveries), 2) if recoveries else None,
            longest_s=round(self.longest, 2),
            seconds=round(time.monotonic() - self._started, 1),
        )

    def report(self) -> Row:
        """The row, appended to the results file and kept for the session summary."""
        row = self.row()
        ROWS.append(row)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as out:
            out.write(json.dumps(asdict(row)) + "\n")
        return row
