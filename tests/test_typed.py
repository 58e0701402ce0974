"""Typed payloads: handlers that declare their payload type get it validated, with pydantic or
without; a body that does not validate is dead-lettered at once; models and dataclasses publish
as JSON."""

from __future__ import annotations

import enum
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import pydantic
import pytest

import aio_workq
from aio_workq import (
    ConfigurationError,
    Job,
    JobData,
    PayloadError,
    Producer,
    RetryPolicy,
    Worker,
)
from aio_workq._consume.execution import HandlerRunner
from aio_workq._consume.typed import build_validator, resolve_payload
from aio_workq._publish.serialization import encode_body
from tests.helpers import Counter, wait_until


class Order(pydantic.BaseModel):
    id: int
    item: str
    quantity: int = 1


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Line:
    sku: str
    price: float


@dataclass
class Basket:
    owner: str
    lines: list[Line]
    colour: Colour = Colour.RED
    tags: dict[str, int] = field(default_factory=dict)
    note: str | None = None


class Point(TypedDict):
    x: int
    y: int


def body(value: Any) -> tuple[bytes, str | None]:
    return encode_body(value)


# --- validators ---


@pytest.mark.parametrize("use_pydantic", [True, False])
def test_dataclasses_typeddicts_and_plain_types_validate(use_pydantic: bool) -> None:
    basket = build_validator(Basket, pydantic=use_pydantic)
    got = basket(
        *body({"owner": "ann", "lines": [{"sku": "a", "price": 2}], "colour": "blue", "tags": {}})
    )
    assert got == Basket("ann", [Line("a", 2.0)], Colour.BLUE)
    point = build_validator(Point, pydantic=None if use_pydantic else False)
    assert point(*body({"x": 1, "y": 2})) == {"x": 1, "y": 2}
    assert build_validator(list[int], pydantic=use_pydantic)(*body([1, 2])) == [1, 2]
    assert build_validator(int | None, pydantic=use_pydantic)(*body(None)) is None
    assert build_validator(str, pydantic=use_pydantic)(*body("hi")) == "hi"
    assert build_validator(Literal["a", "b"], pydantic=use_pydantic)(*body("b")) == "b"
    assert build_validator(tuple[int, str], pydantic=use_pydantic)(*body([1, "x"])) == (1, "x")


@pytest.mark.parametrize("use_pydantic", [True, False])
def test_a_body_that_does_not_validate_is_a_payload_error_naming_the_field(
    use_pydantic: bool,
) -> None:
    basket = build_validator(Basket, pydantic=use_pydantic)
    with pytest.raises(PayloadError, match="Basket") as info:
        basket(*body({"owner": "ann", "lines": [{"sku": "a"}]}))
    assert "price" in str(info.value)
    with pytest.raises(PayloadError, match="lines"):
        basket(*body({"owner": "ann", "lines": "nope"}))
    with pytest.raises(PayloadError):
        build_validator(Point, pydantic=None if use_pydantic else False)(*body({"x": 1}))
    with pytest.raises(PayloadError):
        build_validator(int, pydantic=use_pydantic)(b"{not json", "application/json")
    assert isinstance(PayloadError("x"), aio_workq.Reject)  # never retried


def test_pydantic_models_validate_from_json() -> None:
    order = build_validator(Order)(*body({"id": 7, "item": "tea"}))
    assert order == Order(id=7, item="tea")
    with pytest.raises(PayloadError, match="item"):
        build_validator(Order)(*body({"id": 7}))


def test_a_type_the_stdlib_path_cannot_check_is_refused_up_front() -> None:
    class Opaque:
        pass

    with pytest.raises(ConfigurationError, match="pydantic"):
        build_validator(Opaque, pydantic=False)


# --- which handlers are typed ---


async def typed(order: Order) -> None: ...


async def typed_with_job(order: Order, job: Job) -> None: ...


async def of_job(job: Job) -> None: ...


async def unannotated(job): ...


def of_job_data(job: JobData) -> None: ...


def test_a_handler_that_cannot_take_the_job_is_refused_when_the_worker_is_built() -> None:
    async def no_arguments() -> None:
        pass

    async def two_required(job: Job, extra: int) -> None:
        pass

    @dataclass
    class Order:
        id: int

    async def payload_then_two(order: Order, job: Job, more: int) -> None:
        pass

    for handler in (no_arguments, two_required, payload_then_two):
        with pytest.raises(ConfigurationError, match="can't be called with"):
            Worker(queue="q", handler=handler)  # type: ignore[arg-type]

    async def fine(job: Job, extra: int = 0) -> None:
        pass

    async def typed(order: Order, job: Job) -> None:
        pass

    Worker(queue="q", handler=fine)
    Worker(queue="q", handler=typed)


def test_only_handlers_annotated_with_a_payload_type_are_typed() -> None:
    plan = resolve_payload(typed)
    assert plan is not None and plan.type is Order and not plan.with_job
    plan = resolve_payload(typed_with_job)
    assert plan is not None and plan.with_job
    for handler in (of_job, unannotated, of_job_data, lambda job: None):
        assert resolve_payload(handler) is None


