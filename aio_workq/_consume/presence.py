"""Worker presence over the broker: every worker's beats on a fanout exchange, and a watcher that
keeps who is alive.

A `Worker` sends a `WorkerBeat` when it starts, every `presence_interval` seconds, and a goodbye
beat (`stopping=True`) when it closes cleanly, to the durable fanout exchange `workq.presence`:
non-persistent, with an expiration of 3 intervals, without publisher confirms, from a task of
its own (`Beacon`). A beat that fails (no permission, a broker that blocks publishers, a closed
channel) is logged once and tried again at the next interval; message processing never waits
for one.

A `PresenceWatcher` binds a queue of its own (exclusive, auto-delete, server-named, with a
message TTL) to the exchange and keeps the newest beat of each worker: a worker is gone after
its goodbye, or when no beat arrived for 3 of its intervals; gone workers are kept for
`forget_after` seconds (a dashboard greys them out).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiormq
from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from .._exceptions import BrokerConnectionError, ConfigurationError, TopologyError
from .._link.aiopika import link_source
from .._link.channel import ManagedChannel
from .._link.connection import Connection, LinkSource, translate_errors
from .._link.settings import URLs
from .._version import __version__
from .._wire.seams import Wire, channel_closing

__all__ = (
    "EXCHANGE",
    "Activity",
    "Beacon",
    "SideLink",
    "PresenceWatcher",
    "WorkerBeat",
    "WorkerPresence",
    "check_interval",
)

log = logging.getLogger("aio_workq")

EXCHANGE = "workq.presence"
"""The durable fanout exchange the beats go to."""

FORMAT = 1
"""The `"v"` field of a beat's JSON: the version of the format."""

_GONE_AFTER = 3  # intervals without a beat after which a worker counts as gone
_WATCH_TTL_MS = 60_000  # a beat older than this in the watcher's queue is of no use
_MAX_BODY = 64 * 1024  # a larger message on the exchange is not a beat
_GOODBYE_WAIT = 1.0  # seconds a close gives the goodbye beat and the channel's close
_SEND_CAP = 5.0  # seconds one beat may take at most (less with a shorter interval)


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    """What one worker says of itself, every `presence_interval` seconds.

    `handled` counts the handler runs that ended (succeeded or failed, each attempt of a retried
    message once); `failed` the ones among them that failed. Both count from the worker's start.
    """

    id: str
    """Unique per `Worker` instance: `host:pid:random`."""
    host: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    in_flight: int
    """Deliveries taken and not settled yet (running, or waiting for a slot)."""
    handled: int
    failed: int
    started_at: float
    """When the worker started (Unix seconds, the worker's clock)."""
    sent_at: float
    """When this beat was sent (Unix seconds, the worker's clock)."""
    version: str
    """The worker's aio-workq version."""
    interval: float
    """Seconds between the worker's beats."""
    stopping: bool = False
    """A goodbye: the worker closed cleanly."""

    def encode(self) -> bytes:
        """The beat as JSON, with the format's version in `"v"`."""
        fields = {name: getattr(self, name) for name in _FIELDS}
        fields["queues"] = list(self.queues)
        return json.dumps({"v": FORMAT, **fields}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, body: bytes) -> WorkerBeat:
        """The beat in `body` (JSON from `encode()`; fields unknown to this version are ignored).

        Raises:
            ValueError: `body` is not a beat (not JSON, no version, a field missing or of the
                wrong type).
        """
        if len(body) > _MAX_BODY:
            raise ValueError(f"{len(body)} bytes is too long for a beat")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"not JSON: {type(exc).__name__}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object but {type(data).__name__}")
        version = data.get("v")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"no beat format version (v), got {version!r}")
        values: dict[str, Any] = {}
        for name, kind in _FIELDS.items():
            if name not in data:
                raise ValueError(f"field {name!r} is missing")
            value = data[name]
            if not _CHECKS[kind](value):
                raise ValueError(f"field {name!r} is not a {kind}: {value!r}")
            values[name] = value
        queues = values["queues"]
        if not all(isinstance(queue, str) for queue in queues):
            raise ValueError(f"field 'queues' is not a list of names: {queues!r}")
        values["queues"] = tuple(queues)
        if not values["interval"] > 0 or not values["id"]:
            raise ValueError("field 'interval' must be > 0 and 'id' not empty")
        return cls(**values)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


