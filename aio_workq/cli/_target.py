"""`MODULE:ATTR` → the workers to run: a Worker, a list of them, a factory, or a handler."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aio_workq import Worker

from ._errors import TargetError

__all__ = (
    "WorkerOptions",
    "build_scheduler",
    "build_workers",
    "check_target",
    "import_target",
    "split_queues",
)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """What the command line says about the workers to build.

    Args:
        target: `MODULE:ATTR`.
        queues: run ATTR as a handler on these queues (a worker each); for a Tasks registry
            or its `workers` factory, run only its tasks of these queues.
        concurrency: handlers at once, for a handler run on `queues` (or a factory's).
        url: broker URL for a handler run on `queues` (others read `AMQP_URL`).
        wait_for_broker: seconds to keep trying to reach the broker at start (0: fail at once).
        schedules: `MODULE:ATTR` of a `Scheduler` (or of `Schedule`s) to run beside the workers.
    """

    target: str
    queues: tuple[str, ...] = ()
    concurrency: int | None = None
    url: str | None = None
    wait_for_broker: float = 0.0
    schedules: str | None = None


def import_target(target: str) -> Any:
    """The object `MODULE:ATTR` names (ATTR may be dotted); the current directory is importable.

    Raises:
        TargetError: `target` is not `MODULE:ATTR`, the module does not import, or it has no ATTR.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(
            f"{target!r} is not MODULE:ATTR; e.g. `aio-workq worker myapp.tasks:worker`"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise TargetError(
                f"cannot import {module_name!r} ({exc}): run from the directory that holds it, "
                "or add that directory to PYTHONPATH"
            ) from exc
        raise TargetError(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise TargetError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"{module_name!r} has no attribute {attr!r} ({target!r})") from None
    return obj


def check_target(obj: Any, options: WorkerOptions) -> None:
    """What can be told of `obj` without calling it: that it is a kind the options apply to.
    The supervisor checks it once, before its children would each fail on it.

    Raises:
        TargetError: `obj` is a Tasks registry or task, or an option does not apply to it.
    """
    target = options.target
    if options.queues and _registry_of(obj) is not None:
        _check_registry_queues(_registry_of(obj), options)
        return
    _refuse_tasks(obj, target)
    factory = not isinstance(obj, Worker) and callable(obj) and not isinstance(obj, type)
    if options.queues:
        if isinstance(obj, Worker) or not callable(obj):
            raise TargetError(
                f"--queue runs {target!r} as a handler, but it is {_kind(obj)}; drop --queue"
            )
        return
    if options.concurrency is not None and not (factory and _takes_concurrency(obj)):
        raise TargetError(
            "--concurrency applies to a handler run with --queue, or to a factory that takes "
            "concurrency= (a Tasks registry's tasks.workers does); for a Worker, set "
            "Worker(concurrency=...) in the code"
        )
    if factory and _needs_arguments(obj):
        raise TargetError(
            f"{target!r} takes an argument, so it looks like a handler: pass --queue QUEUE"
        )


async def build_workers(obj: Any, options: WorkerOptions) -> list[Worker]:
    """The workers `obj` stands for, under `options`.

    Raises:
        TargetError: `obj` is none of the accepted kinds, or an option does not apply to it.
    """
    target = options.target
    check_target(obj, options)
    registry = _registry_of(obj) if options.queues else None
    if registry is not None:
        given = {} if options.concurrency is None else {"concurrency": options.concurrency}
        return _workers_of(
            registry.workers(queues=list(options.queues), **given),
            f"the workers factory of {target!r} returned",
        )
    if options.queues:
        return [
            Worker(
                options.url,
                queue=queue,
                handler=obj,
                concurrency=options.concurrency or 1,
                name=f"aio-workq worker {queue}",
            )
            for queue in options.queues
        ]
    if not isinstance(obj, Worker) and callable(obj) and not isinstance(obj, type):
        try:
            given = {} if options.concurrency is None else {"concurrency": options.concurrency}
            obj = obj(**given)
            if inspect.isawaitable(obj):
                obj = await obj
        except TargetError:
            raise
        except Exception as exc:
            raise TargetError(
                f"the factory {target!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        return _workers_of(obj, f"the factory {target!r} returned {_kind(obj)}")
    return _workers_of(obj, f"{target!r} is {_kind(obj)}")


def _refuse_tasks(obj: Any, target: str) -> None:
    """A `Tasks` registry, or one of its tasks (callable, so it looked like a handler), named
    instead of the registry's `workers` factory (told by their shape: the CLI is below
    `aio_workq.jobs` and does not import it)."""
    name = getattr(obj, "name", None)
    if _is_registry(obj):
        raise TargetError(
            f"{target!r} is a Tasks registry: name its workers factory, "
            f"aio-workq worker {target}.workers"
        )
    if isinstance(name, str) and all(
        callable(getattr(obj, attr, None)) for attr in ("enqueue", "s", "job")
    ):
        module = target.partition(":")[0]
        raise TargetError(
            f"{target!r} is the task {name!r}, not a handler: run the workers of the Tasks "
            f"registry it was declared on, e.g. aio-workq worker {module}:tasks.workers"
        )


def _is_registry(obj: Any) -> bool:
    """A `Tasks` registry, told by its shape (see `_refuse_tasks`)."""
    return callable(getattr(obj, "workers", None)) and callable(getattr(obj, "task", None))


def _registry_of(obj: Any) -> Any:
    """The `Tasks` registry `obj` is, or whose `workers` factory it is; else None."""
    if _is_registry(obj):
        return obj
    owner = getattr(obj, "__self__", None)
    if _is_registry(owner) and getattr(obj, "__name__", None) == "workers":
        return owner
    return None


def _check_registry_queues(registry: Any, options: WorkerOptions) -> None:
    """`--queue` names queues of the registry's tasks (Celery's `-Q`).

    Raises:
        TargetError: a queue none of its tasks is on; the message lists the registry's queues.
    """
    known = sorted({task.queue.name for task in registry.tasks.values()})
    unknown = [queue for queue in options.queues if queue not in known]
    if unknown:
        names = ", ".join(repr(queue) for queue in unknown)
        raise TargetError(
            f"--queue {names}: no task of the registry of {options.target!r} is on "
            f"{'it' if len(unknown) == 1 else 'them'}; its queues: {', '.join(known) or 'none'}"
        )


def split_queues(values: Sequence[str]) -> tuple[str, ...]:
    """`--queue a --queue b,c` → `("a", "b", "c")`: repeated, or comma lists, as Celery's `-Q`;
    each named once, in order."""
    queues: dict[str, None] = {}
    for value in values:
        for queue in value.split(","):
            if queue.strip():
                queues[queue.strip()] = None
    return tuple(queues)


def _workers_of(obj: Any, what: str) -> list[Worker]:
    if isinstance(obj, Worker):
        return [obj]
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes) and obj:
        if all(isinstance(item, Worker) for item in obj):
            return list(obj)
    raise TargetError(
        f"{what}; expected a Worker, a non-empty list of Workers, a factory returning them, "
        "or a handler with --queue QUEUE"
    )


def _takes_concurrency(func: Any) -> bool:
    try:
        parameter = inspect.signature(func).parameters.get("concurrency")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (
        parameter.POSITIONAL_OR_KEYWORD,
        parameter.KEYWORD_ONLY,
    )


def _needs_arguments(func: Any) -> bool:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return False
    return any(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in signature.parameters.values()
    )


def _kind(obj: Any) -> str:
    if isinstance(obj, Worker):
        return "a Worker"
    if isinstance(obj, list | tuple):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def build_scheduler(target: str, url: str | None) -> Any:
    """The `Scheduler` that `--schedules MODULE:ATTR` names: a Scheduler, a Schedule, or a
    non-empty list of Schedules (run by a Scheduler on `url`).

    Raises:
        TargetError: ATTR is none of these.
    """
    from aio_workq.schedules import Schedule, Scheduler

    obj = import_target(target)
    if isinstance(obj, Scheduler):
        return obj
    if isinstance(obj, Schedule):
        obj = [obj]
    if isinstance(obj, Sequence) and obj and all(isinstance(item, Schedule) for item in obj):
        return Scheduler(url, obj)
    raise TargetError(
        f"--schedules {target!r} is {_kind(obj)}; expected a Scheduler, a Schedule or a "
        "non-empty list of Schedules"
    )
