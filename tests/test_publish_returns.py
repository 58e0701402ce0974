"""A returned message is always attributed to its publish (issue #20, finding 11 (b)).

The fast path finds the publish a `Basic.Return` is about by the message id in the returned
content header. The broker returns the content header it was sent, which aio-workq encoded
itself; if decoding it could fail, the return would be dropped (logged) and the ack that follows
it would count the message as confirmed: a lie. This checks that every header table
`encode_properties` accepts decodes back, message id included, on the path the demux takes.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from aio_workq._wire.frames import Properties, decode_header, encode_properties

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False, width=32),  # pamqp sends floats as 32-bit
    st.text(max_size=300),
    st.integers(0, 2**32 - 1).map(lambda s: datetime.fromtimestamp(s, tz=UTC)),
    st.decimals(
        allow_nan=False, allow_infinity=False, places=2, min_value=-(10**6), max_value=10**6
    ),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(st.dictionaries(st.text(max_size=12), _values, max_size=5), st.text(max_size=80))
def test_every_header_table_we_send_decodes_back_with_its_message_id(
    headers: dict[str, Any], message_id: str
) -> None:
    if len(message_id.encode()) > 255:
        message_id = message_id[:60]
    props = Properties(message_id=message_id, headers=headers, content_type="text/plain")
    flags, encoded = encode_properties(props)
    payload = struct.pack(">HHQH", 60, 0, 5, flags) + encoded  # the returned content header
    decoded = decode_header(payload).properties
    assert decoded.message_id == message_id
    assert decoded.headers == (_as_decoded(headers) if headers else None)


def _as_decoded(value: Any) -> Any:
    """What the decoder gives back for what was encoded."""
    if isinstance(value, dict):
        return {k: _as_decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_decoded(v) for v in value]
    return value
