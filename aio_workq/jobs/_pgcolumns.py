"""A job store batch's columns in PostgreSQL's binary array format, built in one go per column
and sent through psycopg's public adapter API (`register_arrays`): psycopg's own dumpers build
an array element by element, in Python, several times slower for the 13 columns of a batch.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from psycopg.adapt import AdaptersMap, Dumper
from psycopg.pq import Format

from ._status import RANK, JobState, Write

__all__ = ("Columns", "register_arrays")

_NULL = b"\xff\xff\xff\xff"  # an element's length -1: NULL
_LENGTH = struct.Struct(">i").pack
_INT4 = struct.Struct(">ii").pack  # (4, value): an int4 element with its length
_FLOAT8 = struct.Struct(">id").pack  # (8, value): a float8 element with its length
_RANK = struct.Struct(">h").pack  # an int2
_ARRAY = struct.Struct(">iiiii").pack  # one dimension: ndim, flags, element type, length, lbound
_EMPTY = struct.Struct(">iii").pack  # no dimension: ndim 0, flags, element type
_TEXT, _INT2, _INT4_OID, _FLOAT8_OID, _BYTEA = 25, 21, 23, 701, 17
_CACHED = 4096
"""Most encoded strings (task, queue, content type, error type) a store keeps."""


class _Array:
    """A column of a batch, as the bytes of a PostgreSQL binary array (`_ArrayDumper`s)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _TextArray(_Array):
    __slots__ = ()


class _Int2Array(_Array):
    __slots__ = ()


class _Int4Array(_Array):
    __slots__ = ()


class _Float8Array(_Array):
    __slots__ = ()


class _ByteaArray(_Array):
    __slots__ = ()


class _ArrayDumper(Dumper):
    """Sends an `_Array`'s bytes as they are, in binary (psycopg's public adapter API)."""

    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        data: bytes = obj.data
        return data


def _dumper(array_oid: int) -> type[Dumper]:
    return type(f"_ArrayDumper{array_oid}", (_ArrayDumper,), {"oid": array_oid})


_DUMPERS: tuple[tuple[type[_Array], type[Dumper]], ...] = (
    (_TextArray, _dumper(1009)),
    (_Int2Array, _dumper(1005)),
    (_Int4Array, _dumper(1007)),
    (_Float8Array, _dumper(1022)),
    (_ByteaArray, _dumper(1001)),
)


def register_arrays(adapters: AdaptersMap) -> None:
    """Let `adapters` (a connection's) send the batch columns `Columns` builds."""
    for cls, dumper in _DUMPERS:
        adapters.register_dumper(cls, dumper)


class Columns:
    """Builds the array parameters of a round's part (`SQL.round`): for each field of `ROWS`,
    the writes' values as one binary array, in the connection's client encoding.

    The strings most writes share (task, queue, content type, error type) are encoded once
    and kept (at most `_CACHED` of them); a state's text and rank are encoded once for all.
    A column is built in one go (#23): the writes' fields read with `zip(*writes)`, the
    numbers packed by one `struct.pack`, the strings looked up and joined by C loops; only a
    column with both NULLs and values (a batch's results, its retry times) takes a Python
    loop over its elements.
    """

    def __init__(self) -> None:
        self._strings: dict[str, dict[str | None, bytes]] = {}
        self._states: dict[str, tuple[dict[JobState, bytes], dict[JobState, bytes]]] = {}

    def build(
        self, writes: Sequence[Write], indexes: Sequence[int], prefix: str, encoding: str
    ) -> dict[str, _Array]:
        """The parameters for the writes at `indexes`, named `{prefix}_{field}`.

        Raises:
            ValueError: a write's value can't be sent (a string not in `encoding`, a number
                out of its column's range), naming the job.
        """
        states = self._states.get(encoding)
        strings = self._strings.get(encoding)
        if states is None or strings is None or len(strings) > _CACHED:
            states = self._states[encoding] = (
                {state: _cell(state.value, encoding) for state in JobState},
                {state: _RANK(RANK[state]) for state in JobState},
            )
            strings = self._strings[encoding] = {None: _NULL}
        p = f"{prefix}_"
        if not indexes:
            return {
                f"{p}{name}": cls(_EMPTY(0, 0, element)) for name, (cls, element) in _FIELDS.items()
            }
        try:
            columns = _fast(writes, indexes, encoding, strings, states)
        except (struct.error, UnicodeError, TypeError, AttributeError, KeyError, ValueError):
            columns = _each(writes, indexes, encoding, strings, states)  # raises, naming the job
        n = len(indexes)
        return {
            f"{p}{name}": cls(_ARRAY(1, name in _NULLABLE, element, n, 1) + data)
            for (name, (cls, element)), data in zip(_FIELDS.items(), columns, strict=True)
        }


_FIELDS: dict[str, tuple[type[_Array], int]] = {
    "job_id": (_TextArray, _TEXT),
    "task": (_TextArray, _TEXT),
    "queue": (_TextArray, _TEXT),
    "state": (_TextArray, _TEXT),
    "rank": (_Int2Array, _INT2),
    "attempt": (_Int4Array, _INT4_OID),
    "defers": (_Int4Array, _INT4_OID),
    "next_retry_at": (_Float8Array, _FLOAT8_OID),
    "error_type": (_TextArray, _TEXT),
    "error_message": (_TextArray, _TEXT),
    "result": (_ByteaArray, _BYTEA),
    "content_type": (_TextArray, _TEXT),
    "at": (_Float8Array, _FLOAT8_OID),
}
"""The fields of `ROWS` in their order: each one's array class and element type."""
_NULLABLE = frozenset({"next_retry_at", "error_type", "error_message", "result", "content_type"})

