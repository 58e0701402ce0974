"""The active scheduler's work: read the state, fire the ticks due, record them.

Each tick: the job is published with publisher confirms and the message id
`{schedule}:{due time in UTC}`; only then is the new state (the last tick fired per schedule)
published, confirmed, to the state queue. A failover between the two makes the next active
scheduler fire that tick again with the same message id (a duplicate a consumer can drop by id),
never skip it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from .._exceptions import (
    ConfigurationError,
    PublishNackedError,
    SerializationError,
    TopologyError,
    UnroutableError,
)
from .._publish.producer import Producer
from ._broker import publish_state, read_state
from ._guard import Guard
from ._lease import Lease
from ._spec import Schedule, tick_id
from ._state import RETAIN_UNKNOWN, Entry, State

__all__ = ("DUE_HEADER", "SCHEDULE_HEADER", "Firing", "reconcile")

log = logging.getLogger("aio_workq.schedules")

SCHEDULE_HEADER = "x-workq-schedule"
DUE_HEADER = "x-workq-due"
_MAX_PAUSE = 5.0  # seconds between rounds at most (a stop is noticed at once regardless)
_REFUSED_PAUSE = 5.0  # seconds before a refused tick is tried again (the others go on)
# What the broker or the producer refuses for one schedule's tick (its queue, its message):
# the other schedules go on and the term lasts. A lost connection or a publish timeout ends
# the term instead (the next active scheduler fires what was not recorded, with the same ids).
_TICK_REFUSALS = (
    TopologyError,
    PublishNackedError,
    UnroutableError,
    SerializationError,
    ConfigurationError,
)


_EARLIEST = datetime.min.replace(tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


class Firing:
    """Fires `schedules` while this process holds `lease` and `guard`, until `stopping` is set
    or either is lost.

    Args:
        schedules: the schedules by name.
        lease: the held lease; the state travels on its channel.
        guard: the held guard (the fence against a second active scheduler).
        producer: a started producer for the ticks.
        identity: recorded in the state as the active process.
        stopping: set to stop after the tick being published is recorded.
        on_fired: called after each confirmed tick.
    """

    def __init__(
        self,
        schedules: Mapping[str, Schedule],
        *,
        lease: Lease,
        guard: Guard,
        producer: Producer,
        identity: str,
        stopping: asyncio.Event,
        on_fired: Callable[[], None],
    ) -> None:
        self._schedules = schedules
        self._lease = lease
        self._guard = guard
        self._producer = producer
        self._identity = identity
        self._stopping = stopping
        self._on_fired = on_fired
        self._refused_until: dict[str, datetime] = {}  # schedule -> when to try its tick again

    def _lost(self) -> bool:
        return self._lease.lost.is_set() or self._guard.lost.is_set()

    def _ending(self) -> bool:
        return self._stopping.is_set() or self._lost()

    async def run(self) -> None:
        """Read the state (the guard is held by now: no other scheduler fires), then fire
        round after round.

        Raises:
            aiormq.exceptions.AMQPError, ConnectionError: the lease's channel failed.
            PublishError, BrokerConnectionError: a tick or the state was not confirmed.
        """
        channel, names = self._lease.channel, self._lease.names
        state = await read_state(channel, names)
        now = _now()
        reconcile(self._schedules, state, now)
        state.active = self._identity
        await publish_state(channel, names, state, now)
        while not self._ending():
            fired = await self._round(state)
            if fired is None:
                return  # the lease or guard is lost: nothing more can be published or recorded here
            if fired:
                await publish_state(channel, names, state, _now())
            await self._pause(state)
        if not self._lost():
            # A stop: no process fires now (the next active scheduler records its own name),
            # which `aio-workq schedules` and the dashboard say.
            state.active = ""
            await publish_state(channel, names, state, _now())

    async def _round(self, state: State) -> bool | None:
        """Fire every tick due now, oldest first per schedule; True if any was fired, None if
        the lease or the guard was lost meanwhile."""
        now = _now()
        fired = False
        plans = {
            name: []
            if self._refused_until.get(name, now) > now
            else schedule.plan(cursor=state.entries[name].cursor, now=now)
            for name, schedule in self._schedules.items()
        }
        if any(plans.values()):
            await self._lease.confirm_held()
            await self._guard.confirm_held()
        for schedule in self._schedules.values():
            entry = state.entries[schedule.name]
            for due in plans[schedule.name]:
                if self._lost():
                    return None
                if self._stopping.is_set():
                    break  # record what was fired, then go
                try:
                    await self._publish(schedule, due)
                except _TICK_REFUSALS as exc:
                    self._refused(schedule, due, exc)
                    break  # its later ticks wait: a tick never fires before the one due before
                self._refused_until.pop(schedule.name, None)
                entry.cursor = entry.last = due
                fired = True
            entry.next = schedule.next_pending(cursor=entry.cursor, now=now)
        return fired

    def _refused(self, schedule: Schedule, due: datetime, exc: Exception) -> None:
        """One schedule's tick was refused: say which and why; try it again later."""
        self._refused_until[schedule.name] = _now() + timedelta(seconds=_REFUSED_PAUSE)
        log.warning(
            "schedule %r: tick %s was not published: %s: %s; the other schedules go on, "
            "this one is tried again in %.0f s",
            schedule.name,
            tick_id(schedule.name, due),
            type(exc).__name__,
            exc,
            _REFUSED_PAUSE,
        )

    async def _publish(self, schedule: Schedule, due: datetime) -> None:
        await self._producer.publish(
            {} if schedule.body is None else schedule.body,
            schedule.queue,
            message_id=tick_id(schedule.name, due),
            headers={
                **schedule.headers,
                SCHEDULE_HEADER: schedule.name,
                DUE_HEADER: due.isoformat(),
            },
        )
        self._on_fired()

    async def _pause(self, state: State) -> None:
        """Wait until the next tick's fire time (at most `_MAX_PAUSE`), or a stop."""
        fire_times = [
            max(schedule.fire_at(entry.next), self._refused_until.get(name, _EARLIEST))
            for name, schedule in self._schedules.items()
            if (entry := state.entries[name]).next is not None
        ]
        soonest = min(fire_times, default=None)
        pause = _MAX_PAUSE if soonest is None else (soonest - _now()).total_seconds()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(max(pause, 0.0), _MAX_PAUSE)):
                await self._stopping.wait()


