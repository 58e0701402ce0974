"""A ledger for failover tests: ids the broker confirmed vs ids processed or dead-lettered.

The producer side records when each message was handed over and when (or whether) it was
confirmed; the handler records each run; the dead-letter queue is read at the end. Nothing confirmed
may be missing from processed + dead-lettered; duplicates (at-least-once) are counted. A fault
time (`mark_fault`) turns the event times into failover timings.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika

import aio_workq

__all__ = ("Ledger", "drain_ids", "produce")


@dataclass
class Ledger:
    """What happened to every message id, with monotonic event times."""

    sent: dict[str, float] = field(default_factory=dict)  # id -> time handed to send()
    confirmed: dict[str, float] = field(default_factory=dict)  # id -> confirm time
    failed: dict[str, str] = field(default_factory=dict)  # id -> error class (not confirmed)
    processed: Counter[str] = field(default_factory=Counter)  # id -> handler runs (returned)
    processed_at: list[tuple[float, str, bool]] = field(default_factory=list)  # (t, id, redeliv.)
    rejected: set[str] = field(default_factory=set)  # ids the handler rejected
    dead: set[str] = field(default_factory=set)  # ids found in the dead-letter queue
    fault_at: float | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    # --- recording ------------------------------------------------------------------------

    def mark_fault(self) -> float:
        self.fault_at = time.monotonic()
        return self.fault_at

    def on_sent(self, message_id: str) -> None:
        self.sent[message_id] = time.monotonic()

    def on_confirm(self, message_id: str, outcome: asyncio.Future[str]) -> None:
        if outcome.cancelled():
            self.failed[message_id] = "cancelled"
        elif (exc := outcome.exception()) is not None:
            self.failed[message_id] = type(exc).__name__
        else:
            self.confirmed[message_id] = time.monotonic()
        self._changed.set()

    def on_processed(self, job: aio_workq.Job) -> None:
        assert job.message_id is not None
        self.processed[job.message_id] += 1
        self.processed_at.append((time.monotonic(), job.message_id, job.redelivered))
        self._changed.set()

    def on_rejected(self, job: aio_workq.Job) -> None:
        assert job.message_id is not None
        self.rejected.add(job.message_id)
        self._changed.set()

    # --- waiting --------------------------------------------------------------------------

    async def wait_for(self, predicate: Any, timeout: float) -> None:
        """Wait until predicate(self) holds; it is checked after each recorded event."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

    async def wait_settled(self, count: int, timeout: float) -> None:
        """Wait until count publishes have settled (confirmed or failed)."""
        await self.wait_for(lambda s: len(s.confirmed) + len(s.failed) >= count, timeout)

    async def wait_all_handled(self, timeout: float) -> None:
        """Wait until every confirmed id was processed or rejected by the handler."""
        await self.wait_for(lambda s: not s.unhandled(), timeout)

    # --- results --------------------------------------------------------------------------

    def unhandled(self) -> set[str]:
        return set(self.confirmed) - set(self.processed) - self.rejected

    def lost(self) -> set[str]:
        """Confirmed ids neither processed nor in the dead-letter queue: must be empty."""
        return set(self.confirmed) - set(self.processed) - self.dead

    def duplicates(self) -> int:
        """Handler runs beyond the first, over all ids."""
        return sum(n - 1 for n in self.processed.values() if n > 1)

    def first_confirm_after_fault(self) -> float | None:
        """Seconds from the fault to the first confirm of a message handed over after it."""
        if self.fault_at is None:
            return None
        times = [
            t - self.fault_at
            for i, t in self.confirmed.items()
            if self.sent.get(i, 0.0) > self.fault_at
        ]
        return min(times, default=None)

    def first_processed_after_fault(self, *, redelivered: bool | None = None) -> float | None:
        """Seconds from the fault to the first handler run that came over a new connection.

        `redelivered=True`: the first redelivery (a message the dead connection had unacked,
        returned by the queue); `None`: the first message handed to the producer after the fault.
        """
        if self.fault_at is None:
            return None
        fault = self.fault_at
        if redelivered:
            times = [t - fault for t, _, again in self.processed_at if t > fault and again]
        else:
            times = [
                t - fault
                for t, i, _ in self.processed_at
                if t > fault and self.sent.get(i, 0.0) > fault
            ]
        return min(times, default=None)

    def summary(self) -> dict[str, Any]:
        def rounded(x: float | None) -> float | None:
            return None if x is None else round(x, 2)

        return {
            "sent": len(self.sent),
            "confirmed": len(self.confirmed),
            "failed": dict(Counter(self.failed.values())),
            "processed": len(self.processed),
            "dead_lettered": len(self.dead),
            "lost": len(self.lost()),
            "duplicates": self.duplicates(),
            "first_confirm_after_fault_s": rounded(self.first_confirm_after_fault()),
            "first_redelivery_processed_s": rounded(
                self.first_processed_after_fault(redelivered=True)
            ),
            "first_new_message_processed_s": rounded(self.first_processed_after_fault()),
        }


async def produce(
    producer: aio_workq.Producer,
    queue: str,
    ledger: Ledger,
    ids: Iterable[str],
    *,
    fault_after: int | None = None,
    fault: asyncio.Event | None = None,
) -> None:
    """Send one message per id (pipelined in the producer's window), recording confirms.

    With fault_after, `fault` is set once that many messages were confirmed (the test then
    injects its fault and calls `ledger.mark_fault()`).
    """
    for message_id in ids:
        ledger.on_sent(message_id)
        try:
            confirm = await producer.send({"id": message_id}, queue, message_id=message_id)
        except aio_workq.PublishError as exc:
            ledger.failed[message_id] = type(exc).__name__
            continue
        confirm.add_done_callback(functools.partial(ledger.on_confirm, message_id))
        if fault is not None and fault_after is not None and len(ledger.confirmed) >= fault_after:
            fault.set()


async def drain_ids(url: str, queue: str) -> set[str]:
    """The message ids in a queue (e.g. `<queue>.dlq`), removed with acks."""
    ids: set[str] = set()
    async with await aio_pika.connect(url) as conn:
        channel = await conn.channel()
        q = await channel.declare_queue(queue, passive=True)
        while (message := await q.get(fail=False, no_ack=True)) is not None:
            if message.message_id:
                ids.add(message.message_id)
    return ids
