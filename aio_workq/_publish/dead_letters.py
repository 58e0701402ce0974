"""Count, read, replay and purge a queue's dead letters.

Every read and every replay is one **pass** over the dead letters that were in the queue when it
began (the count of a passive declare): each of them is taken once, and what arrives during the
pass (new dead letters, or replayed copies that failed again) is left for the next one. A dead
letter taken is settled in one of two ways, each copy confirmed by the broker before the original
is acked:

- **moved**: a copy with its failure headers removed and its attempt reset goes to the work queue;
- **kept**: an exact copy (body, properties, every header) goes to the back of the dead-letter
  queue. After a whole pass the kept letters are in their old order, behind nothing older.

Nothing is ever handed back to the queue unacked: a quorum queue counts every such return in
`x-delivery-count` and, from RabbitMQ 4.0 on (a default delivery limit of 20), drops a message it
has returned too often. Reading a dead letter leaves its headers as they were. The one exception:
a dead letter the broker's x-death headers grew past frame_max can't be copied; it is held
unacked to the end of the pass, then returned (logged by id, with what to do), and the others
are read or replayed as usual.

Interrupted, every message is in one of the two queues; a copy confirmed whose original was not
yet acked is in both (at-least-once).

One pass at a time per dead-letter queue, across processes: two passes at once would take each
other's letters and copy them back interleaved (the order lost, and each pass reading some letters
twice and others not at all). A pass (and a purge) holds `{dlq}.pass`, a classic queue declared
**exclusive** (one owner connection: a declare from another fails with `RESOURCE_LOCKED`) with a
consumer on it, auto-deleted when the pass's channel closes or its connection ends; a second
pass waits for it. Within one process a lock per queue orders the passes (an exclusive queue's
owner is the connection, which passes in one process may share).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

from .._exceptions import (
    BrokerConnectionError,
    ConfigurationError,
    PublishError,
    PublishNackedError,
    SerializationError,
    TopologyError,
    UnroutableError,
)
from .._headers import ATTEMPT_HEADER, BROKER_HEADERS, FAILURE_HEADERS
from .._link.connection import LinkSource, translate_errors
from .._link.declare import raw_channel
from .._link.specs import Queue
from .._wire.frames import properties_limit

__all__ = ("DeadLetter", "DeadLetters", "public_name", "replay_headers")

_BATCH = 100
_BATCH_BYTES = 4 * 1024 * 1024
"""A batch ends once its bodies reach this many bytes (it holds one letter at least): a pass
over 16 MiB dead letters holds a few MiB of them at a time, not 100 (1.6 GiB)."""

_SETTLE_CHUNK = 10
"""A batch is copied and acked this many letters at a time, each chunk's copies confirmed
before its acks go out and before the next chunk's copies: on a quorum queue the channel's
client holds back the acks (one command each) past 32 commands not yet applied, and drops
what it holds when the channel closes (rabbitmq-server#10327), which left the last letters of
a pass unacked, beside their copies. A confirm comes once the queue applied everything the
channel sent before it, so at most two chunks' commands (20) are ever on the way. (A replay's
copies go to the work queue, whose confirms do not follow the dead-letter queue's acks: there
the chunks pace its acks, 10 a round trip, without bounding them.)"""

log = logging.getLogger("aio_workq")

_PASS_ARGS: dict[str, Any] = {"x-queue-type": "classic", "x-max-length": 0}
_FIRST_RETRY = 0.02  # seconds before the first look again at a pass held elsewhere
_MAX_RETRY = 0.5  # seconds between looks at most
_HELD_ELSEWHERE = (aiormq.exceptions.ChannelLockedResource, aiormq.exceptions.ChannelNotFoundEntity)
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)
"""Per event loop, a lock per dead-letter queue: one pass at a time in this process."""


class _TooLarge(SerializationError):
    """A dead letter whose copy would make a content header over the connection's frame_max."""


