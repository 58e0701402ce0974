"""Running workers from a script: signals, graceful then fast shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import Counter
from typing import Any, Protocol

from .._link.settings import check_seconds
from .worker import Worker

__all__ = ("Scheduled", "run_workers")

log = logging.getLogger("aio_workq")


class Scheduled(Protocol):
    """What `run_workers(schedules=...)` runs beside the workers (`aio_workq.schedules`)."""

    async def run(self) -> None:
        """Run until `stop()`."""

    async def stop(self, timeout: float | None = None) -> None:
        """Ask `run()` to return."""


async def run_workers(
    *workers: Worker,
    handle_signals: bool = True,
    wait_for_broker: float = 0.0,
    schedules: Scheduled | None = None,
) -> None:
    """Run workers until SIGTERM or SIGINT; a second signal stops them fast.

    The first signal stops every worker gracefully (running handlers get their
    `shutdown_timeout`); a second one cancels running handlers at once, and their messages go
    back to the queue. If a worker fails to start (e.g. `TopologyError`), the others are stopped
    and the error is raised: a supervisor can then restart the process.

    `wait_for_broker` (seconds, > 0) replaces each worker's own: their first connect keeps
    retrying with backoff while no broker answers, for a process that may start before its
    broker. 0 (the default) leaves each worker's own setting.

    `schedules` (an `aio_workq.schedules.Scheduler`) runs beside the workers, in every replica:
    the broker makes one of them the active scheduler. A signal stops it with the workers.
    """
    check_seconds("wait_for_broker", wait_for_broker, zero=True, forever=True)
    wait = float(wait_for_broker) if wait_for_broker > 0 else None
    loop = asyncio.get_running_loop()
    signals_seen = 0
    tasks: set[asyncio.Task[Any]] = set()

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        fast = signals_seen > 1
        log.warning(
            "%s received: stopping %s %s",
            signal.Signals(signum).name,
            _what_stops(workers, schedules is not None),
            "now" if fast else "gracefully",
        )
        stops = [worker.stop(0 if fast else None) for worker in workers]
        if schedules is not None:
            stops.append(schedules.stop(0 if fast else None))
        for stop in stops:
            task = loop.create_task(stop)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    installed: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    runs = [asyncio.ensure_future(worker.run(wait_for_broker=wait)) for worker in workers]
    if schedules is not None:
        runs.append(asyncio.ensure_future(schedules.run()))
    try:
        await asyncio.gather(*runs)
    except BaseException:
        for worker in workers:
            with contextlib.suppress(Exception):
                await worker.stop()
        if schedules is not None:
            with contextlib.suppress(Exception):
                await schedules.stop()
        for run in runs:
            run.cancel()
        raise
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _what_stops(workers: tuple[Worker, ...], scheduler: bool) -> str:
    """What a signal stops, as the start lines name them: the workers of queues, the listeners
    by their exchange (`workq.control`, the jobs' cancel requests), the scheduler."""
    exchanges = Counter(name for worker in workers if (name := worker.listens_to) is not None)
    parts = [f"{len(workers) - exchanges.total()} worker(s)"]
    for exchange, count in exchanges.items():  # a listener per `tasks.workers()` call
        listeners = "the listener" if count == 1 else f"{count} listeners"
        parts.append(f"{listeners} on exchange {exchange!r}")
    if scheduler:
        parts.append("the scheduler")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
