"""The job store: one small protocol, an in-memory reference, and the SQL its databases share.

A store keeps one row per job: its state, attempt, error, result, and when it expires. All it
has to do is apply a batch of `Write`s in one transaction, each under the rules of `Write`
(a late write never overwrites a newer state; succeeded and cancelled are final), read a job,
and cancel one. Group completion ("the last job of a group is done") fits the same shape: a
write that carries its group id, counted in the same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from .._exceptions import ConfigurationError
from ._groupstore import CallbackDue, GroupSpec, MemoryGroups
from ._status import RANK, TERMINAL, JobRecord, JobState, JobStatus, Write, timestamp

__all__ = (
    "CLAIM", "DAY", "RECLAIM", "REQUEUE", "ROWS", "WRITE", "CancelRequests", "JobStore",
    "MemoryStore", "SQL", "Withdrawals", "check_ttl", "row_record", "rounds", "write_params",
)  # fmt: skip

DAY = 86_400.0


@runtime_checkable
class JobStore(Protocol):
    """Where job states and results are kept (`SQLiteStore`, `PostgresStore`, `MemoryStore`).

    Every method may raise `StoreError` when the store can't be reached.
    """

    ttl: float
    """Seconds a record is kept after its last change; then it reads as absent."""

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        """Apply `writes` in one transaction, in order; for each, whether it was applied (for
        a claim: granted)."""
        ...

    async def get(self, job_id: str) -> JobRecord | None:
        """The job's record, or None (unknown, or past its TTL)."""
        ...

    async def cancel(self, job_id: str, *, now: float) -> JobStatus | None:
        """Cancel the job in one transaction: a queued or retrying job becomes `cancelled`; a
        running one gets `cancel_requested` (its worker is told by the caller). Returns the
        status after that, or None for an unknown job."""
        ...

    async def purge(self) -> int:
        """Delete the records past their TTL; returns how many."""
        ...

    async def close(self) -> None:
        """Release connections and threads; the store may not be used afterwards."""
        ...


@runtime_checkable
class CancelRequests(Protocol):
    """A store that reads many jobs' cancel flags at once (`SQLiteStore`, `PostgresStore`,
    `MemoryStore`): a task worker's check of its long-running jobs is then one read a round,
    where a store without it is asked with `get()`, a job at a time."""

    async def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        """Those of `job_ids` whose cancel was requested (a record past its TTL is absent)."""
        ...


@runtime_checkable
class Withdrawals(Protocol):
    """A store that takes back an enqueue's `queued` record (`SQLiteStore`, `PostgresStore`,
    `MemoryStore`): a tracked enqueue into it sends the record as the publish goes out and
    waits for both at once (#23), and withdraws the record if the publish then fails or the
    enqueue is cancelled. A store without it is sent the record only once the broker
    confirmed the publish (one round trip after the other), and never a withdrawal."""

    async def withdraw(self, job_ids: Sequence[str]) -> set[str]:
        """Delete, in one transaction, the records of `job_ids` that are still an enqueue's
        own: `queued`, never started, no cancel requested; leave any other record alone (a
        worker's claim or outcome, a job handed back to its queue, a cancelled one: a publish
        whose confirm was lost may still have been delivered). Returns the ids deleted."""
        ...