@contextmanager
def _missing_says_why(doing: str, queue: Queue) -> Iterator[None]:
    """`translate_errors`; a dead-letter queue that does not exist is most often a misspelt
    work queue (its `.dlq` is declared with it): the error says to check that name."""
    try:
        with translate_errors(doing):
            yield
    except TopologyError as exc:
        if not isinstance(exc.__cause__, aiormq.exceptions.ChannelNotFoundEntity):
            raise
        raise TopologyError(
            f"{exc}: check the work queue's name ({queue.name!r}); its dead-letter queue is "
            "declared with it, by its first worker or publish"
        ) from exc.__cause__


def public_name(qualified: str) -> str:
    """`aio_workq.X` for an aio-workq class recorded under a private module
    (`aio_workq._exceptions.PayloadError`); any other name as it is."""
    module, _, name = qualified.rpartition(".")
    parts = module.split(".")
    if parts[0] == "aio_workq" and any(part.startswith("_") for part in parts[1:]):
        return f"aio_workq.{name}"
    return qualified


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message in a dead-letter queue, with why it got there."""

    body: bytes
    message_id: str | None
    headers: Mapping[str, Any]
    content_type: str | None
    too_large: str | None = None
    """Set when the pass that read it could not copy it: its properties (the broker's x-death
    headers included) are over the connection's frame_max. Says so and what to do (replay it,
    which leaves the broker's headers, or purge it); it stays in the queue, returned to it at
    the end of the pass. None for the others."""

    @property
    def reason(self) -> str:
        """`type: message` of the exception, or the broker's reason (e.g. `delivery_limit`)."""
        exc_type = self.exception_type
        if exc_type:
            return f"{exc_type}: {self.headers.get('x-workq-exception-message', '')}"
        death = self._death()
        if death is not None:
            return str(death.get("reason", "dead-lettered by the broker"))
        return "unknown"

    @property
    def exception_type(self) -> str | None:
        """The qualified name of the exception that dead-lettered it (`None` when the broker
        did, e.g. at the delivery limit). aio-workq's own exceptions read `aio_workq.Name`."""
        value = self.headers.get("x-workq-exception-type")
        return public_name(str(value)) if value else None

    @property
    def attempts(self) -> int | None:
        """How many attempts the worker made, when it dead-lettered the message itself."""
        value = self.headers.get("x-workq-attempts")
        return value if isinstance(value, int) else None

    @property
    def failed_at(self) -> datetime.datetime | None:
        """When it was dead-lettered (UTC): the worker's last failure, else the broker's."""
        stamp = self.headers.get("x-workq-last-failure")
        when: Any = None
        if isinstance(stamp, str):
            try:
                when = datetime.datetime.fromisoformat(stamp)
            except ValueError:
                when = None
        if when is None and (death := self._death()) is not None:
            when = death.get("time")
        if not isinstance(when, datetime.datetime):
            return None
        return when.replace(tzinfo=datetime.UTC) if when.tzinfo is None else when

    def _death(self) -> Mapping[str, Any] | None:
        deaths = self.headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
            return deaths[0]
        return None


Where = Callable[[DeadLetter], bool]


