"""`aio-workq worker`: run workers in this process, or N supervised processes."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import click

from ._options import LEVELS, resolve, url_option
from ._procmetrics import ProcessMetrics
from ._run import HealthOptions, run_in_process
from ._supervisor import RestartPolicy, Supervisor, child_command
from ._target import WorkerOptions, build_scheduler, check_target, import_target, split_queues

__all__ = ("worker",)

_LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


@click.command()
@click.argument("target", metavar="MODULE:ATTR")
@click.option(
    "--queue", "-q", "queue", multiple=True, metavar="QUEUE[,QUEUE...]",
    help="Run ATTR as a handler on this queue (a worker each); for a Tasks registry or its "
    "workers factory, run only its tasks of these queues, as Celery's -Q. Repeatable.",
)  # fmt: skip
@click.option(
    "--concurrency", "-c", type=click.IntRange(min=1),
    help="Handlers at once: with --queue, or passed to a factory that takes concurrency= "
    "(a Tasks registry's tasks.workers: per queue, in each process).",
)  # fmt: skip
@click.option(
    "--processes", "-p", type=click.IntRange(min=1), default=1, show_default=True,
    help="Worker processes; more than 1 runs a supervisor that restarts crashed ones.",
)  # fmt: skip
@url_option
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535),
    help="Serve GET /healthz on this port (200 while every worker consumes, else 503) and, "
    "with aio-workq[prometheus], GET /metrics (summed over all --processes).",
)  # fmt: skip
@click.option(
    "--metrics-host", default="127.0.0.1", show_default=True,
    help="Address for /healthz and /metrics (0.0.0.0 in a container).",
)  # fmt: skip
@click.option(
    "--health-grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
    help="Seconds a worker may be not consuming (e.g. reconnecting) before /healthz says 503.",
)  # fmt: skip
@click.option(
    "--max-restarts", type=click.IntRange(min=0), default=5, show_default=True,
    help="Crashes of one process within --restart-window that are restarted; then exit 1.",
)  # fmt: skip
@click.option(
    "--restart-window", type=click.FloatRange(min=1), default=60.0, show_default=True,
    help="Seconds over which crashes are counted.",
)  # fmt: skip
@click.option(
    "--wait-for-broker", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS",
    help="At start, keep trying to reach the broker for up to this long, logging each retry "
    "with the time waited (0: fail at once).",
)  # fmt: skip
@click.option(
    "--schedules", metavar="MODULE:ATTR",
    help="Also run this Scheduler (or these Schedules) in every process: the broker makes one "
    "scheduler active among all replicas.",
)  # fmt: skip
@click.option("--log-level", type=LEVELS, default="INFO", show_default=True)
def worker(
    target: str,
    queue: tuple[str, ...],
    concurrency: int | None,
    processes: int,
    url: str | None,
    metrics_port: int | None,
    metrics_host: str,
    health_grace: float,
    max_restarts: int,
    restart_window: float,
    wait_for_broker: float,
    schedules: str | None,
    log_level: str,
) -> None:
    """Run the workers that MODULE:ATTR names until SIGTERM or Ctrl-C.

    ATTR is a Worker, a list of Workers, a function returning them (sync or async), or a
    handler run on --queue; for a Tasks registry's workers factory, --queue picks its queues.
    The first SIGTERM/SIGINT drains: running handlers finish, the rest of the messages stay
    on the broker. A second signal stops fast: running handlers are
    cancelled and their messages go back to the queue.
    """
    logging.basicConfig(level=log_level.upper(), format=_LOG_FORMAT, stream=sys.stderr)
    if url is not None:  # module-level Workers read AMQP_URL; so do the children
        os.environ["AMQP_URL"] = resolve(url)
    queues = split_queues(queue)
    health = HealthOptions(port=metrics_port, host=metrics_host, grace=health_grace)
    if processes == 1:
        options = WorkerOptions(
            target=target, queues=queues, concurrency=concurrency, url=url,
            wait_for_broker=wait_for_broker, schedules=schedules,
        )  # fmt: skip
        asyncio.run(run_in_process(options, health))
        return
    # The children's summed /metrics: its directory is checked before the target is imported
    # here (which may write metric files of its own into it).
    metrics = ProcessMetrics.create() if metrics_port is not None else None
    try:
        check_target(  # fail here, once, rather than in every child
            import_target(target),
            WorkerOptions(target=target, queues=queues, concurrency=concurrency),
        )
        if schedules is not None:
            build_scheduler(schedules, url)
        args = ["worker", target, "--health-grace", str(health_grace), "--log-level", log_level]
        for name in queues:
            args += ["--queue", name]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        if wait_for_broker:
            args += ["--wait-for-broker", str(wait_for_broker)]
        if schedules is not None:
            args += ["--schedules", schedules]
        supervisor = Supervisor(
            command=child_command(args),
            processes=processes,
            policy=RestartPolicy(max_restarts=max_restarts, window=restart_window),
            health=health,
            metrics=metrics,
        )
        code = asyncio.run(supervisor.run())
    finally:
        if metrics is not None:
            metrics.close()
    sys.exit(code)
