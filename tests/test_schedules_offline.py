"""Schedules without a broker: due times, daylight saving time, misfires, bad input."""

from __future__ import annotations

import asyncio
import logging
import ssl
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from aio_workq import ConfigurationError
from aio_workq._wire.frames import Properties, encode_properties
from aio_workq.cli._errors import TargetError
from aio_workq.cli._target import build_scheduler
from aio_workq.schedules import Schedule, Scheduler, State, tick_id
from aio_workq.schedules._state import Entry

PARIS = ZoneInfo("Europe/Paris")


def fires_between(schedule: Schedule, start: datetime, end: datetime) -> list[datetime]:
    return list(schedule.due_between(start, end))


def test_0230_in_paris_fires_once_on_the_spring_forward_day() -> None:
    # 2026-03-29: 02:00 -> 03:00 in Europe/Paris; 02:30 does not exist that day.
    daily = Schedule("nightly", cron="30 2 * * *", tz="Europe/Paris", queue="reports")
    fired = fires_between(
        daily, datetime(2026, 3, 28, 12, tzinfo=PARIS), datetime(2026, 3, 30, 12, tzinfo=PARIS)
    )
    on_the_day = [d for d in fired if d.astimezone(PARIS).date().day == 29]
    assert len(on_the_day) == 1
    assert on_the_day[0].astimezone(PARIS).strftime("%H:%M") == "03:00"  # first valid minute
    assert len(fired) == 2  # and 02:30 again the next day


def test_0230_in_paris_fires_once_on_the_fall_back_day() -> None:
    # 2026-10-25: 03:00 -> 02:00 in Europe/Paris; 02:30 happens twice that day.
    daily = Schedule("nightly", cron="30 2 * * *", tz="Europe/Paris", queue="reports")
    fired = fires_between(
        daily, datetime(2026, 10, 24, 12, tzinfo=PARIS), datetime(2026, 10, 26, 12, tzinfo=PARIS)
    )
    on_the_day = [d for d in fired if d.astimezone(PARIS).date().day == 25]
    assert on_the_day == [datetime(2026, 10, 25, 0, 30, tzinfo=UTC)]  # 02:30 CEST, once
    assert len(fired) == 2


def test_a_fall_back_day_restarted_inside_the_repeated_hour_does_not_fire_0230_again() -> None:
    daily = Schedule("nightly", cron="30 2 * * *", tz="Europe/Paris", queue="reports")
    # The cursor sits just after the first 02:30 (00:30 UTC), during the repeated hour.
    after = datetime(2026, 10, 25, 0, 45, tzinfo=UTC)
    assert daily.next_after(after) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)


def test_hourly_wildcards_fire_in_both_copies_of_the_repeated_hour() -> None:
    half_hourly = Schedule("half", cron="*/30 * * * *", tz="Europe/Paris", queue="q")
    fired = fires_between(
        half_hourly,
        datetime(2026, 10, 24, 23, 45, tzinfo=UTC),
        datetime(2026, 10, 25, 2, 1, tzinfo=UTC),
    )
    assert fired == [datetime(2026, 10, 24, 23, 45, tzinfo=UTC) + timedelta(minutes=15 + 30 * i)
                     for i in range(5)]  # fmt: skip
    assert len(set(fired)) == len(fired)


def test_cron_is_read_in_its_time_zone() -> None:
    report = Schedule("nightly-report", cron="0 3 * * *", tz="Europe/Paris", queue="reports")
    assert report.next_after(datetime(2026, 1, 10, tzinfo=UTC)) == datetime(
        2026, 1, 10, 2, tzinfo=UTC
    )
    assert report.next_after(datetime(2026, 7, 10, tzinfo=UTC)) == datetime(
        2026, 7, 10, 1, tzinfo=UTC
    )


def test_every_is_anchored_so_every_replica_computes_the_same_ticks() -> None:
    poll = Schedule("poll", every=timedelta(seconds=30), queue="poll")
    moment = datetime(2026, 12, 6, 4, 0, 17, 123, tzinfo=UTC)
    assert poll.next_after(moment) == datetime(2026, 12, 6, 4, 0, 30, tzinfo=UTC)
    assert poll.next_after(datetime(2026, 12, 6, 4, 0, 30, tzinfo=UTC)) == datetime(
        2026, 12, 6, 4, 1, tzinfo=UTC
    )
    start = datetime(2026, 12, 6, 4, 0, 5, tzinfo=UTC)
    later = Schedule("poll", every=timedelta(seconds=30), queue="poll", start=start)
    assert later.next_after(moment - timedelta(hours=1)) == start
    assert later.next_after(moment) == datetime(2026, 12, 6, 4, 0, 35, tzinfo=UTC)


