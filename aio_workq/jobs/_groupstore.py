"""What groups and rate limits keep in a store: the rows, the SQL SQLite and PostgreSQL share,
and the in-memory reference.

**Groups.** `create_group` records a group (its size, its callback) and one row per member
before any member is published. A member's terminal write (`finish_member`) applies the job's
write, marks its member row done (once: `... WHERE NOT done`), counts the group down and, when
that made it zero, claims the callback (`callback_claimed`, set once) -- all in one
transaction. The row lock on the group row orders concurrent last members (PostgreSQL) or the
write lock does (SQLite): exactly one transaction claims. `callback_published` is set once the
callback message is confirmed (or the callback recorded failed, too large to send); a claimed
but unpublished callback is handed out again to the redelivery of a member that was already
done (the crash between claim and publish).

**Rate limits.** One row per key holds its *theoretical arrival time* (GCRA): taking a token
reserves the slot `max(tat, now - tau)` and moves `tat` on by one interval, in one UPDATE; a
slot further away than `max_wait` is not reserved (the caller defers the message by that long).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .._exceptions import ConfigurationError
from ._status import Write

__all__ = (
    "CallbackDue",
    "GroupSpec",
    "GroupSQL",
    "GroupStore",
    "MemberDone",
    "MemoryGroups",
    "RateStore",
)

SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS workq_groups (
    group_id            TEXT PRIMARY KEY,
    size                INTEGER NOT NULL,
    remaining           INTEGER NOT NULL,
    callback_task       TEXT,
    callback_queue      TEXT,
    callback_param      TEXT,
    callback_body       BLOB,
    callback_claimed    BOOLEAN NOT NULL DEFAULT FALSE,
    callback_published  BOOLEAN NOT NULL DEFAULT FALSE,
    created_at          REAL NOT NULL,
    expires_at          REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workq_group_members (
    group_id       TEXT NOT NULL,
    idx            INTEGER NOT NULL,
    job_id         TEXT NOT NULL,
    done           BOOLEAN NOT NULL DEFAULT FALSE,
    state          TEXT,
    result         BLOB,
    content_type   TEXT,
    error_type     TEXT,
    error_message  TEXT,
    expires_at     REAL NOT NULL,
    PRIMARY KEY (group_id, idx)
);
CREATE TABLE IF NOT EXISTS workq_rates (
    key         TEXT PRIMARY KEY,
    tat         REAL NOT NULL,
    expires_at  REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSpec:
    """A group as `create_group` records it."""

    group_id: str
    member_ids: tuple[str, ...]
    callback_task: str | None = None
    callback_queue: str | None = None
    callback_param: str | None = None
    callback_body: bytes | None = None
    """The callback's other arguments (a JSON object), given with `then=task.partial(...)`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberDone:
    """One member's outcome as the callback receives it (stored with the member row)."""

    index: int
    job_id: str
    state: str
    result: bytes | None = None
    content_type: str | None = None
    error_type: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackDue:
    """A claimed callback not yet published: the worker that gets it publishes it."""

    group_id: str
    task: str
    queue: str
    param: str
    body: bytes | None
    members: tuple[MemberDone, ...]
    claimed_now: bool = False
    """True for the transaction that claimed it (False: handed out again for recovery)."""


@runtime_checkable
class GroupStore(Protocol):
    """A job store that can run groups (`SQLiteStore`, `PostgresStore`, `MemoryStore`)."""

    ttl: float

    async def create_group(self, group: GroupSpec, writes: Sequence[Write]) -> None:
        """Record the group, its members and `writes` (their queued states) in one
        transaction; a group id recorded already is left as it is, and refused
        (`ConfigurationError`, nothing written) when recorded as another group."""
        ...

    async def finish_member(self, write: Write, *, group_id: str, index: int) -> CallbackDue | None:
        """Apply the member's terminal `write`, mark it done and count the group down, in one
        transaction; the callback to publish if this made the group complete (or if it was
        complete, claimed and unpublished and this member was done already)."""
        ...

    async def callback_published(self, group_id: str) -> None:
        """Record that the group's callback message was confirmed (or the callback recorded
        failed, too large to send): no member publishes it again."""
        ...


@runtime_checkable
class RateStore(Protocol):
    """A job store that keeps token buckets (`SQLiteStore`, `PostgresStore`, `MemoryStore`)."""

    async def take_token(
        self, key: str, *, interval: float, tau: float, max_wait: float, now: float
    ) -> float:
        """Reserve the next slot of `key`'s bucket: returns the seconds until it (<= 0: now).
        A slot more than `max_wait` away is not reserved; the seconds until it are returned
        (the caller defers the message). `now` is the caller's clock; a store shared by
        several hosts (`PostgresStore`) reckons the slots by its own clock instead."""
        ...


