"""The relay: moves committed outbox rows to RabbitMQ, deleting each only after its confirm.

`OutboxRelay` is the lifecycle and the loops (poll, LISTEN/NOTIFY, reconnect); the claiming SQL
is `_claims.OutboxTable`, the pipelined publishing `_publishing.RowPublisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterable

import psycopg

from .. import Producer, Queue
from .._link.settings import check_seconds
from ._claims import OutboxTable
from ._errors import OutboxConfigurationError
from ._publishing import RowPublisher
from ._schema import DEFAULT_SCHEMA, NOTIFY_CHANNEL, check_dsn

__all__ = ("OutboxRelay",)

log = logging.getLogger("aio_workq.outbox")

_RECONNECT_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)


def _reconnect_delay(failures: int) -> float:
    """Seconds to wait after `failures` failures in a row (the last delay repeats)."""
    return _RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)]


class OutboxRelay:
    """Publishes committed outbox rows with confirms and deletes each row once it is confirmed.

    It wakes on `LISTEN/NOTIFY` when an insert commits, and polls every `poll_interval` seconds
    as well (a missed notification, a lost listening connection, `delay=` rows coming due).
    Rows are claimed with `SELECT ... FOR UPDATE SKIP LOCKED` in batches, so any number of
    relays can run against one database: each row is locked by one of them at a time. A relay
    that dies mid-batch leaves its rows unlocked and undeleted, so another relay publishes them
    again: delivery is at-least-once, with the row's message id on every copy for consumers to
    deduplicate (see `idempotent`).

    ```python
    async with OutboxRelay("postgresql://app@db/app", url="amqp://guest:guest@mq/"):
        ...  # runs in the background until the block exits
    ```

    Args:
        dsn: the PostgreSQL connection string (libpq URL or key=value).
        url: the broker URL for a producer of the relay's own ...
        producer: ... or a started `Producer` to publish through (not closed by the relay).
        schema: the schema that holds the outbox tables.
        batch_size: rows claimed (and published pipelined) per transaction.
        poll_interval: seconds between polls when no notification arrives.
        retry_delay: seconds before a row whose publish failed is tried again (times the
            number of attempts, up to 10 times this).
        queues: `Queue` specs to declare by name instead of the producer's default (for
            queues with arguments, such as a delivery limit).
        publish_timeout: seconds to wait for a confirm (with `url`); a row whose confirm does
            not come in time stays for a later attempt.
        db_timeout: seconds a connection to PostgreSQL may take, and a step with it (claim,
            delete) may add to a batch: a batch that takes longer than `publish_timeout + 2 *
            db_timeout` is given up (rolled back, its rows published again later; psycopg
            takes up to 10 s more to give the query up), and its connection replaced. On the
            server a claim's transaction may sit idle that long too, then PostgreSQL ends it,
            so a relay cut off mid-batch does not keep its rows locked.
        listen: wake on `LISTEN/NOTIFY`; `False` only polls (for a connection pooler in
            transaction mode, such as PgBouncer's, where `LISTEN` does not work).
        name: the broker connection name (with `url`).

    Raises:
        OutboxConfigurationError: a bad argument (both `url` and `producer`, a batch size < 1,
            a non-positive interval, a bad schema name).
    """

    def __init__(
        self,
        dsn: str,
        *,
        url: str | None = None,
        producer: Producer | None = None,
        schema: str = DEFAULT_SCHEMA,
        batch_size: int = 500,
        poll_interval: float = 2.0,
        retry_delay: float = 5.0,
        queues: Iterable[Queue] = (),
        publish_timeout: float = 30.0,
        db_timeout: float = 10.0,
        listen: bool = True,
        name: str | None = None,
    ) -> None:
        if producer is not None and url is not None:
            raise OutboxConfigurationError("pass url= or producer=, not both")
        if not isinstance(dsn, str) or not dsn:
            raise OutboxConfigurationError(
                f"dsn must be a PostgreSQL connection string, got {dsn!r}"
            )
        check_dsn(dsn, OutboxConfigurationError)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise OutboxConfigurationError(f"batch_size must be an int >= 1, got {batch_size!r}")
        intervals = (
            ("poll_interval", poll_interval),
            ("retry_delay", retry_delay),
            ("publish_timeout", publish_timeout),
            ("db_timeout", db_timeout),
        )
        for label, value in intervals:
            check_seconds(label, value, error=OutboxConfigurationError)
        self._batch_bound = float(publish_timeout + 2 * db_timeout)
        self._table = OutboxTable(
            dsn, schema, hold=self._batch_bound, connect_timeout=max(2, math.ceil(db_timeout))
        )
        self._dsn = dsn
        self._schema = schema
        self._owns_producer = producer is None
        self._own_producer: Callable[[], Producer] = lambda: Producer(
            url, timeout=publish_timeout, name=name
        )
        self._producer = producer if producer is not None else self._own_producer()
        self._queues = {q.name: q for q in queues}
        self._publisher = RowPublisher(self._producer, self._queues)
        self._listen_enabled = listen
        self._batch_size = batch_size
        self._poll_interval = float(poll_interval)
        self._retry_delay = float(retry_delay)
        self._bound: asyncio.AbstractEventLoop | None = None  # its lock's and events' loop
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._listening = False
        self.published = 0
        """Rows published, confirmed and deleted by this relay."""
        self.failed = 0
        """Publish attempts that failed (the row stays and is retried after `retry_delay`)."""

    def __repr__(self) -> str:
        return (
            f"<OutboxRelay schema={self._schema!r} published={self.published} "
            f"listening={self._listening}>"
        )

    @property
    def listening(self) -> bool:
        """Whether the relay's LISTEN connection is up (else it only polls)."""
        return self._listening

    async def __aenter__(self) -> OutboxRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect to the database and the broker, and relay in the background.

        Raises:
            OutboxSchemaError: the outbox table is missing (run `migrate()`).
            psycopg.OperationalError: the database cannot be reached.
            BrokerConnectionError: the broker cannot be reached.
        """
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        if loop is not self._bound:  # another `asyncio.run()`: asyncio's locks belong to one
            self._bound = loop
            self._lock, self._wake, self._stopped = asyncio.Lock(), asyncio.Event(), asyncio.Event()
        self._stopped.clear()
        try:
            await self._table.connect()
            if self._owns_producer:
                await self._producer.start()
        except BaseException:
            await self._table.close()
            raise
        self._tasks = [asyncio.create_task(self._loop(), name="outbox-relay")]
        if self._listen_enabled:
            self._tasks.append(asyncio.create_task(self._listen(), name="outbox-listen"))

    async def stop(self) -> None:
        """Stop relaying: a batch in flight is rolled back (its rows are published again later,
        with the same message ids), then close what the relay opened."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._table.close()
        if self._owns_producer:
            await self._producer.close()
            # a closed producer can't start again: the next start() gets a fresh one
            self._producer = self._own_producer()
            self._publisher = RowPublisher(self._producer, self._queues)
        self._stopped.set()

    async def run(self) -> None:
        """Relay until this task is cancelled (then stop)."""
        await self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    async def drain(self) -> int:
        """Relay batches until no row is due; returns how many rows this call published.

        Rows whose publish fails stay for a later attempt and do not count. Needs `start()`.
        """
        before = self.published
        while await self.relay_batch() >= self._batch_size:
            pass
        return self.published - before

    async def relay_batch(self) -> int:
        """Claim one batch, publish it, delete the confirmed rows; returns the rows claimed.

        Raises:
            OutboxSchemaError: the outbox table is missing.
            psycopg.Error: the database failed (the batch rolled back; its rows stay).
        """
        async with self._lock, self._table.claim(self._batch_size) as batch:
            if not batch.rows:
                return 0
            outcomes = await self._publisher.publish(batch.rows)
            pairs = list(zip(batch.rows, outcomes, strict=True))
            done = [row[0] for row, outcome in pairs if isinstance(outcome, str)]
            if done:
                await batch.delete(done)
            for row, outcome in pairs:
                if isinstance(outcome, BaseException):
                    self.failed += 1
                    log.warning("outbox message %s not published: %r", row[1], outcome)
                    await batch.reschedule(row[0], repr(outcome), self._retry_delay)
        self.published += len(done)
        return len(batch.rows)

    async def _loop(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                async with asyncio.timeout(self._batch_bound):
                    claimed = await self.relay_batch()
                failures = 0
            except Exception as exc:  # the relay outlives a database or broker outage
                delay = _reconnect_delay(failures)
                failures += 1
                if isinstance(exc, TimeoutError):
                    exc = TimeoutError(
                        f"a batch took longer than {self._batch_bound:g} s (the database or "
                        "the broker stopped answering); its rows are published again later"
                    )
                log.warning("outbox relay: %r; again in %.1f s", exc, delay)
                await self._table.close()
                await asyncio.sleep(delay)
                continue
            if claimed >= self._batch_size:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._listening = True
                    failures = 0
                    self._wake.set()  # catch up with what committed while nobody listened
                    async for notify in conn.notifies():
                        if notify.payload == self._schema:
                            self._wake.set()
            except (psycopg.Error, OSError) as exc:
                delay = _reconnect_delay(failures)
                failures += 1
                log.warning("outbox relay: LISTEN connection lost (%s); polling meanwhile", exc)
                await asyncio.sleep(delay)
            finally:
                self._listening = False
