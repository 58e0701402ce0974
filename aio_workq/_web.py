"""What the web-framework integrations share: a bounded producer view and the app's runtime.

`aio_workq.fastapi` and `aio_workq.aiohttp` are thin layers over `Integration` (start a
`Producer` and in-process `Worker`s with the app, stop them with it) and `ProducerView` (every
call bounded by a short, request-sized timeout). Nothing here imports a web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypedDict, TypeVar, Unpack, cast

from ._consume.worker import Handler, Worker
from ._exceptions import (
    BrokerConnectionError,
    ConfigurationError,
    IntegrationError,
    PublishError,
    RPCTimeoutError,
    WorkqError,
)
from ._hooks import Hook
from ._link.connection import Backoff, Connection
from ._link.settings import URLs
from ._link.settings import check_seconds as _check_timeout
from ._link.specs import Exchange, Queue, QueueType
from ._publish.message import PublishOptions
from ._publish.producer import Producer
from .jobs._errors import StoreError
from .schedules import Schedule, Scheduler

__all__ = (
    "ANSWERED",
    "DEFAULT_REQUEST_TIMEOUT",
    "ConnectionOptions",
    "Integration",
    "IntegrationError",
    "OwnedProducer",
    "ProducerOptions",
    "ProducerSettings",
    "ProducerView",
    "answered",
    "error_response",
)

log = logging.getLogger("aio_workq")

DEFAULT_REQUEST_TIMEOUT = 5.0
# The view's own bound sits a little after the producer's deadline, so that the producer's
# precise error (e.g. "the connection is down; nothing was sent") is the one raised.

H = TypeVar("H", bound=Handler)


class ConnectionOptions(TypedDict, total=False):
    """The `Connection` settings an integration passes on to every connection it opens.

    Each key is a keyword argument of `Connection` (mypy checks that): adding one here passes it
    through `Workq`, the aiohttp `Workq` and `SyncProducer` alike.
    """

    ssl_context: ssl.SSLContext | None
    """For `amqps://` URLs: the CA, client certificate and host-name checks."""
    name: str | None
    """Connection name shown in the management UI (the producer's connection)."""
    backoff: Backoff
    """Delays between rounds of failed reconnect attempts."""
    hooks: Sequence[Hook]
    """`Hook`s that observe publishes, the in-process workers' jobs, and reconnects."""
    wait_for_broker: float
    """Seconds the app's start-up keeps retrying while no broker answers (0: fail at once)."""


class _ProducerOnly(TypedDict, total=False):
    window: int
    """The most unconfirmed messages in flight (see `Producer`)."""
    window_bytes: int
    """The most body bytes in flight (see `Producer`)."""
    on_reconnect: Literal["resend", "fail"]
    """Unconfirmed messages after a lost connection: re-sent (default) or failed."""
    fail_fast: bool
    """While the connection is down, publishes raise `BrokerUnavailableError` at once."""
    declare: Literal["always", "never"]
    """`"never"`: queues are only checked, so a misspelt name fails instead of being created."""
    channels: int
    """Channels to publish over, in turn (see `Producer`; 1 keeps the order sent)."""


class ProducerOptions(ConnectionOptions, _ProducerOnly, total=False):
    """The keyword arguments of `Producer` and `Connection` the integrations take as they are
    (`ssl_context`, `name`, `backoff`, `hooks`, `wait_for_broker`, `window`, `window_bytes`,
    `on_reconnect`, `fail_fast`, `declare`, `channels`)."""


def _split(options: ProducerOptions) -> tuple[ConnectionOptions, _ProducerOnly]:
    link = {k: v for k, v in options.items() if k in ConnectionOptions.__optional_keys__}
    rest = {k: v for k, v in options.items() if k not in ConnectionOptions.__optional_keys__}
    return cast(ConnectionOptions, link), cast(_ProducerOnly, rest)


class OwnedProducer:
    """A `Producer` on a `Connection` of its own, made with every setting; closes both."""

    __slots__ = ("connection", "producer")

    def __init__(self, connection: Connection, producer: Producer) -> None:
        self.connection = connection
        self.producer = producer

    async def start(self) -> None:
        """Connect, then open the producer's channel.

        Raises:
            BrokerConnectionError (and its subclasses): see `Connection.open`. A failed start
                leaves nothing open.
        """
        try:
            await self.connection.open()
            await self.producer.start()
        except BaseException:
            await self.connection.close()
            raise

    async def close(self, timeout: float) -> None:
        """Wait up to `timeout` for outstanding confirms, then close the connection."""
        try:
            await self.producer.close(timeout)
        finally:
            await self.connection.close()


class ProducerSettings:
    """Everything an integration needs to open its producer and its in-process workers.

    Args:
        url: broker URL(s) (see `Producer`).
        queue_type: the type of queues declared from a plain name.
        connect_timeout: seconds for each connection attempt.
        options: `ProducerOptions`, passed on as they are.

    Raises:
        ConfigurationError: a setting is invalid (checked now, by building them once).
        TypeError: an unknown setting.
    """

    __slots__ = ("_connection", "_producer", "connect_timeout", "queue_type", "url")

    def __init__(
        self,
        url: URLs | None,
        *,
        queue_type: QueueType | Literal["quorum", "classic"],
        connect_timeout: float,
        options: ProducerOptions,
    ) -> None:
        self.url = url
        self.queue_type = queue_type
        self.connect_timeout = _check_timeout("connect_timeout", connect_timeout)
        connection, producer = _split(options)
        if "hooks" in connection:  # a generator would be used up by the first connection
            connection["hooks"] = tuple(connection["hooks"])
        self._connection = connection
        self._producer = producer
        self.producer()  # validates every setting now (a bad one fails at import)

    @property
    def hooks(self) -> Sequence[Hook]:
        return self._connection.get("hooks", ())

    def producer(self) -> OwnedProducer:
        """A new producer on a new connection (neither opened)."""
        connection = Connection(self.url, connect_timeout=self.connect_timeout, **self._connection)
        producer = Producer(
            connection=connection,
            queue_type=self.queue_type,
            connect_timeout=self.connect_timeout,
            hooks=self.hooks,
            **self._producer,
        )
        return OwnedProducer(connection, producer)

    def scheduler(self, schedules: Scheduler | Schedule | Iterable[Schedule]) -> Scheduler:
        """The `Scheduler` an app hosts: `schedules` itself if it is one, else a new one for
        these `Schedule`s, on the integration's URL, `ssl_context`, `backoff` and `hooks`.

        Raises:
            ConfigurationError: `schedules` is none of these, or holds two of one name.
        """
        if isinstance(schedules, Scheduler):
            return schedules
        items = [schedules] if isinstance(schedules, Schedule) else schedules
        if isinstance(items, str | bytes) or not isinstance(items, Iterable):
            raise ConfigurationError(
                f"schedules= must be a Scheduler, a Schedule or a list of Schedules, "
                f"got {type(schedules).__name__}"
            )
        link = self._connection
        return Scheduler(
            self.url,
            list(items),
            ssl_context=link.get("ssl_context"),
            backoff=link.get("backoff"),
            hooks=link.get("hooks") or None,
        )

    def worker(self, handler: Handler, options: dict[str, Any]) -> tuple[Worker, Connection | None]:
        """A new `Worker(handler=handler, **options)` on a new connection (neither opened),
        made with the integration's settings unless `options` has its own; and that connection
        (None when `options` gives a `connection=` to share).

        Raises:
            ConfigurationError: an option is invalid.
            TypeError: an option is not a `Worker` argument.
        """
        options = {"queue_type": self.queue_type, **options}
        if options.get("connection") is not None:
            return Worker(handler=handler, **options), None
        queue = options.get("queue")
        link: dict[str, Any] = {**self._connection, "name": None}
        for key in ConnectionOptions.__optional_keys__:
            if key in options:
                link[key] = options.pop(key)
        if link["name"] is None:  # the name `Worker` gives its own connection
            label = queue.name if isinstance(queue, Queue) else queue
            link["name"] = f"aio-workq worker {label or 'subscriber'}"
        timeout = options.pop("connect_timeout", self.connect_timeout)
        connection = Connection(self.url, connect_timeout=timeout, **link)
        worker = Worker(
            connection=connection,
            handler=handler,
            connect_timeout=timeout,
            hooks=link.get("hooks", ()),
            **options,
        )
        return worker, connection


def _target(queue: str | Queue | None, exchange: str | Exchange, routing_key: str | None) -> str:
    if queue is not None:
        return f"queue {queue.name if isinstance(queue, Queue) else queue!r}"
    name = exchange.name if isinstance(exchange, Exchange) else exchange
    return f"exchange {name!r} routing key {routing_key!r}"


class ProducerView:
    """A started `Producer` whose every call is bounded by a short default timeout.

    A web request should answer "try again later" in seconds, not wait 30 s for a broker that
    is down. The view passes `timeout=` to each call and also bounds the steps the producer does
    not time itself (declaring a queue on first use), so a call never takes much longer than its
    timeout. Errors are the producer's own typed errors.

    ```python
    view = ProducerView(producer, timeout=3.0)
    job_id = await view.publish({"path": "cat.png"}, queue="images")  # <= about 3 s
    ```

    Args:
        producer: a started producer (the view does not start or close it).
        timeout: the default bound of each call, in seconds.
    """

    __slots__ = ("_timeout", "producer")

    def __init__(self, producer: Producer, *, timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        self.producer = producer
        self._timeout = _check_timeout("timeout", timeout)

    def __repr__(self) -> str:
        return f"<ProducerView timeout={self._timeout:g} {self.producer!r}>"

    @property
    def timeout(self) -> float:
        """The default bound of each call, in seconds."""
        return self._timeout

    def with_timeout(self, timeout: float) -> ProducerView:
        """The same producer with another default timeout (e.g. for one slow route)."""
        return ProducerView(self.producer, timeout=timeout)

    def _resolve(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else _check_timeout("timeout", timeout)

    async def send(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        **options: Unpack[PublishOptions],
    ) -> asyncio.Future[str]:
        """`Producer.send` with the view's timeout: the future settles by that deadline.

        The producer's timeout covers the queue's first declaration, the window and the
        confirm.

        Raises:
            PublishTimeoutError: the message could not be handed to the broker in time (the
                connection is down, the queue could not be declared, or the window stayed
                full); it was not sent.
            SerializationError: the body or an option can't be encoded; nothing was sent.
            TopologyError: the queue exists with other arguments, or the exchange doesn't.
        """
        options["timeout"] = self._resolve(options.get("timeout"))
        return await self.producer.send(
            body, queue, exchange=exchange, routing_key=routing_key, **options
        )

    async def publish(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        **options: Unpack[PublishOptions],
    ) -> str:
        """`Producer.publish` within the timeout: the message id once confirmed.

        Raises:
            PublishTimeoutError: not confirmed within the timeout.
            PublishError: nacked, unroutable or connection lost (see `Producer.publish`).
            SerializationError: the body can't be encoded; nothing was sent.
            TopologyError: the queue exists with other arguments, or the exchange doesn't.
        """
        confirm = await self.send(
            body, queue, exchange=exchange, routing_key=routing_key, **options
        )
        return await confirm  # settled by the deadline: a timeout fails it, never hangs

    async def publish_many(
        self,
        bodies: Iterable[Any],
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        return_exceptions: bool = False,
        **options: Unpack[PublishOptions],
    ) -> list[Any]:
        """`Producer.publish_many` with one deadline for the whole batch.

        Every message sent is settled before this returns or raises.

        Raises:
            PublishError: the first failure, once all are settled (unless `return_exceptions`).
            SerializationError: a body can't be encoded (unless `return_exceptions`).
        """
        options["timeout"] = self._resolve(options.get("timeout"))
        return await self.producer.publish_many(
            bodies,
            queue,
            exchange=exchange,
            routing_key=routing_key,
            return_exceptions=return_exceptions,
            **options,
        )

    async def call(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """`Producer.call` (RPC) within the timeout: the worker's reply.

        Raises:
            RPCError: the remote handler raised.
            RPCTimeoutError: no reply within the timeout (no worker, or the broker is down).
            PublishError: the request was not confirmed.
        """
        seconds = self._resolve(timeout)
        return await self.producer.call(
            body, queue, exchange=exchange, routing_key=routing_key, headers=headers,
            timeout=seconds,
        )  # fmt: skip

    async def declare(self, queue: str | Queue, *, timeout: float | None = None) -> str:
        """`Producer.declare` within the timeout; returns the queue's name.

        Raises:
            BrokerConnectionError: no answer within the timeout.
            TopologyError: the queue exists with other arguments.
        """
        seconds = self._resolve(timeout)
        try:
            async with asyncio.timeout(seconds):
                return await self.producer.declare(queue)
        except TimeoutError as exc:
            if isinstance(exc, WorkqError):
                raise
            name = queue.name if isinstance(queue, Queue) else queue
            raise BrokerConnectionError(
                f"declaring queue {name!r}: no answer from the broker within {seconds:g} s"
            ) from None


ANSWERED = (PublishError, BrokerConnectionError, RPCTimeoutError, StoreError)
"""The error classes the integrations' handlers catch; `answered()` says which of their
errors get an answer of aio-workq's (a `StoreError` only when the store can't be reached)."""


def answered(exc: BaseException) -> bool:
    """True when `error_response(exc)` answers `exc`; else it is the app's to answer (500)."""
    if isinstance(exc, StoreError):
        return exc.unreachable
    return isinstance(exc, PublishError | BrokerConnectionError | RPCTimeoutError)


def error_response(exc: BaseException, retry_after: float) -> tuple[int, dict[str, str], str]:
    """The HTTP status, headers and message for an aio-workq error a route let through.

    `PublishError` and `BrokerConnectionError` are 503 (the job queue is unavailable, try again:
    nothing was enqueued unless the error says it may have been); a `StoreError` of a job store
    that can't be reached (`unreachable`: refused, restarting, not answering) is 503 too (the
    job store is unavailable, try again); `RPCTimeoutError` is 504. Other errors, a
    `StoreError` that waiting does not cure among them (the tables missing), are the
    application's bugs (500), left to the framework. The message names the error class only:
    the error itself, which names the store (its DSN without the password), goes to the log.

    Raises:
        TypeError: `exc` is not one of the errors above (`answered(exc)` is False).
    """
    if not answered(exc):
        raise TypeError(f"no HTTP status for {type(exc).__name__}")
    if isinstance(exc, StoreError):
        status, what = 503, "the job store is unavailable, try again later"
    elif isinstance(exc, RPCTimeoutError):
        status, what = 504, "no answer from the workers in time"
    else:
        status, what = 503, "the job queue is unavailable, try again later"
    log.warning("answering %d: %s: %s", status, type(exc).__name__, exc)
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if status == 503 else {}
    return status, headers, f"{what} ({type(exc).__name__})"


class Integration:
    """Runs a `Producer`, and optionally `Worker`s, for as long as a web app runs.

    The framework modules subclass this with their hooks: `aio_workq.fastapi.Workq` (lifespan)
    and `aio_workq.aiohttp.Workq` (cleanup context). Routes get a `ProducerView` bounded by
    `request_timeout`. On shutdown the workers stop gracefully (running handlers get their
    `shutdown_timeout`), then the producer waits up to `close_timeout` for outstanding confirms.

    Args:
        url: broker URL(s), for the producer and the workers (see `Producer`).
        request_timeout: the default bound, in seconds, of each publish or call from a route.
        close_timeout: seconds the producer waits for outstanding confirms on shutdown, and
            the hosted scheduler for its tick being recorded (see `Scheduler.stop`).
        connect_timeout: seconds for the first connection at startup; the app fails to start
            with `BrokerConnectionError` if the broker can't be reached by then.
        queue_type: the type of queues declared from a plain name.
        **options: `Producer` and `Connection` settings, passed on as they are: `ssl_context`
            (for `amqps://`), `name` (the producer's connection name), `backoff`
            (reconnect delays), `hooks` (metrics, tracing: they see each publish and, in the
            in-process workers, each job), `window`, `window_bytes`, `on_reconnect`. The
            in-process workers take `ssl_context`, `backoff`, `hooks` and `connect_timeout`
            too, unless their own options say otherwise.
        schedules: periodic jobs the app hosts (`aio_workq.schedules`): a `Scheduler`, or
            `Schedule`s (run by a `Scheduler` on `url`, `ssl_context`, `backoff`, `hooks`).
            Its `run()` starts with the app and stops with it; every replica of the app is a
            candidate and the broker makes one of them the active scheduler.

    Raises:
        ConfigurationError: a setting is invalid.
        TypeError: an unknown setting.
    """

    def __init__(
        self,
        url: URLs | None = None,
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        close_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        queue_type: QueueType | Literal["quorum", "classic"] = QueueType.QUORUM,
        schedules: Scheduler | Schedule | Iterable[Schedule] | None = None,
        **options: Unpack[ProducerOptions],
    ) -> None:
        self._request_timeout = _check_timeout("request_timeout", request_timeout)
        self._close_timeout = _check_timeout("close_timeout", close_timeout)
        self._settings = ProducerSettings(
            url, queue_type=queue_type, connect_timeout=connect_timeout, options=options
        )
        self._worker_specs: list[tuple[Handler, dict[str, Any]]] = []
        self._view: ProducerView | None = None
        self._workers: list[Worker] = []
        self._scheduler = None if schedules is None else self._settings.scheduler(schedules)

    @property
    def request_timeout(self) -> float:
        """The default bound of each publish or call from a route, in seconds."""
        return self._request_timeout

    def add_worker(self, handler: Handler, *, queue: str | Queue, **options: Any) -> None:
        """Run a `Worker` for `queue` in the app process while the app runs.

        For small deployments: the app serves requests and works through the queue. Each app
        start builds a fresh `Worker(url, queue=queue, handler=handler, **options)` on a
        connection of its own, with the integration's `ssl_context`, `backoff`, `hooks`,
        `connect_timeout` and `queue_type` unless `options` has its own.

        Raises:
            ConfigurationError: an option is invalid (checked now).
            TypeError: an option is not a `Worker` argument.
        """
        spec = {"queue": queue, **options}
        self._settings.worker(handler, dict(spec))  # validate now
        self._worker_specs.append((handler, spec))

    def worker(self, *, queue: str | Queue, **options: Any) -> Callable[[H], H]:
        """Decorator form of `add_worker`: `@workq.worker(queue="images", concurrency=4)`."""

        def register(handler: H) -> H:
            self.add_worker(handler, queue=queue, **options)
            return handler

        return register

    @property
    def producer(self) -> ProducerView:
        """The running app's producer view (also for background tasks of the app).

        Raises:
            IntegrationError: the app is not running.
        """
        if self._view is None:
            raise IntegrationError(
                "the aio-workq producer is not running: it starts with the app (install the "
                "integration's lifespan or cleanup context)"
            )
        return self._view

    @property
    def workers(self) -> tuple[Worker, ...]:
        """The workers running in the app process (their `state` serves health checks)."""
        return tuple(self._workers)

    @property
    def scheduler(self) -> Scheduler | None:
        """The `Scheduler` the app hosts (`schedules=`), None without one; its `active` tells
        whether this replica is the active scheduler."""
        return self._scheduler

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ProducerView]:
        """Start the producer, the workers and the scheduler; stop them on exit (the
        scheduler first, its lease going back to the broker, then the workers).

        Raises:
            BrokerConnectionError: the broker can't be reached within `connect_timeout`.
            TopologyError: a worker's queue exists with other arguments.
            IntegrationError: already running.
        """
        if self._view is not None:
            raise IntegrationError("this aio-workq integration is already running an app")
        owned = self._settings.producer()
        await owned.start()
        connections: list[Connection] = []
        try:
            for handler, spec in self._worker_specs:
                worker, connection = self._settings.worker(handler, dict(spec))
                if connection is not None:
                    connections.append(connection)
                    await connection.open()
                self._workers.append(worker)
                await worker.start()
            self._view = ProducerView(owned.producer, timeout=self._request_timeout)
            async with _hosting(self._scheduler, self._close_timeout):
                yield self._view
        finally:
            self._view = None
            workers, self._workers = self._workers, []
            try:
                stops = await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
                for worker, outcome in zip(workers, stops, strict=True):
                    if isinstance(outcome, Exception):
                        log.error("stopping %r failed: %r", worker, outcome)
            finally:  # a shutdown cancelled while the workers drain still closes every connection
                try:
                    await asyncio.gather(*(c.close() for c in connections))
                finally:
                    await owned.close(self._close_timeout)


@contextlib.asynccontextmanager
async def _hosting(scheduler: Scheduler | None, timeout: float) -> AsyncIterator[None]:
    """Run `scheduler` (a candidate in the election) while the block runs; on exit stop it:
    the tick being published is recorded, then the lease goes back to the broker (within
    `timeout` seconds, else given up: see `Scheduler.stop`)."""
    if scheduler is None:
        yield
        return
    run = asyncio.create_task(scheduler.run(), name=f"aio-workq scheduler {scheduler.identity}")
    try:
        yield
    finally:
        await scheduler.stop(timeout)
        try:
            await run  # bounded: `timeout`, then about a second to abort its connections
        except Exception as exc:  # the app's shutdown goes on: the workers and the producer
            log.error("the scheduler %s failed: %r", scheduler.identity, exc)
