"""`python -m aio_workq.outbox`: print or apply the migration, or run a relay.

    python -m aio_workq.outbox schema [--schema NAME]
    python -m aio_workq.outbox migrate --dsn DSN [--schema NAME]
    python -m aio_workq.outbox relay --dsn DSN [--url AMQP_URL] [--schema NAME] [--batch-size N]

The DSN defaults to `$DATABASE_URL`, the broker URL to `$AMQP_URL`. The relay runs until SIGINT
or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import psycopg

from .._exceptions import WorkqError
from ._errors import OutboxConfigurationError
from ._relay import OutboxRelay
from ._schema import DEFAULT_SCHEMA, check_dsn, migrate, redact_dsn, schema_sql

__all__ = ("main",)


async def _migrate(dsn: str, schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await migrate(conn, schema=schema)


async def _relay(relay: OutboxRelay) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await relay.run()
    except asyncio.CancelledError:
        pass


def main(argv: list[str] | None = None, prog: str = "python -m aio_workq.outbox") -> int:
    """Run the command; an error is one line on stderr (the password hidden) and exit code 1."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("command", choices=["schema", "migrate", "relay"])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"), help="PostgreSQL DSN")
    parser.add_argument("--url", default=None, help="broker URL (default: $AMQP_URL)")
    parser.add_argument("--schema", default=DEFAULT_SCHEMA, help="schema of the outbox tables")
    parser.add_argument("--batch-size", type=int, default=500, help="rows per transaction")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "schema":
        sys.stdout.write(schema_sql(args.schema))
        return 0
    if not args.dsn:
        parser.error("no database: pass --dsn or set DATABASE_URL")
    name = "aio-workq" if prog.startswith("aio-workq") else prog  # as `aio-workq`'s errors
    try:
        check_dsn(args.dsn, OutboxConfigurationError)  # psycopg's own error quotes it
        return _run(args)
    except psycopg.OperationalError as exc:
        reason = redact_dsn(" ".join(str(exc).split()))  # libpq's lines, as one
        message = (
            f"cannot connect to PostgreSQL at {redact_dsn(args.dsn)} ({reason}); check --dsn "
            "(or DATABASE_URL) and that the server is running"
        )
    except WorkqError as exc:  # the broker, or the outbox tables; it names the fix
        message = str(exc)
    sys.stderr.write(f"{name}: error: {message}\n")
    return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "migrate":
        asyncio.run(_migrate(args.dsn, args.schema))
        logging.getLogger("aio_workq.outbox").info(
            "outbox tables ready in %s, schema %s", redact_dsn(args.dsn), args.schema
        )
        return 0
    relay = OutboxRelay(args.dsn, url=args.url, schema=args.schema, batch_size=args.batch_size)
    asyncio.run(_relay(relay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