_CHECKS: dict[str, Callable[[object], bool]] = {
    "string": lambda value: isinstance(value, str),
    "whole number": lambda value: _is_int(value) and value >= 0,  # type: ignore[operator]
    "number": _is_number,
    "list": lambda value: isinstance(value, list),
    "boolean": lambda value: isinstance(value, bool),
}
_FIELDS: dict[str, str] = {
    "id": "string",
    "host": "string",
    "pid": "whole number",
    "queues": "list",
    "concurrency": "whole number",
    "in_flight": "whole number",
    "handled": "whole number",
    "failed": "whole number",
    "started_at": "number",
    "sent_at": "number",
    "version": "string",
    "interval": "number",
    "stopping": "boolean",
}


@dataclass(frozen=True, slots=True)
class WorkerPresence:
    """A worker as a `PresenceWatcher` last saw it."""

    beat: WorkerBeat
    """Its newest beat."""
    alive: bool
    """False after its goodbye, or when no beat came for 3 of its intervals (`gone_after`)."""
    last_seen: float
    """When its newest beat arrived (Unix seconds, the watcher's clock)."""

    @property
    def uptime(self) -> float:
        """Seconds from its start to its newest beat."""
        return max(0.0, self.beat.sent_at - self.beat.started_at)


def check_interval(presence_interval: float) -> float:
    """`presence_interval` once checked.

    Raises:
        ConfigurationError: not a finite number of seconds > 0.
    """
    if not _is_number(presence_interval) or not presence_interval > 0:
        raise ConfigurationError(
            f"presence_interval must be a number of seconds > 0 (default 5.0), got "
            f"{presence_interval!r}; pass presence=False to send no beats"
        )
    return float(presence_interval)


# -- sending -------------------------------------------------------------------------------


class Activity(NamedTuple):
    """What a worker reports in each beat (read from what it counts anyway)."""

    queues: tuple[str, ...]
    in_flight: int
    handled: int
    failed: int


class SideLink:
    """The connection the beats go on, one per event loop for every worker whose connection
    reaches the same brokers the same way (`Connection.sibling_key()`): a process running 1,000
    workers on one connection, or a web app with a connection per worker, opens one more
    connection for presence, not one per worker. Opened by the first beacon that needs it,
    closed when the last one lets go (`release`).
    """

    def __init__(self, connection: Connection, key: tuple[object, ...]) -> None:
        self.connection = connection
        self.key = key
        self.users = 0
        self._opening = asyncio.Lock()

    @classmethod
    def acquire(cls, parent: Connection, *, name: str) -> SideLink:
        """The side link of `parent`'s brokers in this event loop, made on first use."""
        sides = _SIDES.setdefault(asyncio.get_running_loop(), {})
        key = parent.sibling_key()
        side = sides.get(key)
        if side is None or side.connection.is_closed:
            side = sides[key] = cls(parent.sibling(name=name), key)
        side.users += 1
        return side

    async def open(self) -> None:
        """Connect unless connected or reconnecting (one beacon at a time opens it).

        Raises:
            BrokerConnectionError (and its subclasses): no broker answered.
        """
        async with self._opening:
            if not self.connection.is_connected:
                await self.connection.open()  # one round over the URLs; then it reconnects

    async def release(self, timeout: float) -> None:
        """One beacon lets go; the last one closes the connection (within `timeout`)."""
        self.users -= 1
        if self.users > 0:
            return
        sides = _SIDES.get(asyncio.get_running_loop(), {})
        if sides.get(self.key) is self:
            del sides[self.key]
        await self.connection.close(timeout=timeout)


_SIDES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[object, ...], SideLink]]
_SIDES = weakref.WeakKeyDictionary()


