"""`aio-workq workers`: the workers alive and those gone lately, from their presence beats."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from aio_workq import PresenceWatcher, WorkerPresence, redact_url

from ._options import number, print_table, resolve, url_option
from ._watch import Ticker, live_refresh

__all__ = ("workers",)

_DEFAULT_WAIT = 7.5  # 1.5 x the default presence interval: every live worker beats meanwhile
_REFRESH = 1.0  # seconds between refreshes with --watch


@click.command("workers")
@url_option
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@click.option("--watch", "-w", is_flag=True, help="Keep listening and refresh until Ctrl-C.")
@click.option(
    "--wait", type=click.FloatRange(min=0), default=_DEFAULT_WAIT, show_default=True,
    help="Seconds to listen before printing (workers beat every 5 s by default).",
)  # fmt: skip
def workers(url: str | None, as_json: bool, watch: bool, wait: float) -> None:
    """Workers alive and those gone lately: host, pid, queues, concurrency, in flight,
    handled and failed counts, uptime and version.

    Every worker sends a presence beat to the `workq.presence` exchange when it starts, every
    5 s (`presence_interval`) and when it stops; this command listens for `--wait` seconds,
    then prints what it heard. A worker is gone after its goodbye, or after 3 intervals
    without a beat (killed, or cut off). Workers that went before the listening began are not
    shown.
    """
    amqp_url = resolve(url)
    asyncio.run(_run(amqp_url, as_json, watch, wait))


async def _run(amqp_url: str, as_json: bool, watch: bool, wait: float) -> None:
    title = f"workers at {redact_url(amqp_url)}"
    async with PresenceWatcher(amqp_url) as watcher:
        if not watch:
            click.echo(f"listening {wait:g} s for the workers' presence beats...", err=True)
            await asyncio.sleep(wait)  # listening: beats come in meanwhile
            found = watcher.workers()
            if as_json:
                click.echo(json.dumps([to_json(w) for w in found], indent=2))
            else:
                print_table(_table(found, title, wait))
            return
        await _watch(watcher, as_json, title)


async def _watch(watcher: PresenceWatcher, as_json: bool, title: str) -> None:
    """Refresh every second until SIGINT or SIGTERM."""
    async with Ticker(interval=_REFRESH) as ticker:
        if as_json:
            while await ticker.pause():
                click.echo(json.dumps([to_json(w) for w in watcher.workers()]))
            return

        async def frame(console: Console) -> Table:
            return _table(watcher.workers(), title, None)

        await live_refresh(ticker, frame, first=_table([], title, None))


def to_json(worker: WorkerPresence) -> dict[str, Any]:
    """One worker as a JSON object: its beat's fields, `alive`, `last_seen`, `uptime`."""
    beat = worker.beat
    return {
        "id": beat.id,
        "host": beat.host,
        "pid": beat.pid,
        "queues": list(beat.queues),
        "concurrency": beat.concurrency,
        "in_flight": beat.in_flight,
        "handled": beat.handled,
        "failed": beat.failed,
        "started_at": beat.started_at,
        "uptime": round(worker.uptime, 3),
        "version": beat.version,
        "interval": beat.interval,
        "alive": worker.alive,
        "stopping": beat.stopping,
        "last_seen": worker.last_seen,
    }


def _table(found: list[WorkerPresence], title: str, waited: float | None) -> Table:
    now = time.time()
    clock = datetime.datetime.now().strftime("%H:%M:%S")
    heard = f"listened {waited:g} s" if waited is not None else "listening"
    alive = sum(1 for w in found if w.alive)
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title=title,
        caption=f"{clock} · {alive} alive, {len(found) - alive} gone · {heard}",
    )
    for name in ("host", "pid", "queues"):
        table.add_column(name, overflow="fold")
    for name in ("conc", "in flight", "handled", "failed", "uptime"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for worker in found:
        beat = worker.beat
        state = "alive" if worker.alive else f"gone {_duration(now - worker.last_seen)} ago"
        failed = number(beat.failed)
        table.add_row(
            beat.host,
            str(beat.pid),
            ", ".join(beat.queues),
            number(beat.concurrency),
            number(beat.in_flight),
            number(beat.handled),
            f"[red]{failed}[/]" if beat.failed else failed,
            _duration(worker.uptime),
            beat.version,
            state,
            style=None if worker.alive else "dim",
        )
    return table


def _duration(seconds: float) -> str:
    """`42s`, `3m 5s`, `2h 10m`, `4d 3h`."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
