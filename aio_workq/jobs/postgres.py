"""The production job store: a table in the PostgreSQL you already run.

Needs the `postgres` extra (`pip install 'aio-workq[postgres]'`, psycopg 3). Create the table
with `migrate()` or ship `schema_sql()` with your migrations, like the outbox's tables.
"""

from __future__ import annotations

import operator
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from itertools import compress
from typing import Any

from psycopg import AsyncConnection, AsyncRawCursor
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from .._exceptions import ConfigurationError
from .._link.settings import check_flag, check_seconds
from ..outbox._schema import apply_locked, check_dsn, check_schema, quote, redact_dsn
from ._groupstore import (
    CallbackDue,
    GroupSpec,
    GroupSQL,
    check_same_group,
    due_from,
    group_params,
    mark_params,
    rate_expiry,
)
from ._pgcolumns import Columns, register_arrays
from ._pgpool import StorePool
from ._status import JobRecord, JobState, JobStatus, Write
from ._store import (
    CLAIM,
    DAY,
    ROWS,
    SQL,
    WRITE,
    check_ttl,
    recent_params,
    rounds,
    row_record,
    write_params,
)

__all__ = ("DEFAULT_SCHEMA", "PostgresStore", "migrate", "schema_sql")

DEFAULT_SCHEMA = "public"
_MIGRATION_LOCK = 0x776F726B6A  # pg_advisory_xact_lock key: concurrent migrations wait in turn
_PARAM = re.compile(r"(?<![:\w]):([a-z_]+)")
_PURGE_EVERY = 60.0
_PURGE_ROWS = 5000
_SERVER_CLOCK = "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"
"""The server's time in Unix seconds, fixed for the statement (rate-limit slots)."""
"""Most rows of each table a purge in front of a batch of writes deletes: a backlog of expired
records (a day's, after the workers were stopped for one) is deleted a part in front of each
batch, never all in one statement that could outlast the store's timeout and fail every batch
(each attempt rolled back, to start over in front of the next)."""
_MEMBERS = 2  # the members' purge among `_purge_some`
_DELETE = re.compile(r"DELETE FROM (\S+) WHERE (.+)", re.DOTALL)
# A write's fields by their place in its tuple (cheaper than by name, once per write).
_JOB_ID, _CLAIM_OF, _REQUEUE = (
    operator.itemgetter(Write._fields.index(name)) for name in ("job_id", "claim", "requeue")
)
# A batch's writes as rows: one array parameter per field (SQL.round reads them), sent in
# PostgreSQL's binary array format, built here (`Columns`) in one go per column.
_UNNEST = (
    "SELECT * FROM unnest(:{p}job_id::text[], :{p}task::text[], :{p}queue::text[], "
    ":{p}state::text[], :{p}rank::smallint[], :{p}attempt::integer[], :{p}defers::integer[], "
    ":{p}next_retry_at::float8[], :{p}error_type::text[], :{p}error_message::text[], "
    ":{p}result::bytea[], :{p}content_type::text[], :{p}at::float8[]) "
    f"AS u({ROWS})"
)


def _plan(writes: Sequence[Write]) -> list[dict[str, list[int]]]:
    """`rounds(writes)`, without a step per write when each job is written once and no write
    is a requeue (a worker's usual batch: claims and outcomes of different jobs, #23)."""
    n = len(writes)
    job_ids = list(map(_JOB_ID, writes))
    if len(set(job_ids)) < n or any(map(_REQUEUE, writes)):
        return rounds(writes)
    order = sorted(range(n), key=job_ids.__getitem__)
    claims = list(map(_CLAIM_OF, writes))
    if all(claims):
        return [{CLAIM: order}]
    if not any(claims):
        return [{WRITE: order}]
    flags = list(map(claims.__getitem__, order))
    claimed = list(compress(order, flags))
    written = list(compress(order, map(operator.not_, flags)))
    # The kinds in the order they first appear, as `rounds` has them (the statement's text).
    return [{CLAIM: claimed, WRITE: written} if claims[0] else {WRITE: written, CLAIM: claimed}]