def test_tick_ids_are_the_name_and_the_due_time_in_utc() -> None:
    due = datetime(2026, 3, 29, 3, tzinfo=PARIS)
    assert tick_id("nightly", due) == "nightly:2026-03-29T01:00:00+00:00"


def test_a_short_gap_fires_every_tick_it_missed() -> None:
    poll = Schedule("poll", every=timedelta(seconds=1), queue="poll")
    now = datetime(2026, 12, 6, 4, 0, 10, 500_000, tzinfo=UTC)
    plan = poll.plan(cursor=now - timedelta(seconds=5), now=now)
    assert len(plan) == 5  # within the 60 s grace: a failover's gap loses nothing


def test_a_clock_set_back_or_forward_fires_no_tick_twice() -> None:
    """The scheduler reads the wall clock: set back an hour after a tick, nothing fires again
    until the clock passes the last tick fired; set a day forward, `misfire` and `grace`
    apply as after an outage of a day, and once the clock is put right nothing fires until
    it reaches that tick again (it was fired, early)."""
    poll = Schedule("poll", every=timedelta(seconds=10), queue="poll")
    fired = datetime(2026, 12, 6, 10, 0, 0, tzinfo=UTC)
    back = fired - timedelta(hours=1)
    assert poll.plan(cursor=fired, now=back) == []
    assert poll.next_pending(cursor=fired, now=back) == fired + timedelta(seconds=10)
    assert poll.plan(cursor=fired, now=fired + timedelta(seconds=10)) == [
        fired + timedelta(seconds=10)
    ]
    ahead = fired + timedelta(days=1, seconds=3)
    plan = poll.plan(cursor=fired, now=ahead)  # the latest beyond grace, then those within
    early = fired + timedelta(days=1)
    assert plan == [early - timedelta(seconds=10 * n) for n in range(6, -1, -1)]
    assert poll.plan(cursor=early, now=fired + timedelta(seconds=30)) == []


def test_misfire_skip_fires_the_latest_missed_tick_once() -> None:
    poll = Schedule("poll", every=timedelta(seconds=10), queue="poll", grace=timedelta(0))
    now = datetime(2026, 12, 6, 5, 0, 5, tzinfo=UTC)
    plan = poll.plan(cursor=now - timedelta(days=3), now=now)
    assert plan == [datetime(2026, 12, 6, 5, 0, 0, tzinfo=UTC)]


@pytest.mark.parametrize("tz", ["UTC", "Europe/Paris"])
def test_after_a_years_long_outage_a_cron_schedule_fires_its_latest_missed_tick(tz: str) -> None:
    """A per-minute cron schedule whose state is 800 days old (every scheduler was off):
    `plan` walked the due times forward from the cursor, half a million a year, seconds of
    CPU with the event loop stopped (the lease's heartbeats too), and past a million it gave
    up and fired a tick months old as "the latest". Now it counts back from the horizon."""
    minutely = Schedule("minutely", cron="* * * * *", queue="q", tz=tz)
    now = datetime(2026, 12, 6, 5, 0, 30, tzinfo=UTC)
    latest = datetime(2026, 12, 6, 4, 59, tzinfo=UTC)  # the last minute beyond the 60 s grace
    plan = minutely.plan(cursor=now - timedelta(days=800), now=now)
    assert plan == [latest, latest + timedelta(minutes=1)]  # skip: it, then 05:00 (in grace)
    catch_up = Schedule(
        "every5", cron="*/5 * * * *", queue="q", tz=tz, misfire="catch_up", catch_up_limit=3
    )
    plan = catch_up.plan(cursor=now - timedelta(days=800), now=now)
    fives = datetime(2026, 12, 6, 4, 45, tzinfo=UTC)  # the 3 latest beyond grace, then 05:00
    assert plan == [fives + timedelta(minutes=5 * n) for n in range(4)]
    # The same as a scan from a cursor a day and a half back (no jump needed).
    recent = now - timedelta(days=1, hours=12)
    assert catch_up.plan(cursor=now - timedelta(days=800), now=now) == catch_up.plan(
        cursor=recent, now=now
    )


