"""Failure routing as a pure function: no broker, no worker."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aio_workq import (
    ConfigurationError,
    Defer,
    IntegrationError,
    PayloadError,
    Queue,
    Reject,
    Retry,
    RetryPolicy,
    UnroutableError,
)
from aio_workq._consume.failures import (
    ATTEMPT_HEADER,
    DEFERS_HEADER,
    Failed,
    MoveKind,
    route_failure,
)
from aio_workq._exceptions import qualname
from aio_workq.cli._errors import CliError
from aio_workq.outbox import OutboxError

NOW = datetime(2026, 11, 25, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=3, initial_delay=1, multiplier=2, jitter=0, throws=(KeyError,))
QUEUE = Queue("tasks")


def failed(attempt: int = 1, **headers: object) -> Failed:
    return Failed(attempt, {"x-death": [{}], "keep": "me", **headers}, "tasks")


def test_an_exception_is_retried_with_backoff_as_the_next_attempt() -> None:
    move = route_failure(failed(1), ValueError("boom"), POLICY, QUEUE, now=NOW)
    assert move.kind is MoveKind.RETRY
    assert move.target == "tasks.retry.1000ms" and move.delay_ms == 1000
    assert move.headers[ATTEMPT_HEADER] == 2
    assert move.headers["keep"] == "me" and "x-death" not in move.headers
    assert move.headers["x-workq-exception-type"] == "builtins.ValueError"
    second = route_failure(failed(2), ValueError("boom"), POLICY, QUEUE, now=NOW)
    assert second.delay_ms == 2000 and second.headers[ATTEMPT_HEADER] == 3


def test_the_last_attempt_dead_letters_with_the_reason() -> None:
    move = route_failure(failed(3), ValueError("boom"), POLICY, QUEUE, now=NOW)
    assert move.kind is MoveKind.DEAD_LETTER and move.final
    assert move.target == "tasks.dlq"
    assert move.headers["x-workq-attempts"] == 3
    assert move.headers["x-workq-original-queue"] == "tasks"
    assert "ValueError: boom" in move.headers["x-workq-traceback"]


def test_reject_and_the_policys_throws_dead_letter_at_once() -> None:
    rejected = route_failure(failed(1), Reject("bad input"), POLICY, QUEUE, now=NOW)
    assert rejected.kind is MoveKind.DEAD_LETTER and rejected.headers["x-workq-rejected"]
    thrown = route_failure(failed(1), KeyError("width"), POLICY, QUEUE, now=NOW)
    assert thrown.kind is MoveKind.DEAD_LETTER and "x-workq-rejected" not in thrown.headers


def test_an_integration_error_dead_letters_at_once_with_its_reason() -> None:
    """An `IntegrationError` from a handler (aio-workq used the wrong way: a registry with no
    producer, a closed SyncProducer) was retried 5 times, although no retry can fix a
    configuration; it goes to the dead-letter queue on the first attempt, as `Reject` does."""
    error = IntegrationError("task 'x': the tasks are not bound to a producer")
    move = route_failure(failed(1), error, POLICY, QUEUE, now=NOW)
    assert move.kind is MoveKind.DEAD_LETTER and move.target == "tasks.dlq"
    assert move.headers["x-workq-attempts"] == 1
    assert move.headers["x-workq-exception-type"] == "aio_workq.IntegrationError"
    assert "not bound to a producer" in move.headers["x-workq-exception-message"]
    assert "x-workq-rejected" not in move.headers  # the handler did not reject it itself


def test_no_policy_dead_letters_on_the_first_failure() -> None:
    move = route_failure(failed(1), ValueError(), None, QUEUE, now=NOW)
    assert move.kind is MoveKind.DEAD_LETTER


def test_retry_with_a_delay_picks_a_level_and_zero_goes_straight_back() -> None:
    later = route_failure(failed(1), Retry(delay=7), POLICY, QUEUE, now=NOW)
    assert later.kind is MoveKind.RETRY and later.delay_ms == 10_000
    assert later.headers[ATTEMPT_HEADER] == 2
    now = route_failure(failed(1), Retry(delay=0), POLICY, QUEUE, now=NOW)
    assert now.target == "tasks" and now.delay_ms is None


def test_defer_waits_without_using_an_attempt_even_on_the_last_one() -> None:
    move = route_failure(failed(3), Defer(5), POLICY, QUEUE, now=NOW)
    assert move.kind is MoveKind.DEFER and move.delay_ms == 5_000
    assert ATTEMPT_HEADER not in move.headers  # the attempt stays 3 (absent header = 1 here)
    kept = route_failure(failed(3, **{ATTEMPT_HEADER: 3}), Defer(5), POLICY, QUEUE, now=NOW)
    assert kept.headers[ATTEMPT_HEADER] == 3
    assert route_failure(failed(1), Defer(1), None, QUEUE, now=NOW).kind is MoveKind.DEFER


def test_queues_without_a_dead_letter_queue_drop_final_failures() -> None:
    no_dlq = Queue("tasks", dead_letter=False)
    assert route_failure(failed(3), ValueError(), POLICY, no_dlq, now=NOW).kind is MoveKind.DROP
    assert route_failure(failed(1), ValueError(), POLICY, no_dlq, now=NOW).kind is MoveKind.RETRY
    subscriber = Queue("")
    assert route_failure(failed(1), ValueError(), POLICY, subscriber, now=NOW).kind is MoveKind.DROP


def test_the_first_failure_time_is_kept_across_retries() -> None:
    first = route_failure(failed(1), ValueError(), POLICY, QUEUE, now=NOW)
    later = datetime(2026, 11, 26, tzinfo=UTC)
    again = route_failure(failed(2, **first.headers), ValueError(), POLICY, QUEUE, now=later)
    assert again.headers["x-workq-first-failure"] == NOW.isoformat()
    assert again.headers["x-workq-last-failure"] == later.isoformat()


@pytest.mark.parametrize("throws", [KeyError, ("KeyError",), (int,)])
def test_throws_must_be_exception_classes(throws: object) -> None:
    with pytest.raises(ConfigurationError, match="throws"):
        RetryPolicy(throws=throws)  # type: ignore[arg-type]


def test_defer_needs_a_positive_delay() -> None:
    with pytest.raises(ConfigurationError, match="Defer"):
        Defer(0)


class AppError(Exception):
    """A user's exception: named by its own module path."""


