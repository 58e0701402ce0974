"""`aio-workq dlq`: list, show, replay and purge a queue's dead letters.

Every command is one pass of the library's over the dead letters there when it began
(`Producer.dead_letters(queue)`): reads leave them as they were (headers and order), and a
replay moves each at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import signal
import sys
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from aio_workq import DeadLetters, Producer
from aio_workq.admin.dead_letters import (
    DeadLetterFilter,
    Listing,
    find_one,
    letter_ids,
    letter_json,
    listing,
    resolve_ids,
    short_ids,
)

from ._options import err_console, number, resolve, url_option

__all__ = ("dlq",)

_BODY_WIDTH = 24
_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class _When(click.ParamType):  # type: ignore[type-arg]
    """A time: ISO 8601 (a time without an offset is local time) or a duration ago (`2h`)."""

    name = "TIME"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime.datetime:
        if isinstance(value, datetime.datetime):
            return value
        text = str(value).strip()
        if match := _AGO.match(text):
            delta = datetime.timedelta(**{_UNITS[match[2]]: float(match[1])})
            return datetime.datetime.now(datetime.UTC) - delta
        try:
            when = datetime.datetime.fromisoformat(text)
        except ValueError:
            self.fail(
                f"{text!r} is neither ISO 8601 (2024-05-01, 2024-05-01T12:00, "
                "2024-05-01T12:00+02:00) nor a time ago (30m, 2h, 1d)",
                param,
                ctx,
            )
        return when.astimezone(datetime.UTC)  # a naive time is taken as local time


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        (
            click.option("--exception", "-e", help="Only dead letters of this exception class."),
            click.option(
                "--since", type=_When(), help="Only those dead-lettered at or after TIME."
            ),
            click.option("--before", type=_When(), help="Only those dead-lettered before TIME."),
        )
    ):
        func = option(func)
    return func


@click.group()
def dlq() -> None:
    """List, show, replay and purge a queue's dead letters (QUEUE.dlq).

    Wherever a message id goes, a unique prefix of it does too, or the HEAD..TAIL form that
    `dlq list` shows. Reading leaves every dead letter as it was: headers (x-delivery-count
    too) and order.
    """


def _letters(producer: Producer, queue: str) -> DeadLetters:
    return producer.dead_letters(queue)


@dlq.command("list")
@click.argument("queue")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True)
@_filter_options
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@url_option
def dlq_list(
    queue: str,
    limit: int,
    exception: str | None,
    since: datetime.datetime | None,
    before: datetime.datetime | None,
    as_json: bool,
    url: str | None,
) -> None:
    """The oldest dead letters of QUEUE, left in place."""
    amqp_url = resolve(url)
    match = DeadLetterFilter(exception=exception, since=since, before=before)
    # the table shows the start of each body; --json shows the bodies of the letters shown
    read = asyncio.run(_listing(amqp_url, queue, match, limit, None if as_json else _BODY_WIDTH))
    if as_json:
        click.echo(json.dumps([letter_json(letter) for letter in read.letters], indent=2))
        return
    short = short_ids(read.ids)
    which = "" if match.empty else f" ({read.matching} match)"
    table = Table(
        title=f"dead letters of {queue!r}",
        caption=f"{len(read.letters)} shown of {read.total} in {queue}.dlq{which}",
    )
    table.add_column("id", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=3)
    table.add_column("tries", justify="right", no_wrap=True)
    table.add_column("body", overflow="ellipsis", no_wrap=True, max_width=_BODY_WIDTH, ratio=1)
    for letter in read.letters:  # Text, not str: a reason or body is data, not rich markup
        table.add_row(
            Text(short.get(letter.message_id or "", "-")),
            Text(letter.reason),
            number(letter.attempts),
            Text(letter.body.decode(errors="replace").replace("\n", " ")),
        )
    Console().print(table, highlight=False)


async def _listing(
    url: str, queue: str, match: DeadLetterFilter, limit: int, body_limit: int | None
) -> Listing:
    """What `dlq list` prints, and nothing more (`listing`, as the dashboard's)."""
    async with Producer(url, name="aio-workq dlq") as producer:
        return await listing(_letters(producer, queue), match, limit=limit, body_limit=body_limit)


@dlq.command("show")
@click.argument("queue")
@click.argument("message_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
@url_option
def dlq_show(queue: str, message_id: str, as_json: bool, url: str | None) -> None:
    """One dead letter of QUEUE by message id (or a unique prefix): why it failed, headers and
    body."""
    amqp_url = resolve(url)

    async def read() -> dict[str, Any]:
        async with Producer(amqp_url, name="aio-workq dlq") as producer:
            return letter_json(await find_one(_letters(producer, queue), message_id))

    data = asyncio.run(read())
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    out = Console()
    for key in ("message_id", "reason", "attempts", "failed_at", "content_type"):
        # the values are data (a reason may hold "[/x]"), not rich markup
        out.print(Text.assemble((key, "bold"), f": {data[key]}"), highlight=False)
    out.print("[bold]headers[/]:")
    for key, value in sorted(data["headers"].items()):
        text = str(value)
        if "\n" in text:  # the traceback
            out.print(f"  {key}:", highlight=False)
            out.print("    " + text.strip().replace("\n", "\n    "), highlight=False, markup=False)
        else:
            out.print(f"  {key}: {text}", highlight=False, markup=False)
    out.print(f"[bold]body[/] ({data['body_encoding']}):")
    out.print(data["body"], highlight=False, markup=False)


@dlq.command("replay")
@click.argument("queue")
@click.option(
    "--id", "ids", multiple=True, metavar="ID",
    help="Only this dead letter (a unique prefix will do); repeat for more.",
)  # fmt: skip
@_filter_options
@click.option("--limit", "-n", type=click.IntRange(min=1), help="Replay at most this many.")
@click.option("--rate", type=click.FloatRange(min=0.1), help="At most this many per second.")
@click.option("--dry-run", is_flag=True, help="Only count what would be replayed.")
@url_option
def dlq_replay(
    queue: str,
    ids: tuple[str, ...],
    exception: str | None,
    since: datetime.datetime | None,
    before: datetime.datetime | None,
    limit: int | None,
    rate: float | None,
    dry_run: bool,
    url: str | None,
) -> None:
    """Move dead letters back to QUEUE, attempts reset, oldest first.

    One pass: only the dead letters there when it starts, each at most once (a replayed
    message that fails again waits in QUEUE.dlq for the next replay). Each copy is confirmed by
    the broker before its dead letter is removed, so nothing is lost. Ctrl-C or SIGTERM settles
    the messages under way, then stops (exit 130); a second one stops at once (a message in
    flight may then be in both queues).
    """
    amqp_url = resolve(url)
    match = DeadLetterFilter(exception=exception, since=since, before=before)
    if ids:
        match = DeadLetterFilter(
            exception=exception,
            since=since,
            before=before,
            message_ids=frozenset(asyncio.run(_resolve_ids(amqp_url, queue, ids))),
        )
    where = None if match.empty else match
    if dry_run:

        async def count() -> int:
            async with Producer(amqp_url, name="aio-workq dlq") as producer:
                read = await listing(_letters(producer, queue), match, limit=0, body_limit=0)
            return read.matching if limit is None else min(read.matching, limit)

        click.echo(f"would replay {_letters_n(asyncio.run(count()))} of {queue!r} (dry run)")
        return
    moved = [0]
    interrupted = asyncio.run(_replay(amqp_url, queue, where, limit, rate, moved))
    if interrupted:
        click.echo(
            f"aio-workq: interrupted: {_letters_n(moved[0])} replayed and confirmed; the rest "
            f"are still in {queue + '.dlq'!r}",
            err=True,
        )
        sys.exit(130)
    click.echo(f"replayed {_letters_n(moved[0])} into {queue!r}, all confirmed")


async def _resolve_ids(url: str, queue: str, given: tuple[str, ...]) -> set[str]:
    async with Producer(url, name="aio-workq dlq") as producer:
        ids = await letter_ids(_letters(producer, queue))
    return resolve_ids(given, ids, f"{queue}.dlq")


async def _replay(
    url: str,
    queue: str,
    where: DeadLetterFilter | None,
    limit: int | None,
    rate: float | None,
    moved: list[int],
) -> bool:
    """Replay; True when a signal stopped it (after the batch under way was settled)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None

    def on_signal() -> None:  # the first finishes the batch under way; a second cancels
        if stop.is_set():
            main.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with Producer(url, name="aio-workq dlq replay") as producer:
            letters = _letters(producer, queue)
            total: int | None = None
            if where is None:
                total = await letters.count()
                total = min(total, limit) if limit is not None else total
            with Progress(
                TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=err_console,
            ) as progress:  # fmt: skip
                task = progress.add_task("replay", total=total)
                batches = letters.replay_batches(limit, where=where, batch=1 if rate else 100)
                async with aclosing(batches):
                    async for batch in batches:
                        moved[0] += len(batch)
                        progress.update(task, completed=moved[0])
                        if stop.is_set():
                            break
                        if rate:
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(len(batch) / rate):
                                    await stop.wait()
                            if stop.is_set():
                                break
                progress.update(task, total=moved[0], completed=moved[0])
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return stop.is_set()


@dlq.command("purge")
@click.argument("queue")
@click.option("--yes", "-y", is_flag=True, help="Don't ask.")
@url_option
def dlq_purge(queue: str, yes: bool, url: str | None) -> None:
    """Delete the dead letters of QUEUE: asks first, then deletes the ones counted (not those
    that arrive meanwhile); with --yes, every one there."""
    amqp_url = resolve(url)

    async def count() -> int:
        async with Producer(amqp_url, name="aio-workq dlq") as producer:
            return await _letters(producer, queue).count()

    async def purge(limit: int | None) -> int:
        async with Producer(amqp_url, name="aio-workq dlq") as producer:
            return await _letters(producer, queue).purge(limit=limit)

    waiting = asyncio.run(count())
    if waiting == 0:
        click.echo(f"no dead letters in {queue + '.dlq'!r}")
        return
    if not yes:
        click.confirm(
            f"Delete the {waiting} dead letters in {queue + '.dlq'!r} (the oldest; those that "
            "arrive meanwhile stay)? This cannot be undone",
            abort=True,
        )
    # asked: the letters counted, not those that arrived while the question waited
    purged = asyncio.run(purge(None if yes else waiting))
    click.echo(f"purged {_letters_n(purged)} from {queue + '.dlq'!r}")


def _letters_n(count: int) -> str:
    """`1 dead letter`, `2 dead letters`."""
    return f"{count} dead letter{'' if count == 1 else 's'}"
