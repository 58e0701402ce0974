"""Bodies on the wire: bytes as they are, str as UTF-8 text, anything else as JSON."""

from __future__ import annotations

import json
from typing import Any

from ._exceptions import SerializationError

__all__ = ("JSON", "TEXT", "decode_body", "encode_body")

JSON = "application/json"
TEXT = "text/plain"
_TEXT_UTF8 = "text/plain; charset=utf-8"


def encode_body(body: Any) -> tuple[bytes, str | None]:
    """`(bytes, content_type)` for a body; raises before anything is sent.

    Raises:
        SerializationError: the body is neither bytes, str, nor JSON-serialisable.
    """
    if isinstance(body, bytes):
        return body, None
    if isinstance(body, str):
        return body.encode(), _TEXT_UTF8
    if isinstance(body, bytearray | memoryview):
        return bytes(body), None
    try:
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode(), JSON
    except (TypeError, ValueError) as exc:
        raise SerializationError(
            f"cannot encode a body of type {type(body).__name__}: {exc}; pass bytes, str, or "
            "JSON-serialisable data (dict, list, str, int, float, bool, None)"
        ) from exc


def decode_body(body: bytes, content_type: str | None) -> Any:
    """The body decoded by its content type: JSON data, text, or the bytes unchanged."""
    if content_type is None:
        return body
    media = content_type.partition(";")[0].strip().lower()
    if media == JSON or media.endswith("+json"):
        return json.loads(body)
    if media.startswith("text/"):
        return body.decode()
    return body