_States = tuple[dict[JobState, bytes], dict[JobState, bytes]]


def _interleave(first: Any, second: Any, n: int) -> list[Any]:
    """[first[0], second[0], first[1], ...] for two iterables of `n` items (C loops)."""
    out: list[Any] = [None] * (2 * n)
    out[::2] = first
    out[1::2] = second
    return out


def _texts(encoded: list[bytes]) -> bytes:
    """Non-NULL text (or bytea) elements, each with its length."""
    return b"".join(_interleave(map(_LENGTH, map(len, encoded)), encoded, len(encoded)))


def _shared(values: Sequence[str | None], strings: dict[str | None, bytes], encoding: str) -> bytes:
    """Elements of a column most writes share values of, NULL for None (`strings` keeps
    each value's element)."""
    cells: list[Any] = list(map(strings.get, values))
    if None in cells:
        for i, cell in enumerate(cells):
            if cell is None:
                value = values[i]
                assert value is not None  # None's element is kept from the start
                cells[i] = strings[value] = _cell(value, encoding)
    return b"".join(cells)


def _fast(
    writes: Sequence[Write],
    indexes: Sequence[int],
    encoding: str,
    strings: dict[str | None, bytes],
    states: _States,
) -> list[bytes]:
    """The columns' elements (in `_FIELDS` order), built a column at a time.

    Raises:
        struct.error, UnicodeError, TypeError, AttributeError, KeyError, ValueError: a value
            that can't be sent (`_each` then names its job).
    """
    n = len(indexes)
    rows = map(writes.__getitem__, indexes)
    (job_id, task, queue, state, at, attempt, defers, _claim, _requeue, next_retry_at,
     error_type, error_message, result, content_type) = zip(*rows, strict=True)  # fmt: skip
    if None in task or None in queue:
        raise TypeError("task and queue can't be None")
    ints = _interleave([4] * n, attempt, n) + _interleave([4] * n, defers, n)
    packed_ints = struct.pack(f">{4 * n}i", *ints)
    at_cells = struct.pack(">" + "id" * n, *_interleave([8] * n, at, n))
    if next_retry_at.count(None) == n:
        retry_cells = _NULL * n
    else:
        retry_cells = b"".join(
            [_NULL if value is None else _FLOAT8(8, value) for value in next_retry_at]
        )
    if error_message.count(None) == n:
        message_cells = _NULL * n
    else:
        message_cells = b"".join(
            [_NULL if value is None else _cell(value, encoding) for value in error_message]
        )
    nulls = result.count(None)
    if nulls == n:
        result_cells = _NULL * n
    elif not nulls:
        result_cells = _texts(list(map(bytes, result)))
    else:
        result_cells = b"".join(
            [_NULL if body is None else _LENGTH(len(body)) + bytes(body) for body in result]
        )
    state_cells, rank_cells = states
    return [
        _texts(list(map(str.encode, job_id, [encoding] * n))),
        _shared(task, strings, encoding),
        _shared(queue, strings, encoding),
        b"".join(map(state_cells.__getitem__, state)),
        b"".join(_interleave([_LENGTH(2)] * n, map(rank_cells.__getitem__, state), n)),
        packed_ints[: 8 * n],
        packed_ints[8 * n :],
        retry_cells,
        _shared(error_type, strings, encoding),
        message_cells,
        result_cells,
        _shared(content_type, strings, encoding),
        at_cells,
    ]


def _each(
    writes: Sequence[Write],
    indexes: Sequence[int],
    encoding: str,
    strings: dict[str | None, bytes],
    states: _States,
) -> list[bytes]:
    """`_fast`, a write at a time: what finds the write a column could not be built for.

    Raises:
        ValueError: a write's value can't be sent, naming the job.
    """
    cells: list[list[bytes]] = [[] for _ in range(13)]
    (job_id, task, queue, state, rank, attempt, defers, next_retry_at, error_type,
     error_message, result, content_type, at) = cells  # fmt: skip
    del strings  # each value encoded anew: the error it raises names its job
    value: str | None
    state_cells, rank_cells = states
    write: Write | None = None
    try:
        for i in indexes:
            write = writes[i]
            encoded = write.job_id.encode(encoding)
            job_id.append(_LENGTH(len(encoded)) + encoded)
            task.append(_cell(write.task, encoding))
            queue.append(_cell(write.queue, encoding))
            value = write.content_type
            content_type.append(_NULL if value is None else _cell(value, encoding))
            value = write.error_type
            error_type.append(_NULL if value is None else _cell(value, encoding))
            state.append(state_cells[write.state])
            rank.append(_LENGTH(2) + rank_cells[write.state])
            attempt.append(_INT4(4, write.attempt))
            defers.append(_INT4(4, write.defers))
            retry_at = write.next_retry_at
            next_retry_at.append(_NULL if retry_at is None else _FLOAT8(8, retry_at))
            message = write.error_message
            error_message.append(_NULL if message is None else _cell(message, encoding))
            body = write.result
            result.append(_NULL if body is None else _LENGTH(len(body)) + bytes(body))
            at.append(_FLOAT8(8, write.at))
    except (struct.error, UnicodeError, TypeError, AttributeError, KeyError) as exc:
        job = write.job_id if write is not None else None
        raise ValueError(f"job {job!r} can't be sent: {type(exc).__name__}: {exc}") from exc
    return [b"".join(column) for column in cells]


def _cell(value: str, encoding: str) -> bytes:
    encoded = value.encode(encoding)
    return _LENGTH(len(encoded)) + encoded
