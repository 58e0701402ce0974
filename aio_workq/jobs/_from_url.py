"""The job store a URL names, for `--store URL` (`aio-workq job`, `aio-workq dashboard`)."""

from __future__ import annotations

from typing import Any

from aio_workq import ConfigurationError, redact_url

__all__ = ("store_from_url",)


def store_from_url(url: str) -> Any:
    """`sqlite:///path/jobs.db` as a `SQLiteStore`, `postgresql://...` as a `PostgresStore`.

    Raises:
        ConfigurationError: another scheme, or PostgreSQL's driver is not installed.
    """
    if url.startswith("sqlite:///"):
        from aio_workq.jobs import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///") or "jobs.db")
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from aio_workq.jobs.postgres import PostgresStore
        except ImportError:
            raise ConfigurationError(
                "a PostgreSQL store needs: pip install 'aio-workq[postgres]'"
            ) from None
        return PostgresStore(url)
    raise ConfigurationError(
        f"store {redact_url(url)!r}: give sqlite:///path/jobs.db or postgresql://user@host/db"
    )
