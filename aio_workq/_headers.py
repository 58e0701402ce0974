"""Message headers that more than one layer reads or writes."""

from __future__ import annotations

__all__ = ("ATTEMPT_HEADER", "BROKER_HEADERS")

ATTEMPT_HEADER = "x-workq-attempt"
"""The attempt a delivery is (1 for the first); the worker raises it for each retry."""

BROKER_HEADERS = frozenset(
    {"x-delivery-count", "x-acquired-count", "x-death", "x-first-death-exchange",
     "x-first-death-queue", "x-first-death-reason"}
)  # fmt: skip
"""Set by the broker; a copy moved to another queue must not carry them."""
