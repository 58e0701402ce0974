"""The publisher's window, offline: waiters that time out are let go at once (#20, finding 11)."""

from __future__ import annotations

import asyncio

import pytest

from aio_workq._wire.window import Window


async def test_waiters_that_time_out_are_not_retained_until_the_window_drains() -> None:
    window = Window(4)
    for _ in range(4):
        window.take(1)

    async def wait_briefly() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await window.wait()

    await asyncio.gather(*(wait_briefly() for _ in range(2000)))
    assert window.waiting == 0  # nothing retained for senders that gave up
    still = asyncio.ensure_future(window.wait())
    await asyncio.sleep(0)
    assert window.waiting == 1
    window.release(1)  # 3 = 4 - 4 // 4 in flight: the one still waiting resumes
    async with asyncio.timeout(5):
        await still
    assert window.waiting == 0


async def test_a_cancelled_waiter_does_not_hold_back_the_others() -> None:
    window = Window(4)
    for _ in range(4):
        window.take(1)
    first = asyncio.ensure_future(window.wait())
    second = asyncio.ensure_future(window.wait())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    assert window.waiting == 1
    window.release(1)
    async with asyncio.timeout(5):
        await second
    assert first.cancelled()
