"""Producer: confirmed, persistent publishes; awaited one by one or pipelined."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from ._confirms import DEFAULT_WINDOW, DEFAULT_WINDOW_BYTES, ConfirmPublisher, make_properties
from ._connection import connect, translate_errors
from ._dead_letters import DeadLetters
from ._exceptions import (
    ConfigurationError,
    PublishError,
    RPCTimeoutError,
    SerializationError,
    WorkqError,
)
from ._rpc import REPLY_TO, RPCClient
from ._serialization import encode_body
from ._settings import redact_url, resolve_url
from ._topology import (
    Exchange,
    Queue,
    QueueType,
    declare_exchange,
    declare_queue,
    raw_channel,
)

__all__ = ("Producer", "Router")

log = logging.getLogger("aio_workq")


class Router:
    """Turns `queue=` / `exchange=` / `routing_key=` into a destination, declaring it once."""

    def __init__(self, connection: AbstractRobustConnection, queue_type: QueueType) -> None:
        self._connection = connection
        self._queue_type = queue_type
        self._queues: dict[str, Queue] = {}
        self._exchanges: set[str] = set()

    def queue_spec(self, queue: str | Queue) -> Queue:
        if isinstance(queue, Queue):
            return queue
        spec = self._queues.get(queue)
        return spec if spec is not None else Queue(queue, type=self._queue_type)

    async def destination(
        self,
        queue: str | Queue | None,
        exchange: str | Exchange,
        routing_key: str | None,
    ) -> tuple[str, str]:
        """`(exchange, routing_key)` to publish to, declared or checked on first use."""
        if queue is not None:
            if exchange:
                raise ConfigurationError("publish to queue= or to exchange=, not both")
            spec = self.queue_spec(queue)
            declared = self._queues.get(spec.name)
            # A plain name maps to the cached spec itself: no field-by-field compare per publish.
            if declared is not spec and declared != spec:
                await self.declare(spec)
            return "", spec.name
        if isinstance(exchange, Exchange):
            if exchange.name not in self._exchanges:
                await self._declare_exchange(exchange)
            return exchange.name, routing_key or ""
        if exchange:
            if exchange not in self._exchanges:
                await self._declare_exchange(Exchange(exchange, passive=True))
            return exchange, routing_key or ""
        if not routing_key:
            raise ConfigurationError(
                "nowhere to publish: pass queue='name', or exchange= and routing_key="
            )
        return "", routing_key

    async def declare(self, spec: Queue, delays_ms: tuple[int, ...] = ()) -> str:
        async with raw_channel(self._connection) as channel:
            name = await declare_queue(channel, spec, delays_ms=delays_ms)
        if not spec.server_named:
            self._queues[spec.name] = spec
        return name

    async def _declare_exchange(self, exchange: Exchange) -> None:
        async with raw_channel(self._connection) as channel:
            await declare_exchange(channel, exchange)
        self._exchanges.add(exchange.name)


class Producer:
    """Publishes persistent messages and waits for the broker's confirms.

    ```python
    async with Producer("amqp://guest:guest@localhost/") as producer:
        await producer.publish({"resize": "cat.png"}, queue="tasks")
    ```

    Args:
        url: broker URL; by default `AMQP_URL`, then `RABBITMQ_HOST`/`_PORT`/`_USERNAME`/
            `_PASSWORD`/`_VHOST`, then `amqp://guest:guest@localhost/`.
        connection: share an existing robust connection (from `aio_workq.connect()`) instead.
        queue_type: the type of queues declared from a plain name: `"quorum"` or `"classic"`.
        window: the most unconfirmed messages in flight; `send()` waits for space beyond it.
            The default is deep enough to keep the broker busy between its confirm bursts
            (a classic queue confirms persistent messages when it syncs to disk).
        window_bytes: the most body bytes in flight (64 MiB by default): whichever of the two
            fills first bounds the window; one message larger than this still goes alone.
        timeout: seconds a publish may take until its confirm; then `PublishTimeoutError`.
        on_reconnect: unconfirmed messages after a lost connection are re-sent with the same
            message id (`"resend"`, at-least-once: duplicates possible) or failed (`"fail"`).
        connect_timeout: seconds for the first connection attempt.
        name: connection name shown in the management UI.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        connection: AbstractRobustConnection | None = None,
        queue_type: QueueType | Literal["quorum", "classic"] = QueueType.QUORUM,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        timeout: float = 30.0,
        on_reconnect: Literal["resend", "fail"] = "resend",
        connect_timeout: float = 10.0,
        name: str | None = None,
    ) -> None:
        if connection is not None and url is not None:
            raise ConfigurationError("pass url= or connection=, not both")
        if window < 1:
            raise ConfigurationError(f"window must be >= 1, got {window!r}")
        if window_bytes < 1:
            raise ConfigurationError(f"window_bytes must be >= 1, got {window_bytes!r}")
        if timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
        if on_reconnect not in ("resend", "fail"):
            raise ConfigurationError(
                f"on_reconnect must be 'resend' or 'fail', got {on_reconnect!r}"
            )
        try:
            self._queue_type = QueueType(queue_type)
        except ValueError:
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', got {queue_type!r}"
            ) from None
        self._url = None if connection is not None else resolve_url(url)
        self._connection = connection
        self._owns_connection = connection is None
        self._window = window
        self._window_bytes = window_bytes
        self._timeout = timeout
        self._resend = on_reconnect == "resend"
        self._connect_timeout = connect_timeout
        self._name = name
        self._channel: AbstractRobustChannel | None = None
        self._publisher: ConfirmPublisher | None = None
        self._router: Router | None = None
        self._rpc: RPCClient | None = None

    def __repr__(self) -> str:
        where = redact_url(self._url) if self._url else "shared connection"
        return f"<Producer {where} in_flight={self.in_flight}>"

    @property
    def in_flight(self) -> int:
        """Messages sent whose confirm has not arrived yet."""
        return self._publisher.in_flight if self._publisher else 0

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect and open the publishing channel (done by `async with`)."""
        if self._publisher is not None:
            return
        if self._connection is None:
            self._connection = await connect(
                self._url, timeout=self._connect_timeout, name=self._name
            )
        with translate_errors("opening the producer's channel"):
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        self._router = Router(self._connection, self._queue_type)
        publisher = ConfirmPublisher(
            self._channel,
            window=self._window,
            window_bytes=self._window_bytes,
            timeout=self._timeout,
            resend=self._resend,
        )
        with translate_errors("opening the producer's channel"):
            await publisher.start()
        self._publisher = publisher

    async def close(self, timeout: float = 10.0) -> None:
        """Wait up to `timeout` for outstanding confirms, then close what this producer opened.

        Messages still unconfirmed then fail with `ConnectionLostError`.
        """
        if self._rpc is not None:
            await self._rpc.close()
            self._rpc = None
        if self._publisher is not None:
            await self._publisher.close(timeout)
            self._publisher = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._owns_connection and self._connection is not None:
            await self._connection.close()
            self._connection = None

    def _ready(self) -> tuple[ConfirmPublisher, Router]:
        if self._publisher is None or self._router is None:
            raise RuntimeError("the producer is not started: use `async with Producer(...)`")
        return self._publisher, self._router

    async def send(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        mandatory: bool = True,
        timeout: float | None = None,
        **properties: Any,
    ) -> asyncio.Future[str]:
        """Hand a message to the connection and return its confirm without waiting for it.

        The returned future resolves to the message id once the broker confirms the message,
        or raises `PublishNackedError`, `UnroutableError`, `PublishTimeoutError` or
        `ConnectionLostError`. `send()` itself waits only while the window is full.

        Args:
            body: bytes, str (sent as UTF-8 text) or JSON-serialisable data.
            queue: a queue name or `Queue`; declared on first use.
            exchange: an exchange name (must exist) or an `Exchange` (declared on first use).
            routing_key: the routing key, with `exchange=`.
            headers: message headers.
            message_id: defaults to a fresh unique id.
            mandatory: raise `UnroutableError` when no queue receives the message.
            timeout: seconds until the confirm; defaults to the producer's `timeout`.
            **properties: `priority`, `expiration`, `correlation_id`, `reply_to`, `type`,
                `timestamp`, `content_type`.

        Raises:
            SerializationError: the body can't be encoded; nothing was sent.
            TopologyError: the queue exists with other arguments, or the exchange doesn't exist.
            PublishTimeoutError: the window stayed full (or the connection down) until timeout.
        """
        publisher, router = self._ready()
        data, content_type = encode_body(body)
        target_exchange, key = await router.destination(queue, exchange, routing_key)
        props = make_properties(
            message_id=message_id,
            content_type=properties.pop("content_type", content_type),
            headers=headers,
            **properties,
        )
        return await publisher.send(
            target_exchange, key, data, props, mandatory=mandatory, timeout=timeout
        )

    async def publish(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        mandatory: bool = True,
        timeout: float | None = None,
        **properties: Any,
    ) -> str:
        """Publish one message and wait for its confirm; returns the message id.

        Takes the same arguments as `send()`.

        Raises:
            PublishNackedError: the broker refused the message.
            UnroutableError: no queue is bound for the routing key (with `mandatory=True`).
            PublishTimeoutError: no confirm within `timeout`.
            ConnectionLostError: the connection closed before the confirm (with
                `on_reconnect="fail"`; by default the message is re-sent).
            SerializationError, TopologyError: see `send()`.
        """
        confirm = await self.send(
            body,
            queue,
            exchange=exchange,
            routing_key=routing_key,
            headers=headers,
            message_id=message_id,
            mandatory=mandatory,
            timeout=timeout,
            **properties,
        )
        return await confirm

    async def publish_many(
        self,
        bodies: Iterable[Any],
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> list[Any]:
        """Publish many messages pipelined within the window; wait for every confirm.

        Returns the message ids in order. Every message is settled before this returns: with
        `return_exceptions=True` failed ones appear as their `PublishError` in the list;
        otherwise the first failure is raised once all are settled.
        """
        outcomes: list[asyncio.Future[str] | WorkqError] = []
        for body in bodies:
            try:
                outcomes.append(
                    await self.send(
                        body,
                        queue,
                        exchange=exchange,
                        routing_key=routing_key,
                        headers=headers,
                        timeout=timeout,
                    )  # fmt: skip
                )
            except (SerializationError, PublishError) as exc:
                if not return_exceptions:
                    # Settle what was sent before raising: no confirm is left unobserved.
                    await asyncio.gather(
                        *(o for o in outcomes if isinstance(o, asyncio.Future)),
                        return_exceptions=True,
                    )
                    raise
                outcomes.append(exc)
        confirms = [o for o in outcomes if isinstance(o, asyncio.Future)]
        settled = iter(await asyncio.gather(*confirms, return_exceptions=True))
        results = [next(settled) if isinstance(o, asyncio.Future) else o for o in outcomes]
        if not return_exceptions:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return results

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

        Raises:
            RPCError: the remote handler raised; `remote_type` names the exception class.
            RPCTimeoutError: no reply within `timeout` seconds.
            PublishError: the request was not confirmed (e.g. `UnroutableError`).
        """
        publisher, _ = self._ready()
        if timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
        if self._rpc is None:
            assert self._channel is not None
            self._rpc = RPCClient(self._channel)
        rpc: RPCClient = self._rpc
        try:
            async with asyncio.timeout(timeout):
                await rpc.ready()
                correlation_id, reply = rpc.expect()
                try:
                    await self.publish(
                        body, queue, exchange=exchange, routing_key=routing_key,
                        headers=headers, correlation_id=correlation_id, reply_to=REPLY_TO,
                        persistent=False, timeout=timeout,
                    )  # fmt: skip
                    return await reply
                finally:
                    reply.cancel()
        except TimeoutError as exc:
            if isinstance(exc, PublishError):
                raise
            target = routing_key or (queue.name if isinstance(queue, Queue) else queue)
            raise RPCTimeoutError(
                f"no reply within {timeout:g} s to the call on {target!r}: is a worker consuming "
                "that queue?"
            ) from None

    def dead_letters(self, queue: str | Queue) -> DeadLetters:
        """The dead-letter queue of `queue`: count, read, replay and purge its messages."""
        _, router = self._ready()
        assert self._connection is not None
        return DeadLetters(self._connection, router.queue_spec(queue))

    async def declare(self, queue: str | Queue) -> str:
        """Declare a queue (with its dead-letter queue) now; returns its name."""
        _, router = self._ready()
        return await router.declare(router.queue_spec(queue))
