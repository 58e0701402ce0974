"""Worker: consume a queue, run the handler, settle every delivery exactly once.

The worker holds the lifecycle and the state; its parts are the `Subscription` (declare, bind,
consume, resume), the `HandlerRunner` (loop, thread or process pool, timeout, loop watchdog),
the `Dispatcher` (from a delivery to its settlement), failure routing (`_failures`, a pure
function) and the `Mover` (publish a copy, confirm, then ack).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aio_pika.abc import AbstractRobustConnection

from .._exceptions import ConfigurationError, IntegrationError
from .._hooks import Hook, Hooks
from .._link.aiopika import open_source, own_connection
from .._link.connection import Connection, LinkSource, finish_by
from .._link.settings import (
    URLs,
    check_connection_name,
    check_flag,
    check_seconds,
    check_wait,
    redact_url,
)
from .._link.specs import Exchange, Queue, QueueType, check_queue_type
from .._publish.confirms import ConfirmPublisher
from .dispatch import Counters, Dispatcher
from .execution import Handler, HandlerRunner
from .failures import MAX_DEFERS
from .plan import ConsumePlan
from .presence import Activity, Beacon, SideLink, check_interval
from .retry import RetryPolicy
from .subscription import Subscription

__all__ = ("Handler", "Worker", "WorkerState")

log = logging.getLogger("aio_workq")

_CLOSE_GRACE = 5.0  # seconds stop() gives the closes after `timeout`, before aborting the socket


@dataclass(frozen=True, slots=True)
class WorkerState:
    """A snapshot of a worker, for health checks."""

    queue: str
    connected: bool
    consuming: bool
    in_flight: int
    processed: int
    failed: int
    retried: int
    dead_lettered: int
    deferred: int = 0


class Worker:
    """Consumes a queue and runs `handler` for each message.

    ```python
    async def resize(job: Job) -> None:
        await make_thumbnail(job.data["path"])

    await Worker(queue="images", handler=resize, concurrency=10).run()
    ```

    Args:
        url: broker URL, several separated by commas, or a list (see `Producer`).
        connection: share a `Connection` (from `aio_workq.connect()`) or a robust aio-pika
            connection; each worker opens its own channels on it.
        queue: the queue name or `Queue`; `""` for a server-named subscriber queue.
        handler: `async def handler(job)` runs on the event loop; a plain `def` runs in a thread
            pool of `concurrency` threads. Its return value becomes the reply to RPC requests.
            A handler whose first parameter is annotated with a payload type (`order: Order`:
            a pydantic model, dataclass, TypedDict or plain type), optionally followed by the
            job, gets the body validated into it; a body that does not validate is
            dead-lettered at once (`PayloadError`).
        concurrency: handlers running at once.
        prefetch: unacked deliveries the broker may send ahead (>= concurrency; default equal).
            Deliveries waiting for `job.forward()` confirms hold a prefetch slot, not a
            concurrency slot.
        retry: the retry policy; `None` dead-letters on the first failure.
        max_defers: how many times a message may be deferred (`Defer`), over its whole life
            (the `x-workq-defers` header counts them; a replay from the dead-letter queue
            starts again from 0): the next `Defer` dead-letters it, saying so. `None`: no
            limit (a handler that always defers then keeps its message forever).
        queue_type: the type of a queue given by name: `"quorum"` (default) or `"classic"`
            (a `Queue` says its own type; giving both raises `ConfigurationError`).
        exchange: bind the queue to this exchange with `binding_keys`: an `Exchange` is
            declared (durable); a plain name must exist already (it is only checked).
        binding_keys: routing keys or patterns to bind with (default: the queue name).
        binding_arguments: arguments of each binding: for a headers exchange, the headers to
            match and `"x-match": "all"` or `"any"` (routing keys are then ignored).
        handler_timeout: seconds a handler may run before it counts as failed, from when it
            starts (a plain `def` handler waiting for a thread or process still busy with a
            call that timed out is not timed meanwhile).
        shutdown_timeout: seconds `stop()` lets running handlers finish; the rest go back to
            the queue.
        executor: where a plain `def` handler runs: `"thread"` (a pool of `concurrency`
            threads) or `"process"` (a pool of `concurrency` processes, for CPU-bound work: the
            handler must be a module-level function and gets a picklable `JobData`).
        name: connection name shown in the management UI.
        ssl_context: for `amqps://` URLs: the CA, client certificate and host-name checks.
        connect_timeout: seconds for each connection attempt (`start()` tries each URL once).
        hooks: `Hook`s that observe and wrap each delivery's handling (metrics, tracing, log
            context), what the handlers forward, and the worker's own reconnects.
        wait_for_broker: seconds `start()` keeps retrying, with backoff, while no broker
            answers (a worker that may start before its broker); 0 (the default) raises after
            one round over the URLs. For the worker's own connection only.
        presence: send presence beats (`WorkerBeat`) to the `workq.presence` exchange, for
            `aio-workq workers`, the dashboard and `PresenceWatcher`: one at start, one every
            `presence_interval` seconds, and a goodbye when the worker stops. A beat that fails
            is logged once and never holds up message processing or `stop()`.
        presence_interval: seconds between beats (a worker counts as gone after 3 without).
    """

    def __init__(
        self,
        url: URLs | None = None,
        *,
        queue: str | Queue,
        handler: Handler,
        concurrency: int = 1,
        prefetch: int | None = None,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, immutable
        max_defers: int | None = MAX_DEFERS,
        queue_type: QueueType | Literal["quorum", "classic"] | None = None,
        connection: Connection | AbstractRobustConnection | None = None,
        exchange: str | Exchange | None = None,
        binding_keys: Sequence[str] = (),
        binding_arguments: Mapping[str, Any] | None = None,
        handler_timeout: float | None = None,
        shutdown_timeout: float = 30.0,
        executor: Literal["thread", "process"] = "thread",
        name: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        hooks: Sequence[Hook] = (),
        wait_for_broker: float = 0.0,
        presence: bool = True,
        presence_interval: float = 5.0,
    ) -> None:
        if connection is not None and url is not None:
            raise ConfigurationError("pass url= or connection=, not both")
        self._hooks = Hooks.of(hooks)
        prefetch = _check_settings(concurrency, prefetch, shutdown_timeout, max_defers)
        _check_retry(retry)
        self._presence = _Presence(presence, presence_interval)
        check_connection_name(name)  # its connection's, and its presence beats
        _check_bindings(exchange, binding_keys, binding_arguments)
        queue = _queue_spec(queue, queue_type)
        self._plan = ConsumePlan(
            queue=queue,
            concurrency=concurrency,
            prefetch=prefetch,
            retry=retry,
            max_defers=max_defers,
            exchange=exchange,
            binding_keys=tuple(binding_keys),
            binding_arguments=dict(binding_arguments or {}),
            connect_timeout=connect_timeout,
        )
        name_part = queue.name or "subscriber"
        self._name = name or f"aio-workq worker {name_part}"
        self._runner = HandlerRunner(
            handler,
            executor=executor,
            concurrency=concurrency,
            timeout=handler_timeout,
            name=name_part,
        )
        self._shared = connection
        self._url, self._connection = own_connection(
            url, connection, ssl_context=ssl_context, name=self._name,
            connect_timeout=connect_timeout, hooks=self._hooks, wait_for_broker=wait_for_broker,
        )  # fmt: skip
        self._shutdown_timeout = shutdown_timeout
        self._source: LinkSource | None = None
        self._publisher: ConfirmPublisher | None = None
        self._subscription: Subscription | None = None
        self._dispatcher: Dispatcher | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it was started on
        self._hurry = asyncio.Event()

    def __repr__(self) -> str:
        where = redact_url(self._url) if self._url else "shared connection"
        return f"<Worker queue={self.queue_name!r} {where} concurrency={self._plan.concurrency}>"

    @property
    def queue_name(self) -> str:
        """The queue consumed (the broker's name for a server-named queue)."""
        return self._subscription.queue_name if self._subscription else self._plan.queue.name

    @property
    def listens_to(self) -> str | None:
        """The exchange its server-named queue is bound to: a listener of that exchange (e.g.
        the jobs' cancel requests on `workq.control`) rather than a worker of a queue; None
        for a worker of a named queue."""
        exchange = self._plan.exchange
        if not self._plan.queue.server_named or not exchange:
            return None
        return exchange.name if isinstance(exchange, Exchange) else exchange

    @property
    def consuming(self) -> str:
        """What it consumes, as its log lines say: the queue, and the exchange a server-named
        queue is bound to (its name alone, `amq.gen-...`, says nothing; before it was declared,
        a worker stopped during its start, it has none)."""
        return _consuming(self.queue_name, self.listens_to)

    @property
    def state(self) -> WorkerState:
        """Connected, consuming, in flight, and the counters since start."""
        subscription, dispatcher = self._subscription, self._dispatcher
        connected = subscription is not None and subscription.connected
        consuming = connected and subscription is not None and subscription.consuming
        return _snapshot(self.queue_name, connected, consuming and not self._stopping, dispatcher)

    def add_hooks(self, *hooks: Hook) -> None:
        """Add hooks before `start()`: e.g. a command line that serves metrics adds a
        `PrometheusHook` to the workers it was given.

        Raises:
            ConfigurationError: the worker has started, or an item is not a `Hook`.
        """
        if self._started:
            raise ConfigurationError("add hooks before the worker starts")
        current = self._hooks.hooks if self._hooks is not None else ()
        self._hooks = Hooks.of([*current, *hooks])
        if self._connection is not None:
            self._connection.hooks = self._hooks

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def run(self, *, wait_for_broker: float | None = None) -> None:
        """Consume until `stop()` is called or this task is cancelled (then stops gracefully).

        `wait_for_broker`, if given, replaces the worker's own for this start (see `start()`).

        Raises:
            IntegrationError: the worker was stopped (make a new Worker); and the errors of
                `start()`.
        """
        await self.start(wait_for_broker=wait_for_broker)
        try:
            await self._stopped.wait()
        except asyncio.CancelledError:
            await self.stop()
            raise

    async def start(self, *, wait_for_broker: float | None = None) -> None:
        """Connect, declare the queues, and start consuming in the background.

        Bounded by `connect_timeout` per connection attempt and for the declarations; with
        `wait_for_broker` (by default the worker's own), the first connect keeps retrying with
        backoff for up to that many seconds while no broker answers.

        Raises:
            BrokerConnectionError (and its subclasses): the broker can't be reached.
            TopologyError: a queue or exchange declaration failed.
            IntegrationError: the worker ran and was stopped (`stop()` was called, or its
                `async with` block ended): a worker runs once, make a new Worker. A worker
                stopped before it ever started (a signal that came first) starts nothing.
        """
        if self._started or self._stopping:  # a stop before any start (a signal) wins: no-op
            if self._started and self._stopping:
                raise IntegrationError(_STOPPED)
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        try:
            await self._open(wait_for_broker)
        except BaseException:
            task = asyncio.current_task()
            cancelled = task is not None and task.cancelling() > 0
            if cancelled and not self._stopping:
                # Ctrl-C while starting: deliveries may have been handled already (they follow
                # the broker's ConsumeOk at once): stop the graceful way, their acks first (#20).
                await self.stop()
                raise
            await self._teardown()
            if self._stopping and not cancelled:
                return  # stop() was called while starting: nothing is left running
            raise
        if self._stopping:  # stop() ran while we were starting: undo what we opened
            await self._teardown()
            return
        source, dispatcher = self._source, self._dispatcher
        assert source is not None and dispatcher is not None
        if self._runner.is_async:
            self._watchdog = asyncio.ensure_future(
                self._runner.watch_loop(
                    lambda: dispatcher.in_flight,
                    lambda: dispatcher.counters.deliveries,
                    f"worker {self.queue_name!r}",
                )
            )
        # The beats' own connection (see `Beacon`); a robust aio-pika connection is shared.
        own = self._connection if self._connection is not None else self._shared
        self._presence.start(
            source,
            dispatcher,
            own if isinstance(own, Connection) else None,
            name=self._name,
            concurrency=self._plan.concurrency,
            queue_name=lambda: self.queue_name,
        )
        log.info("worker consuming %s (concurrency %d)", self.consuming, self._plan.concurrency)

    async def _open(self, wait_for_broker: float | None) -> None:
        self._source = source = await open_source(self._connection, self._shared, wait_for_broker)
        plan = self._plan
        self._publisher = publisher = plan.publisher(source)
        await publisher.start(plan.connect_timeout)
        self._dispatcher, self._subscription = plan.consumer(
            source, publisher, self._runner, self._hooks
        )
        await self._subscription.start(plan.connect_timeout)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop consuming, let running handlers finish, and close.

        New deliveries stop at once. Handlers running get `timeout` seconds (default:
        `shutdown_timeout`) to finish and be acked; the rest are cancelled and their messages go
        back to the queue. Calling `stop(0)` while a stop is under way hurries it. Returns
        within `timeout` plus about 5 s (closing the publisher and channels), whatever the
        broker's state: a worker's own connection that does not close in time has its socket
        aborted (deliveries not acked go back to the queue).

        Raises:
            ConfigurationError: `timeout` is not a number of seconds (or is NaN); the worker
                is left as it was (a later `stop()` stops it).
            IntegrationError: called on another event loop than the worker's `start()`; the
                worker is left as it was (stop it on its own loop).
        """
        if timeout is not None:
            timeout = check_wait("timeout", timeout)
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            raise IntegrationError(
                f"worker {self.queue_name!r} was started on another event loop: stop() it on "
                "that loop (from another thread: asyncio.run_coroutine_threadsafe(worker.stop(), "
                "loop))"
            )
        if self._stopping:
            if timeout == 0:
                self._hurry.set()
            await self._stopped.wait()
            return
        self._stopping = True
        timeout = self._shutdown_timeout if timeout is None else timeout
        deadline = asyncio.get_running_loop().time() + timeout + _CLOSE_GRACE
        subscription, dispatcher = self._subscription, self._dispatcher
        try:
            if dispatcher is not None:
                dispatcher.stopping = True
            if subscription is not None and not self._plan.queue.single_active_consumer:
                await subscription.cancel()
            # A single-active-consumer queue is not cancelled: the broker would make the next
            # consumer active before our unfinished deliveries are back in the queue, and order
            # would break. Closing the channel at the end returns them first, then hands over.
            if dispatcher is not None:
                await dispatcher.drain(timeout, self._hurry)
        except asyncio.CancelledError:
            # The caller's stop was cancelled: the handlers still running are cancelled as at
            # the deadline (their messages go back to the queue), not left running on after
            # the close below (their acks lost, a later stop() returning at once).
            if dispatcher is not None:
                await dispatcher.drain(0, self._hurry)
            raise
        finally:
            # A broker that stopped answering would hold each polite close for its own bound
            # (or aiormq's heartbeat grace): at the deadline, the socket is aborted instead.
            await finish_by(deadline, self._teardown(), self._connection)
            self._stopped.set()

    async def _teardown(self) -> None:
        """Close what this worker opened; safe to call more than once."""
        # The goodbye, once the handlers are done (bounded: ~1 s), beside the closes below.
        goodbye = self._presence.goodbye()
        try:
            watchdog, self._watchdog = self._watchdog, None
            if watchdog is not None:
                watchdog.cancel()
            subscription = self._subscription
            if subscription is not None:
                await subscription.close()
            publisher, self._publisher = self._publisher, None
            if publisher is not None:
                await publisher.close(timeout=5)
            self._runner.close()
        finally:
            if goodbye is not None:
                await asyncio.gather(goodbye, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()


_STOPPED = (
    "the worker is stopped (`stop()` was called, or its `async with` block ended): a worker "
    "runs once, make a new Worker"
)


def hooks_of(worker: Worker) -> tuple[Hook, ...]:
    """The hooks `worker` was given, `add_hooks()` included (for the command line)."""
    return worker._hooks.hooks if worker._hooks is not None else ()


class _Presence:
    """A worker's presence beats: the options, then a `Beacon` from `start()` to `goodbye()`.

    The beats read the counters the dispatcher keeps anyway: nothing is added to the handling
    of a message.

    Raises:
        ConfigurationError: `presence` is not a bool, or a bad `interval`.
    """

    def __init__(self, presence: bool, interval: float) -> None:
        check_flag("presence", presence)
        interval = check_interval(interval)
        self._interval = interval if presence else None
        self._beacon: Beacon | None = None

    def start(
        self,
        source: LinkSource,
        dispatcher: Dispatcher,
        own: Connection | None,
        *,
        name: str,
        concurrency: int,
        queue_name: Callable[[], str],
    ) -> None:
        """Start beating (unless presence is off); on a side link of `own`, else on `source`."""
        if self._interval is None:
            return
        counters = dispatcher.counters

        def activity() -> Activity:
            handled = counters.processed + counters.failed
            return Activity((queue_name(),), dispatcher.in_flight, handled, counters.failed)

        side = SideLink.acquire(own, name=f"{name} presence") if own is not None else None
        self._beacon = Beacon(
            source,
            side=side,
            interval=self._interval,
            concurrency=concurrency,
            activity=activity,
            what=f"worker {queue_name()!r}",
        )
        self._beacon.start()

    def goodbye(self) -> asyncio.Future[None] | None:
        """Stop beating: the goodbye beat and the close, running (None if never started)."""
        beacon, self._beacon = self._beacon, None
        return asyncio.ensure_future(beacon.close(goodbye=True)) if beacon else None


def _consuming(queue_name: str, exchange: str | None) -> str:
    """`Worker.consuming`: the queue's name, or for a server-named queue not declared yet
    those words (not `''`), and the exchange it is bound to."""
    bound = "" if exchange is None else f" (bound to exchange {exchange!r})"
    name = repr(queue_name) if queue_name else "a server-named queue not declared yet"
    return f"{name}{bound}"


def _check_settings(
    concurrency: int, prefetch: int | None, shutdown_timeout: float, max_defers: int | None
) -> int:
    """Validate the numbers; returns the prefetch (default: `concurrency`)."""
    if not _whole(concurrency) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be a whole number >= 1, got {concurrency!r}")
    prefetch = concurrency if prefetch is None else prefetch
    if not _whole(prefetch):
        raise ConfigurationError(f"prefetch must be a whole number, got {prefetch!r}")
    if not concurrency <= prefetch <= 65535:
        raise ConfigurationError(
            f"prefetch must be between concurrency ({concurrency}) and 65535, got {prefetch!r}"
        )
    check_seconds("shutdown_timeout", shutdown_timeout, zero=True)
    if max_defers is not None and (
        isinstance(max_defers, bool) or not isinstance(max_defers, int) or max_defers < 0
    ):
        raise ConfigurationError(
            f"max_defers must be a whole number >= 0, or None for no limit; got {max_defers!r}"
        )
    return prefetch


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_retry(retry: object) -> None:
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ConfigurationError(
            f"retry must be a RetryPolicy, or None to dead-letter on the first failure; got "
            f"{retry!r}"
        )


def _check_bindings(
    exchange: str | Exchange | None,
    binding_keys: Sequence[str],
    binding_arguments: Mapping[str, Any] | None,
) -> None:
    """Bindings need an exchange, and keys come as a list."""
    if exchange is not None and not isinstance(exchange, str | Exchange):
        raise ConfigurationError(
            f"exchange must be a name (str) or an Exchange, got {type(exchange).__name__} "
            f"{exchange!r}"
        )
    if isinstance(binding_keys, str):
        raise ConfigurationError("binding_keys must be a list of keys, not one string")
    for key in binding_keys:
        if not isinstance(key, str):
            raise ConfigurationError(
                f"binding_keys must be str keys, got {type(key).__name__} {key!r}"
            )
    if (binding_keys or binding_arguments) and exchange is None:
        raise ConfigurationError("binding_keys and binding_arguments need an exchange=")


def _queue_spec(queue: str | Queue, queue_type: QueueType | str | None) -> Queue:
    """The `Queue` to consume; `queue_type` only for a queue given by name."""
    if queue_type is not None:
        queue_type = check_queue_type(queue_type)
    if isinstance(queue, Queue):
        if queue_type is not None and queue_type != queue.type:
            raise ConfigurationError(
                f"queue_type={queue_type.value!r} conflicts with Queue({queue.name!r}, "
                f"type={QueueType(queue.type).value!r}); set the type on the Queue only"
            )
        return queue
    if not isinstance(queue, str):
        raise ConfigurationError(f"queue must be a name or a Queue, got {type(queue).__name__}")
    return Queue(queue, type=queue_type or QueueType.QUORUM)


def _snapshot(
    queue: str, connected: bool, consuming: bool, dispatcher: Dispatcher | None
) -> WorkerState:
    counters = dispatcher.counters if dispatcher is not None else Counters()
    return WorkerState(
        queue=queue,
        connected=connected,
        consuming=consuming,
        in_flight=dispatcher.in_flight if dispatcher is not None else 0,
        processed=counters.processed,
        failed=counters.failed,
        retried=counters.retried,
        dead_lettered=counters.dead_lettered,
        deferred=counters.deferred,
    )