def test_misfire_catch_up_fires_up_to_its_limit_oldest_first() -> None:
    poll = Schedule(
        "poll", every=timedelta(seconds=10), queue="poll", grace=timedelta(0),
        misfire="catch_up", catch_up_limit=3,
    )  # fmt: skip
    now = datetime(2026, 12, 6, 5, 0, 5, tzinfo=UTC)
    plan = poll.plan(cursor=now - timedelta(days=3), now=now)
    first = datetime(2026, 12, 6, 4, 59, 40, tzinfo=UTC)
    assert plan == [first + timedelta(seconds=10 * i) for i in range(3)]
    cron = Schedule(
        "minutely", cron="* * * * *", queue="q", grace=timedelta(0), misfire="catch_up",
        catch_up_limit=2,
    )  # fmt: skip
    assert cron.plan(cursor=now - timedelta(hours=5), now=now) == [
        datetime(2026, 12, 6, 4, 59, tzinfo=UTC),
        datetime(2026, 12, 6, 5, 0, tzinfo=UTC),
    ]


def test_nothing_is_due_before_the_first_tick() -> None:
    poll = Schedule("poll", every=timedelta(seconds=30), queue="poll")
    now = datetime(2026, 12, 6, 5, 0, 5, tzinfo=UTC)
    assert poll.plan(cursor=now - timedelta(seconds=1), now=now) == []


def test_a_changed_spec_has_another_fingerprint() -> None:
    a = Schedule("r", cron="0 3 * * *", tz="Europe/Paris", queue="q")
    assert (
        a.fingerprint()
        == Schedule("r", cron="0 3 * * *", tz="Europe/Paris", queue="x").fingerprint()
    )
    assert (
        a.fingerprint()
        != Schedule("r", cron="0 4 * * *", tz="Europe/Paris", queue="q").fingerprint()
    )
    assert a.fingerprint() != Schedule("r", cron="0 3 * * *", queue="q").fingerprint()


def test_a_changed_spec_goes_on_from_its_last_tick_within_grace_never_back() -> None:
    """A rolling deploy's new spec fires its ticks due since the old version's last one (the
    handover), at most `grace` back; a new schedule starts from now; a flip-flop between two
    versions never moves a schedule back, so no tick id fires twice."""
    from aio_workq.schedules._firing import reconcile

    now = datetime(2026, 12, 7, 3, 0, 5, tzinfo=UTC)
    v1 = Schedule("nightly", cron="0 3 * * *", queue="q")
    v2 = Schedule("nightly", cron="0 3 * * 1-5", queue="q")
    last = datetime(2026, 12, 6, 3, tzinfo=UTC)  # v1 fired yesterday's; today's is due 5 s ago
    state = State(entries={"nightly": Entry(cursor=last, fingerprint=v1.fingerprint())})
    reconcile({"nightly": v2}, state, now)
    entry = state.entries["nightly"]
    assert entry.cursor == now - v2.grace and entry.fingerprint == v2.fingerprint()
    assert v2.plan(cursor=entry.cursor, now=now) == [datetime(2026, 12, 7, 3, tzinfo=UTC)]
    entry.cursor = datetime(2026, 12, 7, 3, tzinfo=UTC)  # fired
    reconcile({"nightly": v1}, state, now + timedelta(seconds=1))  # v1 active again
    assert state.entries["nightly"].cursor == datetime(2026, 12, 7, 3, tzinfo=UTC)
    fresh = State(entries={})
    reconcile({"nightly": v2}, fresh, now)
    assert fresh.entries["nightly"].cursor == now  # new: no tick it never had


def test_state_round_trips_through_its_message() -> None:
    now = datetime(2026, 12, 6, 5, tzinfo=UTC)
    state = State(entries={"poll": Entry(cursor=now, fingerprint="f", last=now)}, active="h:1")
    again = State.decode(state.encode())
    assert again.entries["poll"].cursor == now and again.active == "h:1"
    with pytest.raises(ValueError, match="not a schedules state"):
        State.decode(b'{"format": 99}')


