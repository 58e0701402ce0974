"""Property tests (hypothesis), offline: the frame demux and URL redaction.

The demux must hand over the same deliveries and pass aiormq the same other frames however the
socket cuts the byte stream; a URL's password, whatever characters it holds, must never appear in
what `redact_url` or `resolve_url` show.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import frame
from pamqp.commands import Basic, Channel
from pamqp.heartbeat import Heartbeat

from aio_workq import ConfigurationError, redact_url, resolve_url
from aio_workq._consume.delivery import Delivery
from aio_workq._wire.demux import FrameDemux
from aio_workq._wire.seams import ALIVE_FRAME
from tests.test_demux import (
    OTHER,
    TAPPED,
    FakeChannel,
    Pieces,
    collect,
    content,
    deliver,
    read_all,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the demux -------------------------------------------------------------------------------

# One item of a stream: ("deliver", channel, body) or ("frame", channel, kind).
_items = st.one_of(
    st.tuples(st.just("deliver"), st.sampled_from([TAPPED, OTHER]), st.binary(max_size=40)),
    st.tuples(st.just("frame"), st.sampled_from([TAPPED, OTHER]), st.sampled_from(["qos", "flow"])),
)


def _marshal(items: list[tuple[str, int, Any]]) -> tuple[bytes, list[tuple[int, bytes]], int]:
    """The stream's bytes, the deliveries the demux must take, and the frames aiormq must get."""
    data = b""
    taken: list[tuple[int, bytes]] = []
    passed = 0
    tags = {TAPPED: 0, OTHER: 0}
    for kind, channel, value in items:
        if kind == "deliver":
            tags[channel] += 1
            data += content(channel, deliver(tags[channel]), value)
            if channel == TAPPED:
                taken.append((tags[channel], value))
            else:  # method + header + one body frame per 7 bytes
                passed += 2 + (len(value) + 6) // 7
        else:
            method = Basic.QosOk() if value == "qos" else Channel.Flow(active=True)
            data += frame.marshal(method, channel)
            passed += 1
    return data, taken, passed


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