def _bounded(delete: str) -> str:
    """`DELETE FROM t WHERE ...` for at most `:limit` of the rows it would delete (a row
    written since the snapshot has a new ctid: it is left alone, as the full statement's
    recheck of the condition would leave it)."""
    match = _DELETE.fullmatch(delete)
    if match is None:
        raise ValueError(f"not a DELETE ... WHERE: {delete!r}")
    table, condition = match.groups()
    return (
        f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM {table} WHERE {condition} LIMIT :limit))"
    )


async def _purge_part(conn: Any, statements: Sequence[str], now: float, ttl: float) -> bool:
    """In front of a batch of writes (first: if it fails, the batch fails with nothing
    written), at most `_PURGE_ROWS` expired rows of each table: whether that was all of them."""
    params = {"now": now, "oldest": now - ttl, "limit": _PURGE_ROWS}
    more = False
    async with conn.transaction():
        for i, statement in enumerate(statements):
            if i == _MEMBERS and more:
                # expired jobs or groups are left: the members wait for their groups to go
                # first (a group is never found without them)
                continue
            cursor = await conn.execute(statement, params)
            more = more or cursor.rowcount >= _PURGE_ROWS
    return not more


def schema_sql(schema: str = DEFAULT_SCHEMA) -> str:
    """The migration that creates the job table in `schema` (idempotent).

    Raises:
        ConfigurationError: `schema` is not a plain SQL identifier.
    """
    text = resources.files(__package__).joinpath("schema.sql").read_text(encoding="utf-8")
    return text.replace("{schema}", quote(schema))


async def migrate(connection: AsyncConnection[Any], *, schema: str = DEFAULT_SCHEMA) -> None:
    """Create the job table (if missing) on a psycopg async connection, in a transaction.

    Raises:
        ConfigurationError: `schema` is not a plain SQL identifier.
    """
    await apply_locked(connection, schema_sql(schema), _MIGRATION_LOCK)


def _psycopg(sql: str, binary: bool = False) -> str:
    return _PARAM.sub(r"%(\1)b" if binary else r"%(\1)s", sql)


def _numbered(sql: str, encoding: str) -> tuple[bytes, tuple[str, ...]]:
    """`sql` with PostgreSQL's own `$n` placeholders, for a raw cursor (psycopg parses a
    statement this long again at each execution, otherwise), and the names in their order."""
    names: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        return f"${names.setdefault(match.group(1), len(names) + 1)}"

    text = _PARAM.sub(number, sql)
    return text.encode(encoding), tuple(names)


