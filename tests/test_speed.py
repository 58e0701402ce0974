"""The publish hot path's shortcuts (#22 item 2), offline: each gives the same bytes and errors
as the general code, and a large body is never copied into its frames."""

from __future__ import annotations

import pytest

from aio_workq._exceptions import SerializationError
from aio_workq._publish.message import build_message
from aio_workq._wire.frames import Properties, encode_properties


def _general(props: Properties) -> tuple[int, bytes]:
    """`encode_properties` through its general branch (a falsy-but-present header dict
    is the same message, and keeps the shortcut out)."""

    class Headers(dict[str, object]):
        def __bool__(self) -> bool:
            return False

    slow = Properties(
        message_id=props.message_id,
        content_type=props.content_type,
        delivery_mode=props.delivery_mode,
    )
    slow.headers = Headers()
    return encode_properties(slow)


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain; charset=utf-8"])
@pytest.mark.parametrize("mode", [1, 2])
def test_usual_properties_encode_as_the_general_code_does(
    content_type: str | None, mode: int
) -> None:
    props = Properties(message_id="a1b2", content_type=content_type, delivery_mode=mode)
    assert encode_properties(props) == _general(props)
    assert encode_properties(props) == _general(props)  # the cached prefix too


def test_usual_properties_refuse_what_the_general_code_refuses() -> None:
    with pytest.raises(SerializationError, match="message_id is 256 bytes long"):
        encode_properties(Properties(message_id="x" * 256))
    with pytest.raises(SerializationError, match="content_type must be a str"):
        encode_properties(Properties(message_id="m", content_type=["json"]))  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match="delivery_mode"):
        encode_properties(Properties(message_id="m", delivery_mode=True))
    with pytest.raises(SerializationError, match="message_id must be a str"):
        encode_properties(Properties(message_id=5))  # type: ignore[arg-type]


def test_a_message_without_options_is_built_as_with_the_defaults() -> None:
    data, props, mandatory, timeout = build_message({"a": 1}, {"timeout": 2.5})
    assert (data, props.content_type, props.delivery_mode, mandatory, timeout) == (
        b'{"a":1}',
        "application/json",
        2,
        True,
        2.5,
    )
    with pytest.raises(Exception, match="timeout must be > 0"):
        build_message(b"x", {"timeout": 0})
