"""`aio-workq queues`: depths of work queues with their retry and dead-letter queues."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import signal
from collections.abc import Callable
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from aio_workq import redact_url

from ._options import number, resolve, url_option
from ._queues import QueueRow, collect

__all__ = ("queues",)


@click.command()
@click.argument("names", nargs=-1, metavar="[QUEUE]...")
@url_option
@click.option(
    "--management-url", envvar="AIO_WORKQ_MANAGEMENT_URL", show_envvar=True,
    help="RabbitMQ management API (default: the broker's host, port 15672, same user).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@click.option("--watch", "-w", is_flag=True, help="Refresh until Ctrl-C.")
@click.option(
    "--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
    help="Seconds between refreshes with --watch.",
)  # fmt: skip
def queues(
    names: tuple[str, ...],
    url: str | None,
    management_url: str | None,
    as_json: bool,
    watch: bool,
    interval: float,
) -> None:
    """Depths of work queues with their retry and dead-letter queues.

    With the management plugin: every queue of the vhost (or those named), ready and unacked
    messages, consumers and rates. Without it: the queues named, over AMQP (ready messages and
    consumers; retry queues of the default RetryPolicy).
    """
    amqp_url = resolve(url)
    explicit = management_url is not None

    async def snapshot() -> tuple[list[QueueRow], str]:
        return await collect(amqp_url, names, management_url, explicit=explicit)

    if not watch:
        rows, source = asyncio.run(snapshot())
        if as_json:
            click.echo(json.dumps([row.to_json() for row in rows], indent=2))
        else:
            Console().print(_queue_table(rows, source, amqp_url))
        return
    asyncio.run(_watch(snapshot, as_json, interval, amqp_url))


async def _watch(
    snapshot: Callable[[], Any], as_json: bool, interval: float, amqp_url: str
) -> None:
    """Refresh every `interval` seconds until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def pause() -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
        return not stop.is_set()

    try:
        if as_json:
            while not stop.is_set():
                rows, _ = await snapshot()
                click.echo(json.dumps([row.to_json() for row in rows]))
                await pause()
            return
        rows, source = await snapshot()
        with Live(_queue_table(rows, source, amqp_url), auto_refresh=False) as live:
            while await pause():
                rows, source = await snapshot()
                live.update(_queue_table(rows, source, amqp_url), refresh=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _queue_table(rows: list[QueueRow], source: str, amqp_url: str) -> Table:
    rates = any(row.publish_rate is not None for row in rows)
    now = datetime.datetime.now().strftime("%H:%M:%S")
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"queues at {redact_url(amqp_url)}",
        caption=f"{now} · from {source}" + ("" if rates else " (no rates)"),
    )
    table.add_column("queue", style="bold")
    for name in ("ready", "unacked", "consumers"):
        table.add_column(name, justify="right")
    if rates:
        for name in ("pub/s", "deliver/s", "ack/s"):
            table.add_column(name, justify="right")
    table.add_column("retrying", justify="right")
    table.add_column("dlq", justify="right")
    for row in rows:
        cells = [row.queue, number(row.ready), number(row.unacked), number(row.consumers)]
        if rates:
            cells += [_rate(row.publish_rate), _rate(row.deliver_rate), _rate(row.ack_rate)]
        dead = number(row.dead_letters)
        cells += [number(row.retry), f"[red]{dead}[/]" if row.dead_letters else dead]
        table.add_row(*cells)
    return table


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"
