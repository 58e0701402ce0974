"""The insert side: `Outbox.publish()` writes a message in the caller's own transaction."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

from .._exceptions import SerializationError, WorkqError
from .._link.specs import Queue
from .._publish.serialization import encode_body
from .._wire.frames import Properties, check_destination, encode_properties
from ._errors import OutboxConfigurationError, UnsupportedConnectionError
from ._schema import DEFAULT_SCHEMA, quote

__all__ = ("Outbox", "encode", "new_message_id")

_COLUMNS = "message_id, queue, exchange, routing_key, body, content_type, headers, available_at"


def new_message_id() -> str:
    """A fresh unique message id (a UUID4 in hex)."""
    return uuid.uuid4().hex


def encode(body: Any) -> tuple[bytes, str | None]:
    """`(bytes, content_type)` exactly as the producer sends them (the library's own rule).

    Raises:
        SerializationError: the body is neither bytes, str, nor JSON-serialisable.
    """
    return encode_body(body)


def _kind(connection: object) -> str:
    """The family of a connection object, by the module its class comes from."""
    module = type(connection).__module__
    if module.startswith("psycopg"):
        return "psycopg"
    if module.startswith("sqlalchemy"):
        return "sqlalchemy"
    if module.startswith("asyncpg"):
        return "asyncpg"
    return "dbapi" if hasattr(connection, "cursor") else "unknown"


class Outbox:
    """Writes messages into the outbox table inside the caller's database transaction.

    The message is published by an `OutboxRelay` once the transaction commits, and never if it
    rolls back: the row and the message share the transaction's fate.

    ```python
    outbox = Outbox()
    async with conn.transaction():
        await conn.execute("INSERT INTO orders ...")
        await outbox.publish(conn, {"order": 42}, queue="emails")
    ```

    Args:
        schema: the schema that holds the outbox tables (see `migrate()`).

    Raises:
        OutboxConfigurationError: `schema` is not a plain SQL identifier.
    """

    def __init__(self, *, schema: str = DEFAULT_SCHEMA) -> None:
        table = f"{quote(schema)}.workq_outbox"
        self.schema = schema
        # One statement in the three placeholder styles: DB-API/psycopg, SQLAlchemy, asyncpg.
        pct = (
            "%s, %s, %s, %s, %s, %s, CAST(%s AS jsonb), "
            "now() + CAST(%s AS float8) * interval '1 second'"
        )
        self._sql_pct = f"INSERT INTO {table} ({_COLUMNS}) VALUES ({pct})"
        named = (
            ":message_id, :queue, :exchange, :routing_key, :body, :content_type, "
            "CAST(:headers AS jsonb), now() + CAST(:delay AS float8) * interval '1 second'"
        )
        self._sql_named = f"INSERT INTO {table} ({_COLUMNS}) VALUES ({named})"
        dollars = (
            "$1, $2, $3, $4, $5, $6, CAST($7 AS jsonb), "
            "now() + CAST($8 AS float8) * interval '1 second'"
        )
        self._sql_dollar = f"INSERT INTO {table} ({_COLUMNS}) VALUES ({dollars})"

    def __repr__(self) -> str:
        return f"<Outbox schema={self.schema!r}>"

    async def publish(
        self,
        connection: Any,
        body: Any,
        queue: str | None = None,
        *,
        exchange: str = "",
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        delay: float | None = None,
    ) -> str:
        """Insert a message in the connection's current transaction; returns its message id.

        Args:
            connection: a psycopg `AsyncConnection` or `AsyncCursor`, a SQLAlchemy
                `AsyncSession` or `AsyncConnection`, or an asyncpg `Connection`, inside the
                transaction the message belongs to.
            body: bytes, str (sent as UTF-8 text) or JSON-serialisable data.
            queue: the queue name (declared by the relay on first use) ...
            exchange: ... or an existing exchange, with `routing_key`.
            routing_key: the routing key (with `exchange`, or alone for the default exchange).
            headers: message headers (JSON-serialisable values).
            message_id: the message id the consumer sees (a fresh one by default); unique.
            delay: seconds before the relay publishes the message.

        Raises:
            SerializationError: the body or the headers cannot be encoded.
            OutboxConfigurationError: no destination, both a queue and an exchange, a bad
                message id or delay.
            UnsupportedConnectionError: a sync connection (use `publish_sync()`) or an object
                that is not a supported connection.
        """
        row = self._row(body, queue, exchange, routing_key, headers, message_id, delay)
        kind = _kind(connection)
        is_async = type(connection).__name__.startswith("Async")
        if kind in ("psycopg", "sqlalchemy") and not is_async:
            raise UnsupportedConnectionError(
                f"{type(connection).__name__} is a sync connection: call "
                "outbox.publish_sync(connection, ...) instead of await outbox.publish()"
            )
        if kind == "psycopg":
            await connection.execute(self._sql_pct, row)
        elif kind == "sqlalchemy":
            from sqlalchemy import text

            await connection.execute(text(self._sql_named), self._named(row))
        elif kind == "asyncpg":
            await connection.execute(self._sql_dollar, *row)
        else:
            raise UnsupportedConnectionError(
                f"cannot publish through a {type(connection).__module__}."
                f"{type(connection).__name__}: pass a psycopg AsyncConnection, a SQLAlchemy "
                "AsyncSession/AsyncConnection or an asyncpg Connection (for sync code, a "
                "DB-API connection to publish_sync())"
            )
        return str(row[0])

    def publish_sync(
        self,
        connection: Any,
        body: Any,
        queue: str | None = None,
        *,
        exchange: str = "",
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        delay: float | None = None,
    ) -> str:
        """`publish()` for sync code: Django, psycopg's `Connection`, SQLAlchemy's `Session`.

        Args:
            connection: a DB-API connection with `cursor()` (psycopg `Connection`, Django's
                `django.db.connection`, psycopg2), or a SQLAlchemy `Session` or `Connection`.
            body: see `publish()`, like the other arguments.
            queue: see `publish()`.
            exchange: see `publish()`.
            routing_key: see `publish()`.
            headers: see `publish()`.
            message_id: see `publish()`.
            delay: see `publish()`.

        Raises:
            SerializationError: the body or the headers cannot be encoded.
            OutboxConfigurationError: see `publish()`.
            UnsupportedConnectionError: an async connection (use `await publish()`) or an
                object that is not a supported connection.
        """
        row = self._row(body, queue, exchange, routing_key, headers, message_id, delay)
        kind = _kind(connection)
        if kind == "sqlalchemy" and not type(connection).__name__.startswith("Async"):
            from sqlalchemy import text

            connection.execute(text(self._sql_named), self._named(row))
        elif kind in ("psycopg", "dbapi") and not type(connection).__name__.startswith("Async"):
            with connection.cursor() as cursor:
                cursor.execute(self._sql_pct, row)
        else:
            raise UnsupportedConnectionError(
                f"cannot publish_sync() through a {type(connection).__module__}."
                f"{type(connection).__name__}: pass a DB-API connection (psycopg, Django's "
                "connection) or a SQLAlchemy Session (for async code, await publish())"
            )
        return str(row[0])

    @staticmethod
    def _named(row: tuple[Any, ...]) -> dict[str, Any]:
        """The row's values by name, for SQLAlchemy's `text()`."""
        names = ("message_id", "queue", "exchange", "routing_key", "body", "content_type")
        return dict(zip((*names, "headers", "delay"), row, strict=True))

    @staticmethod
    def _row(
        body: Any,
        queue: str | None,
        exchange: str,
        routing_key: str | None,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        delay: float | None,
    ) -> tuple[Any, ...]:
        """The row's values, validated before anything touches the database."""
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise OutboxConfigurationError(f"queue must be a non-empty name, got {queue!r}")
        if queue is not None and exchange:
            raise OutboxConfigurationError("publish to queue= or to exchange=, not both")
        if queue is None and not exchange and not routing_key:
            raise OutboxConfigurationError(
                "nowhere to publish: pass queue='name', or exchange= and routing_key="
            )
        if message_id is None:
            message_id = new_message_id()
        elif (
            not isinstance(message_id, str)
            or not message_id
            or _octets(message_id) > 255
            or "\x00" in message_id  # PostgreSQL's text can't keep it
        ):
            raise OutboxConfigurationError(
                f"message_id must be a non-empty str of at most 255 bytes (UTF-8), without a "
                f"NUL character, got {message_id!r}"
            )
        _check_destination(queue, exchange, routing_key)
        seconds = 0.0 if delay is None else delay
        if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
            raise OutboxConfigurationError(f"delay must be >= 0 seconds, got {delay!r}")
        data, content_type = encode(body)
        header_json = None
        if headers is not None:
            try:
                header_json = json.dumps(dict(headers), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise SerializationError(
                    f"outbox headers must be JSON-serialisable (str, int, float, bool, None, "
                    f"lists and dicts of them): {exc}"
                ) from exc
            loaded = json.loads(header_json)
            if _has_nul(loaded):  # jsonb refuses \u0000, failing the caller's transaction
                raise SerializationError(
                    "outbox headers can't hold a NUL character (PostgreSQL's jsonb refuses "
                    "it): remove it, or escape it in the value (e.g. as '\\x00')"
                )
            # As the relay will send them (from JSON): what AMQP can't carry fails here, in
            # the caller's transaction, not at every relay pass after it is committed.
            encode_properties(Properties(message_id=message_id, headers=loaded))
        return (
            message_id, queue, exchange, routing_key or "", data, content_type, header_json,
            float(seconds),
        )  # fmt: skip


def _has_nul(value: object) -> bool:
    """Whether a NUL is in a string of `value` (JSON data: keys and values, nested)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _octets(text: str) -> int:
    """`text`'s length in UTF-8 (a lone surrogate, which can't be sent, counts as too long)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return 256


def _check_destination(queue: str | None, exchange: str, routing_key: str | None) -> None:
    """Refuse a destination the relay could never publish to, as the producer would.

    Raises:
        OutboxConfigurationError: an invalid queue or exchange name, or routing key.
    """
    try:
        if queue is not None:
            Queue(queue)
        else:
            check_destination(exchange, routing_key or "", True)
    except WorkqError as exc:
        raise OutboxConfigurationError(str(exc)) from None
    if routing_key is not None and "\x00" in routing_key:  # PostgreSQL's text can't keep it
        raise OutboxConfigurationError(
            f"routing key {routing_key!r} has a NUL character, which the outbox table can't "
            "keep: give a key without one"
        )
