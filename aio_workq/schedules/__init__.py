"""Periodic jobs that fire once: cron or interval schedules, one active scheduler per broker.

Run a `Scheduler` in every replica; the broker elects one active scheduler (a single-active
consumer of `workq.scheduler.lease`), which publishes each tick once, with the message id
`{schedule}:{due time in UTC}`, and keeps each schedule's last tick on the broker. Cron schedules
need the `schedules` extra (`pip install 'aio-workq[schedules]'`, for `cronsim`).
"""

from __future__ import annotations

from ._broker import GROUP as GROUP
from ._broker import LEASE_QUEUE as LEASE_QUEUE
from ._broker import STATE_QUEUE as STATE_QUEUE
from ._broker import STATUS_QUEUE as STATUS_QUEUE
from ._broker import read_status as read_status
from ._scheduler import Scheduler as Scheduler
from ._spec import Schedule as Schedule
from ._spec import tick_id as tick_id
from ._state import Entry as Entry
from ._state import State as State

__all__ = (
    "GROUP",
    "LEASE_QUEUE",
    "STATE_QUEUE",
    "STATUS_QUEUE",
    "Entry",
    "Schedule",
    "Scheduler",
    "State",
    "read_status",
    "tick_id",
)
