"""The `aio-workq` Click application: the root group and how errors end a run.

Each command group lives in a module of its own (`_worker_cmd`, `_publish_cmd`, `_queues_cmd`,
`_dlq_cmd`, `_job_cmd`, `_broker_cmd`, `_outbox_cmd`, `_schedules_cmd`, `_workers_cmd`,
`_dashboard_cmd`); this module puts them together.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click

from aio_workq import WorkqError, __version__

from ._broker_cmd import broker, demo
from ._dashboard_cmd import dashboard
from ._dlq_cmd import dlq
from ._job_cmd import job
from ._outbox_cmd import outbox
from ._publish_cmd import publish
from ._queues_cmd import queues
from ._schedules_cmd import schedules
from ._worker_cmd import worker
from ._workers_cmd import workers

__all__ = ("cli", "run")


def run(argv: Sequence[str] | None = None) -> None:
    """Run the command line; errors become one line on stderr and a non-zero exit code."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="aio-workq",
                        standalone_mode=False)  # fmt: skip
    except click.exceptions.Abort:
        click.echo("aio-workq: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (WorkqError, OSError) as exc:
        click.echo(f"aio-workq: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("aio-workq: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="aio-workq")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run workers, publish, look at queues and dead letters, and run a local RabbitMQ node.

    Errors are one line on stderr with exit code 1 (2 for a usage error, 130 when
    interrupted); passwords in URLs are always shown as ***.
    """
    if ctx.invoked_subcommand != "worker":  # their errors are ours to report, once
        for name in ("aiormq", "aio_pika"):
            _keep_off_stderr(logging.getLogger(name))


def _keep_off_stderr(logger: logging.Logger) -> None:
    """Print none of `logger`'s records, but let them be made: aio-workq learns of a broker's
    block of publishers from an aiormq record (`_wire/seams.py`, reliance 9), which a raised
    level would drop before it is read."""
    logger.propagate = False
    if not any(isinstance(handler, logging.NullHandler) for handler in logger.handlers):
        logger.addHandler(logging.NullHandler())


for _command in (
    worker,
    workers,
    publish,
    queues,
    dlq,
    job,
    broker,
    demo,
    outbox,
    schedules,
    dashboard,
):
    cli.add_command(_command)
