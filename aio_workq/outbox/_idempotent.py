"""The idempotent consumer: a handler's effects and its message id commit in one transaction."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from .. import Job, Reject
from .._link.settings import check_seconds
from ._errors import OutboxConfigurationError
from ._schema import DEFAULT_SCHEMA, quote

__all__ = ("IdempotentConsumer", "TransactionalHandler", "idempotent")

log = logging.getLogger("aio_workq.outbox")

TransactionalHandler = Callable[[Job, AsyncConnection[Any]], Awaitable[Any]]
"""`async def handler(job, conn)`: does its database work on `conn`, inside the transaction."""

DAY = 86_400.0


class IdempotentConsumer:
    """Runs handlers at most once per message id, counted in the database.

    The wrapped handler runs inside a transaction on a connection from `pool`; the message id is
    inserted into the processed-messages table in that same transaction, first. So the
    handler's database effects and the record "this id is done" commit together or not at
    all: a redelivery (the worker died before its ack, a relay published twice) finds the id
    and is acked without running the handler; a handler that raises rolls both back, and the
    retry runs it again. Two deliveries of one id at the same time are serialised by the
    table's primary key: the second waits for the first transaction and then skips.

    ```python
    consumer = idempotent(pool, name="emails")

    @consumer
    async def send_email(job: Job, conn: AsyncConnection) -> None:
        await conn.execute("INSERT INTO sent_emails ...")
    ```

    Only effects inside the transaction are exactly-once; a call to another system from the
    handler (an HTTP request, a mail) still happens at least once.

    Args:
        pool: a psycopg `AsyncConnectionPool` (opened by the caller).
        name: the consumer's name: ids are recorded per name, so two consumers of one message
            (a fan-out) each run once. By default the wrapped handler's qualified name.
        schema: the schema that holds the processed-messages table.
        keep: seconds an id is remembered (7 days by default); a redelivery after that runs
            the handler again. Keep it longer than any retry, delay or dead-letter replay.
        purge_every: at most one purge of expired ids per this many seconds, run after a
            handler's transaction; `None` leaves purging to you (`purge()`).
        key: the message's deduplication key (the message id by default); a message without
            one is rejected to the dead-letter queue.

    Raises:
        OutboxConfigurationError: a bad argument.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        name: str | None = None,
        schema: str = DEFAULT_SCHEMA,
        keep: float = 7 * DAY,
        purge_every: float | None = 300.0,
        key: Callable[[Job], str | None] | None = None,
    ) -> None:
        if not isinstance(pool, AsyncConnectionPool):
            raise OutboxConfigurationError(
                f"pool must be a psycopg_pool.AsyncConnectionPool, got {type(pool).__name__}"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise OutboxConfigurationError(f"name must be a non-empty str, got {name!r}")
        check_seconds("keep", keep, error=OutboxConfigurationError)
        if purge_every is not None:
            check_seconds("purge_every (or None)", purge_every, error=OutboxConfigurationError)
        if key is not None and not callable(key):
            raise OutboxConfigurationError(
                f"key must be a function of the job that returns its deduplication key, got {key!r}"
            )
        table = f"{quote(schema)}.workq_processed"
        self._pool = pool
        self.name = name
        self._keep = float(keep)
        self._purge_every = purge_every
        self._key = key
        self._last_purge = time.monotonic()
        self._derived = False  # the name came from the first wrapped handler
        self._record = (
            f"INSERT INTO {table} (consumer, message_id) VALUES (%s, %s) ON CONFLICT DO NOTHING"
        )
        self._seen = f"SELECT 1 FROM {table} WHERE consumer = %s AND message_id = %s"
        self._purge = (
            f"DELETE FROM {table} WHERE processed_at < now() - CAST(%s AS float8) * "
            "interval '1 second'"
        )
        self.skipped = 0
        """Deliveries acked without running the handler (their id was already recorded)."""

    def __repr__(self) -> str:
        return f"<IdempotentConsumer name={self.name!r} skipped={self.skipped}>"

    def __call__(self, handler: TransactionalHandler) -> Callable[[Job], Awaitable[Any]]:
        """Wrap `handler` into a worker handler of one argument, the job.

        Raises:
            OutboxConfigurationError: a second handler for a consumer whose name was taken
                from the first one.
        """
        if self.name is None:
            self.name = f"{handler.__module__}.{handler.__qualname__}"
            self._derived = True
        elif self._derived:
            raise OutboxConfigurationError(
                f"this idempotent consumer already wraps {self.name}: use one per handler, or "
                "pass the same name= to share the processed ids on purpose"
            )
        consumer = self.name

        @functools.wraps(handler)
        async def run_once(job: Job) -> Any:
            message_id = self._key(job) if self._key is not None else job.message_id
            if not message_id:
                raise Reject(
                    f"idempotent consumer {consumer!r}: the message has no message id to "
                    "deduplicate on (publish with a message id, or pass key=)"
                )
            if isinstance(message_id, str) and "\x00" in message_id:  # PostgreSQL refuses it
                raise Reject(
                    f"idempotent consumer {consumer!r}: the message's deduplication key "
                    f"{message_id!r} has a NUL character, which the processed-messages table "
                    "can't keep (publish with another message id, or pass key=)"
                )
            async with self._pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(self._record, (consumer, message_id))
                if cursor.rowcount == 0:
                    self.skipped += 1
                    log.info("%s: message %s already processed: skipped", consumer, message_id)
                    return None
                result = await handler(job, conn)
            await self._maybe_purge()
            return result

        return run_once

    async def seen(self, message_id: str) -> bool:
        """Whether `message_id` is recorded as processed by this consumer."""
        if self.name is None:
            raise OutboxConfigurationError("this consumer has no name yet: wrap a handler first")
        async with self._pool.connection() as conn:
            cursor = await conn.execute(self._seen, (self.name, message_id))
            return await cursor.fetchone() is not None

    async def purge(self) -> int:
        """Forget ids recorded more than `keep` seconds ago (for every consumer name in the
        table); returns how many."""
        self._last_purge = time.monotonic()
        async with self._pool.connection() as conn:
            cursor = await conn.execute(self._purge, (self._keep,))
            return int(cursor.rowcount)

    async def _maybe_purge(self) -> None:
        if self._purge_every is None or time.monotonic() - self._last_purge < self._purge_every:
            return
        try:
            removed = await self.purge()
        except Exception as exc:  # never fail a job whose transaction already committed
            log.warning("idempotent consumer %s: purging expired ids failed: %r", self.name, exc)
        else:
            log.debug("idempotent consumer %s: %d expired ids purged", self.name, removed)


def idempotent(
    pool: AsyncConnectionPool[Any],
    *,
    name: str | None = None,
    schema: str = DEFAULT_SCHEMA,
    keep: float = 7 * DAY,
    purge_every: float | None = 300.0,
    key: Callable[[Job], str | None] | None = None,
) -> IdempotentConsumer:
    """An `IdempotentConsumer` to decorate transactional handlers with (see its arguments).

    Raises:
        OutboxConfigurationError: a bad argument.
    """
    return IdempotentConsumer(
        pool, name=name, schema=schema, keep=keep, purge_every=purge_every, key=key
    )
