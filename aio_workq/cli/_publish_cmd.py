"""`aio-workq publish`: one message, or one per line of stdin, all confirmed."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any, Literal

import click

from aio_workq import Producer, WorkqError
from aio_workq._publish.serialization import encode_body

from ._errors import CliError
from ._options import resolve, url_option

__all__ = ("publish",)


@click.command()
@click.argument("queue")
@click.argument("body", required=False)
@click.option("--json", "as_json", is_flag=True, help="Parse BODY (or each line) as JSON.")
@click.option(
    "--queue-type", type=click.Choice(["quorum", "classic"]), default="quorum",
    show_default=True, help="Type of the queue if it has to be declared.",
)  # fmt: skip
@url_option
def publish(
    queue: str,
    body: str | None,
    as_json: bool,
    queue_type: Literal["quorum", "classic"],
    url: str | None,
) -> None:
    """Publish BODY to QUEUE, or one message per line of stdin (BODY '-' or omitted).

    Every message is confirmed by the broker; the count is printed at the end. Empty lines
    are skipped.
    """
    if body is None and sys.stdin.isatty():
        raise click.UsageError("give BODY, or pipe messages on stdin (one per line) with '-'")
    source = _stdin_chunks() if body in (None, "-") else _one(body)
    count = asyncio.run(_publish(resolve(url), queue, source, as_json, queue_type))
    click.echo(f"published {count} message{'s' if count != 1 else ''} to {queue!r}, all confirmed")


def _one(body: str) -> Callable[[], list[tuple[int, str]]]:
    chunks = [[(0, body)]]  # line 0: BODY itself
    return lambda: chunks.pop() if chunks else []


def _stdin_chunks(size: int = 1000) -> Callable[[], list[tuple[int, str]]]:
    numbered = enumerate(sys.stdin, start=1)

    def read() -> list[tuple[int, str]]:
        chunk: list[tuple[int, str]] = []
        for number, line in numbered:
            if line.strip():
                chunk.append((number, line.rstrip("\r\n")))
                if len(chunk) >= size:
                    break
        return chunk

    return read


async def _publish(
    url: str,
    queue: str,
    source: Callable[[], list[tuple[int, str]]],
    as_json: bool,
    queue_type: Literal["quorum", "classic"],
) -> int:
    total = 0
    async with Producer(url, queue_type=queue_type, name="aio-workq publish") as producer:
        while chunk := await asyncio.to_thread(source):
            bodies: list[Any] = []
            for number, line in chunk:
                try:
                    body = json.loads(line) if as_json else line
                    encode_body(body)  # what publish_many would refuse midway (e.g. not UTF-8)
                except (ValueError, WorkqError) as exc:
                    what = "is not JSON" if not isinstance(exc, WorkqError) else "cannot be sent"
                    if not number:  # BODY, the one message
                        raise CliError(f"BODY {what} ({exc}); nothing was published") from None
                    if bodies:
                        await producer.publish_many(bodies, queue=queue)
                    done = total + len(bodies)
                    were = "message before it was" if done == 1 else "messages before it were"
                    raise CliError(
                        f"line {number} {what} ({exc}); the {done} {were} published and confirmed"
                    ) from None
                bodies.append(body)
            try:
                await producer.publish_many(bodies, queue=queue)
            except WorkqError as exc:
                raise CliError(
                    f"{exc} (publishing stopped; {total} earlier messages were confirmed)"
                ) from exc
            total += len(bodies)
    return total
