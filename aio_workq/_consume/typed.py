"""Typed payloads: a handler that declares its payload type gets the body validated into it.

`async def handle(order: Order) -> None` or `(order: Order, job: Job)`: the annotation of the
first parameter is resolved once (`typing.get_type_hints`) when the worker is made, and a
validator is built once for it: pydantic's `TypeAdapter` where pydantic is installed, else a
small converter for dataclasses, TypedDicts, enums and plain types (`int`, `str`,
`list[int]`, `dict[str, float]`, `X | None`, `Literal[...]`, ...). A body that does not
validate raises `PayloadError` (a `Reject`): it goes straight to the dead-letter queue with
the validation error in its headers, and is never retried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._exceptions import ConfigurationError, PayloadError, qualname
from .._publish.serialization import JSON, decode_body

__all__ = ("Payload", "build_validator", "resolve_payload")

Validator = Callable[[bytes, str | None], Any]

_JOB_NAMES = frozenset({"Job", "JobData", "Any", "object"})


@dataclasses.dataclass(frozen=True, slots=True)
class Payload:
    """How a typed handler is called: the validator of its first argument, and whether a
    second argument gets the job."""

    type: Any
    validate: Validator
    with_job: bool


def resolve_payload(handler: Callable[..., Any], *, pydantic: bool | None = None) -> Payload | None:
    """The handler's payload plan, or None for a handler of a `Job` (or unannotated).

    Raises:
        ConfigurationError: the annotation can't be resolved, or its type can't be validated.
    """
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return None
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not positional or positional[0].annotation is inspect.Parameter.empty:
        _check_call(handler, signature, 1)
        return None
    first = positional[0]
    raw = first.annotation
    if isinstance(raw, str):
        payload_type = _resolve(handler, first.name, raw)
        if payload_type is None:
            return None
    else:
        payload_type = raw
    if _is_job(payload_type):
        _check_call(handler, signature, 1)
        return None
    with_job = len(positional) > 1 and positional[1].default is inspect.Parameter.empty
    _check_call(handler, signature, 2 if with_job else 1)
    validate = build_validator(payload_type, pydantic=pydantic)
    return Payload(payload_type, validate, with_job)


def _check_call(handler: Callable[..., Any], signature: inspect.Signature, args: int) -> None:
    """A handler must take what the worker passes it: the job (or a payload, and the job).

    A wrapper (`functools.wraps`, e.g. `idempotent()`) is checked as itself: it is what the
    worker calls, whatever the function it wraps takes.

    Raises:
        ConfigurationError: it can't be called that way (every message would fail).
    """
    try:
        own = inspect.signature(handler, follow_wrapped=False)
    except (TypeError, ValueError):
        own = signature
    try:
        own.bind(*range(args))
    except TypeError as exc:
        what = "the job" if args == 1 else "the payload and the job"
        raise ConfigurationError(
            f"handler {qualname(handler)} can't be called with {what} ({exc}): a handler takes "
            "one argument, the job (`async def handle(job: Job)`) or a typed payload, and "
            "optionally the job after it"
        ) from None


def _resolve(handler: Callable[..., Any], parameter: str, raw: str) -> Any:
    """The type a string annotation names (`from __future__ import annotations`), or None
    for a `Job` that can't be resolved (a handler that takes the job).

    Raises:
        ConfigurationError: the annotation names a type that can't be found.
    """
    target: Any = handler
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = getattr(target, "__call__", target)  # noqa: B004 - callable objects
    try:
        return typing.get_type_hints(target, include_extras=True).get(parameter, Any)
    except Exception as exc:
        if raw.rpartition(".")[2] in _JOB_NAMES:
            return None
        raise ConfigurationError(
            f"handler {_name(handler)}: can't resolve the annotation {raw!r} of its parameter "
            f"{parameter!r} ({exc}); define the type at module level, or annotate with Job"
        ) from exc


def _is_job(tp: Any) -> bool:
    from .job import Job, JobData

    if tp is Any or tp is object:
        return True
    return inspect.isclass(tp) and issubclass(tp, Job | JobData)


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)


def _type_name(tp: Any) -> str:
    return tp.__name__ if inspect.isclass(tp) else repr(tp)


def build_validator(tp: Any, *, pydantic: bool | None = None) -> Validator:
    """A function of `(body, content_type)` that returns the body as `tp`.

    Args:
        tp: the payload type.
        pydantic: use pydantic's `TypeAdapter` (`None`: where pydantic is installed, and the
            stdlib converter for a type pydantic refuses, such as a `typing.TypedDict` on
            Python 3.11).

    Raises:
        ConfigurationError: pydantic is asked for but missing, or `tp` can't be validated
            without it.
    """
    if pydantic is None or pydantic:
        try:
            from pydantic import TypeAdapter, ValidationError
        except ImportError:
            if pydantic:
                raise ConfigurationError(
                    "pydantic is not installed: pip install 'aio-workq[pydantic]'"
                ) from None
        else:
            try:
                return _pydantic_validator(tp, TypeAdapter, ValidationError)
            except ConfigurationError:
                # e.g. typing.TypedDict on Python < 3.12, which pydantic refuses
                if pydantic:
                    raise
                with contextlib.suppress(ConfigurationError):
                    return _stdlib_validator(tp)
                raise
    return _stdlib_validator(tp)


def _media(content_type: str | None) -> str:
    return "" if content_type is None else content_type.partition(";")[0].strip().lower()


def _pydantic_validator(tp: Any, adapter_class: Any, error_class: Any) -> Validator:
    try:
        adapter = adapter_class(tp)
    except Exception as exc:
        raise ConfigurationError(f"pydantic can't validate payload type {tp!r}: {exc}") from exc
    name = _type_name(tp)
    validate_json = adapter.validate_json
    validate_python = adapter.validate_python

    def validate(body: bytes, content_type: str | None) -> Any:
        try:
            media = _media(content_type)
            if media == JSON or media.endswith("+json"):
                return validate_json(body)
            return validate_python(decode_body(body, content_type))
        except (error_class, ValueError) as exc:
            raise PayloadError(f"the body does not validate as {name}: {exc}") from None

    return validate


def _stdlib_validator(tp: Any) -> Validator:
    convert = _converter(tp)
    name = _type_name(tp)

    def validate(body: bytes, content_type: str | None) -> Any:
        try:
            return convert(decode_body(body, content_type), "")
        except _Invalid as exc:
            where = f" at {exc.path}" if exc.path else ""
            raise PayloadError(f"the body does not validate as {name}{where}: {exc}") from None
        except ValueError as exc:  # the body is not valid JSON
            raise PayloadError(f"the body does not validate as {name}: {exc}") from None

    return validate


class _Invalid(ValueError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


Converter = Callable[[Any, str], Any]


def _expect(ok: bool, path: str, what: str, value: Any) -> None:
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise _Invalid(path, f"expected {what}, got {type(value).__name__} {shown}")


def _converter(tp: Any) -> Converter:
    """A converter of decoded JSON data into `tp`, built once.

    Raises:
        ConfigurationError: `tp` is not a kind this converter knows.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return lambda value, path: value
    if origin is typing.Annotated:
        return _converter(args[0])
    if tp is None or tp is type(None):

        def none(value: Any, path: str) -> Any:
            _expect(value is None, path, "null", value)
            return None

        return none
    if tp is bool:

        def boolean(value: Any, path: str) -> Any:
            _expect(isinstance(value, bool), path, "a bool", value)
            return value

        return boolean
    if tp is int:

        def integer(value: Any, path: str) -> Any:
            _expect(isinstance(value, int) and not isinstance(value, bool), path, "an int", value)
            return value

        return integer
    if tp is float:

        def number(value: Any, path: str) -> Any:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            _expect(ok, path, "a number", value)
            return float(value)

        return number
    if tp is str or tp is bytes:

        def plain(value: Any, path: str) -> Any:
            _expect(isinstance(value, tp), path, f"a {tp.__name__}", value)
            return value

        return plain
    if origin is typing.Literal:

        def literal(value: Any, path: str) -> Any:
            _expect(value in args, path, f"one of {list(args)!r}", value)
            return value

        return literal
    if origin is typing.Union or origin is types.UnionType:
        options = [_converter(arg) for arg in args]

        def union(value: Any, path: str) -> Any:
            for option in options:
                try:
                    return option(value, path)
                except _Invalid:
                    continue
            raise _Invalid(path, f"expected {tp!r}, got {type(value).__name__} {value!r:.60}")

        return union
    if inspect.isclass(tp) and issubclass(tp, enum.Enum):

        def enumeration(value: Any, path: str) -> Any:
            try:
                return tp(value)
            except ValueError:
                raise _Invalid(path, f"{value!r:.60} is not a valid {tp.__name__}") from None

        return enumeration
    if dataclasses.is_dataclass(tp) and inspect.isclass(tp):
        return _dataclass_converter(tp)
    if typing.is_typeddict(tp):
        return _typeddict_converter(tp)
    container = origin or tp
    if container in (list, set, frozenset, Sequence) or container is tuple:
        return _sequence_converter(tp, container, args)
    if container in (dict, Mapping):
        keys = _converter(args[0]) if args else _converter(Any)
        values = _converter(args[1]) if args else _converter(Any)

        def mapping(value: Any, path: str) -> Any:
            _expect(isinstance(value, dict), path, "an object", value)
            return {keys(k, path): values(v, f"{path}.{k}") for k, v in value.items()}

        return mapping
    raise ConfigurationError(
        f"can't validate payload type {tp!r} without pydantic: use a dataclass, a TypedDict or "
        "plain types (int, str, list[int], ...), or pip install 'aio-workq[pydantic]'"
    )


