"""The producer a registry's workers bring for their jobs' enqueues when none is bound.

A task that enqueues another (`await second.enqueue(...)` inside `first`) needs a producer. A
web app binds its own (`tasks.bind(producer)`); in a process that runs the registry's workers
(`tasks.workers()`, `aio-workq worker myapp:tasks.workers`) the workers bring one: opened when
the first of them starts, to the workers' brokers with their TLS context and timeouts, and
closed once the last of them stopped (its handlers finished, their enqueues confirmed). A
producer the user bound wins: then none is opened, and the user's is never closed here.

It has a connection of its own, as the workers' presence beats do (`Beacon`): RabbitMQ blocks
a connection that publishes during a memory or disk alarm and then reads nothing more from it,
acks included, so enqueues on the workers' connection would stop their acks (what frees the
broker's memory) for as long as the alarm lasts. Workers given a robust aio-pika connection
share it, as their beats do.

One producer per event loop (a registry's workers on two loops have one each), shared by every
`tasks.workers()` call on that loop; a forked child opens its own (`os.register_at_fork`).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._link.connection import Connection
from .._publish.producer import Producer

if TYPE_CHECKING:
    import ssl

    from .._hooks import Hook
    from .._link.settings import URLs
    from ._handle import Publisher

__all__ = ("PRODUCER_NAME", "Lease", "LentProducers", "ProducerSettings")

PRODUCER_NAME = "aio-workq task enqueues"
"""The connection name of the producer the workers bring (shown in the management UI)."""
_CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class ProducerSettings:
    """Where and how the workers of one `tasks.workers()` call connect: their producer's."""

    url: URLs | None
    connection: Any
    """The `Connection` or robust aio-pika connection the workers were given, if any."""
    ssl_context: ssl.SSLContext | None
    connect_timeout: float
    wait_for_broker: float
    hooks: tuple[Hook, ...]
    """The `hooks=` of `tasks.workers()`; a worker starting adds those of its `add_hooks()`."""
    name: str

    @classmethod
    def of(
        cls, url: URLs | None, options: Mapping[str, Any], hooks: Sequence[Hook]
    ) -> ProducerSettings:
        """The settings of workers built with `url` and the `Worker` `options`."""
        name = options.get("name")
        return cls(
            url=url,
            connection=options.get("connection"),
            ssl_context=options.get("ssl_context"),
            connect_timeout=options.get("connect_timeout", 10.0),
            wait_for_broker=options.get("wait_for_broker", 0.0),
            hooks=tuple(hooks),
            name=f"{name} (enqueues)" if isinstance(name, str) else PRODUCER_NAME,
        )


class Lease:
    """One event loop's producer, its connection (a sibling we opened, if any) and users."""

    def __init__(self, settings: ProducerSettings, wait_for_broker: float | None) -> None:
        self.users = 0
        self.sibling: Connection | None = None
        shared = settings.connection
        wait = settings.wait_for_broker if wait_for_broker is None else wait_for_broker
        self.wait = wait
        if isinstance(shared, Connection):
            self.sibling = shared.sibling(name=settings.name)
            self.producer = Producer(connection=self.sibling, hooks=settings.hooks)
        elif shared is not None:  # a robust aio-pika connection: shared, as the beats do
            self.producer = Producer(connection=shared, hooks=settings.hooks)
        else:
            self.producer = Producer(
                settings.url,
                ssl_context=settings.ssl_context,
                connect_timeout=settings.connect_timeout,
                name=settings.name,
                hooks=settings.hooks,
                wait_for_broker=wait,
            )
        self.opening: asyncio.Task[None] | None = None
        self.ready = False

    async def open(self) -> None:
        if self.sibling is not None:
            await self.sibling.open(wait_for_broker=self.wait)
        await self.producer.start()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        try:
            await self.producer.close(_CLOSE_TIMEOUT)
        finally:
            if self.sibling is not None:
                await self.sibling.close()


class LentProducers:
    """A registry's producers brought by its workers, one per event loop, counted by use.

    Args:
        bound: the producer the user bound, if any (then none is brought).
    """

    def __init__(self, bound: Callable[[], Publisher | None]) -> None:
        self._bound = bound
        self._lent: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Lease]
        self._lent = weakref.WeakKeyDictionary()
        _all.add(self)

    def publisher(self) -> Publisher | None:
        """What the registry's jobs publish through (their enqueues, a group's callback): the
        producer bound, else the one brought on the running loop once started; None else."""
        bound = self._bound()
        if bound is not None or not self._lent:
            return bound
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: a sync caller
            return None
        lent = self._lent.get(loop)
        return lent.producer if lent is not None and lent.ready else None

    async def acquire(
        self, settings: ProducerSettings, wait_for_broker: float | None
    ) -> Lease | None:
        """A worker starts: the producer of the running loop is opened if it is the first
        (with its settings), and used once more; the lease to `release()`. None (nothing to
        release) when the user bound a producer.

        Raises:
            BrokerConnectionError (and its subclasses): the producer could not connect.
        """
        if self._bound() is not None:
            return None
        loop = asyncio.get_running_loop()
        lent = self._lent.get(loop)
        if lent is None:
            lent = self._lent[loop] = Lease(settings, wait_for_broker)
            lent.opening = loop.create_task(lent.open(), name="aio-workq task enqueues")
        lent.users += 1
        assert lent.opening is not None
        try:
            await asyncio.shield(lent.opening)
        except BaseException:
            await self.release(lent)
            raise
        return lent

    async def release(self, lease: Lease) -> None:
        """A worker that acquired `lease` stopped: the last one closes the producer (what it
        still has in flight gets its confirms, within 5 s)."""
        lease.users -= 1
        if lease.users > 0:
            return
        for loop, lent in list(self._lent.items()):
            if lent is lease:
                del self._lent[loop]
        opening = lease.opening
        if opening is not None and not opening.done():
            opening.cancel()
        if opening is not None:
            await asyncio.gather(opening, return_exceptions=True)
        await lease.close()

    def forget(self) -> None:
        """A forked child: the parent's producers are not its own (it opens its own)."""
        self._lent = weakref.WeakKeyDictionary()


_all: weakref.WeakSet[LentProducers] = weakref.WeakSet()


def _forget_in_child() -> None:
    for producers in list(_all):
        producers.forget()


os.register_at_fork(after_in_child=_forget_in_child)