def test_a_next_fire_long_past_is_marked_overdue() -> None:
    """A killed active scheduler leaves its name in the state until another takes over; a
    next fire over 30 s in the past says that nothing fired it (the new-user pass)."""
    from aio_workq.admin.schedules import schedule_rows

    now = datetime(2026, 12, 6, 5, tzinfo=UTC)
    state = State(
        entries={
            "late": Entry(cursor=now, fingerprint="f", next=now - timedelta(seconds=31)),
            "due": Entry(cursor=now, fingerprint="f", next=now - timedelta(seconds=29)),
            "soon": Entry(cursor=now, fingerprint="f", next=now + timedelta(seconds=5)),
            "unknown": Entry(cursor=now, fingerprint="f"),
        },
        active="h:1",
    )
    rows = {row["name"]: row["overdue"] for row in schedule_rows(state, now)}
    assert rows == {"late": True, "due": False, "soon": False, "unknown": False}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"queue": "q"}, "exactly one of cron= and every="),
        ({"queue": "q", "cron": "* * * * *", "every": timedelta(seconds=1)}, "exactly one"),
        ({"queue": "q", "cron": "61 * * * *"}, "cron expression '61 \\* \\* \\* \\*' is invalid"),
        # An expression that never fires names the day and what to give instead.
        ({"queue": "q", "cron": "0 0 30 2 *"}, "never fire: February has 29 days at most"),
        ({"queue": "q", "cron": "0 0 31 4,6 *"}, "L is the last day of every month"),
        ({"queue": "q", "every": timedelta(milliseconds=10)}, "at least 1 second"),
        ({"queue": "q", "every": 30}, "every= must be a timedelta"),
        ({"queue": "q", "cron": "0 3 * * *", "tz": "Paris"}, "unknown time zone 'Paris'"),
        ({"queue": "q", "every": timedelta(seconds=1), "misfire": "all"}, "misfire must be"),
        ({"queue": "q", "every": timedelta(seconds=1), "catch_up_limit": 0}, "catch_up_limit"),
        (
            {"queue": "q", "every": timedelta(seconds=1), "start": datetime(2026, 1, 1)},
            "timezone-aware",
        ),
        # Due times out of datetime's range: refused here, not an OverflowError that ended the
        # scheduler's run (and every other schedule's ticks) at its first round.
        ({"queue": "q", "every": timedelta(days=3_000_000)}, "every= .* past the year 9999"),
        (
            {"queue": "q", "every": timedelta(days=1), "start": datetime(9999, 12, 31, tzinfo=UTC)},
            "past the year 9999",
        ),
        (
            {"queue": "q", "every": timedelta(seconds=1), "grace": timedelta(days=10**6)},
            "grace= .* before the year 1",
        ),
    ],
)
def test_bad_schedules_are_refused_with_the_reason(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Schedule("s", **kwargs)  # type: ignore[arg-type]


def test_bad_names_and_duplicates_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="schedule name 'a b' is invalid"):
        Schedule("a b", every=timedelta(seconds=1), queue="q")
    poll = Schedule("poll", every=timedelta(seconds=1), queue="poll")
    with pytest.raises(ConfigurationError, match="two schedules named 'poll'"):
        Scheduler("amqp://guest:secret@localhost/", [poll, poll])


def test_the_decorator_adds_a_schedule_and_returns_the_handler() -> None:
    scheduler = Scheduler("amqp://guest:secret@localhost/")

    @scheduler.schedule(every=timedelta(seconds=30))
    async def poll(job: object) -> None:
        del job

    assert callable(poll)
    assert scheduler.schedules["poll"].queue_name == "poll"
    assert "secret" not in repr(scheduler)


SCHEDULES = [Schedule("poll", every=timedelta(seconds=30), queue="poll")]
NOT_SCHEDULES = ["poll"]


def test_worker_schedules_option_takes_schedules_or_a_scheduler_and_names_a_wrong_target() -> None:
    scheduler = build_scheduler(f"{__name__}:SCHEDULES", "amqp://guest:guest@localhost/")
    assert isinstance(scheduler, Scheduler) and list(scheduler.schedules) == ["poll"]
    with pytest.raises(TargetError, match="expected a Scheduler, a Schedule or a non-empty list"):
        build_scheduler(f"{__name__}:NOT_SCHEDULES", None)


