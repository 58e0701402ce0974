"""The job a handler receives: one delivery, decoded lazily."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Unpack

import aio_pika
from aiormq.abc import AbstractChannel
from pamqp import commands
from pamqp.header import ContentHeader

from .._exceptions import Reject
from .._publish.message import PublishOptions
from .._publish.serialization import decode_body
from .._wire.frames import decode_header
from .._wire.tracker import Outgoing
from .delivery import HEADERS_FLAG, REPLY_TO_FLAG, Delivery, header_flag
from .failures import ATTEMPT_HEADER, BROKER_HEADERS

if TYPE_CHECKING:
    from .._link.specs import Exchange, Queue

__all__ = ("ATTEMPT_HEADER", "BROKER_HEADERS", "Forwarder", "Job", "JobData")


class Forwarder(Protocol):
    """Publishes what a handler forwards (the worker's publisher), returning the confirm."""

    async def forward(
        self,
        body: Any,
        queue: str | Queue | None,
        exchange: str | Exchange,
        routing_key: str | None,
        options: PublishOptions,
    ) -> asyncio.Future[str]: ...

    def send_now(
        self,
        body: Any,
        queue: str | Queue | None,
        exchange: str | Exchange,
        routing_key: str | None,
        options: PublishOptions,
    ) -> Outgoing | None:
        """`forward` when it needs no wait (no coroutine): the message's record, whose
        `future` is the confirm; None, nothing sent, otherwise."""


_UNSET: Any = object()


def _failed(exc: BaseException) -> asyncio.Future[str]:
    """A settled confirm standing for a forward that failed before it was sent."""
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)
        future.exception()  # observed here: the dispatcher reads it, or the handler failed
    return future


def job_of(
    forwarder: Forwarder,
    channel: AbstractChannel,
    consumer_tag: str,
    delivery_tag: int,
    redelivered: bool,
    exchange: str,
    routing_key: str,
    header: bytes,
    body: bytes,
) -> Job:
    """The job of a delivery the demux took off the socket, as its fields: no `Delivery` until
    something asks for it (`Job.delivery`). `Dispatcher.take` makes its jobs as this does,
    inline (a call less per delivery): keep the two alike."""
    job = _new_job(Job)
    job._delivery = None
    job._channel = channel
    job._consumer_tag = consumer_tag
    job._tag = delivery_tag
    job._redelivered = redelivered
    job._exchange = exchange
    job._routing_key = routing_key
    job._header = header
    job._body = body
    job._forwarder = forwarder
    job._data = _UNSET
    job.links = None
    job._sent = None
    job._task = None
    return job


_new_job = object.__new__


