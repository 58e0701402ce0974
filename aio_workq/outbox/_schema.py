"""The SQL shipped with the package: the migration and the statements built on it."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from psycopg import AsyncConnection

from .. import redact_url
from ._errors import OutboxConfigurationError

__all__ = (
    "DEFAULT_SCHEMA",
    "NOTIFY_CHANNEL",
    "check_schema",
    "migrate",
    "redact_dsn",
    "schema_sql",
)

DEFAULT_SCHEMA = "public"
NOTIFY_CHANNEL = "workq_outbox"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_MIGRATION_LOCK = 0x776F726B71  # pg_advisory_xact_lock key: concurrent migrations wait in turn


def check_schema(schema: str) -> str:
    """The schema name if it is a plain SQL identifier.

    Raises:
        OutboxConfigurationError: the name is empty, too long or has other characters.
    """
    if not isinstance(schema, str) or not _IDENTIFIER.fullmatch(schema):
        raise OutboxConfigurationError(
            f"schema must be a plain SQL identifier (letters, digits, _ or $, at most 63, not "
            f"starting with a digit), got {schema!r}"
        )
    return schema


def quote(schema: str) -> str:
    """The schema as a quoted identifier (it is checked first, so quoting is plain)."""
    return '"' + check_schema(schema) + '"'


def schema_sql(schema: str = DEFAULT_SCHEMA) -> str:
    """The migration that creates the outbox and processed-messages tables in `schema`.

    Idempotent: running it again changes nothing. Feed it to your migration tool (Alembic's
    `op.execute()`, Django's `RunSQL`) or call `migrate()`.

    Raises:
        OutboxConfigurationError: `schema` is not a plain SQL identifier.
    """
    text = resources.files(__package__).joinpath("schema.sql").read_text(encoding="utf-8")
    return text.replace("{schema}", quote(schema))


async def migrate(connection: AsyncConnection[object], *, schema: str = DEFAULT_SCHEMA) -> None:
    """Create the tables (if missing) on a psycopg async connection, in a transaction.

    Raises:
        OutboxConfigurationError: `schema` is not a plain SQL identifier.
    """
    await apply_locked(connection, schema_sql(schema), _MIGRATION_LOCK)


async def apply_locked(connection: AsyncConnection[Any], statements: str, lock: int) -> None:
    """Run `statements` in one transaction under the advisory lock `lock`, so that processes
    migrating at once wait in turn (the outbox's and the job store's migrations)."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
        await connection.execute(statements)


def redact_dsn(dsn: str) -> str:
    """A PostgreSQL DSN (URL or key=value) with its password replaced by `***`."""
    if "://" in dsn:
        dsn = redact_url(dsn)
    return _PASSWORD.sub(r"\1***", dsn)
