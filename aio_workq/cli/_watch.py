"""The loop of a `--watch`: a refresh every so often until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from types import TracebackType

from rich.console import Console, RenderableType
from rich.live import Live

__all__ = ("Ticker", "live_refresh")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Ticker:
    """Paces a `--watch` loop: `pause()` waits `interval` seconds, cut short by SIGINT or
    SIGTERM, which stop the loop (the command then exits 0).

    Use it as `async with Ticker(interval=...) as ticker:`: the signal handlers are the
    ticker's while the block runs.
    """

    def __init__(self, *, interval: float) -> None:
        self._interval = interval
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stopped(self) -> bool:
        """True once a signal came."""
        return self._stop.is_set()

    async def __aenter__(self) -> Ticker:
        self._loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            self._loop.add_signal_handler(sig, self._stop.set)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None:
            for sig in _SIGNALS:
                self._loop.remove_signal_handler(sig)
            self._loop = None

    async def pause(self) -> bool:
        """Wait the interval, or less if a signal comes.

        Returns:
            True to refresh again, False once a signal came.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._interval):
                await self._stop.wait()
        return not self._stop.is_set()


async def live_refresh(
    ticker: Ticker,
    frame: Callable[[Console], Awaitable[RenderableType]],
    *,
    first: RenderableType | None = None,
) -> None:
    """Show `first` (else a `frame`) in place on the terminal, then a new `frame` at each tick
    until the ticker stops."""
    console = Console()
    shown = first if first is not None else await frame(console)
    with Live(shown, console=console, auto_refresh=False) as live:
        while await ticker.pause():
            live.update(await frame(console), refresh=True)
