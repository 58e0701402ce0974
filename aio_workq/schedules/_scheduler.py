"""The scheduler: every replica runs one; the broker makes exactly one of them active.

Election: every replica consumes the quorum queue `workq.scheduler.lease`, declared with
`x-single-active-consumer`, with a prefetch of 1. RabbitMQ delivers only to the active consumer;
the replica that holds the lease message (never acked) is the active scheduler. When its
connection ends (a stop, `kill -9`: the kernel closes the socket at once; a partition: after the
heartbeat timeout), the broker requeues the lease and makes the next consumer active.

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
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue

from .._exceptions import BrokerConnectionError, ConfigurationError, WorkqError
from .._link.settings import URLs, redact_url, resolve_url
from .._link.specs import Queue
from .._publish.producer import Producer
from .._wire.frames import NAME_PATTERN
from ._spec import Misfire, Schedule, tick_id
from ._state import RETAIN_UNKNOWN, Entry, State

__all__ = (
    "GROUP",
    "LEASE_QUEUE",
    "STATE_EXCHANGE",
    "STATE_QUEUE",
    "STATUS_QUEUE",
    "Names",
    "Scheduler",
    "declare_state",
    "read_status",
)

log = logging.getLogger("aio_workq.schedules")

GROUP = "workq.scheduler"
LEASE_QUEUE = f"{GROUP}.lease"
STATE_EXCHANGE = f"{GROUP}.state"
STATE_QUEUE = f"{GROUP}.state"
STATUS_QUEUE = f"{GROUP}.status"
SCHEDULE_HEADER = "x-workq-schedule"
DUE_HEADER = "x-workq-due"

_LAST_VALUE: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-max-length": 1,
    "x-overflow": "drop-head",
}
_LEASE_ARGS: dict[str, Any] = {**_LAST_VALUE, "x-single-active-consumer": True}
_BROKER_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, asyncio.TimeoutError)

_STOP_GRACE = 35.0  # seconds a stop waits for the tick being published (publish timeout 30 s)
_WATCH_EVERY = 0.5  # seconds between looks at the connection's and channel's state
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Names:
    """The broker objects of one scheduler group."""

    lease: str
    state: str
    status: str

    @classmethod
    def of(cls, group: str) -> Names:
        """The names for `group`.

        Raises:
            ConfigurationError: `group` is not a valid queue name prefix.
        """
        if not isinstance(group, str) or not group or not NAME_PATTERN.match(group):
            raise ConfigurationError(
                f"group {group!r} is invalid: use letters, digits, '-', '_', '.' and ':'"
            )
        return cls(lease=f"{group}.lease", state=f"{group}.state", status=f"{group}.status")


def _now() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    """Fires `Schedule`s from whichever replica the broker makes active.

    Run one in every replica (`run_workers(..., schedules=scheduler)` or
    `aio-workq worker ... --schedules MODULE:ATTR`); see the guide *Periodic jobs*.

    Args:
        url: the broker URL (default: `AMQP_URL`, as `Producer` resolves it). Add
            `?heartbeat=5` to detect a partitioned active scheduler sooner.
        schedules: the `Schedule`s; more with `add()` or the `schedule()` decorator.
        identity: how `aio-workq schedules` names this process (default `host:pid`).
        retry_delay: seconds between attempts to reach the broker (default 1).
        producer: a started `Producer` to publish the ticks with (default: one of its own).
        group: the prefix of the lease and state queues (default `workq.scheduler`): schedulers
            of one group elect one active among them; another group is independent.

    Raises:
        ConfigurationError: two schedules of one name, or not a `Schedule`.
    """

    def __init__(
        self,
        url: URLs | None = None,
        schedules: Iterable[Schedule] = (),
        *,
        identity: str | None = None,
        retry_delay: float = 1.0,
        producer: Producer | None = None,
        group: str = GROUP,
    ) -> None:
        self.names = Names.of(group)
        self._url = resolve_url(url)
        self._schedules: dict[str, Schedule] = {}
        for item in schedules:
            self.add(item)
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self._retry_delay = _seconds("retry_delay", retry_delay)
        self._producer = producer
        self._own_producer = producer is None
        self._stopping = asyncio.Event()
        self._active = asyncio.Event()
        self._fired = 0
        self.on_active: Callable[[bool], None] | None = None
        """Called with True when this process becomes the active scheduler, False when not."""

    def __repr__(self) -> str:
        return (
            f"<Scheduler {self.identity} {redact_url(self._url)} "
            f"schedules={sorted(self._schedules)} active={self.active}>"
        )

    # --- declaring ----------------------------------------------------------------------------

    @property
    def schedules(self) -> Mapping[str, Schedule]:
        """The schedules by name."""
        return dict(self._schedules)

    def add(self, schedule: Schedule) -> None:
        """Add a schedule.

        Raises:
            ConfigurationError: not a `Schedule`, or its name is taken.
        """
        if not isinstance(schedule, Schedule):
            raise ConfigurationError(f"expected a Schedule, got {type(schedule).__name__}")
        if schedule.name in self._schedules:
            raise ConfigurationError(
                f"two schedules named {schedule.name!r}: schedule names must be unique"
            )
        self._schedules[schedule.name] = schedule

    def schedule(
        self,
        name: str | None = None,
        *,
        queue: str | Queue | None = None,
        cron: str | None = None,
        every: timedelta | None = None,
        tz: str = "UTC",
        body: Any = None,
        misfire: Misfire = "skip",
        catch_up_limit: int = 10,
        start: datetime | None = None,
    ) -> Callable[[F], F]:
        """Decorate a handler: its schedule publishes to `queue` (default: the handler's name).

        The handler is returned unchanged; run it with a `Worker` on that queue.

        Raises:
            ConfigurationError: see `Schedule`.
        """

        def decorate(handler: F) -> F:
            label = name or handler.__name__
            self.add(
                Schedule(
                    label,
                    queue=queue or handler.__name__,
                    cron=cron,
                    every=every,
                    tz=tz,
                    body=body,
                    misfire=misfire,
                    catch_up_limit=catch_up_limit,
                    start=start,
                )
            )
            return handler

        return decorate

    # --- running ------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while this process holds the lease and fires the ticks."""
        return self._active.is_set()

    @property
    def fired(self) -> int:
        """Ticks this process published (confirmed)."""
        return self._fired

    async def wait_active(self) -> None:
        """Return once this process is the active scheduler."""
        await self._active.wait()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop: the tick being published is confirmed and recorded, then the lease goes back
        to the broker (the next candidate is active at once)."""
        del timeout  # a round is bounded by the producer's publish timeout
        self._stopping.set()

    async def run(self, wait_for_broker: float | None = None) -> None:
        """Take part in the election until `stop()`; fire the ticks while active.

        Broker outages are retried every `retry_delay` seconds, without end: a replica that
        can't reach the broker is simply not a candidate.
        """
        del wait_for_broker
        self._stopping.clear()
        try:
            while not self._stopping.is_set():
                try:
                    await self._session()
                except (*_BROKER_ERRORS, WorkqError) as exc:
                    log.warning(
                        "scheduler %s: %s: %s; retrying in %.1f s",
                        self.identity,
                        type(exc).__name__,
                        exc,
                        self._retry_delay,
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._retry_delay):
                        await self._stopping.wait()
        finally:
            if self._own_producer and self._producer is not None:
                with contextlib.suppress(Exception):
                    await self._producer.close()
                self._producer = None

    async def _session(self) -> None:
        """One connection: be a candidate; while holding the lease, fire."""
        connection = await aio_pika.connect(
            self._url,
            timeout=10,
            client_properties={"connection_name": f"aio-workq scheduler {self.identity}"},
        )
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        channel: AbstractChannel | None = None
        watch = asyncio.ensure_future(_watch(connection, lambda: channel, lost))
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            channel.close_callbacks.add(lambda *_: lost.set())
            await channel.set_qos(prefetch_count=1)
            lease, exchange, state_queue = await declare_state(channel, self.names)
            # A lease message per session start: the queue keeps at most one ready.
            await channel.default_exchange.publish(
                aio_pika.Message(b"lease", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=self.names.lease,
            )
            granted = asyncio.Event()

            async def on_lease(message: AbstractIncomingMessage) -> None:
                granted.set()  # held, never acked: the broker requeues it when we go

            await lease.consume(on_lease, no_ack=False)
            if not await _first(granted, lost, self._stopping):
                return
            self._set_active(True)
            log.info("scheduler %s is active", self.identity)
            try:
                firing = asyncio.ensure_future(self._fire(channel, exchange, state_queue, lost))
                ended = asyncio.ensure_future(_any(self._stopping, lost))
                try:
                    await asyncio.wait({firing, ended}, return_when=asyncio.FIRST_COMPLETED)
                    if not lost.is_set() and not firing.done():
                        # A stop: the tick being published is recorded before the lease goes.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(_STOP_GRACE):
                                await asyncio.shield(firing)
                finally:
                    for task in (firing, ended):
                        task.cancel()
                    await asyncio.gather(ended, return_exceptions=True)
                    with contextlib.suppress(asyncio.CancelledError):
                        await firing  # raises what stopped the firing
            finally:
                self._set_active(False)
                log.info("scheduler %s is no longer active", self.identity)
        finally:
            watch.cancel()
            with contextlib.suppress(Exception):
                await connection.close()

    def _set_active(self, active: bool) -> None:
        if active:
            self._active.set()
        else:
            self._active.clear()
        if self.on_active is not None:
            self.on_active(active)

    async def _publisher(self) -> Producer:
        if self._producer is None:
            # A tick whose publish the connection took down is not re-sent later by a process
            # that may no longer be active: the next active scheduler fires it (same id).
            self._producer = Producer(
                self._url,
                name=f"aio-workq scheduler {self.identity}",
                on_reconnect="fail",
                fail_fast=True,
            )
            await self._producer.start()
        return self._producer

    async def _fire(
        self,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        state_queue: AbstractQueue,
        lost: asyncio.Event,
    ) -> None:
        producer = await self._publisher()
        state = await _read(state_queue)
        now = _now()
        reconcile(self._schedules, state, now)
        state.active = self.identity
        await _publish_state(exchange, state, now)
        while not self._stopping.is_set() and not lost.is_set():
            now = _now()
            fired = False
            plans = {
                name: schedule.plan(cursor=state.entries[name].cursor, now=now)
                for name, schedule in self._schedules.items()
            }
            if any(plans.values()):
                # One round trip on the lease's channel first: a process that was frozen (a
                # partition, SIGSTOP) and has lost the lease learns it here, not after firing.
                await channel.get_queue(self.names.lease, ensure=True)
            for schedule in self._schedules.values():
                entry = state.entries[schedule.name]
                for due in plans[schedule.name]:
                    if lost.is_set():
                        return  # nothing more can be published or recorded on this connection
                    if self._stopping.is_set():
                        break  # record what was fired, then go
                    await producer.publish(
                        {} if schedule.body is None else schedule.body,
                        schedule.queue,
                        message_id=tick_id(schedule.name, due),
                        headers={
                            **schedule.headers,
                            SCHEDULE_HEADER: schedule.name,
                            DUE_HEADER: due.isoformat(),
                        },
                    )
                    self._fired += 1
                    entry.cursor = entry.last = due
                    fired = True
                entry.next = schedule.next_after(max(entry.cursor, now))
            if fired:
                await _publish_state(exchange, state, _now())
            soonest = min((e.next for e in state.entries.values() if e.next), default=None)
            pause = 5.0 if soonest is None else (soonest - _now()).total_seconds()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(max(pause, 0.0), 5.0)):
                    await self._stopping.wait()


def reconcile(schedules: Mapping[str, Schedule], state: State, now: datetime) -> None:
    """New or changed schedules start from now; unknown ones are kept a while, then dropped."""
    for name, schedule in schedules.items():
        entry = state.entries.get(name)
        fingerprint = schedule.fingerprint()
        if entry is None or entry.fingerprint != fingerprint:
            if entry is not None:
                log.info("schedule %r changed: it fires on its new spec from now", name)
            entry = Entry(
                cursor=now, fingerprint=fingerprint, last=None if entry is None else entry.last
            )
            state.entries[name] = entry
        entry.describe = schedule.describe()
        entry.tz = schedule.tz
        entry.queue = schedule.queue_name
        entry.next = schedule.next_after(max(entry.cursor, now))
    for name in [n for n in state.entries if n not in schedules]:
        entry = state.entries[name]
        if (entry.last or entry.cursor) < now - RETAIN_UNKNOWN:
            log.info("schedule %r is unknown here and idle for a week: its state is dropped",
                     name)  # fmt: skip
            del state.entries[name]
        else:
            entry.next = None  # not fired by this version


async def _watch(
    connection: aio_pika.abc.AbstractConnection,
    channel: Callable[[], AbstractChannel | None],
    lost: asyncio.Event,
) -> None:
    """Set `lost` once the connection or the channel is closed, should a close callback
    not come (belt and braces: holding a dead lease must never look like holding one)."""
    while not lost.is_set():
        current = channel()
        if connection.is_closed or (current is not None and current.is_closed):
            lost.set()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_WATCH_EVERY):
                await lost.wait()


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigurationError(f"{name} must be seconds > 0, got {value!r}")
    return float(value)


async def _first(granted: asyncio.Event, lost: asyncio.Event, stopping: asyncio.Event) -> bool:
    """Wait for the lease; False when the connection or the scheduler stops first."""
    await _any(granted, lost, stopping)
    if lost.is_set():
        raise ConnectionError("the connection to the broker closed")
    return granted.is_set() and not stopping.is_set()


async def _any(*events: asyncio.Event) -> None:
    """Return once any of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def declare_state(
    channel: AbstractChannel, names: Names
) -> tuple[AbstractQueue, AbstractExchange, AbstractQueue]:
    """Declare the lease queue, the state exchange and its two last-value queues."""
    lease = await channel.declare_queue(names.lease, durable=True, arguments=_LEASE_ARGS)
    exchange = await channel.declare_exchange(
        names.state, aio_pika.ExchangeType.FANOUT, durable=True
    )
    state_queue = await channel.declare_queue(names.state, durable=True, arguments=_LAST_VALUE)
    status_queue = await channel.declare_queue(names.status, durable=True, arguments=_LAST_VALUE)
    await state_queue.bind(exchange)
    await status_queue.bind(exchange)
    return lease, exchange, state_queue


async def _read(queue: AbstractQueue) -> State:
    """The newest state message, left in its queue (got, then requeued at once)."""
    message = await queue.get(no_ack=False, fail=False)
    if message is None:
        return State()
    try:
        return State.decode(message.body)
    except ValueError as exc:
        log.error("the schedules state in %r is unreadable (%s): starting afresh", queue.name, exc)
        return State()
    finally:
        await message.reject(requeue=True)


async def _publish_state(exchange: AbstractExchange, state: State, now: datetime) -> None:
    state.updated = now
    await exchange.publish(
        aio_pika.Message(
            state.encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key="",
    )


async def read_status(url: URLs | None = None, *, group: str = GROUP) -> State | None:
    """The state the active scheduler last published (None before any), for `aio-workq
    schedules`.

    Raises:
        BrokerConnectionError: the broker can't be reached.
    """
    names = Names.of(group)
    target = resolve_url(url)
    try:
        connection = await aio_pika.connect(target, timeout=10)
    except (*_BROKER_ERRORS,) as exc:
        raise BrokerConnectionError(f"cannot reach {redact_url(target)}: {exc}") from None
    try:
        channel = await connection.channel()
        try:  # passive: looking creates nothing
            queue = await channel.get_queue(names.status, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            return None
        try:
            return State.decode(message.body)
        finally:
            await message.reject(requeue=True)
    finally:
        await connection.close()
