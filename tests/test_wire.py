"""The wire encoders against pamqp byte for byte, and validation before anything is encoded."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from aio_workq import SerializationError
from aio_workq._wire.frames import (
    Properties,
    ack_frame,
    check_destination,
    decode_header,
    encode_properties,
    nack_frame,
    publish_frames,
    reject_frame,
)


def test_publish_frames_match_pamqp_byte_for_byte() -> None:
    props = Properties(
        message_id="abc",
        content_type="application/json",
        headers={"x-workq-attempt": 2, "s": "v"},
        priority=3,
        correlation_id="c",
        reply_to="r",
        expiration="100",
        timestamp=123,
        type="t",
    )
    body = b"hello" * 10
    ours = publish_frames(5, "ex", "rk", True, encode_properties(props), body, 131072)
    reference = Basic.Properties(
        message_id="abc",
        content_type="application/json",
        headers={"x-workq-attempt": 2, "s": "v"},
        delivery_mode=2,
        priority=3,
        correlation_id="c",
        reply_to="r",
        expiration="100",
        timestamp=datetime.fromtimestamp(123, UTC),
        message_type="t",
    )
    expected = (
        frame.marshal(Basic.Publish(exchange="ex", routing_key="rk", mandatory=True), 5)
        + frame.marshal(ContentHeader(0, len(body), reference), 5)
        + frame.marshal(ContentBody(body), 5)
    )
    assert ours == expected


def test_large_bodies_are_split_at_frame_max() -> None:
    body = bytes(range(256)) * 100  # 25,600 bytes
    ours = publish_frames(
        1, "", "q", False, encode_properties(Properties(message_id="m")), body, 4096
    )
    chunks = [body[i : i + 4088] for i in range(0, len(body), 4088)]
    tail = b"".join(frame.marshal(ContentBody(chunk), 1) for chunk in chunks)
    assert ours.endswith(tail)
    assert len(chunks) == 7


def test_settle_frames_match_pamqp() -> None:
    assert ack_frame(3, 99, True) == frame.marshal(Basic.Ack(99, True), 3)
    assert ack_frame(3, 7, False) == frame.marshal(Basic.Ack(7, False), 3)
    assert nack_frame(3, 99, True) == frame.marshal(Basic.Nack(99, False, True), 3)
    assert nack_frame(3, 99, False) == frame.marshal(Basic.Nack(99, False, False), 3)
    assert reject_frame(3, 99, False) == frame.marshal(Basic.Reject(99, False), 3)


@pytest.mark.parametrize(
    ("props", "field"),
    [
        (Properties(message_id="m", headers={"x": object()}), "header 'x'"),
        (Properties(message_id="m", headers={"ok": 1, "bad": {1, 2}}), "header 'bad'"),
        (Properties(message_id="m" * 256), "message_id"),
        (Properties(message_id="m", priority="high"), "priority"),  # type: ignore[arg-type]
        (Properties(message_id="m", priority=256), "priority"),
        (Properties(message_id="m", expiration=60), "expiration"),  # type: ignore[arg-type]
        (Properties(message_id="m", expiration="1.5"), "expiration"),
        (Properties(message_id="m", correlation_id="c" * 300), "correlation_id"),
        (Properties(message_id="m", content_type=b"x"), "content_type"),  # type: ignore[arg-type]
        (Properties(message_id="m", timestamp=-1), "timestamp"),
        (Properties(message_id="m", type="t" * 256), "message_type"),
        (Properties(message_id="m", delivery_mode=3), "delivery_mode"),
    ],
)
def test_every_bad_property_is_a_serialization_error_naming_it(
    props: Properties, field: str
) -> None:
    with pytest.raises(SerializationError, match=field):
        encode_properties(props)


def test_header_values_of_every_supported_type_encode() -> None:
    headers: dict[str, Any] = {
        "s": "v", "i": 1, "f": 1.5, "t": True, "n": None, "d": Decimal("1.25"),
        "ts": datetime(2026, 1, 1, tzinfo=UTC), "l": [1, "a"], "m": {"k": [1]},
    }  # fmt: skip
    flags, encoded = encode_properties(Properties(message_id="m", headers=headers))
    assert flags and encoded


@pytest.mark.parametrize(
    ("exchange", "routing_key"),
    [("ex change", "rk"), ("e", "r" * 256), ("x" * 256, "rk"), ("e", 5)],
)
def test_bad_destinations_are_serialization_errors(exchange: str, routing_key: Any) -> None:
    with pytest.raises(SerializationError):
        check_destination(exchange, routing_key, True)


_shortstr = st.text(max_size=40)
_properties = st.fixed_dictionaries(
    {},
    optional={
        "content_type": _shortstr,
        "content_encoding": _shortstr,
        "headers": st.dictionaries(
            st.text(max_size=10),
            st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), _shortstr,
                      st.lists(st.integers(0, 9), max_size=3)),
            max_size=4,
        ),
        "delivery_mode": st.sampled_from([1, 2]),
        "priority": st.integers(0, 255),
        "correlation_id": _shortstr,
        "reply_to": _shortstr,
        "expiration": st.integers(0, 10**9).map(str),
        "message_id": _shortstr,
        "timestamp": st.integers(0, 2**32 - 1).map(lambda s: datetime.fromtimestamp(s, tz=UTC)),
        "message_type": _shortstr,
        "user_id": _shortstr,
        "app_id": _shortstr,
    },
)  # fmt: skip


def _header_payload(header: ContentHeader) -> bytes:
    return header.marshal()  # the frame's payload, as the demux hands it over


@given(_properties, st.integers(0, 2**40))
def test_decode_header_reads_what_pamqp_reads(values: dict[str, Any], body_size: int) -> None:
    payload = _header_payload(ContentHeader(0, body_size, Basic.Properties(**values)))
    theirs = ContentHeader()
    theirs.unmarshal(payload)
    ours = decode_header(payload)
    assert (ours.body_size, ours.properties) == (theirs.body_size, theirs.properties)
    assert ours.properties.headers == values.get("headers")


def test_decode_header_leaves_the_unusual_to_pamqp() -> None:
    """A delivery mode pamqp's constructor refuses, a cluster id, a truncated table: decoded
    (or refused) exactly as pamqp's decoder does."""
    odd = bytearray(_header_payload(ContentHeader(0, 5, Basic.Properties(delivery_mode=2))))
    odd[-1] = 7  # delivery_mode 7, which only a foreign publisher would send
    assert decode_header(bytes(odd)).properties.delivery_mode == 7
    cluster = Basic.Properties()
    cluster.cluster_id = "c"
    payload = _header_payload(ContentHeader(0, 5, cluster))
    assert decode_header(payload).properties.cluster_id == "c"
    whole = _header_payload(ContentHeader(0, 5, Basic.Properties(headers={"k": "v" * 20})))
    with pytest.raises(ValueError):
        ContentHeader().unmarshal(whole[:-10])
    with pytest.raises(ValueError):
        decode_header(whole[:-10])


@pytest.mark.parametrize("size", [0, 1, 64, 4087, 4088, 4089, 9000])
def test_publish_frames_of_every_size_match_pamqp(size: int) -> None:
    """The one-body-frame message (joined at once) and the others, byte for byte."""
    body = bytes(range(256)) * (size // 256 + 1)
    body = body[:size]
    ours = publish_frames(
        7, "ex", "rk", False, encode_properties(Properties(message_id="m")), body, 4096
    )
    reference = Basic.Properties(message_id="m", delivery_mode=2)
    expected = frame.marshal(Basic.Publish(exchange="ex", routing_key="rk"), 7)
    expected += frame.marshal(ContentHeader(0, size, reference), 7)
    expected += b"".join(
        frame.marshal(ContentBody(body[i : i + 4088]), 7) for i in range(0, size, 4088)
    )
    assert ours == expected
