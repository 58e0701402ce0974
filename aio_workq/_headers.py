"""Message headers that more than one layer reads or writes."""

from __future__ import annotations

__all__ = ("ATTEMPT_HEADER", "BROKER_HEADERS", "FAILURE_HEADERS")

ATTEMPT_HEADER = "x-workq-attempt"
"""The attempt a delivery is (1 for the first); the worker raises it for each retry."""

BROKER_HEADERS = frozenset(
    {"x-delivery-count", "x-acquired-count", "x-death", "x-first-death-exchange",
     "x-first-death-queue", "x-first-death-reason"}
)  # fmt: skip
"""Set by the broker; a copy moved to another queue must not carry them."""

FAILURE_HEADERS = frozenset(
    {ATTEMPT_HEADER, "x-workq-attempts", "x-workq-defers", "x-workq-exception-type",
     "x-workq-exception-message", "x-workq-traceback", "x-workq-validation-error",
     "x-workq-first-failure", "x-workq-last-failure", "x-workq-rejected",
     "x-workq-original-queue"}
)  # fmt: skip
"""What a failure wrote on a message (the worker's bookkeeping of its attempts and errors): a
replayed copy starts without them. Every other header, aio-workq's own included (a task's name,
its group), is the message's and stays."""
