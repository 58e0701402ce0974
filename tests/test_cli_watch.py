"""The `--watch` loop the `workers` and `queues` commands share, without a broker."""

from __future__ import annotations

import asyncio
import io
import os
import signal

import pytest
from rich.console import Console
from rich.table import Table

import aio_workq
from aio_workq import WorkerBeat, WorkerPresence
from aio_workq.cli._options import print_table
from aio_workq.cli._watch import Ticker, live_refresh
from aio_workq.cli._workers_cmd import _table as _workers_table

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


def test_a_table_narrower_than_its_values_prints_them_whole() -> None:
    # A pipe counts as 80 columns: rich folded a pid into `175` over `90` and cut a time to
    # `2026-12-06T…`; the table now prints at its own width and the terminal wraps the lines.
    beat = WorkerBeat(
        id="worker-host-17590", host="worker-host.example.internal", pid=17590,
        queues=("images", "thumbnails-priority"), concurrency=64, in_flight=12,
        handled=1_234_567, failed=89, started_at=100.0, sent_at=9_000.0,
        version=aio_workq.__version__, interval=5.0, stopping=False,
    )  # fmt: skip
    table = _workers_table([WorkerPresence(beat, True, 9_000.0)], "workers", None)
    times = Table()
    for column in ("schedule", "spec", "queue", "next (UTC)", "next (local)", "last (UTC)"):
        times.add_column(column)
    stamp = "2026-12-06T10:29:31+00:00"
    times.add_row("nightly-report", "0 3 * * *", "reports", stamp, stamp, stamp)
    cases = ((table, (beat.host, "17590", "thumbnails-priority", "1,234,567")), (times, (stamp,)))
    for made, values in cases:
        out = io.StringIO()
        print_table(made, Console(file=out, width=80))
        for value in values:
            assert any(value in line for line in out.getvalue().splitlines()), out.getvalue()
