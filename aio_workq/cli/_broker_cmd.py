"""`aio-workq broker` (a throwaway local RabbitMQ node) and `aio-workq demo`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from aio_workq import redact_url

from ._errors import CliError
from ._options import resolve, url_option
from ._repo import load_broker_script, load_demo

__all__ = ("broker", "demo")

F = TypeVar("F", bound=Callable[..., Any])


@click.group()
def broker() -> None:
    """A throwaway local RabbitMQ node (Debian's rabbitmq-server; needs a clone of the repo)."""


def _dir_option(func: F) -> F:
    return click.option(
        "--dir", "state_dir", type=click.Path(file_okay=False), default=".broker/dev",
        show_default=True, envvar="AIO_WORKQ_BROKER_DIR", show_envvar=True,
        help="The node's directory: data, logs, ports (state.json).",
    )(func)  # fmt: skip


@broker.command("start")
@_dir_option
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="AMQP port (default: free).")
@click.option("--management", is_flag=True, help="Enable the management plugin (HTTP API).")
@click.option("--timeout", type=float, default=60.0, show_default=True)
def broker_start(state_dir: str, port: int, management: bool, timeout: float) -> None:
    """Start the node (installs rabbitmq-server with apt-get as root when it is missing)."""
    from pathlib import Path

    script = load_broker_script()
    path = Path(state_dir)
    try:
        script.ensure_installed()
        path.mkdir(parents=True, exist_ok=True)
        try:
            node = script.LocalBroker.from_dir(path)
        except script.BrokerError:
            node = script.LocalBroker(path)
        if port and not node.running():
            node.amqp_port = port
        node.management = node.management or management
        node.start(timeout=timeout)
    except script.BrokerError as exc:
        raise CliError(str(exc)) from None
    click.echo(f"RabbitMQ node {node.node} is up at {redact_url(node.url)}")
    if node.management:
        click.echo(f"management API: {node.management_url}")


@broker.command("stop")
@_dir_option
@click.option("--timeout", type=float, default=30.0, show_default=True)
def broker_stop(state_dir: str, timeout: float) -> None:
    """Stop the node (its data is kept for the next start)."""
    from pathlib import Path

    script = load_broker_script()
    if not (Path(state_dir) / "state.json").exists():
        click.echo(f"no broker in {state_dir}")
        return
    try:
        node = script.LocalBroker.from_dir(Path(state_dir))
        node.stop(timeout=timeout)
        node.close()
    except script.BrokerError as exc:
        raise CliError(str(exc)) from None
    click.echo(f"stopped {node.node}")


@broker.command("status")
@_dir_option
def broker_status(state_dir: str) -> None:
    """Whether the node runs (exit 0) or not (exit 1), and its URL."""
    from pathlib import Path

    script = load_broker_script()
    try:
        node = script.LocalBroker.from_dir(Path(state_dir))
    except script.BrokerError as exc:
        raise CliError(str(exc)) from None
    up = node.running()
    click.echo(f"{node.node}: {'running' if up else 'stopped'}, {redact_url(node.url)}")
    if up and node.management:
        click.echo(f"management API: {node.management_url}")
    sys.exit(0 if up else 1)


@click.command()
@url_option
def demo(url: str | None) -> None:
    """Two workers share ten tasks (examples/demo.py); a local node unless AMQP_URL is set."""
    module = load_demo()
    if url is not None:
        os.environ["AMQP_URL"] = resolve(url)
    sys.exit(module.main())