def test_ssl_context_with_a_plain_url_is_refused_naming_amqps() -> None:
    context = ssl.create_default_context()
    with pytest.raises(ConfigurationError, match="amqps://"):
        Scheduler("amqp://guest:secret@localhost/", ssl_context=context)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.arrived.set()


async def test_an_unreachable_broker_is_logged_as_a_typed_error_without_the_password() -> None:
    records = _Records()
    logger = logging.getLogger("aio_workq")
    logger.addHandler(records)
    scheduler = Scheduler("amqp://guest:s3cret-pw@127.0.0.1:1/", retry_delay=0.2)
    run = asyncio.create_task(scheduler.run())
    try:
        async with asyncio.timeout(20):
            while not any("retrying" in m for m in records.messages):
                records.arrived.clear()
                await records.arrived.wait()
    finally:
        await scheduler.stop()
        async with asyncio.timeout(10):
            await run
        logger.removeHandler(records)
    retrying = [m for m in records.messages if "retrying" in m]
    assert "BrokerConnectionError" in retrying[0], retrying
    assert "127.0.0.1:1" in retrying[0]
    assert not any("s3cret-pw" in m for m in records.messages)


# --- jitter ---


def test_jitter_offsets_are_deterministic_per_tick_and_within_the_jitter() -> None:
    spread = timedelta(seconds=7)
    poll = Schedule("poll", every=timedelta(seconds=10), queue="poll", jitter=spread)
    twin = Schedule("poll", every=timedelta(seconds=10), queue="other", jitter=spread)
    other = Schedule("other", every=timedelta(seconds=10), queue="poll", jitter=spread)
    start = datetime(2026, 12, 6, 5, tzinfo=UTC)
    dues = [start + timedelta(seconds=10 * i) for i in range(200)]
    offsets = [poll.offset(due) for due in dues]
    assert all(timedelta(0) <= o < spread for o in offsets)
    assert offsets == [twin.offset(due) for due in dues]  # every replica computes the same
    assert offsets != [other.offset(due) for due in dues]  # the name is part of the draw
    assert len(set(offsets)) > 150  # spread out, not one fixed delay
    assert max(offsets) > spread * 0.9 and min(offsets) < spread * 0.1
    assert Schedule("poll", every=timedelta(seconds=10), queue="q").offset(start) == timedelta(0)


def test_a_jittered_tick_fires_at_its_offset_with_the_due_time_as_its_id() -> None:
    poll = Schedule("poll", every=timedelta(seconds=10), queue="poll", jitter=timedelta(seconds=9))
    due = datetime(2026, 12, 6, 5, 0, 10, tzinfo=UTC)
    fire = poll.fire_at(due)
    assert fire == due + poll.offset(due) and fire >= due
    cursor = due - timedelta(seconds=10)
    assert poll.plan(cursor=cursor, now=fire - timedelta(microseconds=1)) == []
    assert poll.plan(cursor=cursor, now=fire) == [due]
    assert tick_id("poll", due) == "poll:2026-12-06T05:00:10+00:00"
    assert poll.next_pending(cursor=cursor, now=fire - timedelta(seconds=0.001)) == due


def test_jittered_ticks_fire_in_due_order_a_later_one_waits_for_an_earlier_one() -> None:
    minutely = Schedule("m", cron="* * * * *", queue="q", jitter=timedelta(minutes=5))
    base = datetime(2026, 12, 6, 5, tzinfo=UTC)
    dues = [base + timedelta(minutes=i) for i in range(1, 30)]
    # Find two consecutive ticks whose fire times are out of order.
    first = next(d for d, e in zip(dues, dues[1:], strict=False)
                 if minutely.fire_at(e) < minutely.fire_at(d))  # fmt: skip
    later = first + timedelta(minutes=1)
    now = minutely.fire_at(later)
    assert now < minutely.fire_at(first)
    plan = minutely.plan(cursor=first - timedelta(minutes=1), now=now)
    assert first not in plan and later not in plan  # never fired past an unfired tick


