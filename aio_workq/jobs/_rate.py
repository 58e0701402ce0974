"""Rate limits across the cluster: a token bucket per key in the job store.

`@tasks.task(queue=..., rate_limit="50/s", rate_key=lambda customer, **_: customer)`: before a
job runs, its worker reserves the next slot of the bucket in one UPDATE of the store (GCRA: the
row holds the bucket's *theoretical arrival time*; a reservation moves it on by one interval).
The worker sleeps until its slot -- at most `max_wait` seconds, far below the broker's consumer
timeout -- or, when the slot is further away, reserves nothing and defers the message by that
long (`Defer`: it waits on the broker, not unacked in memory). No polling: one store round trip
per delivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._exceptions import ConfigurationError, Defer, Reject
from ._errors import StoreError
from ._groupstore import RateStore

__all__ = ("KEY_MAX", "RateLimit", "acquire")

log = logging.getLogger("aio_workq.jobs")

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour)\s*)?")
"""A count, and a unit (a second when left out, as in Celery: `"10"` is `"10/s"`)."""
_UNIT = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_UNIT |= {"h": 3600.0, "hour": 3600.0}
_STORE_DOWN_DEFER = 5.0
KEY_MAX = 200  # bytes of a rate key kept as it is; a longer one is stored by its digest


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A task's rate limit, shared by every worker process through the store.

    Args:
        per_second: jobs a second, for all processes together (per key).
        burst: jobs that may start at once after an idle time (1: evenly spaced).
        key: called with the job's arguments (by name), returns the key of the bucket
            (e.g. the customer); None: one bucket for the task.
        max_wait: longest a worker holds a delivery waiting for its slot; a later slot
            defers the message on the broker instead.
    """

    per_second: float
    burst: int = 1
    key: Callable[..., Any] | None = None
    max_wait: float = 5.0
    defaults: tuple[tuple[str, Any], ...] = ()
    """The task function's defaults: `key` gets them for the arguments a job left out."""

    @classmethod
    def of(
        cls,
        rate: str | float,
        *,
        burst: int = 1,
        key: Callable[..., Any] | None = None,
        max_wait: float = 5.0,
    ) -> RateLimit:
        """Parse `"50/s"`, `"600/m"`, `"1000/h"`, or a number of jobs a second (`10` or `"10"`).

        Raises:
            ConfigurationError: a rate, burst, key or max_wait that does not fit.
        """
        if isinstance(rate, str):
            match = _RATE.fullmatch(rate)
            if match is None:
                raise ConfigurationError(
                    "rate_limit must look like '50/s', '600/m', '1000/h', '10' (jobs a second) "
                    f"or 10, got {rate!r}"
                )
            per_second = float(match[1]) / _UNIT[match[2] or "s"]
        elif isinstance(rate, int | float) and not isinstance(rate, bool):
            try:
                per_second = float(rate)
            except OverflowError:
                per_second = math.inf
        else:
            raise ConfigurationError(f"rate_limit must be '50/s' or a number, got {rate!r}")
        if not per_second > 0:
            raise ConfigurationError(f"rate_limit must be > 0, got {rate!r}")
        if math.isinf(per_second):
            raise ConfigurationError(
                f"rate_limit must be a finite rate, got {_short(rate)}: for no limit, leave "
                "rate_limit out"
            )
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigurationError(f"rate_burst must be a whole number >= 1, got {burst!r}")
        if key is not None and not callable(key):
            raise ConfigurationError(f"rate_key must be a function of the arguments, got {key!r}")
        if (
            isinstance(max_wait, bool)
            or not isinstance(max_wait, int | float)
            or not 0 < max_wait <= 60
        ):
            raise ConfigurationError(f"rate_max_wait must be in (0, 60] seconds, got {max_wait!r}")
        return cls(per_second, burst, key, float(max_wait))

    @property
    def interval(self) -> float:
        return 1.0 / self.per_second

    @property
    def tau(self) -> float:
        return (self.burst - 1) * self.interval

    def with_defaults(self, signature: inspect.Signature) -> RateLimit:
        """This limit, its `key` given the defaults of the function of `signature`."""
        defaults = tuple(
            (name, p.default)
            for name, p in signature.parameters.items()
            if p.default is not inspect.Parameter.empty
        )
        return dataclasses.replace(self, defaults=defaults)

    def bucket(self, task: str, kwargs: Mapping[str, Any]) -> str:
        """The bucket's key for a job of `task` with these arguments (the ones it left out
        take the function's defaults, as when it runs).

        Raises:
            Reject: `key` raised (the job is dead-lettered, the reason naming `rate_key`).
        """
        if self.key is None:
            return task
        arguments = {**dict(self.defaults), **kwargs} if self.defaults else kwargs
        try:
            key = str(self.key(**arguments))
        except Exception as exc:  # the same arguments would raise it again: no retry
            raise Reject(
                f"rate_key of task {task!r} raised {exc!r} for this job's arguments, so the "
                "job has no rate-limit bucket and did not run: make rate_key handle them "
                "(it is called with the job's arguments by name), then replay the job"
            ) from exc
        try:
            storable = len(key.encode()) <= KEY_MAX and "\x00" not in key
        except UnicodeEncodeError:  # a lone surrogate
            storable = False
        if not storable:
            # Too long for PostgreSQL's primary key (2704 bytes at most), or a NUL or a lone
            # surrogate (text can hold neither): the bucket is named by the key's digest.
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
            return f"{task}:sha256:{digest}"
        return f"{task}:{key}"


def _short(value: object) -> str:
    """`repr(value)`, cut to 40 characters (an int too big for a float is not printed)."""
    if isinstance(value, int) and value.bit_length() > 1024:
        return "an int too large for a float"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


async def acquire(
    store: RateStore, task: str, limit: RateLimit, kwargs: Mapping[str, Any]
) -> float:
    """Wait for this job's slot; returns the seconds waited.

    Raises:
        Defer: the slot is more than `max_wait` away (nothing reserved), or the store can't
            be reached (the limit is not exceeded while it is down).
    """
    key = limit.bucket(task, kwargs)
    now = time.time()
    try:
        wait = await store.take_token(
            key, interval=limit.interval, tau=limit.tau, max_wait=limit.max_wait, now=now
        )
    except StoreError as exc:
        log.warning("rate limit %r: the store can't be reached (%s); deferring the job", key, exc)
        raise Defer(_STORE_DOWN_DEFER) from exc
    if wait > limit.max_wait:
        raise Defer(wait)
    if wait > 0:
        await asyncio.sleep(wait)
        return wait
    return 0.0
