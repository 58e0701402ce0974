"""How often and how late a failed job runs again."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

from .._exceptions import ConfigurationError

__all__ = ("RetryPolicy",)

# Delay levels for `Retry(delay=...)`: a requested delay waits in the smallest level that is at
# least as long, so a handful of delay queues serve any delay and none holds a shorter one back.
_LADDER_MS = (
    1_000,
    2_000,
    5_000,
    10_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
    1_800_000,
    3_600_000,
    21_600_000,
    86_400_000,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Retries with capped exponential backoff, held by the broker in delay queues.

    Attempt `n` (1-based) that fails waits `min(max_delay, initial_delay * multiplier**(n-1))`
    seconds before attempt `n + 1`, shortened by up to `jitter` (a fraction) at random so a burst
    of failures doesn't come back in lock step. After `max_attempts` the message is dead-lettered.

    `throws` lists exception classes that are never retried: a handler raising one of them
    (or a subclass) dead-letters the message at once, like `Reject` (Dramatiq's `throws`).

    Raises:
        ConfigurationError: a setting is out of range (a `ValueError`).
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1
    throws: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(
                f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts!r}"
            )
        if not 0.001 <= self.initial_delay <= 86_400:
            raise ConfigurationError(
                f"RetryPolicy.initial_delay must be 0.001-86400 seconds, got {self.initial_delay!r}"
            )
        if self.multiplier < 1:
            raise ConfigurationError(
                f"RetryPolicy.multiplier must be >= 1, got {self.multiplier!r}"
            )
        if not self.initial_delay <= self.max_delay <= 86_400:
            raise ConfigurationError(
                "RetryPolicy.max_delay must be between initial_delay and 86400 seconds, got "
                f"{self.max_delay!r}"
            )
        if not 0 <= self.jitter < 1:
            raise ConfigurationError(f"RetryPolicy.jitter must be in [0, 1), got {self.jitter!r}")
        if isinstance(self.throws, type) or not all(
            isinstance(cls, type) and issubclass(cls, BaseException) for cls in self.throws
        ):
            raise ConfigurationError(
                "RetryPolicy.throws must be a tuple of exception classes, e.g. (KeyError,), "
                f"got {self.throws!r}"
            )

    def gives_up_on(self, exc: BaseException) -> bool:
        """True when `exc` is one of `throws`: dead-letter without retrying."""
        return isinstance(exc, self.throws)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based), before jitter."""
        return float(min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1)))

    def delay_ms(self, attempt: int) -> int:
        """`delay(attempt)` in whole milliseconds: the TTL of its delay queue."""
        return max(1, round(self.delay(attempt) * 1000))

    def levels_ms(self) -> tuple[int, ...]:
        """The distinct delay-queue TTLs this policy uses."""
        return tuple(sorted({self.delay_ms(n) for n in range(1, self.max_attempts)}))

    def jittered_ms(self, level_ms: int) -> int:
        """A per-message TTL within a level: at most the level, at least `(1 - jitter)` of it."""
        if not self.jitter:
            return level_ms
        return max(1, round(level_ms * (1 - self.jitter * random.random())))

    def queues_ms(self) -> tuple[int, ...]:
        """Every delay-queue TTL a worker with this policy may declare: `levels_ms()`, and
        the ladder `Retry(delay=...)` takes its level from (`level_for`)."""
        return tuple(sorted({*self.levels_ms(), *_LADDER_MS}))

    def level_for(self, delay: float) -> int:
        """The delay level (ms) for `Retry(delay=...)`: the smallest one long enough (the
        copy then has `delay` as its own TTL when it is shorter)."""
        wanted = max(1, round(delay * 1000))
        levels = self.queues_ms()
        index = bisect.bisect_left(levels, wanted)
        return levels[min(index, len(levels) - 1)]
