"""`aio-workq schedules`: each schedule's next and last fire, and the active scheduler."""

from __future__ import annotations

import asyncio
import json

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aio_workq.admin.schedules import OVERDUE_AFTER, schedule_rows
from aio_workq.schedules import GROUP, read_status

from ._options import print_table, url_option

__all__ = ("schedules",)


@click.command("schedules")
@url_option
@click.option(
    "--group", default=GROUP, show_default=True,
    help="The schedulers' group (Scheduler(group=...)).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def schedules(url: str | None, group: str, as_json: bool) -> None:
    """Each schedule with its next fire (UTC and its time zone), its last fire, and which
    process is the active scheduler, as the active scheduler last recorded them on the broker.
    """
    state = asyncio.run(read_status(url, group=group))
    rows = schedule_rows(state)
    if as_json:
        document = {
            "active": None if state is None else state.active or None,
            "updated": None
            if state is None or state.updated is None
            else state.updated.isoformat(),
            "schedules": rows,
        }
        click.echo(json.dumps(document, indent=2))
        return
    console = Console()
    if state is None:
        console.print(
            f"no scheduler has run on this broker yet (group {group}); for schedulers made "
            "with Scheduler(..., group=...), give --group GROUP"
        )
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("schedule", "spec", "queue", "next (UTC)", "next (local)", "last (UTC)"):
        table.add_column(column)
    for row in rows:
        overdue = " (overdue)" if row["overdue"] else ""
        table.add_row(  # Text: a schedule's name is data, not rich markup
            Text(row["name"]), row["spec"], row["queue"], (row["next_utc"] or "-") + overdue,
            row["next_local"] or "-", row["last_utc"] or "-",
        )  # fmt: skip
    print_table(table, console)
    late = sum(row["overdue"] for row in rows)
    if late:
        console.print(
            f"{late} schedule{'s are' if late > 1 else ' is'} overdue (next fire over "
            f"{OVERDUE_AFTER.seconds} s ago): no scheduler fired {'them' if late > 1 else 'it'}; "
            "is one running? (a killed one is named below until another takes over; a refused "
            "tick is in the active scheduler's log)"
        )
    updated = "-" if state.updated is None else state.updated.isoformat(timespec="seconds")
    if state.active:
        console.print(f"active scheduler: {state.active} (state recorded {updated})", markup=False)
    else:
        console.print(f"no scheduler is active: the last one stopped at {updated}")
