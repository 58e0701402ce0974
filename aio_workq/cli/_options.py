"""What the command modules share: the `--url` option, the error console, type helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from aio_workq import resolve_url

__all__ = ("LEVELS", "err_console", "number", "resolve", "url_option")

F = TypeVar("F", bound=Callable[..., Any])

LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)

err_console = Console(stderr=True)


def url_option(func: F) -> F:
    """`--url` (or `AMQP_URL`): the broker."""
    return click.option(
        "--url",
        envvar="AMQP_URL",
        show_envvar=True,
        help="Broker URL (default: AMQP_URL, then RABBITMQ_HOST/..., then localhost as guest).",
    )(func)


def resolve(url: str | None) -> str:
    """The broker URL to use: `url`, else what the library resolves from the environment."""
    return resolve_url(url)


def number(value: int | None) -> str:
    """`1,234`, or `-` when unknown."""
    return "-" if value is None else f"{value:,}"