def _sequence_converter(tp: Any, container: Any, args: tuple[Any, ...]) -> Converter:
    if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        items = [_converter(arg) for arg in args]

        def fixed(value: Any, path: str) -> Any:
            ok = isinstance(value, list | tuple) and len(value) == len(items)
            _expect(ok, path, f"an array of {len(items)}", value)
            pairs = enumerate(zip(items, value, strict=True))
            return tuple(item(v, f"{path}[{n}]") for n, (item, v) in pairs)

        return fixed
    item = _converter(args[0]) if args else _converter(Any)
    build: Callable[[Any], Any] = list if container is Sequence else container

    def sequence(value: Any, path: str) -> Any:
        _expect(isinstance(value, list | tuple), path, "an array", value)
        return build(item(v, f"{path}[{n}]") for n, v in enumerate(value))

    return sequence


def _dataclass_converter(cls: Any) -> Converter:
    fields: list[tuple[str, Converter, bool]] = []

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            fields.append((f.name, _converter(hints.get(f.name, Any)), required))

    def dataclass(value: Any, path: str) -> Any:
        _expect(isinstance(value, dict), path, f"an object ({cls.__name__})", value)
        kwargs = {}
        for name, convert, required in fields:
            if name in value:
                kwargs[name] = convert(value[name], f"{path}.{name}")
            elif required:
                raise _Invalid(f"{path}.{name}", "field required")
        return cls(**kwargs)

    return dataclass


def _typeddict_converter(cls: Any) -> Converter:
    hints = typing.get_type_hints(cls)
    converters = {name: _converter(hint) for name, hint in hints.items()}
    required = frozenset(cls.__required_keys__)

    def typeddict(value: Any, path: str) -> Any:
        _expect(isinstance(value, dict), path, f"an object ({cls.__name__})", value)
        missing = required - value.keys()
        if missing:
            raise _Invalid(f"{path}.{sorted(missing)[0]}", "field required")
        return {
            k: converters[k](v, f"{path}.{k}") if k in converters else v for k, v in value.items()
        }

    return typeddict
