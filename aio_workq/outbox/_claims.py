"""The relay's side of the outbox table: its connection, and claiming, deleting, rescheduling rows.

Rows are claimed with `SELECT ... FOR UPDATE SKIP LOCKED` in a transaction, so any number of
relays can share one table; a confirmed row is deleted and a failed one rescheduled in that same
transaction, so a relay that dies mid-batch leaves its rows to the next claim.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from ._errors import OutboxSchemaError
from ._schema import quote, redact_dsn

__all__ = ("ClaimedBatch", "OutboxTable")


class ClaimedBatch:
    """Due rows locked by this relay inside an open transaction, and what it may do with them.

    Each row is ``(id, message_id, queue, exchange, routing_key, body, content_type, headers)``.
    """

    def __init__(
        self,
        table: OutboxTable,
        conn: psycopg.AsyncConnection[TupleRow],
        rows: list[tuple[Any, ...]],
    ) -> None:
        self._table = table
        self._conn = conn
        self.rows = rows

    async def delete(self, ids: Sequence[int]) -> None:
        """Delete the rows with these ids (published and confirmed)."""
        await self._conn.execute(self._table.delete_sql, (list(ids),))

    async def reschedule(self, row_id: int, error: str, retry_delay: float) -> None:
        """Count a failed attempt on a row and make it due again after `retry_delay` seconds
        times its attempts (at most 10 times)."""
        await self._conn.execute(self._table.fail_sql, (error, retry_delay, row_id))


class OutboxTable:
    """One connection to the outbox table of `schema` (opened on demand) and its statements.

    Raises:
        OutboxConfigurationError: `schema` is not a plain SQL identifier.
    """

    def __init__(
        self, dsn: str, schema: str, *, hold: float = 0.0, connect_timeout: int = 0
    ) -> None:
        table = f"{quote(schema)}.workq_outbox"
        self._dsn = dsn
        # libpq's own connect_timeout, unless the DSN says one: a host that does not answer
        # is given up on (and the next one of a DSN with several hosts tried).
        has_timeout = "connect_timeout" in conninfo_to_dict(dsn)
        self._connect: dict[str, Any] = (
            {"connect_timeout": connect_timeout} if connect_timeout and not has_timeout else {}
        )
        # The most a claim's transaction may sit idle on the server (PostgreSQL then ends the
        # session): a relay cut off mid-batch does not keep its rows locked for hours.
        self._hold_sql = (
            f"SET LOCAL idle_in_transaction_session_timeout = {max(1, round(hold * 1000))}"
            if hold > 0
            else None
        )
        self._schema = schema
        self._probe_sql = f"SELECT 1 FROM {table} LIMIT 0"
        self._claim_sql = (
            "SELECT id, message_id, queue, exchange, routing_key, body, content_type, headers "
            f"FROM {table} WHERE available_at <= now() ORDER BY id LIMIT %s "
            "FOR UPDATE SKIP LOCKED"
        )
        self.delete_sql = f"DELETE FROM {table} WHERE id = ANY(%s)"
        self.fail_sql = (
            f"UPDATE {table} SET attempts = attempts + 1, last_error = %s, available_at = now() "
            "+ CAST(%s AS float8) * LEAST(attempts + 1, 10) * interval '1 second' WHERE id = %s"
        )
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None

    async def connect(self) -> psycopg.AsyncConnection[TupleRow]:
        """The open connection, or a new one once the table is found on it.

        Raises:
            OutboxSchemaError: the outbox table is missing.
            psycopg.OperationalError: the database cannot be reached.
        """
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self._dsn, **self._connect)
            try:
                await self._conn.execute(self._probe_sql)
                await self._conn.commit()
            except psycopg.errors.UndefinedTable as exc:
                await self.close()
                raise self.no_table() from exc
        return self._conn

    async def close(self) -> None:
        """Close the connection, if open (errors closing it are ignored)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[ClaimedBatch]:
        """Lock up to `limit` due rows, oldest first, for the block's transaction: it commits
        when the block exits, and rolls back (the rows stay) when it raises.

        Raises:
            OutboxSchemaError: the outbox table is missing.
            psycopg.Error: the database failed.
        """
        conn = await self.connect()
        async with conn.transaction():
            if self._hold_sql is not None:
                await conn.execute(self._hold_sql)
            try:
                rows = await (await conn.execute(self._claim_sql, (limit,))).fetchall()
            except psycopg.errors.UndefinedTable as exc:
                raise self.no_table() from exc
            yield ClaimedBatch(self, conn, rows)

    def no_table(self) -> OutboxSchemaError:
        """The error for a missing outbox table, with how to create it."""
        return OutboxSchemaError(
            f"no table {self._schema}.workq_outbox in the database at "
            f"{redact_dsn(self._dsn)}: create it with `await aio_workq.outbox.migrate(conn, "
            f"schema={self._schema!r})` or the SQL of `aio_workq.outbox.schema_sql()`"
        )
