"""Task arguments are checked by mypy (ParamSpec) as well as at run time.

mypy checks this file (pyproject's `files` includes tests/, with `warn_unused_ignores` from
`strict`): each wrong call below carries the `# type: ignore[...]` of the error mypy reports for
it. If mypy stopped flagging one, its ignore would be unused, and `make lint` would fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from aio_workq.jobs import JobHandle, TaskArgumentError, Tasks


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