def test_jitter_does_not_change_the_fingerprint_or_the_due_times() -> None:
    plain = Schedule("poll", every=timedelta(seconds=10), queue="q")
    jittered = Schedule("poll", every=timedelta(seconds=10), queue="q", jitter=timedelta(seconds=3))
    assert plain.fingerprint() == jittered.fingerprint()
    moment = datetime(2026, 12, 6, 5, 0, 3, tzinfo=UTC)
    assert plain.next_after(moment) == jittered.next_after(moment)
    assert "jitter 0:00:03" in jittered.describe()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": timedelta(seconds=10), "jitter": timedelta(seconds=-1)}, "jitter= must be"),
        ({"every": timedelta(seconds=10), "jitter": 3}, "jitter= must be a timedelta"),
        ({"every": timedelta(seconds=10), "jitter": timedelta(seconds=10)}, "shorter than every"),
    ],
)
def test_bad_jitter_is_refused_with_the_reason(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Schedule("s", queue="q", **kwargs)  # type: ignore[arg-type]


def test_the_decorator_takes_a_jitter() -> None:
    scheduler = Scheduler("amqp://guest:secret@localhost/")

    @scheduler.schedule(every=timedelta(seconds=30), jitter=timedelta(seconds=5))
    async def poll(job: object) -> None:
        del job

    assert scheduler.schedules["poll"].jitter == timedelta(seconds=5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"body": {"at": object()}},
            "schedule 's': its body can't be published: cannot encode a body of type dict",
        ),
        (
            {"headers": {"x-tenant": object()}},
            "schedule 's': its headers can't be published: .*x-tenant",
        ),
    ],
)
def test_a_body_or_headers_that_cant_be_published_are_refused_when_declared(
    kwargs: dict[str, object], match: str
) -> None:
    # Found at the first tick instead, it ended every active term: the other schedules' ticks
    # fired in that round were never recorded and went out again, once a term.
    with pytest.raises(ConfigurationError, match=match):
        Schedule("s", every=timedelta(seconds=5), queue="q", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("cron", ["0 0 3 * * *", "*/10 * * * * *", "0 3 * * * 2026", "0 3 * *"])
def test_a_cron_expression_not_of_5_fields_is_refused_naming_the_fields(cron: str) -> None:
    # cronsim reads a 6th field as seconds (first): '0 0 3 * * *' was taken as 03:00 daily
    # and '*/10 * * * * *' as every 10 s, against the documented 5 fields.
    with pytest.raises(ConfigurationError, match="5 fields: minute hour day-of-month month"):
        Schedule("s", cron=cron, queue="q")


async def test_a_stop_timeout_that_is_not_seconds_is_refused() -> None:
    """`stop(timeout=...)` was ignored, so any value went: "5" or NaN said nothing. Now a
    timeout is checked (before anything is stopped), as the workers' is."""
    scheduler = Scheduler("amqp://guest:guest@localhost/")
    for bad in ("5", float("nan"), True, -1):
        with pytest.raises(ConfigurationError, match="timeout must be"):
            await scheduler.stop(bad)  # type: ignore[arg-type]
    await scheduler.stop(float("inf"))  # no bound: as stop()
    await scheduler.stop(0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1", True, 0])
def test_a_retry_delay_that_is_not_finite_seconds_is_refused(bad: object) -> None:
    # NaN passed the scheduler's own check (NaN <= 0 is false) and inf made a replica that
    # lost the broker wait forever; the check is now the one of every other setting.
    with pytest.raises(ConfigurationError, match="retry_delay must be a finite number of sec"):
        Scheduler("amqp://guest:guest@localhost/", retry_delay=bad)  # type: ignore[arg-type]


def test_a_name_too_long_for_its_ticks_message_ids_is_refused() -> None:
    # A tick's message id is `{name}:{due time}` (up to 32 characters with microseconds):
    # over AMQP's 255 bytes, every tick's publish failed, and the schedule never fired.
    with pytest.raises(ConfigurationError, match="255 bytes"):
        Schedule("n" * 223, queue="q", every=timedelta(seconds=1))
    start = datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    longest = Schedule("n" * 222, queue="q", every=timedelta(seconds=1), start=start)
    due = longest.next_after(start)
    assert due.microsecond == 123456
    assert len(tick_id(longest.name, due).encode()) == 255
    encode_properties(Properties(message_id=tick_id(longest.name, due)))  # as publish does
