"""`aio-workq job ID --store URL`: one job's status, read from the job store."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click

from aio_workq import redact_url

__all__ = ("job",)


@click.command("job")
@click.argument("job_id")
@click.option(
    "--store", metavar="URL", required=True, envvar="AIO_WORKQ_STORE", show_envvar=True,
    help="The job store: sqlite:///path/jobs.db or postgresql://...",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="JSON instead of lines.")
def job(job_id: str, store: str, as_json: bool) -> None:
    """One job's status from the job store: state, task, queue, attempt, times, error, result.

    Exit code 1 when the store has no such job (never enqueued with this store, or past its
    TTL). The dashboard's Jobs page shows the same (`aio-workq dashboard --store URL`).
    """
    from aio_workq.jobs import JobNotFoundError

    document = asyncio.run(_read(store, job_id))
    if document is None:
        raise JobNotFoundError(
            f"no job {job_id!r} in the store at {redact_url(store)} (never recorded there, "
            "past its TTL, or enqueued while the store was down and not run yet)",
            job_id=job_id,
        )
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    width = max(len(key) for key in document)
    for key, value in document.items():
        if value is not None and value is not False:
            click.echo(f"{key.ljust(width)}  {value}")


async def _read(url: str, job_id: str) -> dict[str, Any] | None:
    from aio_workq.jobs._from_url import store_from_url  # not the dashboard's: no jinja2

    store = store_from_url(url)
    try:
        record = await store.get(job_id)
    finally:
        await store.close()
    if record is None:
        return None
    status = record.status
    result = None
    if record.result is not None:
        result = record.result.decode("utf-8", errors="replace")
    return {
        "job_id": status.job_id,
        "state": status.state.value,
        "task": status.task,
        "queue": status.queue,
        "attempt": status.attempt,
        "created_at": _iso(status.created_at),
        "started_at": _iso(status.started_at),
        "finished_at": _iso(status.finished_at),
        "next_retry_at": _iso(status.next_retry_at),
        "cancel_requested": status.cancel_requested,
        "error_type": status.error_type,
        "error_message": status.error_message,
        "result": result,
    }


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat())