class Beacon:
    """Sends one worker's beats from a task of its own, on a channel of its own.

    The beats go on a connection apart from the worker's (`side`, shared with the other workers
    on the same brokers), opened in the background, when there is one: RabbitMQ blocks a
    connection that publishes during a memory or disk alarm and then reads nothing more from it,
    acks included, so beats on the worker's connection would stop its work (whose acks are what
    frees the broker's memory) for as long as the alarm lasts.

    Args:
        source: the worker's connection: no beat while it is down (the worker is cut off).
        side: the side link to publish on (acquired for this beacon; released by `close()`);
            `None` publishes on `source` (an aio-pika connection given to the worker).
        interval: seconds between beats.
        concurrency: the worker's concurrency, as reported.
        activity: reads the worker's queues and counters, once per beat.
        what: how log lines name the worker.
    """

    def __init__(
        self,
        source: LinkSource,
        *,
        side: SideLink | None,
        interval: float,
        concurrency: int,
        activity: Callable[[], Activity],
        what: str,
    ) -> None:
        self._worker_link = source
        self._side = side
        self._source: LinkSource = side.connection if side is not None else source
        self._interval = interval
        self._concurrency = concurrency
        self._activity = activity
        self._what = what
        self._properties = Basic.Properties(
            content_type="application/json",
            delivery_mode=1,
            expiration=str(max(1, round(_GONE_AFTER * interval * 1000))),
            message_type="workq.presence",
        )
        self._host = socket.gethostname()
        self._pid = 0
        self.id = ""
        self._started_at = 0.0
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._sending = False  # a beat on its way (its channel may be opening)
        self._stopping = False
        self.sent = 0
        """Beats sent (handed to the socket) since `start()`."""

    def start(self) -> None:
        """Send the first beat now and the next every interval, in the background."""
        # Made here, in the process that runs the worker (after any fork), not at construction.
        self._pid = os.getpid()
        self.id = f"{self._host}:{self._pid}:{uuid.uuid4().hex[:8]}"
        self._started_at = time.time()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def beat(self, *, stopping: bool = False) -> WorkerBeat:
        """The worker's beat as of now."""
        activity = self._activity()
        return WorkerBeat(
            id=self.id,
            host=self._host,
            pid=self._pid,
            queues=activity.queues,
            concurrency=self._concurrency,
            in_flight=activity.in_flight,
            handled=activity.handled,
            failed=activity.failed,
            started_at=self._started_at,
            sent_at=time.time(),
            version=__version__,
            interval=self._interval,
            stopping=stopping,
        )

    async def _run(self) -> None:
        while True:
            try:
                if self._side is not None:
                    await self._side.open()
                self._sending = True
                async with asyncio.timeout(min(self._interval, _SEND_CAP)):
                    proven = await self._send(self.beat())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a background loop: say so once, try again next time
                self._failed(exc)
            else:
                if proven and self._failing:
                    log.info("%s sends its presence beats again", self._what)
                    self._failing = False
            finally:
                self._sending = False
            if self._stopping:
                return
            await asyncio.sleep(self._interval)

    def _failed(self, exc: BaseException) -> None:
        if not isinstance(exc, _Skipped):  # the channel may be at fault: a new one next time
            channel, self._channel = self._channel, None
            if channel is not None and not channel.is_closed:
                task = asyncio.get_running_loop().create_task(_close_channel(channel))
                task.add_done_callback(_drop_result)
        if self._failing:
            log.debug("%s: presence beat failed again: %s", self._what, exc)
            return
        self._failing = True
        text = str(exc) if str(exc) else type(exc).__name__
        log.warning(
            "%s could not send its presence beat to exchange %r (%s); message processing is "
            "not affected; trying again every %g s",
            self._what,
            EXCHANGE,
            text,
            self._interval,
        )

    async def _send(self, beat: WorkerBeat) -> bool:
        """Publish `beat`; True when it went on a channel that outlived the beat before it (the
        broker may close a channel for a publish it refuses, a moment after it was written).

        Raises:
            BrokerConnectionError: the connection is in trouble, or the broker closed the
                channel of the last beat (refused it).
            TopologyError: the exchange can't be used.
        """
        if not self._worker_link.is_connected:
            raise _Skipped("the worker's connection is down")
        trouble = self._source.trouble()
        if trouble is not None:
            raise _Skipped(trouble)  # a publish now would only wait
        channel = self._channel
        proven = channel is not None
        if channel is not None and channel_closing(channel):
            self._channel = None
            raise BrokerConnectionError(f"the broker closed its channel ({_closed(channel)})")
        if channel is None:
            channel = await self._open()
        await self._publish(channel, beat)
        return proven

    async def _publish(self, channel: aiormq.abc.AbstractChannel, beat: WorkerBeat) -> None:
        body = beat.encode()
        if channel_closing(channel):  # checked in the step the publish takes the channel
            raise BrokerConnectionError(f"the broker closed its channel ({_closed(channel)})")
        with translate_errors(f"sending a presence beat to {EXCHANGE!r}"):
            await channel.basic_publish(
                body, exchange=EXCHANGE, routing_key="", properties=self._properties
            )
        self.sent += 1

    async def _open(self) -> aiormq.abc.AbstractChannel:
        """A channel on which the exchange is known to exist: declared, or, when the user may
        not configure it, declared passively (someone else declared it).

        Raises:
            TopologyError: the exchange exists with another type, or may not be used.
            BrokerConnectionError: no connection or channel.
        """
        self._channel = None
        link = await self._source.link(self._interval)
        connection = link.connection
        channel = await _new_channel(connection)
        try:
            await channel.exchange_declare(exchange=EXCHANGE, exchange_type="fanout", durable=True)
        except aiormq.exceptions.ChannelAccessRefused:
            channel = await _new_channel(connection)
            with translate_errors(f"checking that exchange {EXCHANGE!r} exists"):
                await channel.exchange_declare(exchange=EXCHANGE, passive=True)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyError(
                f"exchange {EXCHANGE!r} exists with another type or arguments "
                f"({translate_reason(exc)}); presence needs a durable fanout exchange: delete "
                f"it (rabbitmqctl delete_exchange {EXCHANGE}) or pass presence=False"
            ) from exc
        except BaseException:
            await _close_channel(channel)
            raise
        self._channel = channel
        return channel

    async def close(self, *, goodbye: bool = True) -> None:
        """Stop beating; with `goodbye`, send a last beat saying so (bounded: about 1 s at most,
        skipped when the channel is not open or the connection is in trouble)."""
        task, self._task = self._task, None
        if task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _GOODBYE_WAIT
        self._stopping = True
        if self._sending:  # aiormq warns of a channel open or a declare cancelled half way:
            await asyncio.wait({task}, timeout=_GOODBYE_WAIT)  # let the beat end (bounded)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        channel, self._channel = self._channel, None
        if channel is not None and not channel_closing(channel):
            if goodbye and self._source.trouble() is None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout_at(deadline):
                        await self._publish(channel, self.beat(stopping=True))
            # The channel is closed alone: the connection is the worker's, or shared.
            closing = asyncio.ensure_future(channel.close())
            await asyncio.wait({closing}, timeout=max(0.0, deadline - loop.time()))
            closing.add_done_callback(_drop_result)  # the connection's close ends it
        if self._side is not None:  # the last beacon on it closes the side link
            side, self._side = self._side, None
            await side.release(timeout=max(0.0, deadline - loop.time()))