@pytest.mark.parametrize(
    ("exc", "name"),
    [
        (PayloadError("bad"), "aio_workq.PayloadError"),
        (Reject("no"), "aio_workq.Reject"),
        (Retry(1), "aio_workq.Retry"),
        (UnroutableError("x"), "aio_workq.UnroutableError"),
        (OutboxError("x"), "aio_workq.outbox.OutboxError"),
        (AppError("x"), f"{__name__}.AppError"),
        (CliError("x"), "aio_workq.cli._errors.CliError"),  # not exported: the module's path
    ],
)
def test_the_exception_type_header_names_exported_classes_by_their_public_path(
    exc: Exception, name: str
) -> None:
    move = route_failure(failed(3), exc, POLICY, QUEUE, now=NOW)
    assert move.headers["x-workq-exception-type"] == name
    assert qualname(type(exc)) == name


DEFERS = "x-workq-defers"


def test_each_defer_is_counted_in_a_header_and_the_cap_dead_letters_with_the_reason() -> None:
    first = route_failure(failed(1), Defer(5), POLICY, QUEUE, now=NOW, max_defers=2)
    assert first.kind is MoveKind.DEFER and first.headers[DEFERS] == 1
    second = route_failure(
        failed(1, **first.headers), Defer(5), POLICY, QUEUE, now=NOW, max_defers=2
    )
    assert second.kind is MoveKind.DEFER and second.headers[DEFERS] == 2
    third = route_failure(
        failed(1, **second.headers), Defer(5), POLICY, QUEUE, now=NOW, max_defers=2
    )
    assert third.kind is MoveKind.DEAD_LETTER and third.target == "tasks.dlq"
    assert third.headers[DEFERS] == 2  # deferred twice; the third was refused
    assert third.headers["x-workq-exception-type"] == "aio_workq.Defer"
    assert "max_defers=2" in third.headers["x-workq-exception-message"]
    dropped = Queue("tasks", dead_letter=False)
    over = route_failure(
        failed(1, **second.headers), Defer(5), POLICY, dropped, now=NOW, max_defers=2
    )
    assert over.kind is MoveKind.DROP


def test_defers_are_capped_at_100_by_default_and_none_is_unlimited() -> None:
    at_99 = failed(1, **{DEFERS: 99})
    assert route_failure(at_99, Defer(1), POLICY, QUEUE, now=NOW).kind is MoveKind.DEFER
    at_100 = failed(1, **{DEFERS: 100})
    assert route_failure(at_100, Defer(1), POLICY, QUEUE, now=NOW).kind is MoveKind.DEAD_LETTER
    many = failed(1, **{DEFERS: 10_000})
    move = route_failure(many, Defer(1), POLICY, QUEUE, now=NOW, max_defers=None)
    assert move.kind is MoveKind.DEFER and move.headers[DEFERS] == 10_001


def test_the_defer_count_survives_retries() -> None:
    deferred = route_failure(failed(1), Defer(1), POLICY, QUEUE, now=NOW)
    retried = route_failure(failed(1, **deferred.headers), ValueError(), POLICY, QUEUE, now=NOW)
    assert retried.headers[DEFERS] == 1


def test_a_delay_between_ladder_steps_waits_its_own_time_in_the_next_step() -> None:
    # Retry(delay=3) waits in the 5 s delay queue with a 3 s per-message TTL: 3 s, unless a
    # message ahead of it in that queue has longer to wait (never more than 5 s).
    retry = route_failure(failed(1), Retry(delay=3), POLICY, QUEUE, now=NOW)
    assert retry.delay_ms == 5_000 and retry.expiration_ms == 3_000
    defer = route_failure(failed(1), Defer(0.25), POLICY, QUEUE, now=NOW)
    assert defer.delay_ms == 1_000 and defer.expiration_ms == 250
    on_a_step = route_failure(failed(1), Retry(delay=5), POLICY, QUEUE, now=NOW)
    assert on_a_step.delay_ms == 5_000 and on_a_step.expiration_ms is None


def test_a_crafted_defer_count_still_moves_the_message_with_a_count_amqp_can_carry() -> None:
    # A count header at the largest signed 64-bit value: the next count (+1) could not be
    # encoded, the move failed and the message went back to its queue, again and again.
    crafted = Failed(1, {DEFERS_HEADER: 2**63 - 1}, "tasks")
    move = route_failure(crafted, Defer(1), POLICY, QUEUE, now=NOW, max_defers=None)
    assert move.kind is MoveKind.DEFER
    assert 0 < move.headers[DEFERS_HEADER] < 2**63 - 1
