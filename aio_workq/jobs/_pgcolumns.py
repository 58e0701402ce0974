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


def _array(element: int, cells: list[bytes], nullable: bool) -> bytes:
    """A one-dimensional array of `element` in PostgreSQL's binary format (array_recv), of its
    elements each with its length (`_NULL` for NULL). The flags word says whether it may hold
    NULLs (the server checks each element's length anyway)."""
    if not cells:
        return _EMPTY(0, 0, element)
    return _ARRAY(1, nullable, element, len(cells), 1) + b"".join(cells)


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
    """

    def __init__(self) -> None:
        self._strings: dict[str, dict[str | None, bytes]] = {}
        self._states: dict[str, dict[JobState, tuple[bytes, bytes]]] = {}

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
            states = self._states[encoding] = {
                state: (_cell(state.value, encoding), _LENGTH(2) + _RANK(RANK[state]))
                for state in JobState
            }
            strings = self._strings[encoding] = {None: _NULL}
        cells: list[list[bytes]] = [[] for _ in range(13)]
        (job_id, task, queue, state, rank, attempt, defers, next_retry_at, error_type,
         error_message, result, content_type, at) = cells  # fmt: skip
        write: Write | None = None
        try:
            for i in indexes:
                write = writes[i]
                encoded = write.job_id.encode(encoding)
                job_id.append(_LENGTH(len(encoded)) + encoded)
                value: str | None = write.task
                cell = strings.get(value)
                if cell is None:
                    cell = strings[value] = _cell(write.task, encoding)
                task.append(cell)
                value = write.queue
                cell = strings.get(value)
                if cell is None:
                    cell = strings[value] = _cell(write.queue, encoding)
                queue.append(cell)
                value = write.content_type
                cell = strings.get(value)
                if cell is None:
                    cell = strings[value] = _cell(value or "", encoding)
                content_type.append(cell)
                value = write.error_type
                cell = strings.get(value)
                if cell is None:
                    cell = strings[value] = _cell(value or "", encoding)
                error_type.append(cell)
                state_cell, rank_cell = states[write.state]
                state.append(state_cell)
                rank.append(rank_cell)
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
        p = f"{prefix}_"
        return {
            f"{p}job_id": _TextArray(_array(_TEXT, job_id, False)),
            f"{p}task": _TextArray(_array(_TEXT, task, False)),
            f"{p}queue": _TextArray(_array(_TEXT, queue, False)),
            f"{p}state": _TextArray(_array(_TEXT, state, False)),
            f"{p}rank": _Int2Array(_array(_INT2, rank, False)),
            f"{p}attempt": _Int4Array(_array(_INT4_OID, attempt, False)),
            f"{p}defers": _Int4Array(_array(_INT4_OID, defers, False)),
            f"{p}next_retry_at": _Float8Array(_array(_FLOAT8_OID, next_retry_at, True)),
            f"{p}error_type": _TextArray(_array(_TEXT, error_type, True)),
            f"{p}error_message": _TextArray(_array(_TEXT, error_message, True)),
            f"{p}result": _ByteaArray(_array(_BYTEA, result, True)),
            f"{p}content_type": _TextArray(_array(_TEXT, content_type, True)),
            f"{p}at": _Float8Array(_array(_FLOAT8_OID, at, False)),
        }


def _cell(value: str, encoding: str) -> bytes:
    encoded = value.encode(encoding)
    return _LENGTH(len(encoded)) + encoded
