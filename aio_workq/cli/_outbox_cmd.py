"""`aio-workq outbox`: the transactional outbox's own command line, passed through."""

from __future__ import annotations

import sys

import click

from ._errors import CliError

__all__ = ("outbox",)


@click.command(
    "outbox",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def outbox(args: tuple[str, ...]) -> None:
    """The transactional outbox (aio-workq[postgres]): `schema`, `migrate`, `relay`.

    `aio-workq outbox relay --dsn DSN [--url AMQP_URL]` publishes committed outbox rows with
    confirms until SIGTERM; `aio-workq outbox --help` lists the options.
    """
    try:
        from aio_workq.outbox.__main__ import main as outbox_main
    except ImportError:
        raise CliError(
            "the outbox needs PostgreSQL's driver: pip install 'aio-workq[postgres]'"
        ) from None
    sys.exit(outbox_main(list(args), prog="aio-workq outbox"))
