"""Where aio-workq meets aiormq: the one public extension point it uses, and every reliance left.

aio-workq writes no aiormq or aio-pika private attribute. Its fast path plugs into aiormq through
the public `aiormq.connection.TransportFactory` (a constructor argument of `aiormq.Connection`):
`WireFactory` opens aiormq's own TCP/TLS stream, and hands aiormq a `FrameDemux` as the reader,
keeping the writer for aio-workq's own frames. What aio-workq owns from then on:

- the delivery tags, pending confirms and returns of its publishing channels (`_tracker`);
- the acks of its consuming channels (`_acker`);
- one ordered `FrameWriter` per connection for those frames (`_writer`).

The reliances that remain, each on aiormq behaviour that is not a documented promise; each is
covered by tests that run on every aiormq version the project supports (`make canary` runs them
against the newest releases):

1. aiormq's `FrameReceiver` reads its stream with `readexactly()` only (plus `read()` and
   `at_eof()` on some paths): `FrameDemux` implements exactly those (`tests/test_demux.py`).
2. aiormq writes each of its frames with one `StreamWriter.write()` call of whole frames, so
   aio-workq's writes on the same stream interleave with aiormq's at frame boundaries
   (AMQP allows frames of different channels to interleave). A large body's frames may leave
   over several loop iterations (the `FrameWriter` stops between two of them while the
   transport is backed up), so aiormq's frames can come between them; on that channel aiormq
   writes nothing meanwhile but the `Channel.CloseOk` of a broker's `Channel.Close` (the broker
   drops the channel's frames until then, and the writer sends none of the rest once the demux
   has seen the Close) or a `Channel.Close` aio-workq asks for, after `FrameWriter.complete()`
   has handed over the rest (`tests/test_large_bodies.py`).
3. aiormq takes the time of the last frame it read as the connection's sign of life. Frames the
   demux takes never reach it, so the demux passes it a heartbeat frame (`ALIVE_FRAME`) at most
   once a second while it takes frames; aiormq ignores heartbeats other than noting the time
   (`tests/test_worker.py::test_a_steady_stream_of_deliveries_keeps_the_connection_alive`).
4. A channel opened with `publisher_confirms=True` on which aio-workq publishes is not published
   on by aiormq, so the broker's delivery tags on it are the ones aio-workq counts; the confirms
   and returns of that channel are taken by the demux and never reach aiormq.
5. `aiormq.Connection.connection_tune.frame_max` is the negotiated frame size.
6. The writer aiormq's `TransportFactory` returns is an `asyncio.StreamWriter` whose
   `transport.get_write_buffer_size()` counts the bytes not yet handed to the kernel and whose
   `drain()` waits while the transport has paused writing (asyncio's flow control; aiormq drains
   the same stream for its own frames): the `FrameWriter` fills that buffer only up to its
   high-water mark and waits in `drain()` for the rest
   (`tests/test_wire_bounds.py::test_the_socket_buffer_stays_at_the_high_water_mark_while_the_broker_reads_nothing`).
7. The plain lane (`AIO_WORKQ_FAST_PATH=0`, or an aio-pika connection) hands
   `aiormq.Channel.basic_publish()` a `pamqp.commands.Basic.Properties` subclass whose
   `marshal()` returns aio-workq's own encoding of the properties: aiormq puts the properties
   object as given into pamqp's `ContentHeader`, whose `marshal()` calls it. So both paths send
   the same bytes, floats in the headers as 64-bit doubles where pamqp's encoder would send
   32-bit floats (`tests/test_publish_outcomes.py::test_a_float_header_arrives_exactly_as_sent`,
   plain).
8. aiormq raises a refused handshake (a missing vhost: `NOT_ALLOWED - vhost nope not found`)
   as an `InvalidFrameError` whose text shows only the `Connection.Close` frame's repr; the
   frame itself is a local of aiormq's handshake frame in the error's traceback.
   `refusing_close_text()` reads it from there (read only), for the broker's own reason
   (`tests/test_link_errors.py::test_a_missing_vhost_shows_the_brokers_reply_text`); without
   it, the error names the URL's vhost
   (`tests/test_link_errors.py::test_without_the_frame_the_refusal_names_the_vhost_of_the_url`).
9. aiormq tells of the broker's `Connection.Blocked` (a memory or disk alarm) and
   `Connection.Unblocked` only in WARNING records of the `aiormq.connection` logger, "Connection
   %r was blocked by: %r" and "Connection %r was unblocked", whose first argument is the
   connection; it offers no public state or callback for them (its own `Connection` keeps a
   private event). `note_block()`, called by the log filter `_link/quiet.py` installs, keeps the
   reason per connection for `blocked_reason()`
   (`tests/test_link_outage.py::test_a_timeout_during_a_memory_alarm_says_the_broker_blocked_publishers`,
   `tests/test_link_quiet.py`). With that logger raised above WARNING, a block is not known.
10. When the broker closes a channel (`Channel.Close`, e.g. a 404 on a publish to a deleted
    exchange), aiormq queues its `Channel.CloseOk` and sets the channel's `_close_exception` in
    one step, but `is_closed` turns true only a few loop iterations later, and
    `basic_publish()` checks only `is_closed`: a publish let in meanwhile is written after the
    Close-Ok, and the broker closes the whole connection (504 CHANNEL_ERROR - expected
    'channel.open'). aiormq's `basic_publish()` takes the channel's `lock` (a property of
    `aiormq.Channel`) in its first step, without yielding while it is free, puts its frames
    on the connection's write queue, and holds it until they are written. So the plain lane
    lets one publish at a time into aiormq, once the previous one's frames are written
    (`await_written()`), and checks `channel_closing()` (which reads `_close_exception`, never
    writes it) in the same step as that first step: no publish follows a Close-Ok
    (`tests/test_topology_faults.py::test_a_deleted_exchange_fails_only_its_own_publishes`,
    plain path, which counts connection losses).
11. aiormq answers the broker's `Channel.Close` with a `Channel.CloseOk` put on the
    connection's write queue with `put_nowait()`, dropping it when the queue is full, and
    frees the channel's number at once: with many channels closed by the broker at once (20
    checks of a missing exchange), a `Channel.CloseOk` was dropped, the broker kept the number
    waiting for it, and the next channel aiormq opened on that number closed the whole
    connection (504 "second 'channel.open' seen"). aiormq sizes that queue from its
    `Connection.FRAME_BUFFER_SIZE` class attribute when a connection is made, so aio-workq's
    connections are an `aiormq.Connection` subclass, `BrokerConnection`, whose queue has no
    bound: no frame of aiormq's is dropped. Every writer into it is bounded elsewhere: a publish
    holds its channel's lock until its frames are written, an RPC waits for its reply, acks and
    rejects are at most the deliveries the prefetch lets in, heartbeats come once an interval
    (`tests/test_channel_closes.py`, both paths). A connection made by aio-pika (`connection=`
    an aio-pika connection) keeps aiormq's bounded queue.
12. When the broker closes a connection, aiormq logs an ERROR "Unexpected connection close
    from remote ..." and, from the reader task's done callback, a WARNING "Cancelling cause
    reader exited abnormally" with the close's exception (a `ConnectionClosed` whose args are
    the reply code and text, or for the codes in aiormq's `connection.EXCEPTION_MAPPING`, 541
    INTERNAL_ERROR among them, a subclass of it with the text alone: `_link/errors.reason`
    puts the code back from that mapping); the reader task and that callback run in a copy of the
    context `connect()` was called in. The log filter of `_link/quiet.py` drops both for
    aio-workq's own connections, which log one WARNING of their own with the reason
    (`tests/test_link_quiet.py::test_a_connection_the_broker_closes_is_logged_once_with_the_brokers_reason`
    and `::test_a_close_aiormq_maps_to_its_own_class_is_logged_once_with_its_code`).
    Should aiormq change either, its lines are printed again beside aio-workq's: nothing is
    lost.

The optional tracing hook's reliances on the OpenTelemetry SDK and API (how the SDK samples a
root and draws its ids; the API's context variable, set and reset as `attach`/`detach` do,
never replaced) are listed with their tests where they are used: `aio_workq/tracing.py`'s
docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any

import aiormq
from aiormq import spec
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

from .demux import FrameDemux
from .writer import FrameWriter

__all__ = (
    "ALIVE_FRAME",
    "BrokerConnection",
    "Wire",
    "WireFactory",
    "await_written",
    "blocked_reason",
    "channel_closing",
    "note_block",
    "refusing_close_text",
)

ALIVE_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"  # a heartbeat frame, for reliance 3


class Wire:
    """aio-workq's side of one aiormq connection: the frame demux and the ordered writer."""

    __slots__ = ("demux", "writer")

    def __init__(self, demux: FrameDemux, writer: FrameWriter) -> None:
        self.demux = demux
        self.writer = writer