def _decode_or_reject(body: bytes, content_type: str | None) -> Any:
    try:
        return decode_body(body, content_type)
    except ValueError as exc:
        raise Reject(f"the body does not decode as {content_type}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class JobData:
    """A picklable copy of a job, for handlers run in a process pool (`executor="process"`)."""

    body: bytes
    content_type: str | None
    headers: Mapping[str, Any]
    message_id: str | None
    attempt: int
    redelivered: bool
    routing_key: str
    exchange: str

    @property
    def data(self) -> Any:
        """The body decoded by its content type (see `Job.data`)."""
        return _decode_or_reject(self.body, self.content_type)


class Job:
    """One delivery handed to a handler.

    Attributes are read from the AMQP message on first use, so a handler that only looks at
    `body` pays for nothing else.
    """

    # The delivery's fields are the job's own: on the fast path its `Delivery` is made only
    # when something asks for it (`delivery`), one object and one call less per message.
    __slots__ = (
        "_body",
        "_channel",
        "_consumer_tag",
        "_data",
        "_delivery",
        "_exchange",
        "_forwarder",
        "_header",
        "_redelivered",
        "_routing_key",
        "_sent",
        "_tag",
        "_task",
        "links",
    )

    def __init__(self, delivery: Delivery, forwarder: Forwarder) -> None:
        self._delivery: Delivery | None = delivery
        self._channel = delivery.channel
        self._consumer_tag = delivery.consumer_tag
        self._tag = delivery.delivery_tag
        self._redelivered = delivery.redelivered
        self._exchange = delivery.exchange
        self._routing_key = delivery.routing_key
        self._header: bytes | ContentHeader = b""  # read through the delivery
        self._body = delivery.body
        self._forwarder = forwarder
        self._data: Any = _UNSET
        self.links: list[asyncio.Future[str]] | None = None
        # The record of the last message sent without a wait (`send_now`), for the
        # dispatcher: the one confirm of a chain step settles the delivery itself (#22).
        self._sent: Outgoing | None = None
        # The task handling this job, while it runs (the dispatcher's, for its own use).
        self._task: asyncio.Task[None] | None = None

    @property
    def delivery(self) -> Delivery:
        """The delivery as it came off the socket (properties decoded on first use)."""
        delivery = self._delivery
        if delivery is None:
            delivery = self._delivery = Delivery(
                self._channel, self._consumer_tag, self._tag, self._redelivered,
                self._exchange, self._routing_key, self._header, self._body,
            )  # fmt: skip
        return delivery

    def _properties(self) -> commands.Basic.Properties:
        """The properties, decoded once: by the job, or by its delivery once there is one."""
        delivery = self._delivery
        if delivery is not None:
            return delivery.properties
        header = self._header
        if isinstance(header, bytes):
            self._header = header = decode_header(header)
        return header.properties

    @property
    def body(self) -> bytes:
        """The raw body."""
        return self._body

    @property
    def data(self) -> Any:
        """The body decoded by its content type: JSON data, `str` for text, else the bytes.

        Raises:
            Reject: the body does not decode; retrying can't help, so the message goes
                straight to the dead-letter queue.
        """
        if self._data is _UNSET:
            self._data = _decode_or_reject(self._body, self.content_type)
        return self._data

    @property
    def headers(self) -> Mapping[str, Any]:
        """The message headers (empty if none)."""
        delivery = self._delivery
        if delivery is not None:
            if not delivery.has_headers:
                return {}
        elif header_flag(self._header, HEADERS_FLAG) is False:
            return {}
        return self._properties().headers or {}

    @property
    def message_id(self) -> str | None:
        """The publisher's message id."""
        return self._properties().message_id

    @property
    def content_type(self) -> str | None:
        """The content type the publisher set."""
        return self._properties().content_type

    @property
    def correlation_id(self) -> str | None:
        """The correlation id (RPC requests carry one)."""
        return self._properties().correlation_id

    @property
    def reply_to(self) -> str | None:
        """Where an RPC reply goes."""
        delivery = self._delivery
        if delivery is not None:
            return delivery.reply_to
        if header_flag(self._header, REPLY_TO_FLAG) is False:
            return None
        return self._properties().reply_to

    @property
    def redelivered(self) -> bool:
        """True when the broker delivered this message before (a crash or a lost connection)."""
        return self._redelivered

    @property
    def routing_key(self) -> str:
        """The routing key the message was published with."""
        return self._routing_key

    @property
    def exchange(self) -> str:
        """The exchange the message was published to (`""` for the default exchange)."""
        return self._exchange

    @property
    def attempt(self) -> int:
        """1 on the first delivery, then one more for each retry."""
        value = self.headers.get(ATTEMPT_HEADER, 1)
        return value if isinstance(value, int) and value >= 1 else 1

    @property
    def delivery_tag(self) -> int:
        """The delivery tag on the worker's channel."""
        return self._tag

    @property
    def message(self) -> aio_pika.IncomingMessage:
        """The aio-pika message, for reading properties; the worker settles it, not you."""
        return aio_pika.IncomingMessage(self.delivery.message(), no_ack=True)

    async def forward(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        **options: Unpack[PublishOptions],
    ) -> str:
        """Publish downstream and wait for the broker's confirm; returns the message id.

        The job is acked only once everything it forwarded is confirmed: if a forward fails,
        whether before the message is sent or after, the job is retried under the worker's
        policy (dead-lettered after its last attempt), never acked, even if the handler caught
        the error. Takes the same arguments as `Producer.publish`.

        Raises:
            SerializationError: the body or an option can't be encoded (nothing was sent).
            ConfigurationError: a bad option, or the `message_id` of a message forwarded
                before is still unconfirmed (nothing was sent).
            TopologyError: the destination queue can't be declared, e.g. it exists with other
                arguments (nothing was sent).
            PublishTimeoutError: no declaration, window room or channel within the timeout
                (nothing was sent), or no confirm.
            PublishError: the broker did not confirm the message.
        """
        confirm = await self.send(
            body, queue, exchange=exchange, routing_key=routing_key, **options
        )
        return await confirm

    async def send(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        **options: Unpack[PublishOptions],
    ) -> asyncio.Future[str]:
        """Like `forward`, without waiting: returns the confirm future (to pipeline many).

        The job's ack still waits for the confirm. A send that fails before its confirm
        exists fails the job just the same (see `forward`).

        Raises:
            SerializationError, ConfigurationError, TopologyError, PublishTimeoutError: as
                `forward`, before the message was sent.
        """
        links = self.links
        if links is None:
            self.links = links = []
        forwarder = self._forwarder
        try:
            # The usual forward (no options, to a known queue, room in the window) is sent
            # here without a coroutine; else it is awaited (declaring, waiting for room).
            sent = forwarder.send_now(body, queue, exchange, routing_key, options)
            if sent is None:
                confirm = await forwarder.forward(body, queue, exchange, routing_key, options)
            else:
                self._sent = sent
                confirm = sent.future  # type: ignore[assignment]  # (a Batch only in publish_many)
        except BaseException as exc:
            # Recorded before it propagates: a handler that catches it must not get its
            # delivery acked, since the message it meant to forward was never sent.
            links.append(_failed(exc))
            raise
        links.append(confirm)
        return confirm

    def forget(self, confirm: asyncio.Future[str]) -> None:
        """Let the job be acked though the forward of `confirm` failed: for a message its
        handler gave up on knowingly (one no retry can send) and whose failure it recorded."""
        links = self.links
        if links is not None and confirm.done() and not confirm.cancelled():
            if confirm.exception() is not None:
                self.links = [link for link in links if link is not confirm]

    def snapshot(self) -> JobData:
        """A picklable copy of this job's data, for handlers in a process pool."""
        return JobData(
            body=self.body,
            content_type=self.content_type,
            headers=dict(self.headers),
            message_id=self.message_id,
            attempt=self.attempt,
            redelivered=self.redelivered,
            routing_key=self.routing_key,
            exchange=self.exchange,
        )

    def __repr__(self) -> str:
        return (
            f"<Job message_id={self.message_id!r} routing_key={self.routing_key!r} "
            f"attempt={self.attempt} redelivered={self.redelivered}>"
        )