class GroupSQL:
    """The statements for groups and rate limits, with `:name` parameters; `greatest` is
    `MAX` in SQLite, `GREATEST` in PostgreSQL. `clock` is the time a rate limit's slots are
    reckoned by: the store's own clock for a store that workers on several hosts share
    (their clocks disagree: reckoned by each worker's, the slots one took were seconds
    away, or past, for another), `:now` (the caller's) for one on the workers' host."""

    def __init__(self, prefix: str, *, greatest: str, clock: str = ":now") -> None:
        g, m, r = f"{prefix}workq_groups", f"{prefix}workq_group_members", f"{prefix}workq_rates"
        self.insert_group = (
            f"INSERT INTO {g} (group_id, size, remaining, callback_task, callback_queue, "
            "callback_param, callback_body, callback_claimed, callback_published, created_at, "
            "expires_at) VALUES (:group_id, :size, :size, :callback_task, :callback_queue, "
            ":callback_param, :callback_body, FALSE, FALSE, :now, :expires) "
            "ON CONFLICT (group_id) DO NOTHING"
        )
        self.insert_member = (
            f"INSERT INTO {m} (group_id, idx, job_id, done, expires_at) "
            "VALUES (:group_id, :idx, :job_id, FALSE, :expires) "
            "ON CONFLICT (group_id, idx) DO NOTHING"
        )
        self.mark_member = (
            f"UPDATE {m} SET done = TRUE, state = :state, result = :result, "
            "content_type = :content_type, error_type = :error_type, "
            "error_message = :error_message, expires_at = :expires "
            "WHERE group_id = :group_id AND idx = :idx AND NOT done RETURNING idx"
        )
        self.count_down = (
            f"UPDATE {g} SET remaining = remaining - 1, expires_at = :expires "
            "WHERE group_id = :group_id RETURNING remaining"
        )
        self.claim_callback = (
            f"UPDATE {g} SET callback_claimed = TRUE WHERE group_id = :group_id "
            "AND remaining <= 0 AND NOT callback_claimed RETURNING group_id"
        )
        self.spec = (
            f"SELECT size, callback_task, callback_queue, callback_param, callback_body "
            f"FROM {g} WHERE group_id = :group_id"
        )
        self.group = (
            f"SELECT callback_task, callback_queue, callback_param, callback_body, "
            f"callback_claimed, callback_published FROM {g} WHERE group_id = :group_id"
        )
        self.members = (
            f"SELECT idx, job_id, state, result, content_type, error_type, error_message "
            f"FROM {m} WHERE group_id = :group_id ORDER BY idx"
        )
        self.published = f"UPDATE {g} SET callback_published = TRUE WHERE group_id = :group_id"
        self.insert_bucket = (
            f"INSERT INTO {r} (key, tat, expires_at) VALUES (:key, 0, :expires) "
            "ON CONFLICT (key) DO NOTHING"
        )
        # Both return the seconds from `clock` to the slot (<= 0: now), not the slot itself:
        # a worker never compares a time of the store's with its own clock.
        slot = f"{greatest}(tat, {clock} - :tau)"
        self.take = (
            f"UPDATE {r} SET tat = {slot} + :interval, expires_at = :expires "
            f"WHERE key = :key AND {slot} - {clock} <= :max_wait "
            f"RETURNING tat - :interval - {clock}"
        )
        self.peek = f"SELECT {slot} - {clock} FROM {r} WHERE key = :key"
        self.purge = [
            f"DELETE FROM {g} WHERE expires_at <= :now",
            f"DELETE FROM {m} WHERE expires_at <= :now",
            f"DELETE FROM {r} WHERE expires_at <= :now",
        ]


def group_params(group: GroupSpec, now: float, ttl: float) -> dict[str, Any]:
    return {
        "group_id": group.group_id,
        "size": len(group.member_ids),
        "callback_task": group.callback_task,
        "callback_queue": group.callback_queue,
        "callback_param": group.callback_param,
        "callback_body": group.callback_body,
        "now": now,
        "expires": now + ttl,
    }


