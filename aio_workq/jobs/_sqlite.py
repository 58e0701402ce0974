"""The embedded store: one SQLite file in WAL mode, for one machine and for tests.

Every process on the machine (the web app, `aio-workq worker --processes N`) opens the same
file; WAL mode lets readers go on while one writer commits. The I/O runs in one thread per
store, never on the event loop, and a batch of writes commits in one transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .._exceptions import ConfigurationError
from .._link.settings import check_seconds
from ._errors import StoreError
from ._groupstore import (
    SQLITE_DDL,
    CallbackDue,
    GroupSpec,
    GroupSQL,
    check_same_group,
    due_from,
    group_params,
    mark_params,
    rate_expiry,
)
from ._status import JobRecord, JobState, JobStatus, Write
from ._store import DAY, SQL, check_ttl, recent_params, row_record, write_params

__all__ = ("SQLiteStore",)

_T = TypeVar("_T")
_JSON_IDS = "SELECT value FROM json_each(:ids)"  # the ids, a JSON array
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # primary result codes: another writer

log = logging.getLogger("aio_workq.jobs")

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
-- No index on what a status write changes (SQLite then leaves the indexes alone): the purge
-- finds expired rows through created_at (a record expires at least its TTL after it was created).
CREATE INDEX IF NOT EXISTS workq_jobs_created_idx ON workq_jobs (created_at);
DROP INDEX IF EXISTS workq_jobs_expires_idx;
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
            fails (`StoreError`): the store's bound while the file is locked (there is no
            `fail_fast`, as no server can be down: set this low, or 0, to fail sooner).

    Raises:
        ConfigurationError: a bad argument.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, ttl: float = DAY, busy_timeout: float = 5.0
    ) -> None:
        if not isinstance(path, str | os.PathLike) or not str(path):
            raise ConfigurationError(f"path must be a file path, got {path!r}")
        if "\x00" in str(path):  # sqlite3 would refuse it at every call (ValueError)
            raise ConfigurationError(f"path {str(path)!r} has a NUL character: no file has one")
        check_seconds("busy_timeout", busy_timeout, zero=True)  # inf has no int of ms
        self.path = Path(path)
        self.ttl = check_ttl(ttl)
        self._busy_ms = int(busy_timeout * 1000)
        self._sql = SQL("workq_jobs")
        self._gsql = GroupSQL("", greatest="MAX")
        self._thread: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._last_purge = 0.0
        self._pid = os.getpid()
        self._inherited: list[sqlite3.Connection] = []

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r} ttl={self.ttl:g}>"

    def _after_fork(self) -> None:
        """In a forked child: the parent's thread does not exist here and its connection must
        not be used (SQLite forbids it), nor closed (a close may checkpoint the parent's WAL):
        it is kept, unused, and the child opens a thread and a connection of its own."""
        self._pid = os.getpid()
        if self._conn is not None:
            self._inherited.append(self._conn)
        self._thread, self._conn = None, None

    async def _run(self, func: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        if self._pid != os.getpid():
            self._after_fork()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="workq-sqlite")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._call, func)
        except sqlite3.Error as exc:
            # Another writer holding the lock past `busy_timeout` (SQLITE_BUSY, or LOCKED, with
            # their extended codes): waiting cures it, as a server that does not answer.
            busy = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _BUSY
            raise StoreError(
                f"SQLite store {str(self.path)!r}: {what} failed: {exc}", unreachable=busy
            ) from exc

    def _call(self, func: Callable[[sqlite3.Connection], _T]) -> _T:
        """In the store's thread: connect on first use (and again when the file was deleted or
        replaced since), then run `func`."""
        if self._conn is not None and self._file is not None and self._file != _identity(self.path):
            log.warning(
                "SQLite job store %r: the file was deleted or replaced while open; reopening it "
                "(the records of the old file are gone with it)",
                str(self.path),
            )
            conn, self._conn = self._conn, None
            conn.close()
        if self._conn is None:
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise sqlite3.OperationalError(f"{exc}{_missing_directory(self.path)}") from exc
            try:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(_SCHEMA + SQLITE_DDL)
            except BaseException:
                conn.close()
                raise
            self._conn, self._file = conn, _identity(self.path)
        return func(self._conn)

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        params = [write_params(w, self.ttl) for w in writes]
        claims = [w.claim for w in writes]
        sql, gsql = self._sql, self._gsql
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
                    conn.execute(sql.purge, {"now": now, "oldest": now - self.ttl})
                    for statement in gsql.purge:
                        conn.execute(statement, {"now": now})
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

    async def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        params = {"ids": json.dumps(list(job_ids)), "now": time.time()}

        def read(conn: sqlite3.Connection) -> Any:
            return conn.execute(self._sql.cancels.format(ids=_JSON_IDS), params).fetchall()

        return {row[0] for row in await self._run(read, "reading cancel requests")}

    async def withdraw(self, job_ids: Sequence[str]) -> set[str]:
        params = {"ids": json.dumps(list(job_ids))}

        def withdraw(conn: sqlite3.Connection) -> Any:  # one statement: its own transaction
            return conn.execute(self._sql.withdraw.format(ids=_JSON_IDS), params).fetchall()

        return {row[0] for row in await self._run(withdraw, "withdrawing queued records")}

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

    async def recent(self, *, state: JobState | str, limit: int = 20) -> list[JobStatus]:
        """The jobs in `state` (e.g. failed), most recently changed first (the dashboard's
        "recent failures"; a scan of the table, not for hot paths).

        Raises:
            StoreError: the database can't be read.
            ConfigurationError: `state` is not a job state, or `limit` not an int from 0 to
                10,000.
        """
        params = recent_params(state, limit)

        def read(conn: sqlite3.Connection) -> Any:
            return conn.execute(self._sql.recent, params).fetchall()

        rows = await self._run(read, f"listing {params['state']} jobs")
        return [row_record(row).status for row in rows]

    async def create_group(self, group: GroupSpec, writes: Sequence[Write]) -> None:
        gsql, sql = self._gsql, self._sql
        params = group_params(group, time.time(), self.ttl)
        members = [
            {"group_id": group.group_id, "idx": i, "job_id": job_id, "expires": params["expires"]}
            for i, job_id in enumerate(group.member_ids)
        ]
        job_writes = [write_params(w, self.ttl) for w in writes]

        def create(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(gsql.insert_group, params)
                check_same_group(group, conn.execute(gsql.spec, params).fetchone())
                conn.executemany(gsql.insert_member, members)
                for p in job_writes:
                    conn.execute(sql.write, p).fetchall()

        await self._run(create, f"recording group {group.group_id}")

    async def finish_member(self, write: Write, *, group_id: str, index: int) -> CallbackDue | None:
        gsql, sql = self._gsql, self._sql
        job = write_params(write, self.ttl)
        mark = mark_params(write, group_id, index, self.ttl)
        key = {"group_id": group_id}

        def finish(conn: sqlite3.Connection) -> CallbackDue | None:
            with _transaction(conn):
                conn.execute(sql.write, job).fetchall()
                claimed = False
                if conn.execute(gsql.mark_member, mark).fetchall():
                    conn.execute(gsql.count_down, mark).fetchall()
                    claimed = bool(conn.execute(gsql.claim_callback, key).fetchall())
                row = conn.execute(gsql.group, key).fetchone()
                if row is None or not row[4] or row[5]:
                    return None
                members = conn.execute(gsql.members, key).fetchall()
            return due_from(group_id, row, members, claimed)

        return await self._run(finish, f"finishing job {write.job_id} of group {group_id}")

    async def callback_published(self, group_id: str) -> None:
        def published(conn: sqlite3.Connection) -> None:
            conn.execute(self._gsql.published, {"group_id": group_id})

        await self._run(published, f"recording group {group_id}'s callback")

    async def take_token(
        self, key: str, *, interval: float, tau: float, max_wait: float, now: float
    ) -> float:
        gsql = self._gsql
        params = {
            "key": key, "interval": interval, "tau": tau, "max_wait": max_wait, "now": now,
            "expires": rate_expiry(now, tau, interval),
        }  # fmt: skip

        def take(conn: sqlite3.Connection) -> float:
            with _transaction(conn):
                conn.execute(gsql.insert_bucket, params)
                row = conn.execute(gsql.take, params).fetchone()
                if row is None:
                    row = conn.execute(gsql.peek, params).fetchone()
            return float(row[0])  # the seconds to the slot (`GroupSQL`)

        return await self._run(take, f"taking a token of rate limit {key!r}")

    async def purge(self) -> int:
        def purge(conn: sqlite3.Connection) -> int:
            now = time.time()
            for statement in self._gsql.purge:
                conn.execute(statement, {"now": now})
            return conn.execute(self._sql.purge, {"now": now, "oldest": now - self.ttl}).rowcount

        return await self._run(purge, "purging expired jobs")

    async def close(self) -> None:
        if self._pid != os.getpid():
            self._after_fork()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(thread, conn.close)
        thread.shutdown(wait=False)


def _missing_directory(path: Path) -> str:
    """A hint for a file that could not be opened because its directory is not there."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        return ""
    return f" (the directory {directory!r} does not exist: create it, or give another path)"


def _identity(path: Path) -> tuple[int, int] | None:
    """The file at `path` (device, inode), None when there is none (deleted; `:memory:`)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT` (or `ROLLBACK` on any exception)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self._conn.execute("ROLLBACK" if kind is not None else "COMMIT")
