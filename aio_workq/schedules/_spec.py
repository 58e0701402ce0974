"""What a schedule is and when it is due: pure time arithmetic, no broker.

Cron expressions are evaluated by `cronsim` (the `schedules` extra) in the schedule's own time
zone (`zoneinfo`); every due time is then handled in UTC. A tick is named by its schedule and
its due time in UTC: `nightly-report:2026-03-29T01:00:00+00:00`, which is also the message id
of the job it publishes, so two publishes of one tick carry the same id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .._exceptions import ConfigurationError, SerializationError
from .._link.specs import Queue
from .._publish.serialization import encode_body
from .._wire.frames import NAME_PATTERN, Properties, encode_properties

__all__ = ("EPOCH", "Misfire", "Schedule", "tick_id")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Misfire = Literal["skip", "catch_up"]
_MICROSECOND = timedelta(microseconds=1)
_SCAN_LIMIT = 1_000_000  # cron due times looked at after one outage, at most
_CRON_JUMP = timedelta(days=1)  # an outage longer than this is counted back from its end
_NAME_MAX = 255 - len(":2026-01-01T00:00:00.000000+00:00")  # a tick id is a message id
_DAY_HINT = (
    " (a day of the month from 1 to 31 that a month it names has, or it would never fire: "
    "February has 29 days at most, April, June, September and November 30; "
    "L is the last day of every month)"
)


def tick_id(name: str, due: datetime) -> str:
    """The message id of a schedule's tick: `{name}:{due time in UTC, ISO 8601}`."""
    return f"{name}:{due.astimezone(UTC).isoformat()}"


