"""Task arguments are checked by mypy (ParamSpec) as well as at run time.

mypy checks this file (pyproject's `files` includes tests/, with `warn_unused_ignores` from
`strict`): each wrong call below carries the `# type: ignore[...]` of the error mypy reports for
it. If mypy stopped flagging one, its ignore would be unused, and `make lint` would fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from aio_workq.jobs import JobHandle, TaskArgumentError, Tasks
from aio_workq.testing import TaskRun, run_task


@dataclass
class Thumb:
    path: str
    width: int


tasks = Tasks()


@tasks.task(queue="typing-images", name="typing.resize")
async def resize(path: str, width: int = 800) -> Thumb:
    return Thumb(path, width)


@tasks.task(queue="typing-images", name="typing.count")
def count(words: list[str]) -> int:
    return len(words)


async def test_wrong_calls_are_type_errors_and_refused_at_run_time() -> None:
    with pytest.raises(TaskArgumentError, match="hieght"):
        await resize.enqueue("cat.png", hieght=400)  # type: ignore[call-arg]
    with pytest.raises(TaskArgumentError, match="width"):
        await resize.enqueue("cat.png", width="wide")  # type: ignore[arg-type]
    with pytest.raises(TaskArgumentError, match="path"):
        await resize.enqueue()  # type: ignore[call-arg]
    with pytest.raises(TaskArgumentError, match="words"):
        await count.enqueue(words="one two")  # type: ignore[arg-type]


def test_the_handle_and_the_direct_call_are_typed() -> None:
    def typed(handle: JobHandle[Thumb]) -> JobHandle[Thumb]:
        return handle

    # The handle of a task is typed by its return type (a coroutine's result for async def).
    typed(resize.job("some-id"))
    wrong: JobHandle[int] = resize.job("some-id")  # type: ignore[assignment]
    assert wrong.job_id == "some-id"
    assert count(["a", "b"]) == 2


async def test_run_task_with_s_is_typed_as_enqueue_is() -> None:
    # `run_task(task.s(...))` is the testing kit's typed form: mypy checks the arguments as
    # for `enqueue()`, and reads the result's type from the task.
    with pytest.raises(TaskArgumentError, match="hieght"):
        await run_task(resize.s("cat.png", hieght=400))  # type: ignore[call-arg]
    with pytest.raises(TaskArgumentError, match="width"):
        await run_task(resize.s("cat.png", width="wide"))  # type: ignore[arg-type]
    with pytest.raises(TaskArgumentError, match="path"):
        await run_task(resize.s())  # type: ignore[call-arg]
    run = await run_task(resize.s("cat.png", width=400))
    thumb: Thumb | None = run.result
    assert thumb == Thumb("cat.png", 400)
    counted: TaskRun[int] = await run_task(count.s(["a"]))
    assert counted.result == 1
    run_count = await run_task(count.s(["a"]))
    text: str | None = run_count.result  # type: ignore[assignment]
    assert text == 1  # type: ignore[comparison-overlap]
    # The older form stays, checked when it runs only.
    legacy = await run_task(resize, ["cat.png"], {"width": 400})
    assert legacy.result == Thumb("cat.png", 400)
