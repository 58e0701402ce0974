"""`aio-workq queues`: depths of work queues with their retry and dead-letter queues, and
`aio-workq queues delete`."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Callable, Sequence
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from aio_workq import redact_url
from aio_workq.admin.queues import OWN_KINDS, QueueRow, collect, delete_queues, queue_group

from ._options import number, resolve, url_option
from ._watch import Ticker, live_refresh

__all__ = ("queues",)

_MIN_NAME = 12


class _DefaultShow(click.Group):
    """`aio-workq queues [QUEUE]...` is `aio-workq queues show [QUEUE]...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["show", *args]
        return super().parse_args(ctx, args)


def _management_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--management-url", envvar="AIO_WORKQ_MANAGEMENT_URL", show_envvar=True,
        help="RabbitMQ management API (default: the broker's host, port 15672 (15671 for "
        "amqps), same user).",
    )(func)  # fmt: skip


def _seconds_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    """`0.5,1,2` → (500, 1000, 2000): delays in whole milliseconds, as `RetryPolicy` names
    its delay queues."""
    if not value:
        return ()
    try:
        seconds = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(
            f"seconds separated by commas (e.g. 0.5,1,2), got {value!r}"
        ) from None
    if any(not 0 < s <= 86_400 for s in seconds):
        raise click.BadParameter(f"each delay must be 0-86400 seconds, got {value!r}")
    return tuple(max(1, round(s * 1000)) for s in seconds)


@click.group(cls=_DefaultShow)
def queues() -> None:
    """Depths of work queues (`queues [QUEUE]...`, the same as `queues show`), or delete one."""


@queues.command("show")
@click.argument("names", nargs=-1, metavar="[QUEUE]...")
@url_option
@_management_option
@click.option(
    "--all", "-a", "all_queues", is_flag=True,
    help="Also each retry and dead-letter queue on a line of its own, and the delay ladder.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@click.option("--watch", "-w", is_flag=True, help="Refresh until Ctrl-C.")
@click.option(
    "--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
    help="Seconds between refreshes with --watch.",
)  # fmt: skip
def show(
    names: tuple[str, ...],
    url: str | None,
    management_url: str | None,
    all_queues: bool,
    as_json: bool,
    watch: bool,
    interval: float,
) -> None:
    """Depths of work queues with their retry and dead-letter queues.

    With the management plugin: every queue of the vhost (or those named), ready and unacked
    messages, consumers and rates. Without it: the queues named, over AMQP (ready messages and
    consumers; retry queues of the default RetryPolicy). Retry (X.retry.*) and dead-letter
    (X.dlq) queues are counted in the row of their work queue X; the shared delay ladder
    (workq.delay.*) shows with --all.
    """
    amqp_url = resolve(url)
    explicit = management_url is not None

    async def snapshot() -> tuple[list[QueueRow], str]:
        rows, source = await collect(
            amqp_url, names, management_url, explicit=explicit, all_queues=True
        )
        if not all_queues:
            hidden = [row for row in rows if row.kind in OWN_KINDS.values()]
            rows = [row for row in rows if row.kind not in OWN_KINDS.values()]
            for row in hidden:
                count = row.queue.split("(")[-1].split()[0]
                source += f" · {count} {row.kind} queues hidden (--all)"
        return rows, source

    table = _TableMaker(amqp_url, all_queues)
    if not watch:
        rows, source = asyncio.run(snapshot())
        if as_json:
            click.echo(json.dumps([row.to_json() for row in rows], indent=2))
        else:
            console = Console()
            console.print(table(rows, source, console.width))
        return
    asyncio.run(_watch(snapshot, as_json, interval, table))


@queues.command("delete")
@click.argument("name", metavar="QUEUE")
@click.option("--yes", "-y", is_flag=True, help="Don't ask.")
@click.option(
    "--retry-delays", metavar="SECONDS,...", callback=_seconds_list,
    help="The retry delays of the worker's RetryPolicy (e.g. 0.5,1,2), to find its retry "
    "queues without the management API (RetryPolicy(...).levels_ms() / 1000).",
)  # fmt: skip
@url_option
@_management_option
def delete(
    name: str,
    yes: bool,
    retry_delays: tuple[int, ...],
    url: str | None,
    management_url: str | None,
) -> None:
    """Delete QUEUE with its dead-letter queue (QUEUE.dlq) and retry queues (QUEUE.retry.*),
    messages and all (asks first unless --yes).

    Without the management API the retry queues are found by name: those of the default
    RetryPolicy and of Retry(delay=...), and those of --retry-delays.
    """
    amqp_url = resolve(url)
    group, looked_for = asyncio.run(
        queue_group(
            amqp_url,
            name,
            management_url,
            explicit=management_url is not None,
            retry_delays_ms=retry_delays,
        )
    )
    if not yes:
        listing = ", ".join(f"{queue} ({_messages(count)})" for queue, count in group)
        click.confirm(f"Delete {listing}? This cannot be undone", abort=True)
    for queue, count in asyncio.run(delete_queues(amqp_url, [queue for queue, _ in group])):
        click.echo(f"deleted {queue} ({_messages(count)})")
    if looked_for is not None:
        delays = ", ".join(map(str, looked_for))
        click.echo(
            f"Without the management API, retry queues were looked for by name, for these "
            f"delays (ms): {delays}. A worker whose RetryPolicy has other delays leaves "
            f"{name}.retry.<ms>ms queues: run this again with --retry-delays (its delays in "
            "seconds), or with --management-url to find every one.",
            err=True,
        )


def _messages(count: int) -> str:
    return f"{count:,} message{'' if count == 1 else 's'}"


async def _watch(
    snapshot: Callable[[], Any], as_json: bool, interval: float, table: _TableMaker
) -> None:
    """Refresh every `interval` seconds until SIGINT or SIGTERM."""
    async with Ticker(interval=interval) as ticker:
        if as_json:
            while not ticker.stopped:
                rows, _ = await snapshot()
                click.echo(json.dumps([row.to_json() for row in rows]))
                await ticker.pause()
            return

        async def frame(console: Console) -> Table:
            rows, source = await snapshot()
            return table(rows, source, console.width)

        await live_refresh(ticker, frame)


class _TableMaker:
    """The table of rows, fitted to the terminal: names are never cut (they wrap only when
    one is wider than the terminal leaves), the rate columns go first when it is narrow."""

    def __init__(self, amqp_url: str, all_queues: bool) -> None:
        self._title = f"queues at {redact_url(amqp_url)}"
        self._all = all_queues

    def __call__(self, rows: list[QueueRow], source: str, width: int) -> Table:
        lines = [line for row in rows for line in self._lines(row)]
        rates = any(row.publish_rate is not None for row in rows)
        name_width = max([len("queue"), *(len(line[0]) for line in lines)])
        cells = [dict(zip(["queue", *_COLUMNS], line, strict=False)) for line in lines]
        columns = [c for c in _COLUMNS if rates or c not in _RATES]
        if rates and _needed(name_width, columns, cells) > width:
            columns = [c for c in columns if c not in _RATES]
            source += " · rates: widen or --json"
        now = datetime.datetime.now().strftime("%H:%M:%S")
        table = Table(
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            title=self._title,
            caption=f"{now} · from {source}" + ("" if rates else " (no rates)"),
        )
        room = width - _needed(0, columns, cells) - 3  # what the other columns leave
        table.add_column(
            "queue", style="bold", overflow="fold", min_width=min(name_width, max(room, _MIN_NAME))
        )
        for name in columns:
            table.add_column(_SHORT.get(name, name), justify="right", no_wrap=True)
        for line in cells:
            table.add_row(line["queue"], *(line.get(name, "") for name in columns))
        return table

    def _lines(self, row: QueueRow) -> list[list[str]]:
        name = row.queue if row.present else f"{row.queue} (gone)"
        dead = number(row.dead_letters)
        main = [
            name, number(row.ready), number(row.unacked), number(row.consumers),
            _rate(row.publish_rate), _rate(row.deliver_rate), _rate(row.ack_rate),
            number(row.retry), f"[red]{dead}[/]" if row.dead_letters else dead,
        ]  # fmt: skip
        lines = [main]
        if self._all and row.kind == "work":
            if row.dead_letters is not None:
                lines.append(["  \u21b3 .dlq", number(row.dead_letters)])
            for queue, count in sorted(row.retry_queues.items(), key=lambda kv: _ms(kv[0])):
                lines.append([f"  \u21b3 {queue.removeprefix(row.queue)}", number(count)])
        return lines


_COLUMNS = ("ready", "unacked", "consumers", "pub/s", "deliver/s", "ack/s", "retrying", "dlq")
_RATES = ("pub/s", "deliver/s", "ack/s")
_SHORT = {"consumers": "cons", "retrying": "retry"}


def _needed(name_width: int, columns: Sequence[str], cells: list[dict[str, str]]) -> int:
    """Characters a table needs: each column its widest cell or header, plus padding."""
    total = name_width - 3 if name_width else 0  # a gap of 3 between columns, none at the edges
    for name in columns:
        header = len(_SHORT.get(name, name))
        total += max([header, *(len(_plain(c.get(name, ""))) for c in cells)]) + 3
    return total


def _plain(text: str) -> str:
    return text.replace("[red]", "").replace("[/]", "")


def _ms(name: str) -> int:
    digits = name.rsplit(".", 1)[-1].removesuffix("ms")
    return int(digits) if digits.isdigit() else 0


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"