class BrokerConnection(aiormq.Connection):
    """aiormq's connection, with a write queue of no bound: aiormq drops a `Channel.CloseOk`
    it cannot queue at once (reliance 11)."""

    FRAME_BUFFER_SIZE = 0  # asyncio.Queue(maxsize=0): no bound


class WireFactory(TransportFactory):
    """aiormq's TCP/TLS transport, with the reader wrapped in a `FrameDemux`; one per attempt."""

    def __init__(self) -> None:
        self.wire: Wire | None = None

    async def create(self, url: URL, **kwargs: Any) -> tuple[Any, asyncio.StreamWriter]:
        base = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await base.create(url, **kwargs)
        demux = FrameDemux(reader, alive_frame=ALIVE_FRAME)
        self.wire = Wire(demux, FrameWriter(writer))
        return demux, writer


def refusing_close_text(exc: BaseException) -> str | None:
    """The reply text of the broker's `Connection.Close` that refused aiormq's handshake, found
    among the locals of the frames in the tracebacks of `exc` and its causes (reliance 8)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        tb = cause.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                if isinstance(value, spec.Connection.Close) and value.reply_text:
                    return str(value.reply_text)
            tb = tb.tb_next
        cause = cause.__cause__ or cause.__context__
    return None


_BLOCKED = "Connection %r was blocked by: %r"
_UNBLOCKED = "Connection %r was unblocked"
_blocked: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def note_block(record: logging.LogRecord) -> None:
    """Note a block or unblock of a connection told by an `aiormq.connection` record
    (reliance 9); other records are ignored."""
    args = record.args
    if record.msg not in (_BLOCKED, _UNBLOCKED) or not isinstance(args, tuple) or not args:
        return
    try:
        if record.msg == _BLOCKED and len(args) == 2:
            _blocked[args[0]] = str(args[1])
        else:
            _blocked.pop(args[0], None)
    except TypeError:  # not weak-referenceable: the block is not known
        pass


def blocked_reason(connection: object) -> str | None:
    """The broker's reason (e.g. "low on memory") while it blocks `connection`, else None."""
    return _blocked.get(connection)


def channel_closing(channel: aiormq.abc.AbstractChannel) -> bool:
    """True once `channel` is closed, or the broker's `Channel.Close` of it has been answered
    (reliance 10): nothing more may be written on it."""
    return channel.is_closed or getattr(channel, "_close_exception", None) is not None


async def await_written(channel: aiormq.abc.AbstractChannel) -> None:
    """Return once no `basic_publish()` holds `channel`'s lock: the frames of the last one are
    written (reliance 10). Returns at once on a closed channel (aiormq refuses its lock)."""
    lock = getattr(channel, "lock", None)
    if lock is None:  # pragma: no cover - an aiormq without it: the canary tells
        return
    with contextlib.suppress(Exception):
        async with lock:
            pass
