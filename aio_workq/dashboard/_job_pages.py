"""The job pages: look a job up by id (state, timeline, result or error), cancel it, and the
recent failures (when the store can list them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aio_workq import Producer

from ._actions import log
from ._http import Request, Response, quote_path
from ._site import PageError, Site, message_id

__all__ = ("JobPages",)


@dataclass(frozen=True, slots=True)
class _JobContext:
    """What a `JobHandle` needs to cancel: the store, and a producer to tell the workers."""

    store: Any
    publisher: Any


class JobPages:
    """The job pages' handlers; without a store, each says how to give one."""

    def __init__(
        self, *, site: Site, store: Any, producer: Callable[[], Awaitable[Producer]]
    ) -> None:
        self._site = site
        self._store = store
        self._producer = producer

    async def index(self, request: Request, match: dict[str, str]) -> Response:
        wanted = request.arg("id").strip()
        if wanted:
            return Response.redirect(request.link(f"/jobs/{quote_path(message_id(wanted))}"))
        failures: list[Any] = []
        recent = getattr(self._store, "recent", None)
        if recent is not None:
            failures = await recent(state="failed", limit=20)
        return self._site.render(
            request, "jobs.html", has_store=self._store is not None,
            can_list=recent is not None, failures=failures,
        )  # fmt: skip

    async def _record(self, job_id: str) -> Any:
        if self._store is None:
            raise PageError(
                404, "No job store",
                "job tracking is not configured: start the dashboard with --store "
                "sqlite:///path/jobs.db or postgresql://...",
            )  # fmt: skip
        record = await self._store.get(job_id)
        if record is None:
            raise PageError(
                404, "No such job",
                f"no record of job {job_id!r}: an unknown id, or past the store's TTL",
            )  # fmt: skip
        return record

    async def show(self, request: Request, match: dict[str, str]) -> Response:
        job_id = message_id(match["id"])
        record = await self._record(job_id)
        status = record.status
        timeline = [
            (label, moment)
            for label, moment in (
                ("created", status.created_at), ("started", status.started_at),
                ("next retry", status.next_retry_at), ("finished", status.finished_at),
                ("last change", status.updated_at),
            )
            if moment is not None
        ]  # fmt: skip
        result = None
        if record.result is not None:
            result = record.result[:4096].decode(errors="replace")
        return self._site.render(
            request, "job.html", job=status, timeline=timeline, result=result,
            content_type=record.content_type,
        )  # fmt: skip

    async def cancel(self, request: Request, match: dict[str, str]) -> Response:
        from aio_workq.jobs import JobHandle

        job_id = message_id(match["id"])
        caller = self._site.require_action(request, f"cancel job {job_id}")
        await self._record(job_id)
        producer = await self._producer()
        handle: JobHandle[Any] = JobHandle(job_id, context=_JobContext(self._store, producer))
        log.info("action: cancel job %s, by %s", job_id, caller)
        status = await handle.cancel()
        log.info("action done: cancel job %s, by %s: now %s", job_id, caller, status.state)
        return Response.redirect(request.link(f"/jobs/{quote_path(job_id)}"))