def reconcile(schedules: Mapping[str, Schedule], state: State, now: datetime) -> None:
    """New schedules start from now; changed ones from their last tick fired, at most `grace`
    back (a tick of the new spec due during a rolling deploy's handover fires, as after any
    failover; none older); unknown ones are kept a while, then dropped."""
    for name, schedule in schedules.items():
        entry = state.entries.get(name)
        fingerprint = schedule.fingerprint()
        if entry is None:
            entry = state.entries[name] = Entry(cursor=now, fingerprint=fingerprint)
        elif entry.fingerprint != fingerprint:
            log.info(
                "schedule %r changed: it fires on its new spec from its last tick fired "
                "(at most %s back)", name, schedule.grace,
            )  # fmt: skip
            # Never back before the old cursor: no tick id fires twice (a flip-flop of two
            # versions during a deploy, specs whose due times coincide).
            cursor = max(entry.cursor, now - schedule.grace)
            entry = Entry(cursor=cursor, fingerprint=fingerprint, last=entry.last)
            state.entries[name] = entry
        entry.describe = schedule.describe()
        entry.tz = schedule.tz
        entry.queue = schedule.queue_name
        entry.next = schedule.next_pending(cursor=entry.cursor, now=now)
    for name in [n for n in state.entries if n not in schedules]:
        entry = state.entries[name]
        if (entry.last or entry.cursor) < now - RETAIN_UNKNOWN:
            log.info("schedule %r is unknown here and idle for a week: its state is dropped",
                     name)  # fmt: skip
            del state.entries[name]
        else:
            entry.next = None  # not fired by this version
