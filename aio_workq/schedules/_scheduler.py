"""The scheduler: every replica runs one; the broker makes exactly one of them active.

The pieces: `_lease` (the election: a candidacy per channel, the lease held by the single
active consumer), `_guard` (the fence: an exclusive queue one connection holds while it fires),
`_firing` (the active scheduler's rounds of ticks and their record),
`_broker` (the group's queues and the confirmed messages in them), `_spec` (when a schedule is
due) and `_state` (what is recorded). `Scheduler` ties them together: its settings, its
schedules, and its run: reconnect, stand, fire while active, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar

import aiormq

from .._exceptions import ConfigurationError, IntegrationError, WorkqError
from .._hooks import Hook, Hooks
from .._link.connection import Backoff, Connection
from .._link.errors import translate_errors
from .._link.settings import URLs, check_seconds, redact_url, resolve_url
from .._link.specs import Queue
from .._publish.producer import Producer
from ._broker import GROUP, Names
from ._firing import Firing
from ._guard import Guard
from ._lease import Lease, any_of
from ._spec import Misfire, Schedule
from ._standby import standing_by

__all__ = ("Scheduler",)

log = logging.getLogger("aio_workq.schedules")

_BROKER_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, asyncio.TimeoutError)
_STOP_GRACE = 35.0  # seconds a stop waits for the tick being published (publish timeout 30 s)
F = TypeVar("F", bound=Callable[..., Any])


class _Declared:
    """What a `Scheduler` fires: its schedules, declared when it is made, with `add()` or with
    the `schedule()` decorator."""

    def __init__(self, schedules: Iterable[Schedule]) -> None:
        self._schedules: dict[str, Schedule] = {}
        for item in schedules:
            self.add(item)

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


class Scheduler(_Declared):
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
        identity: how `aio-workq schedules` names this process (default `host:pid`, of the
            process that runs it: a scheduler made before `fork()` names the child).
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

    _lease_type: ClassVar[type[Lease]] = Lease
    """The election (a seam: a test subclass stands with a lease that is granted at once, as
    the broker did once for two standbys after a node failure)."""
    _guard_type: ClassVar[type[Guard]] = Guard
    """The fence (a seam: a test subclass goes without it, to show what it prevents)."""

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
        self._group = group
        self._url = resolve_url(url)
        super().__init__(schedules)
        self._identity = identity
        self._retry_delay = check_seconds("retry_delay", retry_delay)
        self._ssl_context = ssl_context
        self._given_name = name
        self._backoff = backoff or Backoff()
        checked = Hooks.of(hooks)
        self._hooks: tuple[Hook, ...] = () if checked is None else checked.hooks
        self._connection()  # checks the settings now (nothing connects until run())
        self._producer = producer
        self._own_producer = producer is None
        self._loop: asyncio.AbstractEventLoop | None = None  # the events' (`_bind`)
        self._running = False
        self._stopping = asyncio.Event()
        self._hurry = _Deadline()  # a stop's timeout passed: give up the tick, abort
        self._active = asyncio.Event()
        self._fired = 0
        self.on_active: Callable[[bool], None] | None = None
        """Called with True when this process becomes the active scheduler, False when not."""

    @property
    def identity(self) -> str:
        """How `aio-workq schedules` names this process: the one given, or `host:pid` of the
        process asking (read when used, so a scheduler made before `fork()` names the child)."""
        return self._identity or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def _name(self) -> str:
        return self._given_name or f"aio-workq scheduler {self.identity}"

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

    # --- running ------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while this process holds the lease and the guard, and fires the ticks."""
        return self._active.is_set()

    @property
    def fired(self) -> int:
        """Ticks this process published (confirmed)."""
        return self._fired

    async def wait_active(self) -> None:
        """Return once this process is the active scheduler.

        Raises:
            IntegrationError: the scheduler runs on another event loop.
        """
        self._bind()
        await self._active.wait()

    def _bind(self) -> None:
        """Its events on the running loop: fresh ones on a loop other than the last run's (a
        scheduler made once, run by a second `asyncio.run()`; asyncio's events belong to one).

        Raises:
            IntegrationError: it runs on another loop now (a call from another thread).
        """
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        if self._running:
            raise IntegrationError(
                f"scheduler {self.identity} runs on another event loop: call it from that "
                "loop (from another thread: loop.call_soon_threadsafe, "
                "asyncio.run_coroutine_threadsafe)"
            )
        self._loop = loop
        self._stopping, self._active, self._hurry = asyncio.Event(), asyncio.Event(), _Deadline()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop: the tick being published is confirmed and recorded, then the lease goes back
        to the broker (the next candidate is active at once).

        Args:
            timeout: seconds to wait for that (default: the publish's own bound, 35 s, and 5 s
                for each polite close after it). Past them, `run()` gives the tick up and
                aborts its connections within about a second more: the broker frees the lease
                and the guard as after a kill, and the next active scheduler fires whatever
                was not recorded, with the same message ids. `run_workers` passes 0 on a
                second signal.

        Raises:
            ConfigurationError: `timeout` is not a number of seconds >= 0 (nothing stops).
            IntegrationError: the scheduler runs on another event loop.
        """
        seconds = None if timeout is None else check_seconds("timeout", timeout, zero=True,
                                                             forever=True)  # fmt: skip
        self._bind()
        self._stopping.set()
        if seconds is not None and not math.isinf(seconds):
            self._hurry.start(seconds)

    async def run(self, wait_for_broker: float | None = None) -> None:
        """Take part in the election until `stop()`; fire the ticks while active.

        Broker outages are retried every `retry_delay` seconds, without end: a replica that
        can't reach the broker is simply not a candidate. Each failure is logged (one WARNING,
        its typed error, no password); a lost connection is reconnected with `backoff`.
        A scheduler that stopped may run again, on another event loop too.

        Raises:
            IntegrationError: it runs already (on this loop or another one).
        """
        del wait_for_broker
        self._bind()
        if self._running:
            raise IntegrationError(f"scheduler {self.identity} runs already: run() it once")
        self._running = True
        self._stopping.clear()
        self._hurry.reset()  # a stop's timer from before this run
        try:
            await self._run()
        finally:
            self._running = False

    async def _run(self) -> None:
        connection = self._connection()
        try:
            while not self._stopping.is_set():
                try:
                    if connection.is_closed:  # given up on after a channel that would not close
                        connection = self._connection()
                    await connection.open()
                    aborting = asyncio.ensure_future(self._abort_when_hurried(connection))
                    try:
                        await self._session(connection)
                    finally:
                        aborting.cancel()
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
            hurry = self._hurry.is_set()
            self._hurry.reset()
            with contextlib.suppress(Exception):
                await connection.close(0 if hurry else 5.0)
            if self._own_producer and self._producer is not None:
                with contextlib.suppress(Exception):
                    await self._producer.close(0 if hurry else 10.0)
                self._producer = None

    async def _abort_when_hurried(self, connection: Connection) -> None:
        """Past a stop's timeout, abort `connection`, whatever this process is doing on it: a
        standby's polite close of its lease channel (5 s with a broker that does not answer)
        ends at once, as the active one's firing does."""
        await self._hurry.wait()
        await connection.close(0)

    async def _session(self, connection: Connection) -> None:
        """One candidacy on `connection`; while it holds the lease, fire.

        Raises:
            BrokerConnectionError: the connection or the channel was lost (or never came).
            WorkqError: a declare or a publish failed.
        """
        timeout = max(self._retry_delay, 10.0)
        if not await _producer_connected(self._producer, self._stopping, timeout):
            return
        async with self._lease_type(connection, self.names, open_timeout=timeout) as lease:
            async with standing_by(  # is ours fired meanwhile? (a look)
                self._schedules, url=self._url, group=self._group, identity=self.identity,
                ssl_context=self._ssl_context,
            ):  # fmt: skip
                granted = await lease.granted(self._stopping)
            if not granted:
                return
            # The guard is released before the lease (inner block): the next scheduler the
            # broker makes active finds it free.
            async with self._guard_type(connection, self.names, open_timeout=timeout) as guard:
                if not await guard.acquire(self._stopping, lease.lost):
                    return
                self._set_active(True)
                log.info("scheduler %s is active", self.identity)
                try:
                    await self._fire_while_held(lease, guard)
                except asyncio.CancelledError:
                    self._hurry.start(0)  # a cancel is a stop with no time left
                    raise
                finally:
                    self._set_active(False)
                    log.info("scheduler %s is no longer active", self.identity)
                    # Past a stop's timeout (or on a cancel) `_abort_when_hurried` aborts the
                    # connection: no polite release, the broker frees the guard and the lease.

    async def _fire_while_held(self, lease: Lease, guard: Guard) -> None:
        """Fire until a stop or the loss of the lease or the guard; a stop lets the tick being
        published be confirmed and recorded first (within `_STOP_GRACE`).

        Raises:
            WorkqError: what stopped the firing (translated).
        """
        firing = asyncio.ensure_future(self._fire(lease, guard))
        ended = asyncio.ensure_future(any_of(self._stopping, lease.lost, guard.lost))
        try:
            await asyncio.wait({firing, ended}, return_when=asyncio.FIRST_COMPLETED)
            lost = lease.lost.is_set() or guard.lost.is_set()
            if lost or firing.done():
                # Say so at once, not after the clean-up below: once the broker has freed the
                # guard, the next scheduler may hold it within a round trip.
                self._set_active(False)
            else:
                # A stop: the tick being published is recorded before the lease goes (unless
                # the stop's timeout passes first).
                hurry = asyncio.ensure_future(self._hurry.wait())
                try:
                    await asyncio.wait(
                        {firing, hurry}, timeout=_STOP_GRACE, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    hurry.cancel()
        finally:
            for task in (firing, ended):
                task.cancel()
            await asyncio.gather(ended, return_exceptions=True)
            with contextlib.suppress(asyncio.CancelledError):
                with translate_errors("firing the schedules"):
                    await firing  # raises what stopped the firing

    def _set_active(self, active: bool) -> None:
        if active == self._active.is_set():
            return
        (self._active.set if active else self._active.clear)()
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

    async def _fire(self, lease: Lease, guard: Guard) -> None:
        firing = Firing(
            self._schedules,
            lease=lease,
            guard=guard,
            producer=await self._publisher(),
            identity=self.identity,
            stopping=self._stopping,
            on_fired=self._count,
        )
        await firing.run()

    def _count(self) -> None:
        self._fired += 1


async def _producer_connected(
    producer: Producer | None, stopping: asyncio.Event, timeout: float
) -> bool:
    """Wait for a scheduler's ticks' `producer` (if open) to be connected; False on a stop
    (`stopping`) meanwhile.

    After an outage the lease's connection can be back before the producer's: a candidate
    made active then would find its ticks refused (`fail_fast`) and give the lease back.
    It stands once it can publish.

    Raises:
        BrokerConnectionError: the producer is still reconnecting after `timeout`.
    """
    if producer is None or producer.connected:
        return True
    back = asyncio.ensure_future(producer.wait_connected(timeout))
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({back, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not back.done():
            back.cancel()
    if not back.done() or back.cancelled():
        return False
    back.result()  # raises what kept it from connecting
    return True


class _Deadline:
    """An event set `timeout` seconds after `start()` (at once for 0)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, timeout: float) -> None:
        self.reset()
        if timeout <= 0:
            self._event.set()
        else:
            self._timer = asyncio.get_running_loop().call_later(timeout, self._event.set)

    def reset(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()