class DeadLetters:
    """The dead-letter queue of a work queue: count, read, replay, purge.

    Each call is one pass over the dead letters there when it began (see the module's notes):
    `replay()` moves each of them at most once, even when its copy fails again at once and
    lands back in the dead-letter queue, and a read leaves every dead letter as it was (headers,
    `x-delivery-count` included, and order).
    """

    def __init__(self, source: LinkSource, queue: Queue, *, timeout: float = 30.0) -> None:
        if queue.server_named or not queue.dead_letter:
            raise ConfigurationError(f"queue {queue.name!r} has no dead-letter queue")
        self._source = source
        self._queue = queue
        self._timeout = timeout
        self._copier = _Copier(queue, timeout)

    @asynccontextmanager
    async def _channel(
        self, doing: str, *, confirms: bool = False
    ) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        """A channel for one operation, which must finish within the timeout (per batch for
        a pass)."""
        try:
            async with raw_channel(
                self._source, publisher_confirms=confirms, timeout=self._timeout
            ) as channel:
                yield channel
        except TimeoutError:
            raise BrokerConnectionError(
                f"{doing} {self.name!r}: the broker did not answer within {self._timeout:g} s"
            ) from None

    @asynccontextmanager
    async def _alone(self, doing: str) -> AsyncIterator[None]:
        """Hold the dead-letter queue for one pass (or purge): this process's lock for it,
        then `{dlq}.pass` on the broker, waiting while another process holds it (see the
        module's notes)."""
        locks = _LOCKS.setdefault(asyncio.get_running_loop(), {})
        async with locks.setdefault(self.name, asyncio.Lock()):
            delay, told = _FIRST_RETRY, False
            while True:
                async with self._channel(doing) as channel:
                    if await self._hold(channel, doing):
                        yield
                        return  # the channel closes: the broker deletes `{dlq}.pass`
                if not told:
                    log.info(
                        "%s %r waits: another process reads, replays or purges it", doing,
                        self.name,
                    )  # fmt: skip
                    told = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY)

    async def _hold(self, channel: aiormq.abc.AbstractChannel, doing: str) -> bool:
        """Declare `{dlq}.pass` exclusive and consume from it; False when another connection
        holds it."""
        name = f"{self.name}.pass"
        with translate_errors(f"{doing} {self.name!r}"):
            async with asyncio.timeout(self._timeout):
                try:
                    await channel.queue_declare(
                        name, durable=False, exclusive=True, auto_delete=True, arguments=_PASS_ARGS
                    )
                except _HELD_ELSEWHERE:
                    return False
                await channel.basic_consume(name, _nothing, no_ack=True)
        return True

    @property
    def name(self) -> str:
        """The dead-letter queue's name."""
        return self._queue.dead_letter_queue

    async def count(self) -> int:
        """Messages waiting in the dead-letter queue."""
        async with self._channel("counting dead letters in") as channel:
            return await self._count(channel)

    async def read(self, limit: int = 10) -> list[DeadLetter]:
        """Up to `limit` dead letters, oldest first, left in the queue as they were."""
        return await self.find(limit=limit)

    async def find(
        self,
        where: Where | None = None,
        *,
        limit: int | None = None,
        body_limit: int | None = None,
    ) -> list[DeadLetter]:
        """The dead letters for which `where` is true (all without it), oldest first, at most
        `limit`; all left in the queue as they were. `replay()` with the same arguments moves
        these, if nothing changes in between.

        Args:
            where: which dead letters to return.
            limit: return at most this many (the oldest).
            body_limit: each one returned carries at most this many bytes of its body (a
                listing of large dead letters need not hold them); default: the whole body.
        """
        found: list[DeadLetter] = []
        async with aclosing(self._pass(where, limit=limit, move=False, batch=_BATCH)) as steps:
            async for batch in steps:
                if body_limit is not None:
                    batch = [replace(one, body=one.body[:body_limit]) for one in batch]
                found.extend(batch)
        return found

    async def replay(self, limit: int | None = None, *, where: Where | None = None) -> int:
        """Move dead letters back to the work queue with attempts reset; returns how many.

        Args:
            limit: move at most this many (the oldest).
            where: move only the dead letters for which it is true, e.g.
                `lambda d: d.exception_type == "myapp.errors.Timeout"`; the others stay, in
                their order.

        Raises:
            UnroutableError: the work queue does not exist; that dead letter and the rest stay.
            PublishError: a copy was not confirmed; that dead letter and the rest stay.
            BrokerConnectionError: the broker did not answer within the timeout.
        """
        moved = 0
        async with aclosing(self.replay_batches(limit, where=where)) as batches:
            async for batch in batches:
                moved += len(batch)
        return moved

    async def replay_batches(
        self, limit: int | None = None, *, where: Where | None = None, batch: int = _BATCH
    ) -> AsyncGenerator[list[DeadLetter], None]:
        """`replay()`, one batch of at most `batch` dead letters at a time: yields the letters
        of each batch once every one of them is moved. Stop iterating to stop: the rest stay.

        Raises:
            ConfigurationError: `batch` is not positive.
            UnroutableError: the work queue does not exist; that dead letter and the rest stay.
            PublishError: a copy was not confirmed; that dead letter and the rest stay.
            BrokerConnectionError: the broker did not answer within the timeout.
        """
        if batch < 1:
            raise ConfigurationError(f"batch must be >= 1, got {batch!r}")
        async with aclosing(self._pass(where, limit=limit, move=True, batch=batch)) as steps:
            async for moved in steps:
                if moved:
                    yield moved

    async def purge(self, limit: int | None = None) -> int:
        """Delete every dead letter, or with `limit` at most that many (the oldest); returns
        how many.

        `purge(limit=n)` after `count()` returned `n` deletes the letters counted and no
        letter that arrived after the count (new ones go to the back of the queue), where
        `purge()` deletes whatever is there by then.

        Raises:
            ConfigurationError: `limit` is not a whole number >= 0.
            BrokerConnectionError: the broker did not answer within the timeout.
        """
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise ConfigurationError(f"limit must be a whole number >= 0 or None, got {limit!r}")
        async with self._alone("purging"):
            return await self._purge(limit)

    async def _purge(self, limit: int | None) -> int:
        if limit is None:
            async with self._channel("purging") as channel:
                with _missing_says_why(f"purging {self.name!r}", self._queue):
                    async with asyncio.timeout(self._timeout):
                        ok = await channel.queue_purge(self.name)
            return int(ok.message_count or 0)
        deleted = 0
        async with self._channel("purging") as channel:
            with _missing_says_why(f"purging {self.name!r}", self._queue):
                while deleted < limit:
                    async with asyncio.timeout(self._timeout):
                        size = min(_BATCH, limit - deleted)
                        # Taken with no_ack: a quorum queue deletes each in its get, where
                        # acks after the gets could be held and lost (see `_SETTLE_CHUNK`).
                        messages = await self._copier.get_batch(channel, size, no_ack=True)
                        if not messages:
                            break
                    deleted += len(messages)
        return deleted

    # -- one pass ---------------------------------------------------------------------------

    async def _count(self, channel: aiormq.abc.AbstractChannel) -> int:
        with _missing_says_why(f"counting dead letters in {self.name!r}", self._queue):
            async with asyncio.timeout(self._timeout):
                ok = await channel.queue_declare(self.name, passive=True)
        return int(ok.message_count or 0)

    async def _pass(
        self, where: Where | None, *, limit: int | None, move: bool, batch: int
    ) -> AsyncGenerator[list[DeadLetter], None]:
        """Take each dead letter there now once; yields, per batch, the selected ones (moved
        to the work queue when `move`, else kept like the others)."""
        doing = "replaying" if move else "reading dead letters from"
        async with self._alone(doing), self._channel(doing, confirms=True) as channel:
            # Dead letters too large to copy back, held unacked to the end of the pass (so
            # that it does not take them again), then returned to the queue.
            held: list[DeliveredMessage] = []
            try:
                left = await self._count(channel)
                chosen = 0
                kept = False  # once one is kept at the back, the pass goes round (the order)
                moved_ids: set[str] = set()  # never twice in one pass, even out of FIFO order
                while left > 0 and (kept or limit is None or chosen < limit):
                    async with asyncio.timeout(self._timeout):
                        messages = await self._copier.get_batch(channel, min(batch, left))
                        if not messages:
                            break
                        left -= len(messages)
                        selected: list[DeadLetter] = []
                        shown: dict[int | None, int] = {}  # by delivery tag: index in selected
                        plan: list[tuple[DeliveredMessage, bool]] = []
                        for message in messages:
                            letter = _letter(message)
                            take = (
                                (limit is None or chosen < limit)
                                and (where is None or where(letter))
                                and letter.message_id not in moved_ids
                            )
                            if take:
                                chosen += 1
                                shown[message.delivery_tag] = len(selected)
                                selected.append(letter)
                                if move and letter.message_id is not None:
                                    moved_ids.add(letter.message_id)
                            plan.append((message, take and move))
                            kept = kept or not (take and move)
                        for message, error in await self._copier.settle(channel, plan):
                            held.append(message)
                            if (index := shown.get(message.delivery_tag)) is not None:
                                selected[index] = replace(selected[index], too_large=str(error))
                    yield selected
            finally:
                await self._copier.give_back(channel, held)


