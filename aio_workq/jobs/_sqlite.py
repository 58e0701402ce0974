"""The embedded store: one SQLite file in WAL mode, for one machine and for tests.

Every process on the machine (the web app, `aio-workq worker --processes N`) opens the same
file; WAL mode lets readers go on while one writer commits. The I/O runs in one thread per
store, never on the event loop, and a batch of writes commits in one transaction.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .._exceptions import ConfigurationError
from ._errors import StoreError
from ._status import JobRecord, JobStatus, Write
from ._store import DAY, SQL, check_ttl, row_record, write_params

__all__ = ("SQLiteStore",)

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS workq_jobs (
    job_id            TEXT PRIMARY KEY,
    task              TEXT NOT NULL,
    queue             TEXT NOT NULL,
    state             TEXT NOT NULL,
    rank              INTEGER NOT NULL,
    attempt           INTEGER NOT NULL,
    defers            INTEGER NOT NULL DEFAULT 0,
    next_retry_at     REAL,
    error_type        TEXT,
    error_message     TEXT,
    result            BLOB,
    content_type      TEXT,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    created_at        REAL NOT NULL,
    started_at        REAL,
    finished_at       REAL,
    updated_at        REAL NOT NULL,
    expires_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS workq_jobs_expires_idx ON workq_jobs (expires_at);
"""
_PURGE_EVERY = 60.0


class SQLiteStore:
    """Job states and results in a SQLite file (WAL mode), shared by the processes of one host.

    ```python
    tasks = Tasks(store=SQLiteStore("jobs.db"))
    ```

    Args:
        path: the database file (created with its table on first use).
        ttl: seconds a record is kept after its last change (1 day by default); then it reads
            as absent and is purged.
        busy_timeout: seconds a write waits for another process's transaction before it
            fails (`StoreError`).

    Raises:
        ConfigurationError: a bad argument.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, ttl: float = DAY, busy_timeout: float = 5.0
    ) -> None:
        if not isinstance(path, str | os.PathLike) or not str(path):
            raise ConfigurationError(f"path must be a file path, got {path!r}")
        if not busy_timeout >= 0:
            raise ConfigurationError(f"busy_timeout must be >= 0 seconds, got {busy_timeout!r}")
        self.path = Path(path)
        self.ttl = check_ttl(ttl)
        self._busy_ms = int(busy_timeout * 1000)
        self._sql = SQL("workq_jobs")
        self._thread: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._last_purge = 0.0

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r} ttl={self.ttl:g}>"

    async def _run(self, func: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="workq-sqlite")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._call, func)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {str(self.path)!r}: {what} failed: {exc}") from exc

    def _call(self, func: Callable[[sqlite3.Connection], _T]) -> _T:
        """In the store's thread: connect on first use, then run `func`."""
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return func(self._conn)

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        params = [write_params(w, self.ttl) for w in writes]
        claims = [w.claim for w in writes]
        sql = self._sql
        now = time.time()
        purge = now - self._last_purge > _PURGE_EVERY
        if purge:
            self._last_purge = now

        def apply(conn: sqlite3.Connection) -> list[bool]:
            applied = []
            conn.execute("BEGIN IMMEDIATE")
            try:
                for p, claim in zip(params, claims, strict=True):
                    cursor = conn.execute(sql.claim if claim else sql.write, p)
                    applied.append(cursor.fetchone() is not None)
                if purge:
                    conn.execute(sql.purge, {"now": now})
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return applied

        return await self._run(apply, "recording job states")

    async def get(self, job_id: str) -> JobRecord | None:
        def read(conn: sqlite3.Connection) -> Any:
            return conn.execute(self._sql.get, {"job_id": job_id, "now": time.time()}).fetchone()

        row = await self._run(read, f"reading job {job_id}")
        return None if row is None else row_record(row)

    async def cancel(self, job_id: str, *, now: float) -> JobStatus | None:
        params = {"job_id": job_id, "now": now, "expires": now + self.ttl}
        sql = self._sql

        def cancel(conn: sqlite3.Connection) -> Any:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(sql.cancel_waiting, params)
                conn.execute(sql.cancel_running, params)
                row = conn.execute(sql.get, params).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return row

        row = await self._run(cancel, f"cancelling job {job_id}")
        return None if row is None else row_record(row).status

    async def purge(self) -> int:
        def purge(conn: sqlite3.Connection) -> int:
            return conn.execute(self._sql.purge, {"now": time.time()}).rowcount

        return await self._run(purge, "purging expired jobs")

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(thread, conn.close)
        thread.shutdown(wait=False)
