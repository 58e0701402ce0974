"""Testing a handler without a broker: `aio_workq.testing.run_handler` says what the worker
would do with a message, deciding through the worker's own code.

Run it: `python docs/examples/testing.py` (no broker needed). In a test suite the same
assertions go in `async def test_...()` functions (pytest-asyncio or anyio).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aio_workq import Job, Reject, RetryPolicy
from aio_workq.testing import run_handler


# --8<-- [start:handler]
@dataclass
class Resize:
    path: str
    width: int


class ImageServiceDown(Exception):
    pass


async def resize(task: Resize, job: Job) -> str:
    if task.width > 4096:
        raise Reject(f"width {task.width} is over the limit")
    if task.path.startswith("flaky/"):
        raise ImageServiceDown(task.path)
    await job.forward({"path": task.path, "width": task.width}, queue="thumbnails", delay=60)
    return f"resized {task.path}"


# --8<-- [end:handler]


async def main() -> None:
    # --8<-- [start:outcomes]
    outcome = await run_handler(resize, Resize("cat.png", 200))
    assert outcome.acked and outcome.result == "resized cat.png"
    assert outcome.forwarded[0].queue == "thumbnails"
    assert outcome.forwarded[0].options["delay"] == 60

    policy = RetryPolicy(max_attempts=3, initial_delay=5, jitter=0)
    outcome = await run_handler(resize, {"path": "flaky/a.png", "width": 1}, retry=policy)
    assert outcome.retried and outcome.delay == 5.0  # attempt 2 runs in 5 s
    outcome = await run_handler(
        resize, {"path": "flaky/a.png", "width": 1}, attempt=3, retry=policy
    )
    assert outcome.dead_lettered and outcome.reason is not None
    assert outcome.reason.endswith("ImageServiceDown: flaky/a.png")

    outcome = await run_handler(resize, {"path": "cat.png", "width": 10_000})
    assert outcome.dead_lettered and outcome.headers["x-workq-rejected"] is True

    outcome = await run_handler(resize, {"path": "cat.png"})  # no width: not a Resize
    assert outcome.dead_lettered and "width" in outcome.headers["x-workq-validation-error"]

    outcome = await run_handler(resize, Resize("dog.png", 100), rpc=True)
    assert outcome.replied and outcome.reply == "resized dog.png"
    # --8<-- [end:outcomes]
    print("all outcomes as expected")


if __name__ == "__main__":
    asyncio.run(main())
