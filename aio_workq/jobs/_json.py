"""A task's arguments and return value as JSON, where the annotation brings them back.

`encode_body` refuses what JSON has no form for (a message body is untyped). A task's values
are typed by its signature, and the worker (or `result()`) validates them back as their
annotations, so a datetime, a UUID or a Decimal can travel in its JSON form: ISO 8601, str,
seconds, a list. Only tried once `encode_body` refused: the common case is not slowed down.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from pathlib import PurePath
from typing import Any

from .._exceptions import SerializationError
from .._publish.serialization import JSON, check_surrogates, encode_body, encode_default

__all__ = ("encode_typed",)


def encode_typed(value: Any) -> tuple[bytes, str | None]:
    """`encode_body(value)`, with the JSON forms of the types annotations validate back.

    Raises:
        SerializationError: the value has no JSON form (encode_body's error).
    """
    try:
        return encode_body(value)
    except SerializationError as exc:
        try:
            data = json.dumps(value, separators=(",", ":"), allow_nan=False, default=_default)
        except (TypeError, ValueError):
            raise exc from None
        if "\\ud" in data:
            check_surrogates(value, _default)
        return data.encode(), JSON


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID | Decimal | PurePath):
        return str(value)
    if isinstance(value, set | frozenset):
        return list(value)
    return encode_default(value)