class _Skipped(BrokerConnectionError):
    """No beat this time: a connection is down or blocked (its channel is not at fault)."""


async def _new_channel(connection: aiormq.abc.AbstractConnection) -> aiormq.abc.AbstractChannel:
    with translate_errors("opening the presence channel"):
        return await connection.channel(publisher_confirms=False)


async def _close_channel(channel: aiormq.abc.AbstractChannel) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(channel.close(), _GOODBYE_WAIT)


def _closed(channel: aiormq.abc.AbstractChannel) -> str:
    """Why the broker closed `channel`, in its words."""
    closing = channel.closing
    if closing.done() and not closing.cancelled() and closing.exception() is not None:
        return translate_reason(closing.exception())  # type: ignore[arg-type]
    return "closed"


def _drop_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def translate_reason(exc: BaseException) -> str:
    """The broker's reply text of an aiormq channel error."""
    first = exc.args[0] if exc.args else None
    return str(getattr(first, "reply_text", None) or first or type(exc).__name__)


# -- watching ------------------------------------------------------------------------------


class PresenceWatcher:
    """Listens to every worker's beats and keeps who is alive.

    ```python
    async with PresenceWatcher("amqp://localhost/") as watcher:
        live = await watcher.wait_for(lambda workers: any(w.alive for w in workers), timeout=10)
        for worker in watcher.workers():
            print(worker.beat.host, worker.beat.pid, worker.alive)
    ```

    Args:
        url_or_connection: a broker URL (several separated by commas, or a list; by default
            from the environment), or a `Connection` / robust aio-pika connection to share.
        gone_after: seconds without a beat after which a worker counts as gone (default: 3 of
            that worker's own intervals).
        forget_after: seconds a gone worker is still listed (with `alive=False`).

    Raises:
        ConfigurationError: a setting is invalid.
    """

    def __init__(
        self,
        url_or_connection: URLs | Connection | AbstractRobustConnection | None = None,
        *,
        gone_after: float | None = None,
        forget_after: float = 600.0,
    ) -> None:
        if gone_after is not None and (not _is_number(gone_after) or not gone_after > 0):
            raise ConfigurationError(
                f"gone_after must be a number of seconds > 0, or None (3 intervals of each "
                f"worker), got {gone_after!r}"
            )
        if not _is_number(forget_after) or not forget_after >= 0:
            raise ConfigurationError(
                f"forget_after must be a number of seconds >= 0, got {forget_after!r}"
            )
        self._gone_after = gone_after
        self._forget_after = float(forget_after)
        self._own: Connection | None = None
        self._source: LinkSource
        if isinstance(url_or_connection, Connection | AbstractRobustConnection):
            self._source = link_source(url_or_connection)
        else:
            self._own = Connection(url_or_connection, name="aio-workq presence watcher")
            self._source = self._own
        self._seen: dict[str, tuple[WorkerBeat, float]] = {}
        self._changed = asyncio.Event()
        self._channel: ManagedChannel | None = None

    async def __aenter__(self) -> PresenceWatcher:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self, timeout: float = 10.0) -> None:
        """Connect (when given a URL), declare the exchange and bind a queue to it.

        Raises:
            BrokerConnectionError (and its subclasses): the broker can't be reached.
            TopologyError: the exchange exists with another type, or may not be used.
        """
        if self._channel is not None:
            return
        if self._own is not None:
            await self._own.open()
        channel = ManagedChannel(
            self._source, confirms=False, setup=self._setup, what="the presence watcher"
        )
        try:
            await channel.open(timeout)
        except BaseException:
            await channel.close()
            if self._own is not None:
                await self._own.close()
            raise
        self._channel = channel

    async def close(self) -> None:
        """Stop listening (the queue goes with its channel)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
        if self._own is not None:
            await self._own.close()
        self._notify()

    async def _setup(self, channel: aiormq.abc.AbstractChannel, wire: Wire | None) -> None:
        with translate_errors(f"declaring exchange {EXCHANGE!r}"):
            await channel.exchange_declare(exchange=EXCHANGE, exchange_type="fanout", durable=True)
        with translate_errors("declaring the presence watcher's queue"):
            ok = await channel.queue_declare(
                "",
                exclusive=True,
                auto_delete=True,
                arguments={"x-queue-type": "classic", "x-message-ttl": _WATCH_TTL_MS},
            )
            assert ok.queue is not None
            await channel.queue_bind(ok.queue, EXCHANGE, routing_key="")
            await channel.basic_consume(ok.queue, self._on_message, no_ack=True)

    async def _on_message(self, message: DeliveredMessage) -> None:
        try:
            beat = WorkerBeat.decode(message.body)
        except Exception as exc:  # whatever is on the exchange, the watcher goes on
            log.debug("presence watcher: skipped a message that is not a beat: %s", exc)
            return
        previous = self._seen.get(beat.id)
        if previous is not None and previous[0].sent_at > beat.sent_at:
            return  # an older beat overtaken by a newer one
        self._seen[beat.id] = (beat, time.time())
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _limit(self, beat: WorkerBeat) -> float:
        return self._gone_after if self._gone_after is not None else _GONE_AFTER * beat.interval

    def workers(self) -> list[WorkerPresence]:
        """Every worker seen: the live ones first, then the gone ones (for `forget_after`
        seconds after they went), each by host, pid and start."""
        now = time.time()
        found: list[WorkerPresence] = []
        for key, (beat, seen) in list(self._seen.items()):
            limit = self._limit(beat)
            alive = not beat.stopping and now - seen <= limit
            if not alive:
                gone_at = seen if beat.stopping else seen + limit
                if now - gone_at > self._forget_after:
                    del self._seen[key]
                    continue
            found.append(WorkerPresence(beat=beat, alive=alive, last_seen=seen))
        found.sort(key=lambda w: (not w.alive, w.beat.host, w.beat.pid, w.beat.started_at))
        return found

    def _next_expiry(self) -> float | None:
        """Seconds until the list changes without a beat (a worker goes or is forgotten)."""
        now = time.time()
        times = []
        for beat, seen in self._seen.values():
            limit = self._limit(beat)
            if not beat.stopping and now - seen <= limit:
                times.append(seen + limit - now)
            gone_at = seen if beat.stopping else seen + limit
            times.append(gone_at + self._forget_after - now)
        return max(0.0, min(times)) + 0.01 if times else None

    async def changes(self) -> AsyncIterator[list[WorkerPresence]]:
        """The workers now, then again after every change: a beat arrived, a worker went
        (goodbye or silence), or a gone one was forgotten. Ends when the watcher is closed."""
        while True:
            changed = self._changed
            yield self.workers()
            if self._channel is None:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_expiry()):
                    await changed.wait()

    async def wait_for(
        self, predicate: Callable[[list[WorkerPresence]], bool], timeout: float | None
    ) -> list[WorkerPresence]:
        """Wait until `predicate(workers())` is true; returns that list.

        Raises:
            TimeoutError: not true within `timeout` seconds.
            BrokerConnectionError: the watcher is closed.
        """
        async with asyncio.timeout(timeout):
            async for workers in self.changes():
                if predicate(workers):
                    return workers
        raise BrokerConnectionError("the presence watcher is closed")
