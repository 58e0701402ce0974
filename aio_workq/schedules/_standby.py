"""A standby scheduler's one look at what the active scheduler of its group fires.

Only the active scheduler fires, and only its own schedules. Schedulers of two services that
share a group (the default one, say) elect one between them, and the other service's schedules
never fire, silently: its replicas stand by. So a scheduler that has stood by for
`STANDBY_CHECK` seconds reads the status the active one recorded, once, and logs one WARNING
naming its schedules that the active one does not fire (unknown to it, or on another spec or
queue). During a rolling deploy a new version's new schedules are such schedules too, until the
new version is active: the warning says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Mapping

import aiormq

from .._exceptions import WorkqError
from .._link.settings import URLs
from ._broker import read_status
from ._spec import Schedule
from ._state import Entry

__all__ = ("STANDBY_CHECK", "check_standby", "standing_by")

log = logging.getLogger("aio_workq.schedules")

STANDBY_CHECK = 30.0
"""Seconds a scheduler stands by before it looks at what the active one fires."""


def _fired_elsewhere(schedule: Schedule, entry: Entry | None) -> bool:
    """Whether the active scheduler fires `schedule` as this process would."""
    return (
        entry is not None
        and entry.next is not None  # known to the active one (unknown ones are kept a while)
        and entry.fingerprint == schedule.fingerprint()
        and entry.queue == schedule.queue_name
    )


async def check_standby(
    schedules: Mapping[str, Schedule],
    *,
    url: URLs,
    group: str,
    identity: str,
    ssl_context: ssl.SSLContext | None,
) -> None:
    """After `STANDBY_CHECK` seconds (cancelled once this process is active), warn once if
    the active scheduler of `group` does not fire some of `schedules`."""
    if not schedules:
        return
    await asyncio.sleep(STANDBY_CHECK)
    try:
        state = await read_status(url, group=group, ssl_context=ssl_context)
    except (WorkqError, aiormq.exceptions.AMQPError, OSError, ValueError):
        return  # a look, not a duty: the election goes on regardless
    if state is None or not state.active:
        return  # none is active, or the last one stopped: the lease comes here soon
    unfired = [n for n, s in schedules.items() if not _fired_elsewhere(s, state.entries.get(n))]
    if unfired:
        log.warning(
            "scheduler %s stands by in group %r, and the active scheduler (%s) does not fire "
            "its schedule(s) %s as this process would: only the active one fires, its own "
            "schedules. If another service's schedulers share this group, give each service "
            "its own, Scheduler(group=...); during a rolling deploy this passes once the new "
            "version is active",
            identity, group, state.active, ", ".join(repr(n) for n in sorted(unfired)),
        )  # fmt: skip


@contextlib.asynccontextmanager
async def standing_by(
    schedules: Mapping[str, Schedule],
    *,
    url: URLs,
    group: str,
    identity: str,
    ssl_context: ssl.SSLContext | None,
) -> AsyncIterator[None]:
    """While the block waits for the lease, `check_standby` runs beside it (on a copy of
    `schedules`); it is cancelled when the block ends."""
    look = asyncio.create_task(
        check_standby(
            dict(schedules), url=url, group=group, identity=identity, ssl_context=ssl_context
        )
    )
    try:
        yield
    finally:
        look.cancel()
        await asyncio.gather(look, return_exceptions=True)
