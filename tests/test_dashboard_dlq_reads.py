"""A dead-letter page view is a pass over the whole dead-letter queue: viewers at once share
one pass, its result serves the page for a few seconds, and a replay or purge from the
dashboard ends that at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aio_workq import DeadLetters
from aio_workq.dashboard import Dashboard, Security
from aio_workq.dashboard._shared import SharedReads
from tests.test_dashboard import AUTH, TOKEN, make_dead_letters, served


async def test_reads_at_once_share_one_read_kept_for_its_lifetime() -> None:
    now = [0.0]
    reads = SharedReads(lifetime=5.0, clock=lambda: now[0])
    started, release = [], asyncio.Event()

    async def read() -> int:
        started.append(1)
        await release.wait()
        return len(started)

    both = asyncio.gather(reads.get(("q", "a"), read), reads.get(("q", "a"), read))
    await asyncio.sleep(0)
    release.set()
    assert list(await both) == [1, 1]  # one read, two viewers
    now[0] = 4.9
    assert await reads.get(("q", "a"), read) == 1  # kept
    assert await reads.get(("q", "b"), read) == 2  # another key reads
    reads.forget("q")  # a replay or purge of q
    assert await reads.get(("q", "a"), read) == 3
    now[0] = 10.0
    assert await reads.get(("q", "a"), read) == 4  # past its lifetime


async def test_a_failed_read_is_not_kept_and_a_viewer_who_leaves_cancels_nothing() -> None:
    reads = SharedReads()
    calls = []
    release = asyncio.Event()

    async def failing() -> int:
        calls.append(1)
        raise RuntimeError("broker down")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            await reads.get(("q", "a"), failing)
    assert len(calls) == 2

    async def slow() -> str:
        await release.wait()
        return "read"

    leaving = asyncio.ensure_future(reads.get(("q", "s"), slow))
    staying = asyncio.ensure_future(reads.get(("q", "s"), slow))
    await asyncio.sleep(0)
    leaving.cancel()
    release.set()
    assert await staying == "read"


@pytest.mark.broker
async def test_two_viewers_of_a_dead_letter_page_cost_one_pass(
    amqp_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_dead_letters(amqp_url, queue_name, 3)
    passes: list[str] = []
    find = DeadLetters.find

    async def counted(self: DeadLetters, *args: Any, **kwargs: Any) -> Any:
        passes.append(self.name)  # a spy: the real pass runs
        return await find(self, *args, **kwargs)

    monkeypatch.setattr(DeadLetters, "find", counted)
    dashboard = Dashboard(url=amqp_url, queues=[queue_name], management_url="",
                          security=Security(allow_actions=True, tokens=(TOKEN,)))  # fmt: skip
    async with served(dashboard) as client:
        page = f"/dead-letters/{queue_name}"
        first, second = await asyncio.gather(client.get(page), client.get(page))
        assert "3 shown of 3" in first.text and "3 shown of 3" in second.text
        assert len(passes) == 1  # before: one pass per view, two interleaved
        assert "3 shown of 3" in (await client.get(page)).text
        assert len(passes) == 1  # within a few seconds: the same read
        confirm = await client.post(f"{page}/purge", headers=AUTH,
                                    data={"confirm": "yes", "count": "3"})  # fmt: skip
        assert confirm.status_code == 200, confirm.text
        assert "0 shown of 0" in (await client.get(page)).text  # the purge ended the read
        assert len(passes) == 2
