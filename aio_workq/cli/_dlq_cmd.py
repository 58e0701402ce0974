"""`aio-workq dlq`: list, show, replay and purge a queue's dead letters."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aio_workq import DeadLetter, Producer

from ._dlq import DeadLetterFilter, letter_json, replay_matching, scan
from ._errors import CliError
from ._options import err_console, number, resolve, url_option

__all__ = ("dlq",)

_REPLAY_CHUNK = 100


@click.group()
def dlq() -> None:
    """List, show, replay and purge a queue's dead letters (QUEUE.dlq)."""


@dlq.command("list")
@click.argument("queue")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--exception", "-e", help="Only dead letters of this exception class.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@url_option
def dlq_list(queue: str, limit: int, exception: str | None, as_json: bool, url: str | None) -> None:
    """The oldest dead letters of QUEUE, left in place."""
    amqp_url = resolve(url)
    match = DeadLetterFilter(exception=exception)

    async def read() -> tuple[list[DeadLetter], int]:
        async with Producer(amqp_url, name="aio-workq dlq") as producer:
            letters = producer.dead_letters(queue)
            total = await letters.count()
            if match.empty:
                return await letters.read(limit), total
        return (await scan(amqp_url, queue, match))[:limit], total

    letters, total = asyncio.run(read())
    if as_json:
        click.echo(json.dumps([letter_json(letter) for letter in letters], indent=2))
        return
    table = Table(
        title=f"dead letters of {queue!r}",
        caption=f"{len(letters)} shown of {total} in {queue}.dlq",
    )
    for name in ("message id", "reason", "attempts", "body"):
        table.add_column(name, overflow="fold")
    for letter in letters:
        body = letter.body.decode(errors="replace")
        table.add_row(
            letter.message_id or "-",
            letter.reason,
            number(letter.attempts),
            body if len(body) <= 60 else body[:57] + "...",
        )
    Console().print(table)


@dlq.command("show")
@click.argument("queue")
@click.argument("message_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
@url_option
def dlq_show(queue: str, message_id: str, as_json: bool, url: str | None) -> None:
    """One dead letter of QUEUE by message id: why it failed, headers and body."""
    found = asyncio.run(scan(resolve(url), queue, DeadLetterFilter(message_id=message_id)))
    if not found:
        raise CliError(f"no dead letter with message id {message_id!r} in {queue + '.dlq'!r}")
    data = letter_json(found[0])
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    out = Console()
    for key in ("message_id", "reason", "attempts", "content_type"):
        out.print(f"[bold]{key}[/]: {data[key]}", highlight=False)
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
@click.option("--limit", "-n", type=click.IntRange(min=1), help="Replay at most this many.")
@click.option("--exception", "-e", help="Only dead letters of this exception class.")
@click.option("--rate", type=click.FloatRange(min=0.1), help="At most this many per second.")
@click.option("--dry-run", is_flag=True, help="Only count what would be replayed.")
@url_option
def dlq_replay(
    queue: str,
    limit: int | None,
    exception: str | None,
    rate: float | None,
    dry_run: bool,
    url: str | None,
) -> None:
    """Move dead letters back to QUEUE, attempts reset, oldest first.

    Each copy is confirmed by the broker before its dead letter is removed, so nothing is lost.
    Ctrl-C or SIGTERM settles the message under way, then stops (exit 130); a second one stops
    at once (the message in flight may then be in both queues).
    """
    amqp_url = resolve(url)
    match = DeadLetterFilter(exception=exception)
    if dry_run:
        found = asyncio.run(scan(amqp_url, queue, match))
        selected = found if limit is None else found[:limit]
        click.echo(f"would replay {len(selected)} dead letters of {queue!r} (dry run)")
        return
    moved = [0]
    interrupted = asyncio.run(_replay(amqp_url, queue, match, limit, rate, moved))
    if interrupted:
        click.echo(
            f"aio-workq: interrupted: {moved[0]} dead letters replayed and confirmed; the rest "
            f"are still in {queue + '.dlq'!r}",
            err=True,
        )
        sys.exit(130)
    click.echo(f"replayed {moved[0]} dead letters into {queue!r}, all confirmed")


async def _replay(
    url: str,
    queue: str,
    match: DeadLetterFilter,
    limit: int | None,
    rate: float | None,
    moved: list[int],
) -> bool:
    """Replay; True when a signal stopped it (after the message under way was settled)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None

    def on_signal() -> None:  # the first finishes the message under way; a second cancels
        if stop.is_set():
            main.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with Producer(url, name="aio-workq dlq replay") as producer:
            letters = producer.dead_letters(queue)
            total = await letters.count()
            total = min(total, limit) if limit is not None else total
            with Progress(
                TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=err_console,
            ) as progress:  # fmt: skip
                task = progress.add_task("replay", total=total)

                def on_moved(count: int) -> None:
                    moved[0] = count
                    progress.update(task, completed=count)

                if match.empty and rate is None:  # the library's own move, chunked for progress
                    while (limit is None or moved[0] < limit) and not stop.is_set():
                        left = _REPLAY_CHUNK if limit is None else limit - moved[0]
                        done = await letters.replay(limit=min(_REPLAY_CHUNK, left))
                        if done == 0:
                            break
                        on_moved(moved[0] + done)
                else:
                    await replay_matching(
                        url, queue, match, limit=limit, rate=rate, on_moved=on_moved, stop=stop
                    )
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
    """Delete every dead letter of QUEUE (asks first unless --yes)."""
    amqp_url = resolve(url)

    async def count() -> int:
        async with Producer(amqp_url, name="aio-workq dlq") as producer:
            return await producer.dead_letters(queue).count()

    async def purge() -> int:
        async with Producer(amqp_url, name="aio-workq dlq") as producer:
            return await producer.dead_letters(queue).purge()

    waiting = asyncio.run(count())
    if waiting == 0:
        click.echo(f"no dead letters in {queue + '.dlq'!r}")
        return
    if not yes:
        click.confirm(
            f"Delete all {waiting} dead letters in {queue + '.dlq'!r}? This cannot be undone",
            abort=True,
        )
    click.echo(f"purged {asyncio.run(purge())} dead letters from {queue + '.dlq'!r}")
