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
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiormq
from aiormq import spec
from aiormq.abc import AbstractChannel, DeliveredMessage

from .._exceptions import BrokerConnectionError, ConfigurationError, WorkqError
from .._hooks import Hook, Hooks
from .._link.connection import Backoff, Connection
from .._link.errors import translate_errors
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
_PERSISTENT = 2
_CHANNEL_CLOSE_GRACE = 5.0  # seconds for a polite channel close before the connection goes

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

    The lease and the state travel on a `Connection` of the library's own (a URL list is
    rotated, `amqps://` takes `ssl_context=`, errors are typed and logs hide the password);
    the ticks go through a `Producer` on the same settings.

    Args:
        url: the broker URL, several separated by commas, or a list (the nodes of a cluster);
            default: `AMQP_URL`, as `Producer` resolves it. Add `?heartbeat=5` to detect a
            partitioned active scheduler sooner.
        schedules: the `Schedule`s; more with `add()` or the `schedule()` decorator.
        identity: how `aio-workq schedules` names this process (default `host:pid`).
        retry_delay: seconds between attempts to reach the broker (default 1).
        producer: a started `Producer` to publish the ticks with (default: one of its own, on
            `url`, `ssl_context`, `name` and `hooks`).
        group: the prefix of the lease and state queues (default `workq.scheduler`): schedulers
            of one group elect one active among them; another group is independent.
        ssl_context: for `amqps://` URLs: the CA, client certificate and host-name checks.
        name: connection name shown in the management UI (default
            `aio-workq scheduler {identity}`).
        backoff: delays between rounds of failed reconnect attempts of the lease's connection
            (default `Backoff()`).
        hooks: `Hook`s told of connection losses and reconnects (and the ticks' publishes).

    Raises:
        ConfigurationError: two schedules of one name, or not a `Schedule`; an invalid URL,
            `ssl_context=` with an `amqp://` URL, or a hook that is not a `Hook`.
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
        ssl_context: ssl.SSLContext | None = None,
        name: str | None = None,
        backoff: Backoff | None = None,
        hooks: Iterable[Hook] | None = None,
    ) -> None:
        self.names = Names.of(group)
        self._url = resolve_url(url)
        self._schedules: dict[str, Schedule] = {}
        for item in schedules:
            self.add(item)
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self._retry_delay = _seconds("retry_delay", retry_delay)
        self._ssl_context = ssl_context
        self._name = name or f"aio-workq scheduler {self.identity}"
        self._backoff = backoff or Backoff()
        checked = Hooks.of(hooks)
        self._hooks: tuple[Hook, ...] = () if checked is None else checked.hooks
        self._connection()  # checks the settings now (nothing connects until run())
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

    def _connection(self) -> Connection:
        """A new (unopened) connection on this scheduler's settings.

        Raises:
            ConfigurationError: an invalid URL or setting.
        """
        return Connection(
            self._url,
            ssl_context=self._ssl_context,
            name=self._name,
            backoff=self._backoff,
            hooks=self._hooks or None,
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
        jitter: timedelta = timedelta(0),
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
                    jitter=jitter,
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
        can't reach the broker is simply not a candidate. Each failure is logged (one WARNING,
        its typed error, no password); a lost connection is reconnected with `backoff`.
        """
        del wait_for_broker
        self._stopping.clear()
        connection = self._connection()
        try:
            while not self._stopping.is_set():
                try:
                    if connection.is_closed:  # given up on after a channel that would not close
                        connection = self._connection()
                    await connection.open()
                    await self._session(connection)
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
            with contextlib.suppress(Exception):
                await connection.close()
            if self._own_producer and self._producer is not None:
                with contextlib.suppress(Exception):
                    await self._producer.close()
                self._producer = None

    async def _session(self, connection: Connection) -> None:
        """One channel on `connection`: be a candidate; while holding the lease, fire.

        Raises:
            BrokerConnectionError: the connection or the channel was lost (or never came).
            WorkqError: a declare or a publish failed.
        """
        lost = asyncio.Event()
        channel = await connection.channel(
            publisher_confirms=True, timeout=max(self._retry_delay, 10.0)
        )
        channel.closing.add_done_callback(lambda _: lost.set())
        watch = asyncio.ensure_future(_watch(connection, channel, lost))
        try:
            with translate_errors("taking part in the scheduler election"):
                await channel.basic_qos(prefetch_count=1)
                await declare_state(channel, self.names)
                # A lease message per session start: the queue keeps at most one ready.
                await _publish(channel, b"lease", exchange="", routing_key=self.names.lease)
                granted = asyncio.Event()

                async def on_lease(message: DeliveredMessage) -> None:
                    granted.set()  # held, never acked: the broker requeues it when we go

                await channel.basic_consume(self.names.lease, on_lease, no_ack=False)
            if not await _first(granted, lost, self._stopping):
                return
            self._set_active(True)
            log.info("scheduler %s is active", self.identity)
            try:
                firing = asyncio.ensure_future(self._fire(channel, lost))
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
                        with translate_errors("firing the schedules"):
                            await firing  # raises what stopped the firing
            finally:
                self._set_active(False)
                log.info("scheduler %s is no longer active", self.identity)
        finally:
            watch.cancel()
            await _release(channel, connection)

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
                ssl_context=self._ssl_context,
                name=self._name,
                hooks=self._hooks,
                on_reconnect="fail",
                fail_fast=True,
            )
            await self._producer.start()
        return self._producer

    async def _fire(self, channel: AbstractChannel, lost: asyncio.Event) -> None:
        producer = await self._publisher()
        state = await _read(channel, self.names.state)
        now = _now()
        reconcile(self._schedules, state, now)
        state.active = self.identity
        await _publish_state(channel, self.names, state, now)
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
                await channel.queue_declare(self.names.lease, passive=True)
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
                entry.next = schedule.next_pending(cursor=entry.cursor, now=now)
            if fired:
                await _publish_state(channel, self.names, state, _now())
            soonest = min(
                (
                    s.fire_at(e.next)
                    for n, s in self._schedules.items()
                    if (e := state.entries[n]).next
                ),
                default=None,
            )
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
        entry.next = schedule.next_pending(cursor=entry.cursor, now=now)
    for name in [n for n in state.entries if n not in schedules]:
        entry = state.entries[name]
        if (entry.last or entry.cursor) < now - RETAIN_UNKNOWN:
            log.info("schedule %r is unknown here and idle for a week: its state is dropped",
                     name)  # fmt: skip
            del state.entries[name]
        else:
            entry.next = None  # not fired by this version


async def _watch(connection: Connection, channel: AbstractChannel, lost: asyncio.Event) -> None:
    """Set `lost` once the connection or the channel is closed, should a close callback
    not come (belt and braces: holding a dead lease must never look like holding one)."""
    while not lost.is_set():
        if not connection.is_connected or channel.is_closed:
            lost.set()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_WATCH_EVERY):
                await lost.wait()


async def _release(channel: AbstractChannel, connection: Connection) -> None:
    """Close the lease's channel (the lease goes back to the broker); should the broker not
    answer in time, close the whole connection instead (its socket aborted if need be), so
    that a lease is never kept by a channel left open."""
    if channel.is_closed:
        return
    try:
        async with asyncio.timeout(_CHANNEL_CLOSE_GRACE):
            await channel.close()
    except Exception:  # any failure: the connection goes instead
        if not channel.is_closed:
            await connection.close(0)


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigurationError(f"{name} must be seconds > 0, got {value!r}")
    return float(value)


async def _first(granted: asyncio.Event, lost: asyncio.Event, stopping: asyncio.Event) -> bool:
    """Wait for the lease; False when the connection or the scheduler stops first."""
    await _any(granted, lost, stopping)
    if lost.is_set():
        raise BrokerConnectionError("the connection (or the channel) to the broker closed")
    return granted.is_set() and not stopping.is_set()


async def _any(*events: asyncio.Event) -> None:
    """Return once any of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def declare_state(channel: AbstractChannel, names: Names) -> None:
    """Declare the lease queue, the state exchange and its two last-value queues.

    Raises:
        aiormq.exceptions.AMQPError: a declare failed (the caller translates it).
    """
    await channel.queue_declare(names.lease, durable=True, arguments=_LEASE_ARGS)
    await channel.exchange_declare(names.state, exchange_type="fanout", durable=True)
    await channel.queue_declare(names.state, durable=True, arguments=_LAST_VALUE)
    await channel.queue_declare(names.status, durable=True, arguments=_LAST_VALUE)
    await channel.queue_bind(names.state, names.state, routing_key="")
    await channel.queue_bind(names.status, names.state, routing_key="")