def check_ttl(ttl: float) -> float:
    """The TTL as a float.

    Raises:
        ConfigurationError: not a number > 0.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
        raise ConfigurationError(f"ttl must be > 0 seconds, got {ttl!r}")
    return float(ttl)


MAX_RECENT = 10_000


def recent_params(state: JobState | str, limit: int) -> dict[str, Any]:
    """The parameters of `SQL.recent` (a store's `recent()`).

    Raises:
        ConfigurationError: `state` is not a job state, or `limit` not an int from 0 to
            `MAX_RECENT`.
    """
    try:
        value = JobState(state).value
    except ValueError:
        states = ", ".join(s.value for s in JobState)
        raise ConfigurationError(f"state must be one of {states}, got {state!r}") from None
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_RECENT:
        raise ConfigurationError(f"limit must be an int from 0 to {MAX_RECENT:,}, got {limit!r}")
    return {"state": value, "now": time.time(), "limit": limit}


COLUMNS = (
    "job_id, task, queue, state, rank, attempt, defers, next_retry_at, error_type, "
    "error_message, result, content_type, cancel_requested, created_at, started_at, "
    "finished_at, updated_at, expires_at"
)


ROWS = (
    "job_id, task, queue, state, rank, attempt, defers, next_retry_at, error_type, "
    "error_message, result, content_type, at"
)
"""The fields of one write a round statement reads (`PostgresStore` sends each as an array
parameter; what `write_params` derives from them, the statement derives too)."""


class SQL:
    """The statements of a SQL store on table `table`, with `:name` parameters (SQLite's
    style; `PostgresStore` rewrites them to psycopg's).

    `write` and `claim` apply one write (`write_params`). With `rows`, a query yielding the
    columns of `ROWS` from parameters named with a `{p}` prefix (`{p}job_id`, ...), `round()`
    gives one statement applying a round of writes (`rounds()`: each job at most once, as a
    row can't be changed twice by one statement), a part per kind; the rules are the same
    text, and it returns the `job_id` of every write applied.
    """

    def __init__(self, table: str, rows: str | None = None) -> None:
        # The conflict rules read the write's time as excluded.updated_at (= its `at`), so
        # the one-write and the many-writes forms share them word for word.
        upsert = f"""
            INSERT INTO {table} AS j ({COLUMNS}) {{source}}
            ON CONFLICT (job_id) DO UPDATE SET
                task = excluded.task, queue = excluded.queue, state = excluded.state,
                rank = excluded.rank, attempt = excluded.attempt, defers = excluded.defers,
                next_retry_at = excluded.next_retry_at, error_type = excluded.error_type,
                error_message = excluded.error_message, result = excluded.result,
                content_type = excluded.content_type,
                cancel_requested = CASE WHEN j.expires_at <= excluded.updated_at THEN FALSE
                                        ELSE j.cancel_requested END,
                created_at = CASE WHEN j.expires_at <= excluded.updated_at
                                  THEN excluded.created_at ELSE j.created_at END,
                started_at = COALESCE(excluded.started_at, j.started_at),
                finished_at = excluded.finished_at, updated_at = excluded.updated_at,
                expires_at = excluded.expires_at
            WHERE j.expires_at <= excluded.updated_at
               OR (j.state NOT IN ('succeeded', 'cancelled') AND ({{rule}}))
            RETURNING job_id"""
        write_rule = (
            "(excluded.attempt, excluded.defers, excluded.rank) > (j.attempt, j.defers, j.rank)"
            " OR ({requeue} AND excluded.state = 'queued' AND j.state = 'running'"
            " AND excluded.attempt = j.attempt AND excluded.defers = j.defers)"
        )
        # A claim is refused for a cancel request, and, unless its delivery came back to the
        # queue (`requeue`: redelivered), for a job already past its queue in the same run or
        # a later one: a second message of one job id (two processes enqueued it at once)
        # must not run it again beside the first. The refused claim's follow-up (`CANCELLED`,
        # also a claim) turns a job cancelled only if its cancel was requested.
        claim_rule = (
            "CASE WHEN excluded.state = 'cancelled' THEN j.cancel_requested"
            " ELSE NOT j.cancel_requested AND ({requeue} OR j.state NOT IN ('running', 'retrying')"
            " OR (excluded.attempt, excluded.defers) > (j.attempt, j.defers)) END"
        )
        values = """VALUES (
                :job_id, :task, :queue, :state, :rank, :attempt, :defers, :next_retry_at,
                :error_type, :error_message, :result, :content_type, FALSE, :at, :started_at,
                :finished_at, :at, :expires_at)"""
        self.write = upsert.format(source=values, rule=write_rule.format(requeue=":requeue"))
        self.claim = upsert.format(source=values, rule=claim_rule.format(requeue=":requeue"))
        self._parts: dict[str, str] = {}
        if rows is not None:
            terminal = ", ".join(sorted(f"'{state.value}'" for state in TERMINAL))
            many = (  # started_at, finished_at and expires_at as write_params has them
                "SELECT job_id, task, queue, state, rank, attempt, defers, next_retry_at, "
                "error_type, error_message, result, content_type, FALSE, at, "
                f"CASE WHEN state = '{JobState.RUNNING.value}' THEN at END, "
                f"CASE WHEN state IN ({terminal}) THEN at END, at, at + :ttl "
                "FROM ({rows}) AS w"
            )
            rules = {
                CLAIM: claim_rule.format(requeue="FALSE"),
                RECLAIM: claim_rule.format(requeue="TRUE"),
                WRITE: write_rule.format(requeue="FALSE"),
                REQUEUE: write_rule.format(requeue="TRUE"),
            }
            self._parts = {
                kind: upsert.format(source=many.format(rows=rows.format(p=f"{kind}_")), rule=rule)
                for kind, rule in rules.items()
            }
        # `Withdrawals.withdraw()`: the enqueue's own record, if nothing came after it.
        self.withdraw = (  # `{ids}`: the store's way to take a list of ids
            f"DELETE FROM {table} WHERE job_id IN ({{ids}}) AND state = 'queued' "
            "AND started_at IS NULL AND NOT cancel_requested RETURNING job_id"
        )
        self.get = f"SELECT {COLUMNS} FROM {table} WHERE job_id = :job_id AND expires_at > :now"
        self.cancels = (  # `{ids}`: the store's way to take a list of ids
            f"SELECT job_id FROM {table} WHERE job_id IN ({{ids}}) AND cancel_requested "
            "AND expires_at > :now"
        )
        self.cancel_waiting = (
            f"UPDATE {table} SET state = 'cancelled', rank = {RANK[JobState.CANCELLED]}, "
            "next_retry_at = NULL, finished_at = :now, updated_at = :now, expires_at = :expires "
            "WHERE job_id = :job_id AND state IN ('queued', 'retrying') AND expires_at > :now"
        )
        self.cancel_running = (
            f"UPDATE {table} SET cancel_requested = TRUE, updated_at = :now, "
            "expires_at = :expires "
            "WHERE job_id = :job_id AND state = 'running' AND expires_at > :now"
        )
        # `oldest`: now - the TTL. A record expires at least its TTL after it was created, so
        # the expired ones are among those created before then (an index no write changes).
        self.purge = f"DELETE FROM {table} WHERE created_at <= :oldest AND expires_at <= :now"
        self.recent = (
            f"SELECT {COLUMNS} FROM {table} WHERE state = :state AND expires_at > :now "
            "ORDER BY updated_at DESC LIMIT :limit"
        )

    def round(self, kinds: Sequence[str]) -> str:
        """One statement applying a round's writes of `kinds` (`CLAIM`, `WRITE`, `REQUEUE`,
        each from its parameters prefixed with the kind); it returns the `job_id` of each
        write applied. Parts of one statement see the same snapshot: fine, as a round holds each
        job once."""
        ctes = ", ".join(f"{kind} AS ({self._parts[kind]})" for kind in kinds)
        union = " UNION ALL ".join(f"SELECT job_id FROM {kind}" for kind in kinds)
        return f"WITH {ctes} {union}"


CLAIM, RECLAIM, WRITE, REQUEUE = "claim", "reclaim", "write", "requeue"
"""The kinds of write a round statement applies, each under its rule (`RECLAIM`: the claim of
a redelivered message)."""


def rounds(writes: Sequence[Write]) -> list[dict[str, list[int]]]:
    """How to apply `writes` with one statement per round: the indexes of each kind in each
    round, rounds in order. Writes of different jobs touch different rows, so only the order
    of each job's own writes matters: the k-th write of a job goes in the k-th round (one
    round unless a job is written twice). Indexes are sorted by job id, so concurrent
    transactions lock rows in the same order."""
    plan: list[dict[str, list[int]]] = []
    seen: dict[str, int] = {}
    for i, write in enumerate(writes):
        k = seen.get(write.job_id, 0)
        seen[write.job_id] = k + 1
        if k == len(plan):
            plan.append({})
        if write.claim:
            kind = RECLAIM if write.requeue else CLAIM
        else:
            kind = REQUEUE if write.requeue else WRITE
        plan[k].setdefault(kind, []).append(i)
    job_ids = [write.job_id for write in writes]
    for kinds in plan:
        for indexes in kinds.values():
            indexes.sort(key=job_ids.__getitem__)  # no Python call per index
    return plan


def write_params(write: Write, ttl: float) -> dict[str, Any]:
    """The parameters of `SQL.write` / `SQL.claim` for one write."""
    return {
        "job_id": write.job_id,
        "task": write.task,
        "queue": write.queue,
        "state": write.state.value,
        "rank": write.rank,
        "attempt": write.attempt,
        "defers": write.defers,
        "next_retry_at": write.next_retry_at,
        "error_type": write.error_type,
        "error_message": write.error_message,
        "result": write.result,
        "content_type": write.content_type,
        "requeue": write.requeue,
        "at": write.at,
        "started_at": write.at if write.state is JobState.RUNNING else None,
        "finished_at": write.at if write.finished else None,
        "expires_at": write.at + ttl,
    }


def row_record(row: Sequence[Any] | Mapping[str, Any]) -> JobRecord:
    """A `JobRecord` from a row of `COLUMNS` (a sequence in their order, or a mapping)."""
    if not isinstance(row, Mapping):
        row = dict(zip([c.strip() for c in COLUMNS.split(",")], row, strict=True))
    status = JobStatus(
        job_id=row["job_id"],
        task=row["task"],
        queue=row["queue"],
        state=JobState(row["state"]),
        attempt=int(row["attempt"]),
        next_retry_at=timestamp(row["next_retry_at"]),
        error_type=row["error_type"],
        error_message=row["error_message"],
        cancel_requested=bool(row["cancel_requested"]),
        created_at=timestamp(row["created_at"]),
        started_at=timestamp(row["started_at"]),
        finished_at=timestamp(row["finished_at"]),
        updated_at=timestamp(row["updated_at"]),
    )
    result = row["result"]
    return JobRecord(status, None if result is None else bytes(result), row["content_type"])


class MemoryStore:
    """A store in this process's memory: for tests and the `aio_workq.testing` kit.

    It follows the same rules as the SQL stores (it is their reference), but nothing survives
    the process and other processes can't see it.

    Args:
        ttl: seconds a record is kept after its last change.

    Raises:
        ConfigurationError: a bad `ttl`.
    """

    def __init__(self, *, ttl: float = DAY) -> None:
        self.ttl = check_ttl(ttl)
        self._rows: dict[str, dict[str, Any]] = {}
        self._groups = MemoryGroups()

    def __repr__(self) -> str:
        return f"<MemoryStore jobs={len(self._rows)} ttl={self.ttl:g}>"

    async def record(self, writes: Sequence[Write]) -> list[bool]:
        return [self._apply(write) for write in writes]

    def _apply(self, write: Write) -> bool:
        row = self._rows.get(write.job_id)
        params = write_params(write, self.ttl)
        if row is not None and row["expires_at"] > write.at:
            if row["state"] in ("succeeded", "cancelled"):
                return False
            if write.claim:
                if write.state is JobState.CANCELLED:  # a refused claim's follow-up
                    if not row["cancel_requested"]:
                        return False
                elif row["cancel_requested"]:
                    return False
                elif (
                    not write.requeue
                    and row["state"] in ("running", "retrying")
                    and (write.attempt, write.defers) <= (row["attempt"], row["defers"])
                ):
                    return False  # a second message of the same run (see SQL)
            else:
                newer = (write.attempt, write.defers, write.rank) > (
                    row["attempt"], row["defers"], row["rank"],
                )  # fmt: skip
                requeued = (
                    write.requeue
                    and write.state is JobState.QUEUED
                    and row["state"] == "running"
                    and (write.attempt, write.defers) == (row["attempt"], row["defers"])
                )
                if not (newer or requeued):
                    return False
            params["created_at"] = row["created_at"]
            params["cancel_requested"] = row["cancel_requested"]
            params["started_at"] = params["started_at"] or row["started_at"]
        else:
            params["created_at"] = write.at
            params["cancel_requested"] = False
        params["updated_at"] = write.at
        del params["at"]
        self._rows[write.job_id] = params
        return True

    async def get(self, job_id: str) -> JobRecord | None:
        row = self._rows.get(job_id)
        if row is None or row["expires_at"] <= time.time():
            return None
        return row_record(row)

    async def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        now = time.time()
        rows = filter(None, map(self._rows.get, job_ids))
        return {r["job_id"] for r in rows if r["cancel_requested"] and r["expires_at"] > now}

    async def withdraw(self, job_ids: Sequence[str]) -> set[str]:
        deleted = set()
        for job_id in job_ids:
            row = self._rows.get(job_id)
            if (
                row is not None
                and row["state"] == "queued"
                and row["started_at"] is None
                and not row["cancel_requested"]
            ):
                del self._rows[job_id]
                deleted.add(job_id)
        return deleted

    async def cancel(self, job_id: str, *, now: float) -> JobStatus | None:
        row = self._rows.get(job_id)
        if row is None or row["expires_at"] <= now:
            return None
        if row["state"] in ("queued", "retrying"):
            row.update(
                state="cancelled", rank=RANK[JobState.CANCELLED], next_retry_at=None,
                finished_at=now, updated_at=now, expires_at=now + self.ttl,
            )  # fmt: skip
        elif row["state"] == "running":
            row.update(cancel_requested=True, updated_at=now, expires_at=now + self.ttl)
        return row_record(row).status

    async def recent(self, *, state: JobState | str, limit: int = 20) -> list[JobStatus]:
        """The jobs in `state` (e.g. failed), most recently changed first (the dashboard's
        "recent failures").

        Raises:
            ConfigurationError: `state` is not a job state, or `limit` not an int from 0 to
                10,000.
        """
        params = recent_params(state, limit)
        rows = [
            row for row in self._rows.values()
            if row["state"] == params["state"] and row["expires_at"] > params["now"]
        ]  # fmt: skip
        rows.sort(key=lambda row: row["updated_at"], reverse=True)
        return [row_record(row).status for row in rows[:limit]]

    async def create_group(self, group: GroupSpec, writes: Sequence[Write]) -> None:
        self._groups.create(group, self.ttl)
        for write in writes:
            self._apply(write)

    async def finish_member(self, write: Write, *, group_id: str, index: int) -> CallbackDue | None:
        self._apply(write)
        return self._groups.finish(write, group_id, index, self.ttl)

    async def callback_published(self, group_id: str) -> None:
        self._groups.published(group_id)

    async def take_token(
        self, key: str, *, interval: float, tau: float, max_wait: float, now: float
    ) -> float:
        return self._groups.take(key, interval=interval, tau=tau, max_wait=max_wait, now=now)

    async def purge(self) -> int:
        self._groups.purge()
        now = time.time()
        expired = [job_id for job_id, row in self._rows.items() if row["expires_at"] <= now]
        for job_id in expired:
            del self._rows[job_id]
        return len(expired)

    async def close(self) -> None:
        pass
