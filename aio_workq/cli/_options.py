"""What the command modules share: the `--url` option, the error console, type helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from aio_workq import resolve_url

from ._errors import CliError

__all__ = ("LEVELS", "err_console", "number", "print_table", "resolve", "url_option")

F = TypeVar("F", bound=Callable[..., Any])

LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)

err_console = Console(stderr=True)
_WIDEST = 1_000  # columns: a table's natural width is measured up to this


def print_table(table: Table, console: Console | None = None) -> None:
    """Print `table` at its natural width when the console is narrower (a pipe counts as 80
    columns): the terminal wraps its lines, but no value is folded or cut to fit (a pid as
    `175` over `90`, a time as `2026-12-06T…`)."""
    console = console or Console()
    natural = Measurement.get(console, console.options.update_width(_WIDEST), table).maximum
    if natural > console.width:  # a console of that width, on the same output
        console = Console(
            file=console.file,
            width=natural,
            force_terminal=console.is_terminal,
            no_color=console.no_color,
        )
    console.print(table, crop=False)


def url_option(func: F) -> F:
    """`--url` (or `AMQP_URL`): the broker."""
    return click.option(
        "--url",
        envvar="AMQP_URL",
        show_envvar=True,
        help="Broker URL (default: AMQP_URL, then RABBITMQ_HOST/..., then localhost as guest).",
    )(func)


def resolve(url: str | None) -> str:
    """The broker URL to use: `url`, else what the library resolves from the environment.

    Raises:
        CliError: `--url` was given empty.
    """
    if url is not None and not url.strip():
        raise CliError(
            "--url is empty: give the broker URL (--url amqp://user:pass@host:5672/vhost), "
            "or leave it out to use AMQP_URL"
        )
    return resolve_url(url)


def number(value: int | None) -> str:
    """`1,234`, or `-` when unknown."""
    return "-" if value is None else f"{value:,}"
