"""Failure routing: where a message whose handler failed goes next, decided without a broker.

`route_failure(failed, exc, policy, queue)` is a pure function of the failed message's attempt
and headers, the exception, the retry policy and the queue: it returns a `Move`, which the
worker's mover carries out (publish a copy, wait for its confirm, then ack the original).
"""

from __future__ import annotations

import enum
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .._exceptions import (
    Defer,
    IntegrationError,
    PayloadError,
    Reject,
    Retry,
    qualname,
    text_of,
)
from .._headers import ATTEMPT_HEADER, BROKER_HEADERS
from .._link.specs import Queue
from .retry import RetryPolicy

__all__ = (
    "ATTEMPT_HEADER",
    "BROKER_HEADERS",
    "DEFERS_HEADER",
    "MAX_DEFERS",
    "Failed",
    "Move",
    "MoveKind",
    "defers_used_up",
    "format_traceback",
    "route_failure",
)

DEFERS_HEADER = "x-workq-defers"
"""How many times the message was deferred (`Defer`), over its whole life."""
MAX_DEFERS = 100
"""The worker's default `max_defers`."""

_ERROR_TEXT_LIMIT = 1000
_TRACEBACK_LIMIT = 4000


class MoveKind(enum.StrEnum):
    """What happens to a failed message."""

    RETRY = "retry"
    """Back to the work queue after a delay, as the next attempt."""
    DEFER = "defer"
    """Back to the work queue after a delay, as the same attempt (`Defer`)."""
    DEAD_LETTER = "dead-letter"
    """To the dead-letter queue, with headers saying why."""
    DROP = "drop"
    """Rejected without requeue: the queue has no dead-letter queue (logged as an error)."""


@dataclass(frozen=True, slots=True)
class Failed:
    """What routing needs to know of a failed message."""

    attempt: int
    headers: Mapping[str, Any]
    queue_name: str


@dataclass(frozen=True, slots=True)
class Move:
    """A routing decision: the queue to publish the copy to, its headers, and its delay."""

    kind: MoveKind
    target: str = ""
    headers: dict[str, Any] = field(default_factory=dict)
    delay_ms: int | None = None
    """The delay queue level to declare and publish into (`None`: no delay queue)."""
    expiration_ms: int | None = None
    """A per-message TTL shorter than the level: backoff jitter, or a `Retry`/`Defer` delay
    between two levels."""

    @property
    def final(self) -> bool:
        return self.kind in (MoveKind.DEAD_LETTER, MoveKind.DROP)


def route_failure(
    failed: Failed,
    exc: BaseException,
    policy: RetryPolicy | None,
    queue: Queue,
    *,
    now: datetime,
    max_defers: int | None = MAX_DEFERS,
) -> Move:
    """Decide where a failed message goes.

    - `Reject`, an `IntegrationError` (aio-workq used the wrong way: no retry fixes a
      configuration), an exception the policy `throws`, no policy, or the last attempt: the
      dead-letter queue (or dropped, for a queue without one);
    - `Defer(delay)`: a delay queue, the attempt unchanged, one more deferral counted; past
      `max_defers` deferrals (`None`: no limit), the dead-letter queue;
    - `Retry(delay)`: a delay queue (or straight back with `delay=0`), as the next attempt;
    - anything else: the policy's backoff for this attempt, as the next attempt.

    A `Retry` or `Defer` delay waits in the smallest delay level at least as long, with the
    delay itself as the message's own TTL when it falls between two levels.
    """
    if queue.server_named:
        return Move(MoveKind.DROP)
    attempt = failed.attempt
    headers = _failure_headers(failed.headers, exc, now)
    defers = _count(failed.headers.get(DEFERS_HEADER))
    refused = ""
    if isinstance(exc, Defer):
        if max_defers is None or defers < max_defers:
            headers[DEFERS_HEADER] = defers + 1
            level, expiration = _level((policy or _LADDER_ONLY), exc.delay)
            return Move(
                MoveKind.DEFER, queue.delay_queue(level), headers,
                delay_ms=level, expiration_ms=expiration,
            )  # fmt: skip
        refused = (
            f"deferred {defers} times already, the worker's max_defers={max_defers}; "
            f"Defer({exc.delay:g}) refused"
        )
        headers["x-workq-exception-message"] = refused
    final = (
        bool(refused)
        or isinstance(exc, Reject | IntegrationError)
        or policy is None
        or attempt >= policy.max_attempts
        or policy.gives_up_on(exc)
    )
    if final and not queue.dead_letter:
        return Move(MoveKind.DROP)
    if final:
        headers["x-workq-original-queue"] = failed.queue_name
        headers["x-workq-attempts"] = attempt
        headers["x-workq-traceback"] = format_traceback(exc)
        if isinstance(exc, Reject):
            headers["x-workq-rejected"] = True
        if isinstance(exc, PayloadError):
            headers["x-workq-validation-error"] = text_of(exc)[:_TRACEBACK_LIMIT]
        return Move(MoveKind.DEAD_LETTER, queue.dead_letter_queue, headers)
    assert policy is not None
    headers[ATTEMPT_HEADER] = attempt + 1
    requested = exc.delay if isinstance(exc, Retry) else None
    if requested == 0:
        return Move(MoveKind.RETRY, failed.queue_name, headers)
    if requested is not None:
        level, expiration = _level(policy, requested)
        return Move(
            MoveKind.RETRY, queue.delay_queue(level), headers,
            delay_ms=level, expiration_ms=expiration,
        )  # fmt: skip
    level = policy.delay_ms(attempt)
    return Move(
        MoveKind.RETRY,
        queue.delay_queue(level),
        headers,
        delay_ms=level,
        expiration_ms=policy.jittered_ms(level),
    )


_LADDER_ONLY = RetryPolicy(max_attempts=1)


def _level(policy: RetryPolicy, delay: float) -> tuple[int, int | None]:
    """The delay level (ms) for a requested delay, and the message's own TTL when the delay
    is shorter than the level (`None` when it is the level)."""
    level = policy.level_for(delay)
    wanted = max(1, round(delay * 1000))
    return level, wanted if wanted < level else None


_COUNT_CAP = 2**31 - 1
"""A count header's largest value read: one more still fits AMQP's signed integers (a crafted
2**63 - 1 could not be counted on, and its move failed, again and again)."""


def defers_used_up(headers: Mapping[str, Any], max_defers: int | None) -> bool:
    """Whether a `Defer` of a message with these headers dead-letters it (`route_failure`'s
    own test): it was deferred `max_defers` times already."""
    return max_defers is not None and _count(headers.get(DEFERS_HEADER)) >= max_defers


def _count(value: Any) -> int:
    """A count header's value; 0 when absent or not a count, `_COUNT_CAP` at most."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return min(value, _COUNT_CAP)
    return 0


def _failure_headers(
    original: Mapping[str, Any], exc: BaseException, now: datetime
) -> dict[str, Any]:
    headers = {k: v for k, v in original.items() if k not in BROKER_HEADERS}
    stamp = now.isoformat()
    headers.setdefault("x-workq-first-failure", stamp)
    headers["x-workq-last-failure"] = stamp
    headers["x-workq-exception-type"] = qualname(exc)
    headers["x-workq-exception-message"] = text_of(exc)[:_ERROR_TEXT_LIMIT]
    return headers


def format_traceback(exc: BaseException) -> str:
    """The exception's traceback, its last 4,000 characters."""
    return "".join(traceback.format_exception(exc))[-_TRACEBACK_LIMIT:]
