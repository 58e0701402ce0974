"""The `--watch` loop the `workers` and `queues` commands share, without a broker."""

from __future__ import annotations

import asyncio
import io
import os
import signal

import pytest
from rich.console import Console

from aio_workq.cli._watch import Ticker, live_refresh

pytestmark = pytest.mark.cli


async def test_a_signal_ends_the_pause_at_once_and_the_handlers_go_with_the_block() -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10), Ticker(interval=60) as ticker:
        assert not ticker.stopped
        loop.call_soon(os.kill, os.getpid(), signal.SIGTERM)
        assert await ticker.pause() is False  # long before the 60 s
        assert ticker.stopped
        assert await ticker.pause() is False
    assert loop.remove_signal_handler(signal.SIGINT) is False  # none left behind
    assert loop.remove_signal_handler(signal.SIGTERM) is False


async def test_live_refresh_shows_a_frame_a_tick_until_a_signal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(
        "aio_workq.cli._watch.Console", lambda: Console(file=out, width=40, force_terminal=False)
    )
    frames: list[int] = []

    async def frame(console: Console) -> str:
        frames.append(console.width)
        if len(frames) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return f"frame {len(frames)}"

    async with asyncio.timeout(10), Ticker(interval=0.01) as ticker:
        await live_refresh(ticker, frame, first="starting")
    assert frames == [40, 40, 40]
    assert out.getvalue().strip() == "frame 3"  # off a terminal, Live prints the last frame
