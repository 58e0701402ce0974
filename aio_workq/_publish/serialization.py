"""Bodies on the wire: bytes as they are, str as UTF-8 text, anything else as JSON (pydantic
models and dataclasses as JSON objects)."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable
from typing import Any

from .._exceptions import SerializationError

__all__ = ("JSON", "TEXT", "check_surrogates", "decode_body", "encode_body", "encode_default")

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
        try:
            return body.encode(), _TEXT_UTF8
        except UnicodeEncodeError as exc:  # a lone surrogate (`surrogateescape`, say)
            raise SerializationError(
                f"cannot encode a str body as UTF-8: {exc}; decode its source with the right "
                "encoding, or pass bytes"
            ) from exc
    if isinstance(body, bytearray | memoryview):
        return bytes(body), None
    try:
        data = json.dumps(body, separators=(",", ":"), allow_nan=False, default=encode_default)
    except (TypeError, ValueError) as exc:
        raise SerializationError(
            f"cannot encode a body of type {type(body).__name__}: {exc}; pass bytes, str, "
            "JSON-serialisable data (dict, list, str, int, float, bool, None), a pydantic model "
            "or a dataclass"
        ) from exc
    if "\\ud" in data:  # a character past U+FFFF, or a lone surrogate: rare
        check_surrogates(body, encode_default)
    return data.encode(), JSON


def check_surrogates(value: Any, default: Callable[[Any], Any]) -> None:
    """Refuse JSON data with a lone surrogate in a str: `json.dumps` writes it as an escape
    (`\\udce9`) that Python reads back, but no UTF-8 text holds it, and pydantic's JSON (a
    typed payload, a task's arguments and result) refuses it, after the message was sent.

    Raises:
        SerializationError: a str in `value` has a lone surrogate.
    """
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False, default=default).encode()
    except UnicodeEncodeError as exc:
        raise SerializationError(
            f"cannot encode a body of type {type(value).__name__}: a str in it is not valid "
            f"text ({exc}); decode its source with the right encoding, or send bytes"
        ) from exc


def encode_default(value: Any) -> Any:
    """`json.dumps(default=...)`: pydantic models and dataclass instances as JSON objects, enum
    members as their values.

    Raises:
        TypeError: anything else (json's own way of saying it can't).
    """
    dump = getattr(value, "model_dump", None)
    if dump is not None and callable(dump) and not isinstance(value, type):
        return dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


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