@dataclass(frozen=True, slots=True)
class Schedule:
    """A job published to `queue` on a cron expression or at a fixed interval.

    Args:
        name: unique among the schedules of one broker; names the ticks' message ids (so at
            most 222 characters: a message id is 255 bytes at most).
        cron: a 5-field cron expression, read in `tz` (`"0 3 * * *"`: 03:00 every day).
        every: a fixed interval (at least 1 s), counted from `start` (default the Unix epoch,
            so that every replica computes the same due times).
        tz: the IANA time zone `cron` is read in (default UTC). Daylight saving time: a time
            skipped by the spring-forward change fires once, at the first valid minute after
            it; a time repeated by the fall-back change fires once (its first occurrence).
        queue: the queue the job goes to (a name or a `Queue`).
        body: the job's body (anything `Producer.publish` takes); default `{}`.
        headers: extra headers of the job.
        start: no tick before this time (timezone-aware); the anchor of `every`.
        misfire: what happens to ticks missed by more than `grace` while no scheduler ran:
            `"skip"` (default): the latest of them fires once, now, the older ones never;
            `"catch_up"`: the latest `catch_up_limit` of them fire, oldest first.
        catch_up_limit: the most missed ticks `"catch_up"` fires (default 10).
        grace: a tick late by less than this always fires (a failover's gap); default 60 s.
        jitter: spread the ticks: each fires at its due time plus an offset in `[0, jitter)`,
            drawn from the schedule's name and the due time (so every replica computes the
            same offset, and the message id stays `{name}:{due time}`). Default 0; with
            `every=`, shorter than the interval. Keep it below a cron schedule's period too:
            a tick never fires before the one due before it.

    Raises:
        ConfigurationError: neither or both of `cron` and `every`, a bad expression, interval,
            time zone, name, misfire policy, limit or jitter.
    """

    name: str
    _: KW_ONLY
    queue: str | Queue
    cron: str | None = None
    every: timedelta | None = None
    tz: str = "UTC"
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    start: datetime | None = None
    misfire: Misfire = "skip"
    catch_up_limit: int = 10
    grace: timedelta = timedelta(seconds=60)
    jitter: timedelta = timedelta(0)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not NAME_PATTERN.match(self.name):
            raise ConfigurationError(
                f"schedule name {self.name!r} is invalid: use letters, digits, '-', '_', '.' "
                "and ':' (it names the ticks' message ids)"
            )
        if len(self.name) > _NAME_MAX:
            raise ConfigurationError(
                f"schedule name {self.name[:40]!r}... is {len(self.name)} characters long: its "
                f"ticks' message ids ('{{name}}:{{due time}}') must fit in 255 bytes, so "
                f"{_NAME_MAX} at most"
            )
        where = f"schedule {self.name!r}"
        if (self.cron is None) == (self.every is None):
            raise ConfigurationError(f"{where}: give exactly one of cron= and every=")
        if not isinstance(self.queue, str | Queue) or not str(_queue_name(self.queue)):
            raise ConfigurationError(f"{where}: queue= must be a queue name or a Queue")
        try:
            zone = ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ConfigurationError(
                f"{where}: unknown time zone {self.tz!r}; use an IANA name such as "
                "'Europe/Paris' or 'UTC'"
            ) from None
        if self.every is not None:
            if not isinstance(self.every, timedelta) or self.every < timedelta(seconds=1):
                raise ConfigurationError(
                    f"{where}: every= must be a timedelta of at least 1 second, got {self.every!r}"
                )
        if self.cron is not None:
            _cron_class()  # the extra is installed
            if not isinstance(self.cron, str):
                raise ConfigurationError(f"{where}: cron= must be a str, got {self.cron!r}")
            fields = len(self.cron.split())
            if fields != 5:  # cronsim would read a 6th field as seconds
                raise ConfigurationError(
                    f"{where}: cron expression {self.cron!r} has {fields} "
                    f"field{'' if fields == 1 else 's'}; give 5 fields: minute hour "
                    "day-of-month month day-of-week (e.g. '0 3 * * *')"
                    + ("; for seconds, use every=" if fields > 5 else "")
                )
            try:
                _cron_class()(self.cron, datetime(2026, 1, 1, tzinfo=zone))
            except Exception as exc:  # cronsim raises CronSimError (a ValueError)
                hint = _DAY_HINT if str(exc) == "Bad day-of-month" else ""
                raise ConfigurationError(
                    f"{where}: cron expression {self.cron!r} is invalid: {exc}{hint}"
                ) from None
        _check_publishable(where, self.body, self.headers)
        if self.start is not None and (
            not isinstance(self.start, datetime) or self.start.tzinfo is None
        ):
            raise ConfigurationError(f"{where}: start= must be a timezone-aware datetime")
        if self.misfire not in ("skip", "catch_up"):
            raise ConfigurationError(
                f"{where}: misfire must be 'skip' or 'catch_up', got {self.misfire!r}"
            )
        limit = self.catch_up_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"{where}: catch_up_limit must be an int >= 1, got {limit!r}")
        if not isinstance(self.grace, timedelta) or self.grace < timedelta(0):
            raise ConfigurationError(f"{where}: grace must be a timedelta >= 0")
        if not isinstance(self.jitter, timedelta) or self.jitter < timedelta(0):
            raise ConfigurationError(
                f"{where}: jitter= must be a timedelta >= 0, got {self.jitter!r}"
            )
        if self.every is not None and self.jitter >= self.every:
            raise ConfigurationError(
                f"{where}: jitter= ({self.jitter}) must be shorter than every= ({self.every})"
            )
        self._check_range(where)

    def _check_range(self, where: str) -> None:
        """Refuse what would put a due time out of datetime's range when the scheduler runs
        (an OverflowError there would end its run, every schedule's ticks with it)."""
        now = datetime.now(UTC)
        try:
            self.next_after(self.next_after(now))
        except OverflowError:
            said = f"every= ({self.every})" if self.every is not None else "its cron expression"
            if self.start is not None:
                said += f" from start= ({self.start.isoformat()})"
            raise ConfigurationError(
                f"{where}: {said} puts its next ticks past the year 9999"
            ) from None
        try:
            now - self.grace
        except OverflowError:
            raise ConfigurationError(
                f"{where}: grace= ({self.grace}) reaches before the year 1; give a shorter one"
            ) from None

    # --- description ----------------------------------------------------------------------------

    @property
    def queue_name(self) -> str:
        """The name of the queue the ticks go to."""
        return _queue_name(self.queue)

    @property
    def zone(self) -> ZoneInfo:
        """The time zone `cron` is read in."""
        return ZoneInfo(self.tz)

    def describe(self) -> str:
        """`cron 0 3 * * * Europe/Paris` or `every 0:00:30` (`... jitter 0:00:05`)."""
        what = f"cron {self.cron} {self.tz}" if self.cron is not None else f"every {self.every}"
        return f"{what} jitter {self.jitter}" if self.jitter else what

    def fingerprint(self) -> str:
        """Changes when the schedule's due times change (not its body, queue or jitter:
        those change no tick id, so the ticks go on where they were)."""
        spec = {
            "cron": self.cron,
            "every": None if self.every is None else self.every.total_seconds(),
            "tz": self.tz,
            "start": None if self.start is None else self.start.astimezone(UTC).isoformat(),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    # --- due times ------------------------------------------------------------------------------

    def next_after(self, moment: datetime) -> datetime:
        """The first due time strictly after `moment` (aware), in UTC."""
        moment = moment.astimezone(UTC)
        if self.start is not None and moment < self.start:
            start = self.start.astimezone(UTC)
            if self.every is not None:
                return start
            moment = start - timedelta(microseconds=1)
        if self.every is not None:
            anchor = EPOCH if self.start is None else self.start.astimezone(UTC)
            steps = (moment - anchor) // self.every + 1
            return anchor + steps * self.every
        return next(self._cron_after(moment))

    def offset(self, due: datetime) -> timedelta:
        """The jitter of the tick due at `due`: in `[0, jitter)`, the same in every process
        (drawn from a hash of the tick's id)."""
        if not self.jitter:
            return timedelta(0)
        digest = hashlib.sha256(tick_id(self.name, due).encode()).digest()
        return timedelta(microseconds=int.from_bytes(digest[:8]) % (self.jitter // _MICROSECOND))

    def fire_at(self, due: datetime) -> datetime:
        """When the tick due at `due` fires: `due` plus its jitter `offset`."""
        return due + self.offset(due) if self.jitter else due

    def next_pending(self, *, cursor: datetime, now: datetime) -> datetime:
        """The due time of the next tick to fire, given that every tick up to `cursor` is done:
        the first after `now`, or one due already whose jittered fire time is still ahead."""
        return self.next_after(max(cursor, now - self.jitter))

    def due_between(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Every due time in `(after, until]`, oldest first, in UTC."""
        if self.every is not None:
            due = self.next_after(after)
            while due <= until:
                yield due
                due += self.every
            return
        for due in self._cron_after(after.astimezone(UTC)):
            if due > until:
                return
            if self.start is None or due >= self.start:
                yield due

    def _cron_after(self, moment: datetime) -> Iterator[datetime]:
        assert self.cron is not None
        last = moment
        for local in _cron_class()(self.cron, moment.astimezone(self.zone)):
            due = local.astimezone(UTC)
            if due > last:  # never the same instant twice, never backwards (DST folds)
                last = due
                yield due

    def _cron_back(self, moment: datetime, count: int) -> datetime | None:
        """The `count`-th cron due time before `moment`, counting back (or the oldest there
        is); None if there is none."""
        assert self.cron is not None
        found = None
        back = _cron_class()(self.cron, moment.astimezone(self.zone), reverse=True)
        with contextlib.suppress(OverflowError, ValueError):  # counted back to the year 1
            for _, local in zip(range(count), back, strict=False):
                found = local.astimezone(UTC)
        return found

    def plan(self, *, cursor: datetime, now: datetime) -> list[datetime]:
        """The ticks to fire now, oldest first, given that every tick up to `cursor` is done.

        A tick is ready at its `fire_at` time (its due time, plus its jitter), and never before
        the tick due before it. Ticks ready within `grace` before `now` all fire; older ones
        follow `misfire`.
        """
        horizon = now - self.grace
        late: deque[datetime] = deque(maxlen=1 if self.misfire == "skip" else self.catch_up_limit)
        recent: list[datetime] = []
        if self.every is not None and cursor < horizon:
            # Jump over a long outage arithmetically rather than counting every interval.
            keep = late.maxlen or 1
            # The newest tick ready by the horizon whatever its jitter.
            last_late = self.next_after(horizon - self.jitter) - self.every
            oldest_kept = last_late - (keep - 1) * self.every
            if oldest_kept > cursor:
                cursor = oldest_kept - timedelta(microseconds=1)
        elif self.cron is not None and cursor < horizon - _CRON_JUMP:
            # Likewise for cron: counted back from the horizon, not forward over the outage
            # (a year of a per-minute schedule is half a million due times, seconds of CPU
            # with the event loop stopped; past `_SCAN_LIMIT` the wrong tick fired).
            counted_back = self._cron_back(horizon - self.jitter, late.maxlen or 1)
            if counted_back is not None and counted_back - _CRON_JUMP > cursor:
                # A day earlier still: the forward scan from there finds what a scan from the
                # cursor would have (a reverse scan can read a repeated hour differently).
                cursor = counted_back - _CRON_JUMP
        for seen, due in enumerate(self.due_between(cursor, now)):
            if seen > _SCAN_LIMIT:
                break
            fire = self.fire_at(due)
            if fire > now:
                break  # not ready yet, and so neither is any tick after it
            (late if fire <= horizon else recent).append(due)
        return [*late, *recent]


def _check_publishable(where: str, body: Any, headers: Mapping[str, str]) -> None:
    """Encode the body and headers once, as each tick's publish would.

    Raises:
        ConfigurationError: the body or the headers can't go on the wire (found at the first
            tick, it would end the active scheduler's term, once a term).
    """
    try:
        encode_body({} if body is None else body)
    except SerializationError as exc:
        raise ConfigurationError(f"{where}: its body can't be published: {exc}") from None
    try:
        if not isinstance(headers, Mapping):
            raise SerializationError(f"headers must be a mapping, got {headers!r}")
        encode_properties(Properties(message_id="x", headers=dict(headers)))
    except SerializationError as exc:
        raise ConfigurationError(f"{where}: its headers can't be published: {exc}") from None


def _queue_name(queue: str | Queue) -> str:
    return queue.name if isinstance(queue, Queue) else queue


def _cron_class() -> Any:
    try:
        from cronsim import CronSim
    except ImportError:
        raise ConfigurationError(
            "cron schedules need cronsim: pip install 'aio-workq[schedules]'"
        ) from None
    return CronSim