async def _get(channel: AbstractChannel, queue: str) -> bytes | None:
    """The body of the newest message in `queue`, left in it (got, then requeued at once);
    None when the queue is empty."""
    message = await channel.basic_get(queue, no_ack=False)
    delivery = message.delivery
    if not isinstance(delivery, spec.Basic.GetOk) or delivery.delivery_tag is None:
        return None
    try:
        return message.body
    finally:
        await channel.basic_reject(delivery.delivery_tag, requeue=True)


async def _read(channel: AbstractChannel, queue: str) -> State:
    """The newest state message, left in its queue."""
    body = await _get(channel, queue)
    if body is None:
        return State()
    try:
        return State.decode(body)
    except ValueError as exc:
        log.error("the schedules state in %r is unreadable (%s): starting afresh", queue, exc)
        return State()


async def _publish(
    channel: AbstractChannel,
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    content_type: str | None = None,
) -> None:
    """Publish persistent `body` and wait for the broker's confirm.

    Raises:
        BrokerConnectionError: the broker nacked it (or the channel closed meanwhile).
    """
    confirm = await channel.basic_publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        properties=spec.Basic.Properties(delivery_mode=_PERSISTENT, content_type=content_type),
    )
    if not isinstance(confirm, spec.Basic.Ack):
        raise BrokerConnectionError(
            f"the broker did not confirm a message to {exchange or routing_key!r} "
            f"({type(confirm).__name__})"
        )


async def _publish_state(
    channel: AbstractChannel, names: Names, state: State, now: datetime
) -> None:
    state.updated = now
    await _publish(
        channel,
        state.encode(),
        exchange=names.state,
        routing_key="",
        content_type="application/json",
    )


async def read_status(
    url: URLs | None = None,
    *,
    group: str = GROUP,
    ssl_context: ssl.SSLContext | None = None,
) -> State | None:
    """The state the active scheduler last published (None before any), for `aio-workq
    schedules`.

    Raises:
        ConfigurationError: an invalid URL, or `ssl_context=` with an `amqp://` URL.
        AuthenticationError, AccessRefusedError, TLSError: the broker refused.
        BrokerConnectionError: the broker can't be reached.
    """
    names = Names.of(group)
    connection = Connection(url, ssl_context=ssl_context, name="aio-workq schedules")
    await connection.open()
    try:
        channel = await connection.channel()
        with translate_errors("reading the schedules' status"):
            try:  # passive: looking creates nothing
                await channel.queue_declare(names.status, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return None
            body = await _get(channel, names.status)
        return None if body is None else State.decode(body)
    finally:
        await connection.close()