class PostgresStore:
    """Job states and results in PostgreSQL, shared by every process and host.

    ```python
    tasks = Tasks(store=PostgresStore(os.environ["DATABASE_URL"]))
    ```

    Args:
        dsn: a PostgreSQL DSN (a pool of `max_size` connections is opened on first use) ...
        pool: ... or a psycopg `AsyncConnectionPool` of yours (opened and closed by you).
        schema: the schema that holds `workq_jobs` (create it with `migrate()`).
        ttl: seconds a record is kept after its last change (1 day by default).
        timeout: seconds a call may take, a connection from the pool and the answer, before
            it raises `StoreError` (a server that stops answering included; the connection
            is then cancelled and closed in the background).
        max_size: connections in the pool this store opens.
        fail_fast: while the server is known to refuse connections (the store probes it each
            second), raise `StoreError` (`unreachable`) at once, not after `timeout`; the
            first call without a connection after 0.1 s has it probed at once (a given
            `pool=` is probed with its own conninfo).

    Raises:
        ConfigurationError: a bad argument.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: AsyncConnectionPool[Any] | None = None,
        schema: str = DEFAULT_SCHEMA,
        ttl: float = DAY,
        timeout: float = 5.0,
        max_size: int = 4,
        fail_fast: bool = False,
    ) -> None:
        _check_arguments(dsn, pool, schema, timeout, max_size)
        self.ttl = check_ttl(ttl)
        self._where = redact_dsn(dsn) if dsn else "the given pool"
        self._pool = StorePool(
            dsn=dsn, pool=pool, max_size=max_size, timeout=timeout,
            where=f"PostgreSQL store ({self._where})", schema=schema,
            fail_fast=check_flag("fail_fast", fail_fast),
        )  # fmt: skip
        self._run = self._pool.run
        sql = SQL(f"{quote(schema)}.workq_jobs", rows=_UNNEST)
        self._write = _psycopg(sql.write)
        self._sql = sql
        self._rounds: dict[tuple[tuple[str, ...], str], tuple[bytes, tuple[str, ...]]] = {}
        self._columns = Columns()
        self._arrays: weakref.WeakSet[Any] = weakref.WeakSet()  # connections that send them
        self._claim = _psycopg(sql.claim)
        self._get = _psycopg(sql.get)
        self._cancels = _psycopg(sql.cancels.format(ids="SELECT unnest(:ids::text[])"))
        self._withdraw = _psycopg(sql.withdraw.format(ids="SELECT unnest(:ids::text[])"))
        self._recent = _psycopg(sql.recent)
        self._cancel_waiting = _psycopg(sql.cancel_waiting)
        self._cancel_running = _psycopg(sql.cancel_running)
        self._purge = _psycopg(sql.purge)
        # Rate-limit slots by the server's clock: the workers' hosts' clocks disagree.
        g = GroupSQL(f"{quote(schema)}.", greatest="GREATEST", clock=_SERVER_CLOCK)
        self._g = {
            name: _psycopg(getattr(g, name))
            for name in (
                "insert_group", "insert_member", "mark_member", "count_down", "claim_callback",
                "group", "members", "published", "insert_bucket", "take", "peek", "spec",
            )
        }  # fmt: skip
        self._gpurge = [_psycopg(statement) for statement in g.purge]
        # jobs, groups, members (`_MEMBERS`), rate buckets: a group's row before its members'
        self._purge_some = [
            _psycopg(_bounded(statement)) for statement in (sql.purge, *g.purge)
        ]  # fmt: skip
        self._last_purge = 0.0

    def __repr__(self) -> str:
        return f"<PostgresStore {self._where} ttl={self.ttl:g}>"

    def _round(self, kinds: tuple[str, ...], encoding: str) -> tuple[bytes, tuple[str, ...]]:
        statement = self._rounds.get((kinds, encoding))
        if statement is None:
            statement = self._rounds[kinds, encoding] = _numbered(self._sql.round(kinds), encoding)
        return statement

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        now = time.time()
        purge = now - self._last_purge > _PURGE_EVERY
        applied = [False] * len(writes)
        plan = _plan(writes)

        async def apply(conn: Any) -> None:
            # One statement per round (one round unless a job is written twice), a part per
            # kind of write. One round runs on its own (its own transaction, one round trip);
            # more run in order in one transaction. A failed statement fails the whole batch.
            autocommit = conn.autocommit
            if len(plan) == 1 and not autocommit:
                await conn.set_autocommit(True)
            try:
                if purge and await _purge_part(conn, self._purge_some, now, self.ttl):
                    self._last_purge = now  # else the next batch deletes the next part
                if len(plan) == 1:
                    await self._apply(conn, writes, plan[0], applied)
                else:
                    async with conn.transaction():
                        for kinds in plan:
                            await self._apply(conn, writes, kinds, applied)
            finally:
                if conn.autocommit != autocommit:
                    await conn.set_autocommit(autocommit)

        await self._run("recording job states", apply, detach=False)  # no task more a batch
        return applied

    async def _apply(
        self, conn: Any, writes: Sequence[Write], kinds: dict[str, list[int]], applied: list[bool]
    ) -> None:
        params: dict[str, Any] = {"ttl": self.ttl}
        encoding = conn.info.encoding
        try:
            for kind, indexes in kinds.items():
                params.update(self._columns.build(writes, indexes, kind, encoding))
        except ValueError as exc:  # nothing sent: the batch fails as the server would fail it
            raise self._pool.failed("recording job states", exc) from exc
        statement, names = self._round(tuple(kinds), encoding)
        if conn not in self._arrays:  # our own column types only: nothing else changes
            register_arrays(conn.adapters)
            self._arrays.add(conn)
        cursor = AsyncRawCursor(conn, row_factory=tuple_row)  # whatever the pool's rows are
        await cursor.execute(statement, [params[name] for name in names])
        if cursor.rowcount == sum(map(len, kinds.values())):
            # Every write applied (the usual case): the ids returned need not be read (#23).
            for indexes in kinds.values():
                for i in indexes:
                    applied[i] = True
            return
        done = {row[0] for row in await cursor.fetchall()}
        for indexes in kinds.values():
            for i in indexes:
                applied[i] = writes[i].job_id in done

    async def get(self, job_id: str) -> JobRecord | None:
        async def read(conn: Any) -> Any:
            cursor = await conn.execute(self._get, {"job_id": job_id, "now": time.time()})
            return await cursor.fetchone()

        row = await self._run(f"reading job {job_id}", read)
        return None if row is None else row_record(row)

    async def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        params = {"ids": list(job_ids), "now": time.time()}
        return await _ids(self._run, "reading cancel requests", self._cancels, params)

    async def withdraw(self, job_ids: Sequence[str]) -> set[str]:
        doing, params = "withdrawing queued records", {"ids": list(job_ids)}
        return await _ids(self._run, doing, self._withdraw, params, detach=False)

    async def cancel(self, job_id: str, *, now: float) -> JobStatus | None:
        params = {"job_id": job_id, "now": now, "expires": now + self.ttl}

        async def cancel(conn: Any) -> Any:
            async with conn.transaction():
                await conn.execute(self._cancel_waiting, params)
                await conn.execute(self._cancel_running, params)
                cursor = await conn.execute(self._get, params)
                return await cursor.fetchone()

        row = await self._run(f"cancelling job {job_id}", cancel)
        return None if row is None else row_record(row).status

    async def recent(self, *, state: JobState | str, limit: int = 20) -> list[JobStatus]:
        """The jobs in `state` (e.g. failed), most recently changed first (the dashboard's
        "recent failures"; a scan of the table, not for hot paths).

        Raises:
            StoreError: the database can't be reached.
            ConfigurationError: `state` is not a job state, or `limit` not an int from 0 to
                10,000.
        """
        params = recent_params(state, limit)

        async def read(conn: Any) -> list[Any]:
            cursor = await conn.execute(self._recent, params)
            rows: list[Any] = await cursor.fetchall()
            return rows

        rows = await self._run(f"listing {params['state']} jobs", read)
        return [row_record(row).status for row in rows]

    async def create_group(self, group: GroupSpec, writes: Sequence[Write]) -> None:
        g = self._g
        params = group_params(group, time.time(), self.ttl)

        async def create(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute(g["insert_group"], params)
                recorded = await (await conn.execute(g["spec"], params)).fetchone()
                check_same_group(group, recorded)
                async with conn.cursor() as cursor:
                    await cursor.executemany(
                        g["insert_member"],
                        [
                            {"group_id": group.group_id, "idx": i, "job_id": job_id,
                             "expires": params["expires"]}
                            for i, job_id in enumerate(group.member_ids)
                        ],
                    )  # fmt: skip
                for write in writes:
                    await conn.execute(self._write, write_params(write, self.ttl))

        await self._run(f"recording group {group.group_id}", create)

    async def finish_member(self, write: Write, *, group_id: str, index: int) -> CallbackDue | None:
        g = self._g
        key = {"group_id": group_id}
        mark = mark_params(write, group_id, index, self.ttl)

        async def finish(conn: Any) -> CallbackDue | None:
            async with conn.transaction():
                await conn.execute(self._write, write_params(write, self.ttl))
                claimed = False
                cursor = await conn.execute(g["mark_member"], mark)
                if await cursor.fetchone() is not None:
                    await conn.execute(g["count_down"], mark)
                    cursor = await conn.execute(g["claim_callback"], key)
                    claimed = await cursor.fetchone() is not None
                cursor = await conn.execute(g["group"], key)
                row = await cursor.fetchone()
                if row is None or not row[4] or row[5]:
                    return None
                cursor = await conn.execute(g["members"], key)
                members = await cursor.fetchall()
            return due_from(group_id, row, members, claimed)

        return await self._run(f"finishing job {write.job_id} of group {group_id}", finish)

    async def callback_published(self, group_id: str) -> None:
        async def mark(conn: Any) -> None:
            await conn.execute(self._g["published"], {"group_id": group_id})

        await self._run(f"recording group {group_id}'s callback", mark)

    async def take_token(
        self, key: str, *, interval: float, tau: float, max_wait: float, now: float
    ) -> float:
        params = {
            "key": key, "interval": interval, "tau": tau, "max_wait": max_wait, "now": now,
            "expires": rate_expiry(now, tau, interval),
        }  # fmt: skip

        async def take(conn: Any) -> Any:
            async with conn.transaction():
                await conn.execute(self._g["insert_bucket"], params)
                cursor = await conn.execute(self._g["take"], params)
                row = await cursor.fetchone()
                if row is None:
                    cursor = await conn.execute(self._g["peek"], params)
                    row = await cursor.fetchone()
            return row

        row = await self._run(f"taking a token of rate limit {key!r}", take)
        assert row is not None
        return float(row[0])  # the seconds to the slot, by the server's clock

    async def purge(self) -> int:
        async def purge(conn: Any) -> int:
            for statement in self._gpurge:
                await conn.execute(statement, {"now": time.time()})
            now = time.time()
            cursor = await conn.execute(self._purge, {"now": now, "oldest": now - self.ttl})
            return int(cursor.rowcount)

        return await self._run("purging expired jobs", purge)

    async def close(self) -> None:
        await self._pool.close()


async def _ids(
    run: Callable[..., Awaitable[Any]],
    doing: str,
    statement: str,
    params: dict[str, Any],
    *,
    detach: bool = True,
) -> set[str]:
    """The first column of the rows of one statement (its own transaction), through `run`
    (a store's `StorePool.run`)."""

    async def read(conn: Any) -> Any:
        cursor = await conn.execute(statement, params)
        return await cursor.fetchall()

    return {row[0] for row in await run(doing, read, detach=detach)}


def _check_arguments(
    dsn: str | None,
    pool: AsyncConnectionPool[Any] | None,
    schema: str,
    timeout: float,
    max_size: int,
) -> None:
    """Raises `ConfigurationError` for a bad argument of `PostgresStore`."""
    if (dsn is None) == (pool is None):
        raise ConfigurationError("pass dsn= or pool=, one of them")
    if pool is not None and not isinstance(pool, AsyncConnectionPool):
        raise ConfigurationError(
            f"pool must be a psycopg_pool.AsyncConnectionPool, got {type(pool).__name__}"
        )
    check_seconds("timeout", timeout, forever=True)
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        # psycopg_pool refused it only when the pool opened: at every call after this
        raise ConfigurationError(
            f"max_size must be an int >= 1 (connections of the store's pool), got {max_size!r}"
        )
    check_schema(schema)
    if dsn:
        check_dsn(dsn, ConfigurationError)
