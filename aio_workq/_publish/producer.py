"""Producer: confirmed, persistent publishes; awaited one by one or pipelined."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import weakref
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, Literal, Unpack

from aio_pika.abc import AbstractRobustConnection

from .._exceptions import ConfigurationError, IntegrationError
from .._hooks import Hook, Hooks
from .._link.aiopika import open_source, own_connection
from .._link.connection import CLOSE_GRACE, Connection, LinkSource, finish_by
from .._link.router import Router
from .._link.settings import (
    URLs,
    check_flag,
    check_name,
    check_seconds,
    check_wait,
    redact_url,
)
from .._link.specs import Exchange, Queue, QueueType, check_queue_type
from .._wire.window import DEFAULT_WINDOW, DEFAULT_WINDOW_BYTES, Window
from .confirms import ConfirmPublisher
from .dead_letters import DeadLetters
from .message import PublishOptions, Sender
from .rpc import REPLY_TO, RPCClient

__all__ = ("Producer",)

log = logging.getLogger("aio_workq")


class Producer:
    """Publishes persistent messages and waits for the broker's confirms.

    ```python
    async with Producer("amqp://guest:guest@localhost/") as producer:
        await producer.publish({"resize": "cat.png"}, queue="tasks")
    ```

    Args:
        url: broker URL, several separated by commas, or a list of them (the nodes of a
            cluster: reconnects rotate through them); by default `AMQP_URL`, then
            `RABBITMQ_HOST`/`_PORT`/`_USERNAME`/`_PASSWORD`/`_VHOST`, then
            `amqp://guest:guest@localhost/`.
        connection: share a `Connection` (from `aio_workq.connect()`), or a robust aio-pika
            connection (then aiormq's public API carries every frame), instead.
        queue_type: the type of queues declared from a plain name: `"quorum"` or `"classic"`.
        window: the most unconfirmed messages in flight; `send()` waits for room beyond it.
            The default is deep enough to keep the broker busy between its confirm bursts
            (a classic queue confirms persistent messages when it syncs to disk).
        window_bytes: the most body bytes in flight (64 MiB by default): whichever of the two
            fills first bounds the window; one message larger than this still goes alone.
        timeout: seconds a publish may take, from the call to its confirm (declaring its queue
            and waiting for room in the window included); then `PublishTimeoutError`.
        on_reconnect: unconfirmed messages after a lost connection are re-sent with the same
            message id (`"resend"`, at-least-once: duplicates possible) or failed (`"fail"`).
        connect_timeout: seconds for each connection attempt; `start()` tries each URL once.
        name: connection name shown in the management UI (text, at most 1,000 bytes as UTF-8).
        ssl_context: for `amqps://` URLs: the CA, client certificate and host-name checks.
        hooks: `Hook`s that observe each publish and confirm (metrics, tracing) and the
            reconnects of the producer's own connection.
        declare: `"always"` (default): a queue or `Exchange(...)` is declared on its first
            publish. `"never"`: it is only checked, and must exist already, else the publish
            raises `TopologyError` naming it (a misspelt queue name then fails instead of
            creating a queue nobody consumes). `producer.declare()` still declares.
        wait_for_broker: seconds `start()` keeps retrying, with backoff, while no broker
            answers (a producer that may start before its broker); 0 (the default) raises after
            one round over the URLs. For the producer's own connection only.
        fail_fast: while the connection is known to be down, `send()` and `publish()` raise
            `BrokerUnavailableError` at once (a web handler answers 503) instead of waiting
            for the connection within the publish timeout.
        channels: publish over this many channels of the connection (1 to 16), each message
            on the next in turn. The broker runs each channel as one process, which bounds
            one channel's rate on a quorum queue; 2 lift one producer to what two processes
            reach. Messages in flight on different channels may reach a queue in another
            order than sent: keep 1 (the default) where the order matters. `window` and
            `window_bytes` are shared out between the channels.
    """

    def __init__(
        self,
        url: URLs | None = None,
        *,
        connection: Connection | AbstractRobustConnection | None = None,
        queue_type: QueueType | Literal["quorum", "classic"] = QueueType.QUORUM,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        timeout: float = 30.0,
        on_reconnect: Literal["resend", "fail"] = "resend",
        connect_timeout: float = 10.0,
        name: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        hooks: Sequence[Hook] = (),
        declare: Literal["always", "never"] = "always",
        wait_for_broker: float = 0.0,
        fail_fast: bool = False,
        channels: int = 1,
    ) -> None:
        if connection is not None and url is not None:
            raise ConfigurationError("pass url= or connection=, not both")
        self._channels = _check_channels(channels, window)
        check_name("name", name)  # also with connection=, where it is not used
        if not isinstance(declare, str) or declare not in ("always", "never"):
            raise ConfigurationError(f"declare must be 'always' or 'never', got {declare!r}")
        self._declare: Literal["always", "never"] = declare
        self._hooks = Hooks.of(hooks)
        self._queue_type = _check_settings(window, window_bytes, timeout, on_reconnect, queue_type)
        self._shared = connection
        self._url, self._connection = own_connection(
            url, connection, ssl_context=ssl_context, name=name,
            connect_timeout=connect_timeout, hooks=self._hooks, wait_for_broker=wait_for_broker,
        )  # fmt: skip
        self._window = window
        self._window_bytes = window_bytes
        self._timeout = timeout
        self._resend = on_reconnect == "resend"
        self._fail_fast = check_flag("fail_fast", fail_fast)
        self._connect_timeout = connect_timeout
        self._source: LinkSource | None = None
        self._publisher: ConfirmPublisher | None = None  # the first of `_publishers`
        self._publishers: tuple[ConfirmPublisher, ...] = ()
        self._router: Router | None = None
        self._sender: Sender | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it was started on
        self._rpc: RPCClient | None = None
        self._closed = False

    def __repr__(self) -> str:
        where = redact_url(self._url) if self._url else "shared connection"
        return f"<Producer {where} in_flight={self.in_flight}>"

    @property
    def in_flight(self) -> int:
        """Messages sent whose confirm has not arrived yet."""
        return sum(publisher.in_flight for publisher in self._publishers)

    @property
    def connected(self) -> bool:
        """True while the producer has a connection and its publishing channels are open."""
        return bool(
            self._source is not None
            and self._source.is_connected
            and self._publishers
            and all(
                publisher.channel is not None and not publisher.channel.is_closed
                for publisher in self._publishers
            )
        )

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect and open the publishing channel (done by `async with`).

        Raises:
            BrokerConnectionError (and its subclasses): the broker can't be reached within
                `connect_timeout` per URL (and `wait_for_broker`). A failed start leaves
                nothing running.
        """
        if self._publisher is not None:
            return
        if self._closed:
            raise IntegrationError(_CLOSED)
        self._source = await open_source(self._connection, self._shared)
        n = self._channels
        publishers = tuple(
            ConfirmPublisher(
                self._source,
                # shared out: the producer's window bounds all of its channels together
                window=Window(max(1, self._window // n), max(1, self._window_bytes // n)),
                timeout=self._timeout,
                resend=self._resend,
                what="producer",
                fail_fast=self._fail_fast,
            )
            for _ in range(n)
        )
        try:
            for publisher in publishers:
                await publisher.start(self._connect_timeout)
        except BaseException:
            for publisher in publishers:
                await publisher.close(0)
            if self._connection is not None:
                await self._connection.close()
            raise
        self._router = Router(self._source, self._queue_type, declare=self._declare)
        self._sender = Sender(publishers, self._router, self._timeout, self._hooks)
        self._publishers = publishers
        self._publisher = publishers[0]
        self._loop = _started_on()

    async def close(self, timeout: float = 10.0) -> None:
        """Wait up to `timeout` for outstanding confirms, then close what this producer opened.

        Messages still unconfirmed then fail with `ConnectionLostError`; a message nacked by a
        quorum queue still starting and waiting for its next try fails with
        `PublishNackedError` (refused on each try, it is not in the queue). Returns within
        `timeout` plus about a second in every broker state: a connection of its own whose
        polite close the broker does not answer in time has its socket aborted.

        Raises:
            ConfigurationError: `timeout` is not a number of seconds (or is NaN); the
                producer is left open.
            IntegrationError: called on another event loop than the producer's `start()`;
                the producer is left open (close it on its own loop).
        """
        timeout = check_wait("timeout", timeout)
        loop = asyncio.get_running_loop()
        if self._publishers and self._loop is not loop:
            raise IntegrationError(f"close() on another event loop: {_other_loop(self._loop)}")
        deadline = loop.time() + timeout + CLOSE_GRACE
        self._closed = True
        if self._rpc is not None:
            await self._rpc.close()
            self._rpc = None
        if self._publishers:
            closing = [publisher.close(timeout) for publisher in self._publishers]
            await finish_by(deadline, _all(closing), self._connection)
            self._publisher, self._publishers = None, ()
        if self._connection is not None:
            await self._connection.close(deadline - loop.time())

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return once the producer's connection is up: at once while it is, else when it
        is back from a loss (e.g. a `fail_fast` producer's owner, before it publishes again).

        Raises:
            BrokerConnectionError: still reconnecting after `timeout` seconds, or closed.
            IntegrationError: the producer is not started.
            ConfigurationError: `timeout` is not None nor a number of seconds >= 0 (NaN).
        """
        if timeout is not None:
            timeout = check_seconds("timeout", timeout, zero=True, forever=True)
        self._ready()
        assert self._source is not None  # set by start(), with the publishers
        await self._source.link(timeout)

    def _ready(self) -> tuple[ConfirmPublisher, Router]:
        if self._publisher is None or self._router is None:
            if self._closed:
                raise IntegrationError(_CLOSED)
            raise IntegrationError(
                "the producer is not started: use `async with Producer(...)`, or "
                "`await producer.start()` first"
            )
        if self._loop is not asyncio.get_running_loop():
            raise IntegrationError(_other_loop(self._loop))
        return self._publisher, self._router

    async def send(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        **options: Unpack[PublishOptions],
    ) -> asyncio.Future[str]:
        """Hand a message to the connection and return its confirm without waiting for it.

        The returned future resolves to the message id once the broker confirms the message,
        or raises `PublishNackedError`, `UnroutableError`, `PublishTimeoutError` or
        `ConnectionLostError`. `send()` itself waits only while the queue is declared the first
        time, the window is full, or the connection is down: all within the timeout.

        Args:
            body: bytes, str (sent as UTF-8 text), JSON-serialisable data, or a pydantic
                model or dataclass (sent as JSON).
            queue: a queue name or `Queue`; declared on first use.
            exchange: an exchange *name* must exist already (it is checked, never declared);
                an `Exchange(...)` is declared on first use.
            routing_key: the routing key, with `exchange=`.
            **options: `headers`, `message_id`, `mandatory`, `timeout`, `priority`,
                `expiration` (seconds), `correlation_id`, `reply_to`, `message_type`,
                `content_type`, `timestamp`, `persistent`, and `delay` (seconds the broker
                holds the message before it reaches its queue) (see `PublishOptions`).

        Raises:
            SerializationError: the body or a property can't be encoded; nothing was sent.
            ConfigurationError: an unknown option, or no destination; a `delay` that is
                negative, through an exchange, or with `expiration`; a `priority` to a queue
                not declared with `max_priority`.
            TopologyError: the queue exists with other arguments, or the exchange doesn't exist;
                with `declare="never"`, the queue or exchange doesn't exist.
            PublishTimeoutError: the declaration, window or connection took until the timeout.
            BrokerUnavailableError: with `fail_fast=True`, the connection is down; nothing was
                sent.
        """
        self._ready()
        assert self._sender is not None
        return await self._sender.forward(body, queue, exchange, routing_key, options)

    async def publish(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        **options: Unpack[PublishOptions],
    ) -> str:
        """Publish one message and wait for its confirm; returns the message id.

        Takes the same arguments as `send()`; returns or raises within `timeout`.

        Raises:
            PublishNackedError: the broker refused the message.
            UnroutableError: no queue is bound for the routing key (with `mandatory=True`).
            PublishTimeoutError: no confirm within `timeout`.
            ConnectionLostError: the connection closed before the confirm (with
                `on_reconnect="fail"`; by default the message is re-sent).
            SerializationError, ConfigurationError, TopologyError: see `send()`.
        """
        sender = self._sender
        if (
            sender is None
            or self._publisher is None
            or self._loop is not asyncio.get_running_loop()
        ):
            self._ready()  # raises: not started, closed, or on another loop
        assert sender is not None
        # `send()`'s work without its coroutine and options repacked (the hot path).
        confirm = await sender.forward(body, queue, exchange, routing_key, options)
        return await confirm

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
        """Publish many messages pipelined within the window; wait for every confirm.

        Returns the message ids in order. Every message is settled before this returns: with
        `return_exceptions=True` failed ones appear as their error in the list; otherwise the
        first failure is raised once all are settled. `options` apply to every message
        (`message_id` is not allowed: each message gets its own); `timeout` bounds the whole
        batch, not each message.
        """
        self._ready()
        assert self._sender is not None
        return await self._sender.forward_many(
            bodies, queue, exchange, routing_key, dict(options), return_exceptions
        )

    async def call(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """Send a request and wait for the worker's reply (RPC over direct reply-to).

        The worker's handler return value comes back decoded (JSON data, text, or bytes).
        Returns or raises within `timeout`.

        Raises:
            RPCError: the remote handler raised; `remote_type` names the exception class.
            RPCTimeoutError: no reply within `timeout` seconds.
            PublishError: the request was not confirmed (e.g. `UnroutableError`).
        """
        publisher, _ = self._ready()
        check_seconds("timeout", timeout)
        if self._rpc is None:
            self._rpc = RPCClient(publisher)
        target = routing_key or (queue.name if isinstance(queue, Queue) else queue)
        return await self._rpc.call(
            lambda correlation_id: self.publish(
                body, queue, exchange=exchange, routing_key=routing_key, headers=headers,
                correlation_id=correlation_id, reply_to=REPLY_TO, persistent=False,
                timeout=timeout,
            ),
            target,
            timeout,
        )  # fmt: skip

    def dead_letters(self, queue: str | Queue) -> DeadLetters:
        """The dead-letter queue of `queue`: count, read, replay and purge its messages."""
        _, router = self._ready()
        assert self._source is not None
        return DeadLetters(self._source, router.queue_spec(queue))

    async def declare(self, queue: str | Queue) -> str:
        """Declare a queue (with its dead-letter queue) now; returns its name."""
        _, router = self._ready()
        return await router.declare(router.queue_spec(queue))


_STARTED_IN: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()
"""The process each loop a producer was started on belongs to: a forked child has a copy of
the parent's loop object, and of the producer on it."""


def _started_on() -> asyncio.AbstractEventLoop:
    """The running loop, a producer's from now on (its process recorded)."""
    loop = asyncio.get_running_loop()
    _STARTED_IN[loop] = os.getpid()
    return loop


def _other_loop(loop: asyncio.AbstractEventLoop | None) -> str:
    if loop is not None and _STARTED_IN.get(loop, os.getpid()) != os.getpid():
        return (
            "this producer was started before fork(), in the parent process: its connection "
            "is the parent's, and can't be shared with a child. Start a Producer in each "
            "process after the fork (in the app's lifespan or startup, or a pre-forking "
            "server's post-fork hook), or use aio_workq.sync.SyncProducer, which opens a "
            "connection of its own in a forked child"
        )
    state = "closed since" if loop is None or loop.is_closed() else "running in another thread"
    return (
        f"this producer was started on another event loop ({state}): a Producer works only on "
        "the loop it was started on. Django runs each async view on an event loop of its own "
        "under a WSGI server (runserver, gunicorn's sync workers): publish from those views "
        "with aio_workq.sync.SyncProducer (one per process), or serve the app with an ASGI "
        "server; threads with loops of their own need a Producer each, or the SyncProducer"
    )


async def _all(closing: list[Coroutine[Any, Any, None]]) -> None:
    """Close the channels together (each within the same timeout); a close's errors are
    dropped (as `finish_by` drops them)."""
    await asyncio.gather(*closing, return_exceptions=True)


_CLOSED = (
    "the producer is closed (its `async with` block ended, or `close()` was called): "
    "make a new Producer"
)


def _check_channels(channels: object, window: object) -> int:
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= 16:
        raise ConfigurationError(
            f"channels must be a whole number from 1 to 16, got {channels!r}: 1 keeps the "
            "order of the messages sent, 2 is enough to reach a quorum queue's rate"
        )
    if isinstance(window, int) and 1 <= window < channels:
        raise ConfigurationError(
            f"window ({window}) is shared out between the channels: it must be at least "
            f"channels ({channels})"
        )
    return channels


def _check_settings(
    window: int, window_bytes: int, timeout: float, on_reconnect: str, queue_type: str
) -> QueueType:
    """The queue type, once every setting is checked.

    Raises:
        ConfigurationError: a setting is out of range; the message names it.
    """
    Window(window, window_bytes)  # validates both
    check_seconds("timeout", timeout)
    if on_reconnect not in ("resend", "fail"):
        raise ConfigurationError(f"on_reconnect must be 'resend' or 'fail', got {on_reconnect!r}")
    return check_queue_type(queue_type)