class _Copier:
    """Takes dead letters off one dead-letter queue and copies them: to the back of that
    queue (kept) or to the work queue (replayed), each copy confirmed before its original is
    acked."""

    def __init__(self, queue: Queue, timeout: float) -> None:
        self._queue = queue
        self._name = queue.dead_letter_queue
        self._timeout = timeout

    async def give_back(
        self, channel: aiormq.abc.AbstractChannel, held: list[DeliveredMessage]
    ) -> None:
        """Return the dead letters too large to copy to the queue (a `basic.nack` with
        requeue: the one way to leave them without a copy); a closed channel returns them
        as well."""
        if not held or channel.is_closed:
            return
        with translate_errors(f"returning dead letters to {self._name!r}"):
            async with asyncio.timeout(self._timeout):
                for message in held:
                    assert message.delivery_tag is not None
                    await channel.basic_nack(message.delivery_tag, requeue=True)

    async def settle(
        self, channel: aiormq.abc.AbstractChannel, plan: list[tuple[DeliveredMessage, bool]]
    ) -> list[tuple[DeliveredMessage, _TooLarge]]:
        """Copy each message (to the work queue, or back to the dead-letter queue), then ack
        each original whose copy was confirmed; raise the first failure after that. Returns
        the ones to keep that are too large to copy, each with its error (left unacked, each
        logged by id): the others are read or replayed all the same."""
        held: list[tuple[DeliveredMessage, _TooLarge]] = []
        for start in range(0, len(plan), _SETTLE_CHUNK):
            await self._settle_chunk(channel, plan[start : start + _SETTLE_CHUNK], held)
        return held

    async def _settle_chunk(
        self,
        channel: aiormq.abc.AbstractChannel,
        plan: list[tuple[DeliveredMessage, bool]],
        held: list[tuple[DeliveredMessage, _TooLarge]],
    ) -> None:
        """`settle` for at most `_SETTLE_CHUNK` messages (see `_SETTLE_CHUNK`)."""
        results = await asyncio.gather(
            *(
                self._publish_back(channel, message) if to_work else self._keep(channel, message)
                for message, to_work in plan
            ),
            return_exceptions=True,
        )
        failure: BaseException | None = None
        with translate_errors(f"acking dead letters in {self._name!r}"):
            for (message, to_work), result in zip(plan, results, strict=True):
                if isinstance(result, _TooLarge) and not to_work:
                    log.warning(
                        "%s (it is returned to %r unacked, once per read; the other dead "
                        "letters are read and replayed as usual)", result, self._name,
                    )  # fmt: skip
                    held.append((message, result))
                    continue
                if isinstance(result, BaseException):
                    failure = failure or result
                    continue
                assert message.delivery_tag is not None
                await channel.basic_ack(message.delivery_tag)
        if failure is not None:
            raise failure

    async def get_batch(
        self, channel: aiormq.abc.AbstractChannel, size: int, *, no_ack: bool = False
    ) -> list[DeliveredMessage]:
        """Up to `size` dead letters, fewer once their bodies reach `_BATCH_BYTES`; with
        `no_ack`, each deleted as it is taken."""
        batch: list[DeliveredMessage] = []
        held = 0
        with translate_errors(f"reading dead letters from {self._name!r}"):
            while len(batch) < size and held < _BATCH_BYTES:
                message = await channel.basic_get(self._name, no_ack=no_ack)
                if message.delivery_tag is None:
                    break
                batch.append(message)
                held += len(message.body)
        return batch

    async def _keep(self, channel: aiormq.abc.AbstractChannel, message: DeliveredMessage) -> None:
        """An exact copy to the back of the dead-letter queue."""
        props = message.header.properties
        await self._publish(
            channel, message.body, props, self._name,
            f"keeping {props.message_id} in {self._name!r}", "the dead-letter queue is gone",
        )  # fmt: skip

    async def _publish_back(
        self, channel: aiormq.abc.AbstractChannel, message: DeliveredMessage
    ) -> None:
        props = message.header.properties
        props.headers = replay_headers(props.headers or {})
        props.delivery_mode = 2
        await self._publish(
            channel, message.body, props, self._queue.name,
            f"replaying {props.message_id} into {self._queue.name!r}",
            f"the work queue {self._queue.name!r} does not exist; declare it first",
        )  # fmt: skip

    async def _publish(
        self,
        channel: aiormq.abc.AbstractChannel,
        body: bytes,
        props: aiormq.spec.Basic.Properties,
        routing_key: str,
        doing: str,
        unroutable: str,
    ) -> None:
        ident = props.message_id
        frame_max = int(channel.connection.connection_tune.frame_max)
        size = len(props.marshal()) - 2  # the property flags are in the frame's overhead
        if size > properties_limit(frame_max):
            # The broker's own headers (x-death) can grow a dead letter past what a client
            # may send: the broker would close the whole connection on the copy.
            raise _TooLarge(
                f"{doing}: its properties ({size:,} bytes, the broker's x-death headers "
                f"included) make a content header over the connection's frame_max of "
                f"{frame_max:,} bytes, so it can't be copied; it stays in the dead-letter "
                "queue. Move it with replay() "
                f"(`aio-workq dlq replay {self._queue.name} --id {ident}`, "
                "without the broker's headers), or purge it"
            )
        try:
            with translate_errors(doing):
                confirm = await channel.basic_publish(
                    body, exchange="", routing_key=routing_key, properties=props, mandatory=True
                )
        except aiormq.exceptions.PublishError as exc:
            raise UnroutableError(
                f"{doing}: {unroutable}. The message stays in the dead-letter queue",
                message_id=ident, routing_key=routing_key,
            ) from exc  # fmt: skip
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishNackedError(
                f"{doing} failed: {exc}; it stays in the dead-letter queue",
                message_id=ident, routing_key=routing_key,
            ) from exc  # fmt: skip
        if not isinstance(confirm, aiormq.spec.Basic.Ack):
            raise PublishError(
                f"{doing} was not confirmed; it stays in the dead-letter queue",
                message_id=ident, routing_key=routing_key,
            )  # fmt: skip


async def _nothing(message: DeliveredMessage) -> None:
    """The consumer that holds `{dlq}.pass` (x-max-length 0: nothing ever arrives)."""


def replay_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of a replayed copy: the failure's and the broker's removed, attempt 1;
    what says what the message is (a task's name, its group) kept."""
    kept = {
        key: value
        for key, value in headers.items()
        if key not in FAILURE_HEADERS and key not in BROKER_HEADERS
    }
    kept[ATTEMPT_HEADER] = 1
    return kept


def _letter(message: DeliveredMessage) -> DeadLetter:
    props = message.header.properties
    return DeadLetter(
        body=message.body,
        message_id=props.message_id,
        headers=dict(props.headers or {}),
        content_type=props.content_type,
    )