def test_partials_and_callable_objects_are_typed_by_their_function() -> None:
    async def with_prefix(prefix: str, order: Order) -> None: ...

    class Handler:
        async def __call__(self, order: Order, job: Job) -> None: ...

    def create() -> Any:  # built at run time: the annotation is an object, not a str
        namespace: dict[str, Any] = {"Line": Line}
        exec("def handle(line: Line) -> None: ...", namespace)
        return namespace["handle"]

    plan = resolve_payload(functools.partial(typed_with_job))
    assert plan is not None and plan.type is Order and plan.with_job
    plan = resolve_payload(functools.partial(with_prefix, "p"))
    assert plan is not None and plan.type is Order and not plan.with_job
    plan = resolve_payload(Handler())
    assert plan is not None and plan.type is Order and plan.with_job
    plan = resolve_payload(create())
    assert plan is not None and plan.type is Line


def test_an_annotation_that_cannot_be_resolved_is_a_configuration_error() -> None:
    class Local(pydantic.BaseModel):
        a: int

    async def handler(item: Local) -> None: ...

    with pytest.raises(ConfigurationError, match="module level"):
        resolve_payload(handler)


# --- the runner ---


class FakeJob:
    """What the runner touches of a `Job`."""

    def __init__(self, value: Any) -> None:
        self.body, self.content_type = encode_body(value)

    def snapshot(self) -> JobData:
        return JobData(self.body, self.content_type, {}, "m", 1, False, "q", "")


def line_total(line: Line) -> float:  # module level: picklable for the process pool
    return line.price * 2


def line_pid(line: Line, job: JobData) -> tuple[str, int, str | None]:
    return line.sku, os.getpid(), job.message_id


async def test_the_runner_passes_the_validated_payload_and_the_job() -> None:
    seen: list[Any] = []

    async def handler(order: Order, job: Job) -> str:
        seen.append((order, job))
        return order.item

    runner = HandlerRunner(handler, executor="thread", concurrency=1, timeout=None, name="t")
    job = FakeJob({"id": 1, "item": "tea"})
    assert await runner.run(job) == "tea"  # type: ignore[arg-type]
    assert seen == [(Order(id=1, item="tea"), job)]
    with pytest.raises(PayloadError):
        await runner.run(FakeJob({"id": "x"}))  # type: ignore[arg-type]
    assert len(seen) == 1  # the handler never ran


async def test_typed_handlers_run_in_threads_and_process_pools() -> None:
    runner = HandlerRunner(line_total, executor="thread", concurrency=1, timeout=None, name="t")
    assert await runner.run(FakeJob({"sku": "a", "price": 2})) == 4.0  # type: ignore[arg-type]
    runner.close()
    runner = HandlerRunner(line_pid, executor="process", concurrency=1, timeout=None, name="p")
    try:
        sku, pid, message_id = await runner.run(FakeJob({"sku": "b", "price": 1}))  # type: ignore[arg-type]
    finally:
        runner.close()
    assert (sku, message_id) == ("b", "m") and pid != os.getpid()


# --- publishing models ---


def test_models_and_dataclasses_publish_as_json() -> None:
    data, content_type = encode_body(Order(id=3, item="tea"))
    assert content_type == "application/json"
    assert json.loads(data) == {"id": 3, "item": "tea", "quantity": 1}
    data, _ = encode_body({"basket": Basket("ann", [Line("a", 1.5)], Colour.BLUE)})
    assert json.loads(data)["basket"]["lines"] == [{"sku": "a", "price": 1.5}]
    with pytest.raises(aio_workq.SerializationError, match="pydantic model or a dataclass"):
        encode_body(object())


# --- on the broker ---


@pytest.mark.broker
async def test_a_typed_worker_handles_valid_bodies_and_dead_letters_the_rest(
    producer: Producer, make_worker: Callable[..., aio_workq.Worker], queue_name: str
) -> None:
    handled = Counter()

    async def handle(order: Order, job: Job) -> None:
        handled.add((order, job.attempt))

    worker = make_worker(queue=queue_name, handler=handle, retry=RetryPolicy(max_attempts=5))
    await worker.start()
    await producer.publish({"id": "oops", "item": "tea"}, queue=queue_name)
    await producer.publish(Order(id=2, item="cake"), queue=queue_name)
    assert await handled.wait_for(1) == [(Order(id=2, item="cake"), 1)]
    dead = producer.dead_letters(queue_name)
    await wait_until(lambda: _true(worker.state.dead_lettered == 1))
    [letter] = await dead.read()
    assert letter.attempts == 1  # never retried
    assert letter.headers["x-workq-exception-type"] == "aio_workq.PayloadError"
    assert "id" in letter.headers["x-workq-validation-error"]
    assert worker.state.retried == 0


async def _true(value: bool) -> bool:
    return value
