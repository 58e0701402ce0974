"""`aio-workq worker` in one process: load the target, run it with signals, serve health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from aio_workq import Worker, run_workers

from ._health import HealthServer, WorkersHealth
from ._procmetrics import CHILD_METRICS_ENV
from ._target import WorkerOptions, build_scheduler, build_workers, import_target

__all__ = ("STATUS_FD_ENV", "SUPERVISOR_ENV", "HealthOptions", "run_in_process")

log = logging.getLogger("aio_workq.cli")

STATUS_FD_ENV = "AIO_WORKQ_STATUS_FD"
"""Set by the supervisor: a pipe to write `1`/`0` lines to when the child's health changes."""
_PARENT_POLL = 0.5
SUPERVISOR_ENV = "AIO_WORKQ_SUPERVISOR_PID"
"""Set by the supervisor: its pid; the child drains (SIGTERM) if that process dies."""


@dataclass(frozen=True, slots=True)
class HealthOptions:
    """Where `/healthz` listens (`port=None`: nowhere) and how long a lapse is forgiven."""

    port: int | None = None
    host: str = "127.0.0.1"
    grace: float = 10.0


async def run_in_process(options: WorkerOptions, health: HealthOptions) -> None:
    """Build the workers and run them until SIGTERM/SIGINT (a second one stops fast).

    Raises:
        TargetError: the target does not give workers.
        WorkqError: a worker failed to start (e.g. `BrokerConnectionError`, `TopologyError`).
        OSError: the health port is taken.
    """
    workers = await build_workers(import_target(options.target), options)
    scheduler = None
    if options.schedules is not None:
        scheduler = build_scheduler(options.schedules, options.url)
    status_fd = _status_fd()
    on_change = None
    if status_fd is not None:

        def on_change(healthy: bool) -> None:
            with contextlib.suppress(OSError):  # the supervisor is gone: nothing to tell
                os.write(status_fd, b"1\n" if healthy else b"0\n")

    # Under a supervisor the child reports each change at once and the supervisor forgives a
    # lapse of up to the grace, once: counted here as well, it would be twice the grace.
    grace = 0.0 if status_fd is not None else health.grace
    monitor = WorkersHealth(workers, grace=grace, on_change=on_change)
    server = None
    if health.port is not None:
        server = HealthServer(
            monitor.check, host=health.host, port=health.port, metrics=_metrics(workers)
        )
        await server.start()
    elif os.environ.get(CHILD_METRICS_ENV):  # the supervisor serves the sum of its children's
        _metrics(workers)
    background = [asyncio.create_task(monitor.run()), asyncio.create_task(_follow_supervisor())]
    try:
        await run_workers(*workers, wait_for_broker=options.wait_for_broker, schedules=scheduler)
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if server is not None:
            await server.close()
    done = ", ".join(f"{w.consuming} ({w.state.processed} done)" for w in workers)
    log.info("stopped: %s", done)


def _metrics(workers: list[Worker]) -> Callable[[], tuple[bytes, str]] | None:
    """`/metrics` for these workers, when prometheus-client (`aio-workq[prometheus]`) is there."""
    try:
        import prometheus_client  # noqa: F401 - aio_workq.metrics raises a ConfigurationError
    except ImportError:
        log.info("/metrics is off: install aio-workq[prometheus] for it")
        return None
    from aio_workq._consume.worker import hooks_of
    from aio_workq.metrics import CONTENT_TYPE, PrometheusHook, _counts_by_default, render

    hook = PrometheusHook()
    for worker in workers:
        if not _counts_by_default(hooks_of(worker)):  # one of its own: a second counts twice
            worker.add_hooks(hook)
    return lambda: (render(), CONTENT_TYPE)


def _status_fd() -> int | None:
    value = os.environ.get(STATUS_FD_ENV)
    return int(value) if value and value.isdigit() else None


async def _follow_supervisor() -> None:
    """Under a supervisor: drain (one SIGTERM to ourselves) once it is gone, even by SIGKILL.

    Polls the parent pid: Linux's `PR_SET_PDEATHSIG` fires once per exiting thread of the
    parent, and a second SIGTERM would stop the workers fast instead of draining them.
    """
    parent = os.environ.get(SUPERVISOR_ENV)
    if not parent or not parent.isdigit():
        return
    while os.getppid() == int(parent):  # noqa: ASYNC110 - a parent's death has no event
        await asyncio.sleep(_PARENT_POLL)
    log.warning("the supervisor (pid %s) is gone: draining", parent)
    os.kill(os.getpid(), signal.SIGTERM)