async def _demux(pieces: list[bytes]) -> tuple[list[Delivery], list[tuple[int, Any]]]:
    demux = FrameDemux(Pieces.of(*pieces), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    deliveries: list[Delivery] = []
    demux.attach(FakeChannel(TAPPED), on_delivery=collect(deliveries))  # type: ignore[arg-type]
    frames = await read_all(demux)
    return deliveries, [(n, v) for n, v in frames if not isinstance(v, Heartbeat)]


@SETTINGS
@given(items=st.lists(_items, max_size=25), cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_demux_takes_the_same_deliveries_however_the_stream_is_cut(
    items: list[tuple[str, int, Any]], cuts: list[int]
) -> None:
    data, taken, passed = _marshal(items)
    whole_deliveries, whole_frames = asyncio.run(_demux([data] if data else []))
    deliveries, frames = asyncio.run(_demux(_cut(data, cuts)))
    assert [(d.delivery_tag, d.body) for d in deliveries] == taken
    assert all(d.channel.number == TAPPED for d in deliveries)
    assert len(frames) == passed
    assert all(n == OTHER or isinstance(v, (Basic.QosOk, Channel.Flow)) for n, v in frames)
    # The same frames, in the same order, as when the stream arrives in one piece.
    assert [(n, type(v).__name__, v.__dict__) for n, v in frames] == [
        (n, type(v).__name__, v.__dict__) for n, v in whole_frames
    ]
    assert [(d.delivery_tag, d.body) for d in whole_deliveries] == taken


def _groups(items: list[tuple[str, int, Any]]) -> list[tuple[list[bytes], int, bytes | None]]:
    """The stream as groups of frames: (frames, channel, body of a delivery or None)."""
    groups: list[tuple[list[bytes], int, bytes | None]] = []
    tags = {TAPPED: 0, OTHER: 0}
    for kind, channel, value in items:
        if kind == "deliver":
            tags[channel] += 1
            data = content(channel, deliver(tags[channel]), value)
            frames = []
            while data:
                used = frame.unmarshal(data)[0]
                frames.append(data[:used])
                data = data[used:]
            groups.append((frames, channel, value))
        else:
            method = Basic.QosOk() if value == "qos" else Channel.Flow(active=True)
            groups.append(([frame.marshal(method, channel)], channel, None))
    return groups


class AttachingReader:
    """Hands out `pieces`; attaches the tap just before handing out piece `at`."""

    def __init__(self, pieces: list[bytes], at: int, attach: Any) -> None:
        self._pieces = pieces
        self._at = at
        self._attach = attach
        self._reads = 0

    async def read(self, n: int) -> bytes:
        if self._reads == self._at:
            self._attach()
        self._reads += 1
        return self._pieces.pop(0) if self._pieces else b""

    def at_eof(self) -> bool:
        return not self._pieces


@SETTINGS
@given(
    items=st.lists(_items, min_size=1, max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
    at=st.integers(min_value=0, max_value=31),
)
def test_a_channel_attached_between_any_two_reads_keeps_frame_boundaries(
    items: list[tuple[str, int, Any]], cuts: list[int], at: int
) -> None:
    # Finding 7 (#20): before any channel is attached the demux passes whole reads to aiormq;
    # a channel attached after a read that ended mid-frame must not make the demux parse the
    # next read from the middle of that frame.
    groups = _groups(items)
    data = b"".join(b"".join(frames) for frames, _, _ in groups)
    pieces = _cut(data, cuts)
    at = min(at, len(pieces))
    attached_at = sum(len(piece) for piece in pieces[:at])  # bytes read before the attach

    async def run() -> tuple[list[Delivery], list[tuple[int, Any]]]:
        deliveries: list[Delivery] = []
        demux: FrameDemux

        def attach() -> None:
            demux.attach(FakeChannel(TAPPED), on_delivery=collect(deliveries))  # type: ignore[arg-type]

        reader = AttachingReader(pieces, at, attach)
        demux = FrameDemux(reader, alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
        frames = await read_all(demux)
        return deliveries, [(n, v) for n, v in frames if not isinstance(v, Heartbeat)]

    deliveries, frames = asyncio.run(run())
    taken_bodies = {d.delivery_tag: d.body for d in deliveries}
    expected_taken: list[tuple[int, bytes]] = []
    expected_frames: list[bytes] = []
    start, tag = 0, 0
    for group, channel, body in groups:
        method_end = start + len(group[0])
        tapped = channel == TAPPED and body is not None
        tag += tapped
        # A delivery whose method frame was wholly read before the attach goes to aiormq; one
        # read wholly after it is taken; one the attach cut through may go either way, whole.
        if tapped and (start >= attached_at or (method_end > attached_at and tag in taken_bodies)):
            expected_taken.append((tag, body))  # type: ignore[arg-type]
        else:
            expected_frames += group
        start += sum(len(f) for f in group)
    assert [(d.delivery_tag, d.body) for d in deliveries] == expected_taken
    assert [(n, type(v).__name__, v.__dict__) for n, v in frames] == [
        (n, type(v).__name__, v.__dict__)
        for n, v in (frame.unmarshal(f)[1:] for f in expected_frames)
    ]


# -- URLs and passwords ----------------------------------------------------------------------

# Distinctive ends: a password shown whole or in part shows one of them.
HEAD, TAIL = "Qz7", "k9W"
_SPECIAL = "/#?@:%[]!$&'()*+,;= \\\"<>^`{|}~"
_middle = st.text(
    alphabet=st.sampled_from(list(_SPECIAL) + list("abcXYZ019-._é")), min_size=0, max_size=16
)


def _shows_password(text: str, password: str) -> bool:
    return HEAD in text or TAIL in text or quote(password, safe="") in text


@SETTINGS
@given(middle=_middle)
def test_a_percent_encoded_password_is_never_shown(middle: str) -> None:
    password = HEAD + middle + TAIL
    url = f"amqp://user:{quote(password, safe='')}@broker.example:5672/vhost"
    assert resolve_url(url) == url
    shown = redact_url(url)
    assert not _shows_password(shown, password), shown
    assert shown == "amqp://user:***@broker.example:5672/vhost"


@SETTINGS
@given(middle=_middle.filter(lambda m: not set(m) & set("/#?[]")))  # brackets: see below
def test_an_unencoded_password_is_never_shown_in_the_url_or_its_error(middle: str) -> None:
    password = HEAD + middle + TAIL
    url = f"amqp://user:{password}@broker.example:5672/vhost"
    assert not _shows_password(redact_url(url), password), redact_url(url)
    try:
        resolve_url(url)
    except ConfigurationError as exc:
        assert not _shows_password(str(exc), password), str(exc)


@SETTINGS
@given(middle=_middle.filter(lambda m: bool(set(m) & set("/#?"))))
def test_an_unencoded_password_with_a_delimiter_is_never_shown(middle: str) -> None:
    password = HEAD + middle + TAIL
    url = f"amqp://user:{password}@broker.example:5672/vhost"
    assert not _shows_password(redact_url(url), password), redact_url(url)
    try:
        resolve_url(url)
    except ConfigurationError as exc:
        assert not _shows_password(str(exc), password), str(exc)


def test_an_unencoded_password_with_brackets_is_never_shown() -> None:
    password = HEAD + "][" + TAIL
    url = f"amqp://user:{password}@broker.example:5672/vhost"
    assert not _shows_password(redact_url(url), password), redact_url(url)
    with pytest.raises(ConfigurationError) as info:
        resolve_url(url)
    assert not _shows_password(str(info.value), password), str(info.value)