def check_same_group(group: GroupSpec, recorded: Sequence[Any] | None) -> None:
    """Refuse `group` when its id is recorded already as another group (`recorded`: its
    size, callback task, queue, parameter and body, or None).

    Raises:
        ConfigurationError: other members or another callback under the same id.
    """
    if recorded is None:
        return
    size, task, queue, param, body = recorded
    body = None if body is None else bytes(body)
    if size != len(group.member_ids):
        differs = f"{size} members, enqueued again with {len(group.member_ids)}"
    elif (task, queue, param, body) != (
        group.callback_task, group.callback_queue, group.callback_param, group.callback_body,
    ):  # fmt: skip
        differs = f"callback {task!r}, enqueued again with callback {group.callback_task!r}"
    else:
        return
    raise ConfigurationError(
        f"group {group.group_id} is recorded already with {differs} (or other arguments): "
        "enqueue a group again (after an error) with the same members and callback, and give "
        "another group a group_id of its own"
    )


def mark_params(write: Write, group_id: str, index: int, ttl: float) -> dict[str, Any]:
    return {
        "group_id": group_id,
        "idx": index,
        "state": write.state.value,
        "result": write.result,
        "content_type": write.content_type,
        "error_type": write.error_type,
        "error_message": write.error_message,
        "expires": time.time() + ttl,
    }


def due_from(
    group_id: str, row: Sequence[Any], members: Sequence[Sequence[Any]], claimed_now: bool
) -> CallbackDue | None:
    """The callback to publish from a group row (`GroupSQL.group`) and its member rows."""
    task, queue, param, body, claimed, published = row
    if task is None or not claimed or published:
        return None
    return CallbackDue(
        group_id=group_id, task=task, queue=queue, param=param,
        body=None if body is None else bytes(body),
        members=tuple(
            MemberDone(
                index=int(i), job_id=j, state=s, result=None if res is None else bytes(res),
                content_type=ct, error_type=et, error_message=em,
            )
            for i, j, s, res, ct, et, em in members
        ),
        claimed_now=claimed_now,
    )  # fmt: skip


def rate_expiry(now: float, tau: float, interval: float) -> float:
    """When an idle bucket's row may be purged (it would be full again by then)."""
    return now + tau + interval + 3600.0


@dataclass
class _Group:
    spec: GroupSpec
    remaining: int
    expires_at: float
    claimed: bool = False
    published: bool = False
    members: dict[int, MemberDone | None] = field(default_factory=dict)


class MemoryGroups:
    """Groups and buckets in memory: `MemoryStore`'s part, the SQL stores' reference."""

    def __init__(self) -> None:
        self.groups: dict[str, _Group] = {}
        self.buckets: dict[str, float] = {}

    def create(self, group: GroupSpec, ttl: float) -> None:
        now = time.time()
        old = self.groups.get(group.group_id)
        if old is not None and old.expires_at > now:
            spec = old.spec
            check_same_group(group, (
                len(spec.member_ids), spec.callback_task, spec.callback_queue,
                spec.callback_param, spec.callback_body,
            ))  # fmt: skip
            return
        self.groups[group.group_id] = _Group(
            group, len(group.member_ids), now + ttl,
            members=dict.fromkeys(range(len(group.member_ids))),
        )  # fmt: skip

    def finish(self, write: Write, group_id: str, index: int, ttl: float) -> CallbackDue | None:
        group = self.groups.get(group_id)
        if group is None or index not in group.members:
            return None
        claimed_now = False
        if group.members[index] is None:
            group.members[index] = MemberDone(
                index=index, job_id=group.spec.member_ids[index], state=write.state.value,
                result=write.result, content_type=write.content_type,
                error_type=write.error_type, error_message=write.error_message,
            )  # fmt: skip
            group.remaining -= 1
            group.expires_at = time.time() + ttl
            if group.remaining <= 0 and not group.claimed:
                group.claimed = claimed_now = True
        spec = group.spec
        if spec.callback_task is None or not group.claimed or group.published:
            return None
        return CallbackDue(
            group_id=group_id, task=spec.callback_task, queue=spec.callback_queue or "",
            param=spec.callback_param or "results", body=spec.callback_body,
            members=tuple(m for m in group.members.values() if m is not None),
            claimed_now=claimed_now,
        )  # fmt: skip

    def published(self, group_id: str) -> None:
        group = self.groups.get(group_id)
        if group is not None:
            group.published = True

    def take(self, key: str, *, interval: float, tau: float, max_wait: float, now: float) -> float:
        slot = max(self.buckets.get(key, 0.0), now - tau)
        if slot - now <= max_wait:
            self.buckets[key] = slot + interval
        return slot - now

    def purge(self) -> None:
        now = time.time()
        for group_id in [g for g, v in self.groups.items() if v.expires_at <= now]:
            del self.groups[group_id]
