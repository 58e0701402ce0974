"""Running workers from a script: signals, graceful then fast shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from .._exceptions import ConfigurationError
from .worker import Worker

__all__ = ("run_workers",)

log = logging.getLogger("aio_workq")


async def run_workers(
    *workers: Worker, handle_signals: bool = True, wait_for_broker: float = 0.0
) -> None:
    """Run workers until SIGTERM or SIGINT; a second signal stops them fast.

    The first signal stops every worker gracefully (running handlers get their
    `shutdown_timeout`); a second one cancels running handlers at once, and their messages go
    back to the queue. If a worker fails to start (e.g. `TopologyError`), the others are stopped
    and the error is raised: a supervisor can then restart the process.

    `wait_for_broker` (seconds, > 0) replaces each worker's own: their first connect keeps
    retrying with backoff while no broker answers, for a process that may start before its
    broker. 0 (the default) leaves each worker's own setting.
    """
    if isinstance(wait_for_broker, bool) or not (
        isinstance(wait_for_broker, int | float) and wait_for_broker >= 0
    ):
        raise ConfigurationError(
            f"wait_for_broker must be a number of seconds >= 0, got {wait_for_broker!r}"
        )
    wait = float(wait_for_broker) if wait_for_broker > 0 else None
    loop = asyncio.get_running_loop()
    signals_seen = 0
    tasks: set[asyncio.Task[Any]] = set()

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        fast = signals_seen > 1
        log.warning(
            "%s received: stopping %d worker(s) %s",
            signal.Signals(signum).name,
            len(workers),
            "now" if fast else "gracefully",
        )
        for worker in workers:
            task = loop.create_task(worker.stop(0 if fast else None))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    installed: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    runs = [asyncio.ensure_future(worker.run(wait_for_broker=wait)) for worker in workers]
    try:
        await asyncio.gather(*runs)
    except BaseException:
        for worker in workers:
            with contextlib.suppress(Exception):
                await worker.stop()
        for run in runs:
            run.cancel()
        raise
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
