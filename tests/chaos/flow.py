"""The traffic of the fault suite: publish with a ledger, retrying what was not confirmed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from aio_workq import Job, Producer, Queue
from tests.chaos.ledger import Ledger

__all__ = ("ids", "publish_all", "recording_handler")


def ids(prefix: str, count: int) -> list[str]:
    """`count` message ids, unique within the scenario."""
    return [f"{prefix}-{i}" for i in range(count)]


async def publish_all(
    producer: Producer,
    ledger: Ledger,
    message_ids: Sequence[str],
    queue: str | Queue,
    *,
    pause: float = 0.2,
    rate: float | None = None,
    **kwargs: Any,
) -> None:
    """Publish every id (as its own body) until each one is confirmed, as an application would.

    Messages go out pipelined through `send()`; a confirm settles in the ledger as it arrives.
    A message whose `send()` raised, or whose confirm failed, is recorded as an error and sent
    again (same id) after `pause` seconds: a re-sent message that had reached the broker after all
    is a duplicate, which the ledger counts. `rate` caps the messages sent per second (a steady
    flow for time-based faults). Run it under `asyncio.timeout`.
    """
    loop = asyncio.get_running_loop()
    pending = list(message_ids)
    started = loop.time()
    sent = 0
    while pending:
        failed: list[str] = []
        confirms: list[asyncio.Future[str]] = []

        def settle(
            message_id: str, at: float, failed: list[str] = failed
        ) -> Callable[[asyncio.Future[str]], None]:
            def done(future: asyncio.Future[str]) -> None:
                ledger.took(loop.time() - at)
                exc = future.exception()
                if exc is None:
                    ledger.confirm(message_id)
                else:
                    ledger.error(exc)
                    failed.append(message_id)

            return done

        for message_id in pending:
            if rate is not None:
                ahead = started + sent / rate - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            sent += 1
            while True:
                at = loop.time()
                try:
                    confirm = await producer.send(
                        message_id, queue, message_id=message_id, **kwargs
                    )
                    break
                except Exception as exc:  # counted: typed or not, then tried again
                    ledger.took(loop.time() - at)
                    ledger.error(exc)
                    await asyncio.sleep(pause)
            confirm.add_done_callback(settle(message_id, at))
            confirms.append(confirm)
        await asyncio.gather(*confirms, return_exceptions=True)
        pending = failed
        if pending:
            await asyncio.sleep(pause)


def recording_handler(ledger: Ledger) -> Callable[[Job], Any]:
    """A handler that records each job's id in the ledger."""

    async def handler(job: Job) -> None:
        ledger.process(job.message_id)

    return handler
