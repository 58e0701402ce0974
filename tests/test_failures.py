"""Failure routing as a pure function: no broker, no worker."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aio_workq import (
    ConfigurationError,
    Defer,
    PayloadError,
    Queue,
    Reject,
    Retry,
    RetryPolicy,
    UnroutableError,
)
from aio_workq._consume.failures import ATTEMPT_HEADER, Failed, MoveKind, route_failure
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
