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


class _Array(bytes):
    """A column of a batch, the bytes of a PostgreSQL binary array (`_ArrayDumper`s); bytes
    themselves, made without a Python `__init__` (#23)."""

    __slots__ = ()

    @property
    def data(self) -> bytes:
        return bytes(self)


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
        data: bytes = obj
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


def _uniform(values: tuple[Any, ...], n: int) -> bool:
    """Whether the `n` values are all equal (a column of a worker's batch often is: one task,
    one queue, one state, attempt 1); `count` compares identical objects without a call."""
    return values.count(values[0]) == n


def _ids(values: tuple[str, ...], n: int, encoding: str) -> bytes:
    """Non-NULL text elements: ids of one length in ASCII (uuid hex, the usual) as one string
    with each one's length between them, encoded at once; others one by one."""
    first = len(values[0])
    if list(map(len, values)).count(first) == n:
        prefix = _LENGTH(first).decode("latin-1")
        text = prefix + prefix.join(values)
        if text.isascii():
            data = text.encode(encoding)
            if len(data) == len(text):
                return data
    return _texts(list(map(str.encode, values, [encoding] * n)))


def _shared(
    values: tuple[str | None, ...],
    n: int,
    strings: dict[str | None, bytes],
    encoding: str,
    nullable: bool,
) -> bytes:
    """Elements of a column most writes share values of (`strings` keeps each value's
    element; None is NULL where `nullable`).

    Raises:
        TypeError: a None where the column can't be NULL.
    """
    if _uniform(values, n):
        value = values[0]
        cell = strings.get(value)
        if cell is None:
            cell = strings[value] = _cell(value, encoding)  # type: ignore[arg-type]
        elif value is None and not nullable:
            raise TypeError("None where a value is needed")
        return cell * n
    cells: list[bytes] = []
    for value in values:
        cell = strings.get(value)
        if cell is None:
            cell = strings[value] = _cell(value, encoding)  # type: ignore[arg-type]
        elif value is None and not nullable:
            raise TypeError("None where a value is needed")
        cells.append(cell)
    return b"".join(cells)


def _int4s(values: tuple[int, ...], n: int) -> bytes:
    if _uniform(values, n):
        return _INT4(4, values[0]) * n
    return struct.pack(f">{2 * n}i", *_interleave([4] * n, values, n))


def _fast(
    writes: Sequence[Write],
    indexes: Sequence[int],
    encoding: str,
    strings: dict[str | None, bytes],
    states: _States,
) -> list[bytes]:
    """The columns' elements (in `_FIELDS` order), built a column at a time: a column whose
    values are all the same is one element repeated.

    Raises:
        struct.error, UnicodeError, TypeError, AttributeError, KeyError, ValueError: a value
            that can't be sent (`_each` then names its job).
    """
    n = len(indexes)
    rows = map(writes.__getitem__, indexes)
    (job_id, task, queue, state, at, attempt, defers, _claim, _requeue, next_retry_at,
     error_type, error_message, result, content_type) = zip(*rows, strict=True)  # fmt: skip
    nones = (None,) * n  # compared item by item, identical objects without a call
    state_cells, rank_cells = states
    if _uniform(state, n):
        state_data = state_cells[state[0]] * n
        rank_data = (_LENGTH(2) + rank_cells[state[0]]) * n
    else:
        state_data = b"".join(map(state_cells.__getitem__, state))
        rank_data = b"".join(_interleave([_LENGTH(2)] * n, map(rank_cells.__getitem__, state), n))
    if next_retry_at == nones:
        retry_data = _NULL * n
    else:
        retry_data = b"".join(
            [_NULL if value is None else _FLOAT8(8, value) for value in next_retry_at]
        )
    if error_message == nones:
        message_data = _NULL * n
    else:
        message_data = b"".join(
            [_NULL if value is None else _cell(value, encoding) for value in error_message]
        )
    if result == nones:
        result_data = _NULL * n
    else:
        try:  # no NULL among them: their lengths and bytes by C loops
            result_data = _texts(list(map(bytes, result)))
        except TypeError:  # some None (bytes(None) raises)
            result_data = b"".join(
                [_NULL if body is None else _LENGTH(len(body)) + bytes(body) for body in result]
            )
    return [
        _ids(job_id, n, encoding),
        _shared(task, n, strings, encoding, False),
        _shared(queue, n, strings, encoding, False),
        state_data,
        rank_data,
        _int4s(attempt, n),
        _int4s(defers, n),
        retry_data,
        _shared(error_type, n, strings, encoding, True),
        message_data,
        result_data,
        _shared(content_type, n, strings, encoding, True),
        struct.pack(">" + "id" * n, *_interleave([8] * n, at, n)),
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
