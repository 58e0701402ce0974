"""The SQL shipped with the package: the migration and the statements built on it."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from psycopg import AsyncConnection, ProgrammingError
from psycopg.conninfo import conninfo_to_dict

from .. import redact_url
from .._exceptions import ConfigurationError
from ._errors import OutboxConfigurationError

__all__ = (
    "DEFAULT_SCHEMA",
    "NOTIFY_CHANNEL",
    "check_dsn",
    "check_schema",
    "migrate",
    "redact_dsn",
    "schema_sql",
)

DEFAULT_SCHEMA = "public"
NOTIFY_CHANNEL = "workq_outbox"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
# `user:password@` wherever it stands, so that a malformed URL hides it too
_USERINFO = re.compile(r"(^|[/\s])([^/:@\s]*):[^@\s]*@")
_QUOTED = re.compile(r'"([^"]*)"')  # a token psycopg's error quotes
_DSN_FORMS = (
    "a URL like postgresql://user:password@host:5432/dbname, or key=value pairs like "
    "'host=db port=5432 dbname=app user=app'"
)
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
    """A PostgreSQL DSN (URL or key=value) with its password replaced by `***`; in a string
    that is neither, whatever stands between `user:` and `@`."""
    dsn = redact_url(dsn) if "://" in dsn else _USERINFO.sub(r"\1\2:***@", dsn)
    return _PASSWORD.sub(r"\1***", dsn)


def _unquoted(reason: str, shown: str) -> str:
    """psycopg's `reason` with each quoted token that `shown` (the DSN, password hidden) does
    not hold replaced by `***`: it quotes the token it could not read, which may be the
    password itself (`invalid percent-encoded token: "s3cret%zz"`)."""
    return _QUOTED.sub(lambda m: m[0] if m[1] in shown else '"***"', reason)


def check_dsn(dsn: str, error: type[ConfigurationError]) -> str:
    """`dsn` if psycopg can read it as a connection string (whose ports are numbers).

    Raises:
        error: it can't: the message says why, without the password, and the forms to use.
    """
    try:
        ports = conninfo_to_dict(dsn).get("port")
    except ProgrammingError as exc:  # its message quotes the DSN, password included
        reason = _unquoted(redact_dsn(str(exc).strip()), redact_dsn(dsn))
    else:
        bad = [port for port in str(ports or "").split(",") if port and not port.isdigit()]
        if not bad:
            return dsn
        reason = f"port {bad[0]!r} is not a number"
    raise error(
        f"dsn {redact_dsn(dsn)!r} is not a PostgreSQL connection string ({reason}): write "
        f"it as {_DSN_FORMS}"
    )
